"""The endpoint gate: every source's `host:port` passes here, and junk is refused with a reason."""

from __future__ import annotations

import ipaddress
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.endpoint import (
    DEFAULT_RPC_PORT,
    PLACEHOLDER_HOSTS,
    Endpoint,
    EndpointError,
    parse_endpoint,
    parse_endpoint_list,
)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:50052", "127.0.0.1", 50052),
        ("10.1.2.3:1", "10.1.2.3", 1),
        ("192.168.1.20:65535", "192.168.1.20", 65535),
        ("[::1]:50052", "::1", 50052),
        ("[fe80::1]:50053", "fe80::1", 50053),
        ("[2001:DB8:0:0:0:0:0:1]:8", "2001:db8::1", 8),  # canonical (compressed, lower) form
        ("[::ffff:10.0.0.1]:9", "10.0.0.1", 9),  # IPv4-mapped: one address, its IPv4 form
        ("gpu-node-1:50052", "gpu-node-1", 50052),
        ("GPU-Node-1.LAN:50052", "gpu-node-1.lan", 50052),  # names are case-insensitive
        ("node.example.org.:7", "node.example.org", 7),  # a trailing root dot is the same name
        ("localhost:50052", "localhost", 50052),
        ("xn--bcher-kva.example:5", "xn--bcher-kva.example", 5),
        ("a:00080", "a", 80),
    ],
)
def test_valid_endpoints(text: str, host: str, port: int) -> None:
    ep = parse_endpoint(text)
    assert ep == Endpoint(host, port)
    assert parse_endpoint(str(ep)) == ep


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("gpu1:0", "port 0 is a placeholder"),
        ("coordinator:0", "placeholder host"),
        ("coordinator:50052", "placeholder host"),
        ("localhost:0", "port 0 is a placeholder"),
        ("none:50052", "placeholder host"),
        ("CHANGEME:1", "placeholder host"),
        ("host.example:65536", "port out of range 1-65535"),
        ("h1:99999999999", "port out of range 1-65535"),
        ("h1:-1", "port is not a number"),
        ("h1:+1", "port is not a number"),
        ("h1:5e3", "port is not a number"),
        ("h1:٣", "port is not a number"),  # a digit, but not an ASCII one
        ("h1:", "missing port"),
        ("h1", "missing ':port'"),
        (":50052", "empty host"),
        ("", "empty endpoint"),
        ("   ", "empty endpoint"),
        ("h1 :50052", "whitespace inside endpoint"),
        ("h1:50052 ", "whitespace inside endpoint"),
        ("h1:50\t052", "whitespace inside endpoint"),
        ("h_1:50052", "not a valid host name"),
        ("-h1:50052", "not a valid host name"),
        ("h..example:50052", "not a valid host name"),
        ("bücher:50052", "not a valid host name"),
        ("h1\x00:50052", "not a valid host name"),
        ("h1/x:50052", "not a valid host name"),
        ("http://h1:50052", "more than one ':'"),
        ("h1:50052:1", "more than one ':'"),
        ("::1", "IPv6 addresses need brackets"),
        ("fe80::1:50052", "IPv6 addresses need brackets"),
        ("[::1]", "expected ':port' after ']'"),
        ("[::1]50052", "expected ':port' after ']'"),
        ("[::1:50052", "unclosed '['"),
        ("[127.0.0.1]:50052", "not an IPv6 address inside brackets"),
        ("[junk]:50052", "not an IPv6 address inside brackets"),
        ("0.0.0.0:50052", "unspecified address"),
        ("[::]:50052", "unspecified address"),
        ("224.0.0.251:5353", "multicast"),
        ("[ff02::1]:50052", "multicast"),
        ("255.255.255.255:50052", "broadcast"),
        # IPv4-mapped IPv6 is its IPv4 address: the IPv4 rules apply to it, no way around them.
        ("[::ffff:0.0.0.0]:50052", "unspecified address"),
        ("[::ffff:255.255.255.255]:50052", "broadcast"),
        ("[::ffff:224.0.0.1]:50052", "multicast"),
        ("[fe80::1%eth0]:50052", "zone id"),
        ("300.1.2.3:50052", "looks like an IP address but is not a valid one"),
        ("127.1:50052", "looks like an IP address but is not a valid one"),
        ("010.0.0.1:50052", "looks like an IP address but is not a valid one"),
        ("a" * 300 + ":1", "endpoint too long"),
        ("a" * 64 + ".example:1", "not a valid host name"),
    ],
)
def test_invalid_endpoints_say_what(text: str, reason: str) -> None:
    with pytest.raises(EndpointError) as info:
        parse_endpoint(text)
    assert reason in str(info.value)


def test_message_says_where_and_quotes_the_input() -> None:
    with pytest.raises(EndpointError) as info:
        parse_endpoint("coordinator:0", where="/etc/corral/rpc_backends.conf:3")
    message = str(info.value)
    assert message.startswith("/etc/corral/rpc_backends.conf:3: ")
    assert message.endswith("'coordinator:0'")


def test_error_is_a_value_error() -> None:
    # Callers that only know ValueError (typer, argparse) still get a clean message.
    with pytest.raises(ValueError, match="port 0"):
        parse_endpoint("h:0")


def test_non_string_is_refused() -> None:
    with pytest.raises(EndpointError, match="must be a string"):
        parse_endpoint(50052)  # type: ignore[arg-type]


def test_default_port_only_when_asked() -> None:
    assert parse_endpoint("gpu1", default_port=DEFAULT_RPC_PORT) == Endpoint("gpu1", 50052)
    assert parse_endpoint("[::1]", default_port=7) == Endpoint("::1", 7)
    assert parse_endpoint("gpu1:9", default_port=7) == Endpoint("gpu1", 9)
    with pytest.raises(EndpointError, match="missing ':port'"):
        parse_endpoint("gpu1")


