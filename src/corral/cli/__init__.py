"""The `corral` command line: the only place that imports typer and rich.

`corral.cli.app` builds the typer app; each command group lives in its own module and imports
what it needs (FastAPI, Redis, zeroconf...) only inside the command, when it runs, so that
`corral --help`, `corral probe` and `corral discover` start fast. Nothing is imported here.
"""
