"""What tests import: helpers and stand-ins, no tests (fixtures live in tests/conftest.py).

- clock.py: FakeClock, a clock the test moves by hand, for code taking `clock=`.
- waiting.py: until() (bounded wait for a condition) and holds_for() (it stays true).
- loopback.py: a fresh 127.x address per test, and free ports.
- rpc_backends.py: StartRpc (the rpc_server fixture's type) and wait_status().
- fake_servers.py: misbehaving TCP servers for the probe's faults, and the replies they send.
- llama_server.py: a real llama-server over given RPC backends, stopped on every exit path.
- redis_server.py: a real redis-server on loopback that a test can stop and start again.
- records.py: one sample of each record the store holds.
- coordinator.py: the real coordinator as a task (ObservedRunner), and chat/stream/health.
- dashboard.py: the real dashboard app on a socket, a probe loop, a llama-server controller.
- guarded.py: the app with any create_app option on a socket, raw HTTP exchanges, a /v1 stand-in.
- sources.py: ListedSource, a discovery source that sees what the test lists.
- corral_cli.py: the `corral` console script as a subprocess, and its --json contract.
- state_files.py: what damages a state file in use, and another process holding one open.
- netns.py: an isolated two-namespace LAN, and the helper processes run inside it.
- schemathesis_hooks.py: the endpoint strategy schemathesis loads (SCHEMATHESIS_HOOKS).
"""
