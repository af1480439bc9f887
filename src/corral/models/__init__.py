"""Models: what `--model` names and how it becomes a local GGUF file (reference, fetch, ...),
and what a model needs. Below coordinator/plane/cli; imports none of them."""
