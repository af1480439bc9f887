#!/usr/bin/env bash
# Shared set-up for the README's two commands: a venv with Corral, the system packages the
# tests use, and the llama.cpp binaries (built once, cached by version outside the repo).
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests="${1:-}"

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v g++ >/dev/null || need_apt+=(g++)
# Debian splits venv/ensurepip out of python3.
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
if [[ "$want_tests" == "--tests" ]]; then
  command -v redis-server >/dev/null || need_apt+=(redis-server)
  command -v chromium >/dev/null || need_apt+=(chromium)
  command -v ip >/dev/null || need_apt+=(iproute2)
fi
if (( ${#need_apt[@]} )); then
  echo "setup: installing system packages: ${need_apt[*]}"
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}"
  else
    sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}"
  fi
fi

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
extras=""
[[ "$want_tests" == "--tests" ]] && extras="[dev]"
.venv/bin/python -m pip install -q -e ".${extras}"

# Builds ggml-rpc-server and llama-server on first use (minutes), then reuses the cache.
.venv/bin/corral llama install >/dev/null
echo "setup: llama.cpp binaries in $(.venv/bin/corral llama bin-dir)"
