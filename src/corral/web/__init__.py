"""The dashboard: HTTP API, live page, Prometheus metrics and /v1 forwarding, from the store.

Build with `web.app.create_app(store, rescan=..., coordinator=..., coordinator_url=...,
token=...)`, run with `await web.server.serve(app, host, port)`. Nothing is imported here, so
that `web.security` (the bind check the command line needs) does not pull in FastAPI.
"""
