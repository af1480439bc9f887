"""Keep a llama-server coordinator running across the healthy RPC backends.

policy.py      what to do next, as a pure function of what was observed (unit-tested)
runner.py      the loop: observe, decide, act (all the I/O)
process.py     the llama-server supervised: one we start, or one we adopt
links.py       is a held backend still there? read from llama-server's own sockets
candidates.py  backends not held, probed fresh (command line, store, node registrations)
health.py      llama-server over HTTP: /health, /metrics (in flight, progress), /slots
publish.py     events and the CoordinatorRecord in the store; lines for the user
pidfile.py     one `coordinator run` per port; `coordinator stop` finds it here
commands.py    `corral coordinator run|status|stop`
"""
