"""The node agent: runs beside ggml-rpc-server on each backend machine."""
