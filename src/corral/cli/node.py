"""`corral node`: run beside ggml-rpc-server (the wiring is corral.node.run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from corral.cli.configured import NodeConfigOpt
from corral.cli.console import bad_input, fail
from corral.cli.options import LogFormatName, LogFormatOpt, RedisOpt


def setup_logging(log_format: LogFormatName = "text") -> None:
    """The node is a long-running service: timestamped lines on stderr (its supervisor's log),
    or JSON ones (`--log-format json`)."""
    import logging
    import sys

    if log_format == "json":
        from corral.cli.log_format import use_json

        use_json()
        return
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # replaces the CLI's plain default
    )


def node(
    config: NodeConfigOpt = None,
    host: Annotated[
        str, typer.Option(help="Interface address the backend binds to.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Backend RPC port.")] = 50052,
    attach: Annotated[
        bool, typer.Option(help="Attach to a ggml-rpc-server already running on host:port.")
    ] = False,
    allow_any_address: Annotated[
        bool, typer.Option(help="Allow binding 0.0.0.0 (the protocol has no authentication).")
    ] = False,
    threads: Annotated[int | None, typer.Option(min=1, help="Backend threads (-t).")] = None,
    devices: Annotated[str | None, typer.Option(help="Backend devices (-d DEV1,DEV2).")] = None,
    cache: Annotated[
        bool,
        typer.Option(
            help="Backend tensor cache (-c): weights over 10 MiB kept on disk by hash, so a"
            " reload does not send them again ($LLAMA_CACHE/rpc, else ~/.cache/llama.cpp/rpc)."
        ),
    ] = True,
    heartbeat: Annotated[
        float, typer.Option(min=0.1, max=60, help="Seconds between heartbeats.")
    ] = 2.0,
    mdns: Annotated[bool, typer.Option(help="Announce the backend by mDNS/DNS-SD.")] = True,
    redis: RedisOpt = None,
    register: Annotated[
        str | None, typer.Option(help="Also register over HTTP with a dashboard at this URL.")
    ] = None,
    log_format: LogFormatOpt = "text",
    warm: Annotated[
        Path | None,
        typer.Option(
            help="A model (a file, hf:OWNER/REPO/FILE.gguf or OWNER/REPO:QUANT) to load into the"
            " backend once at start, so its cache holds it: a coordinator's load of it then"
            " sends a hash per large tensor instead of the tensor."
        ),
    ] = None,
) -> None:
    """Run beside ggml-rpc-server: supervise or attach to it, heartbeat, announce."""
    import asyncio
    import os

    from corral.cli.llama import binaries_missing
    from corral.llama.binaries import BinariesNotFound, LlamaBinaries, find_binaries
    from corral.net.notify import Notifier
    from corral.node.run import NodeOptions, NodeOptionsError, check_bind_host, run_node
    from corral.store.errors import StateFileError

    warm_file = None
    if warm is not None:
        from corral.cli.model_ref import fetch_with_bar, model_option

        if not cache:
            bad_input("--warm fills the backend's cache: it needs --cache")
        local, fetch = model_option(warm, "--warm")
        warm_file = local if fetch is None else fetch_with_bar(fetch, "--warm")
    binaries: LlamaBinaries | None = None
    if not attach or warm_file is not None:
        try:
            binaries = find_binaries()
        except BinariesNotFound as exc:
            binaries_missing(exc)
    opts = NodeOptions(
        host=host,
        port=port,
        attach=attach,
        allow_any_address=allow_any_address,
        threads=threads,
        devices=devices,
        cache=cache,
        heartbeat_s=heartbeat,
        mdns=mdns,
        redis_url=redis,
        register_url=register,
        token=os.environ.get("CORRAL_TOKEN"),
        warm=warm_file,
    )
    try:
        check_bind_host(opts.host, opts.allow_any_address)
        setup_logging(log_format)
        # NOTIFY_SOCKET is set when systemd runs it (corral service node)
        code = asyncio.run(run_node(opts, binaries, Notifier.from_environ()))
    except (NodeOptionsError, ValueError) as exc:
        bad_input(str(exc))
    except StateFileError as exc:  # the state file locked or damaged: one line, no traceback
        fail(str(exc))
    raise typer.Exit(code)