def test_str_brackets_ipv6_only() -> None:
    assert str(Endpoint("::1", 5)) == "[::1]:5"
    assert str(Endpoint("10.0.0.1", 5)) == "10.0.0.1:5"
    assert str(Endpoint("gpu1", 5)) == "gpu1:5"


def test_is_ip() -> None:
    assert Endpoint("10.0.0.1", 1).is_ip
    assert Endpoint("::1", 1).is_ip
    assert not Endpoint("localhost", 1).is_ip


def test_endpoints_are_values() -> None:
    a, b = parse_endpoint("10.0.0.1:5"), parse_endpoint("10.0.0.1:5")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert sorted([Endpoint("b", 1), Endpoint("a", 2), Endpoint("a", 1)]) == [
        Endpoint("a", 1),
        Endpoint("a", 2),
        Endpoint("b", 1),
    ]


def test_list_keeps_good_items_and_reports_each_bad_one_with_its_place() -> None:
    good, errors = parse_endpoint_list(
        "10.0.0.1:50052, coordinator:0,[::1]:50053,,gpu2:0", where="llama-server pid 7 --rpc"
    )
    assert good == [Endpoint("10.0.0.1", 50052), Endpoint("::1", 50053)]
    assert len(errors) == 3
    assert errors[0].startswith("llama-server pid 7 --rpc item 2: placeholder host")
    assert errors[1].startswith("llama-server pid 7 --rpc item 4: empty endpoint")
    assert errors[2].startswith("llama-server pid 7 --rpc item 5: port 0")


def test_list_without_where_still_numbers_items() -> None:
    good, errors = parse_endpoint_list("a:1,b:0")
    assert good == [Endpoint("a", 1)]
    assert errors == ["item 2: port 0 is a placeholder, not a listening port: 'b:0'"]


# --- properties -------------------------------------------------------------------------------

ports = st.integers(1, 65535)
label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")
host_names = (
    st.lists(label, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda n: not n.split(".")[-1].isdigit())
    .filter(lambda n: n not in PLACEHOLDER_HOSTS)
)
ipv4 = st.ip_addresses(v=4).filter(
    lambda a: not (a.is_unspecified or a.is_multicast or str(a) == "255.255.255.255")
)


# IPv4-mapped ones are their IPv4 address (test_no_ipv4_rule_can_be_passed_by_another_spelling).
def _plain_ipv6(a: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    assert isinstance(a, ipaddress.IPv6Address)
    return not (a.is_unspecified or a.is_multicast or a.ipv4_mapped is not None)


ipv6 = st.ip_addresses(v=6).filter(_plain_ipv6)


@settings(max_examples=200, deadline=None)
@given(host=st.one_of(ipv4.map(str), ipv6.map(str), host_names), port=ports)
def test_round_trip(host: str, port: int) -> None:
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    ep = parse_endpoint(text)
    assert ep.port == port
    if ep.is_ip:
        assert ipaddress.ip_address(ep.host) == ipaddress.ip_address(host)
    else:
        assert ep.host == host
    assert parse_endpoint(str(ep)) == ep


@settings(max_examples=200, deadline=None)
@given(port=st.one_of(st.integers(max_value=0), st.integers(min_value=65536)))
def test_any_port_out_of_range_is_refused(port: int) -> None:
    with pytest.raises(EndpointError):
        parse_endpoint(f"gpu1:{port}")


endpointish = st.text(alphabet=string.printable + "[]:.٣é\x00\u00a0", max_size=40)


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.text(max_size=40), endpointish))
def test_anything_either_parses_to_a_sane_endpoint_or_is_refused_cleanly(text: str) -> None:
    try:
        ep = parse_endpoint(text)
    except EndpointError as exc:
        assert str(exc)  # a reason, never an empty message
        return
    assert 1 <= ep.port <= 65535
    assert ep.host and ep.host.isascii()
    assert not any(ch.isspace() for ch in ep.host)
    assert parse_endpoint(str(ep)) == ep


@settings(max_examples=100, deadline=None)
@given(items=st.lists(st.one_of(endpointish, host_names.map(lambda h: h + ":1")), max_size=6))
def test_list_partitions_every_item(items: list[str]) -> None:
    text = ",".join(items)
    good, errors = parse_endpoint_list(text)
    assert len(good) + len(errors) == len(text.split(","))


def _spellings(addr: ipaddress.IPv4Address) -> list[str]:
    """One IPv4 address in every form the gate might meet it."""
    hi, lo = int(addr) >> 16, int(addr) & 0xFFFF
    return [
        str(addr),
        f"[::ffff:{addr}]",
        f"[::FFFF:{addr}]",
        f"[::ffff:{hi:x}:{lo:x}]",
        f"[0:0:0:0:0:ffff:{hi:04x}:{lo:04x}]",
        f"[0000:0000:0000:0000:0000:FFFF:{addr}]",
    ]


@given(
    st.one_of(
        st.ip_addresses(v=4),
        st.sampled_from(
            [ipaddress.IPv4Address(a) for a in ("0.0.0.0", "255.255.255.255", "224.0.0.1")]
        ),
    ),
    st.integers(1, 65535),
)
def test_no_ipv4_rule_can_be_passed_by_another_spelling(
    addr: ipaddress.IPv4Address, port: int
) -> None:
    outcomes = set()
    for text in _spellings(addr):
        try:
            outcomes.add(str(parse_endpoint(f"{text}:{port}")))
        except EndpointError as exc:
            outcomes.add(str(exc).split(":")[0])  # the rule, without the spelling quoted
    assert len(outcomes) == 1, outcomes
