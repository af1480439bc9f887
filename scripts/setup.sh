#!/usr/bin/env bash
# Shared set-up for the README's two commands: a venv with Corral, the system packages each one
# needs, and the llama.cpp binaries (built once, cached by version outside the repo).
#   bash scripts/setup.sh           the main job (demo): build tools, Corral, llama.cpp
#   bash scripts/setup.sh --tests   the test suite: also redis-server, chromium, iproute2, systemd and the
#                                   dev tools (pytest, ruff, mypy, playwright, build, ...)
# Each phase installs only what is missing, so on a machine already set up it only checks; the
# time of each phase is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests="${1:-}"

timings=()
now() { date +%s.%N; }
phase_done() {  # NAME START: remember how long the phase took
  timings+=("$1 $(awk -v a="$2" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }')")
}

# --- system packages -----------------------------------------------------------------------
start=$(now)
need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v make >/dev/null || need_apt+=(make)  # cmake's generator; only a Recommends of cmake
command -v g++ >/dev/null || need_apt+=(g++)
# Debian splits venv/ensurepip out of python3.
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
if [[ "$want_tests" == "--tests" ]]; then
  command -v redis-server >/dev/null || need_apt+=(redis-server)
  command -v chromium >/dev/null || need_apt+=(chromium)
  command -v ip >/dev/null || need_apt+=(iproute2)
  # systemd-analyze checks the units `corral service` writes (tests/test_service.py).
  command -v systemd-analyze >/dev/null || need_apt+=(systemd)
fi
if (( ${#need_apt[@]} )); then
  echo "setup: installing system packages: ${need_apt[*]}"
  sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  # Recommends are left out: for chromium they are ~90 desktop packages (printing, avahi, perl
  # modules) that a headless browser never uses.
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi
phase_done "system packages" "$start"

# --- Python packages -----------------------------------------------------------------------
start=$(now)
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
extras=""
[[ "$want_tests" == "--tests" ]] && extras="[dev]"
# The editable install follows the sources by itself; only pyproject.toml (dependencies, entry
# points) or the extras asked for can make it stale, so their digest says when to run pip again.
# A test set-up (dev extras) covers the main job's.
digest() { { cat pyproject.toml; echo "$1"; .venv/bin/python -V; } | sha256sum | cut -d' ' -f1; }
stamp() { echo ".venv/corral-setup${1:+-dev}.sha256"; }
covering=("[dev]")
[[ -z "$extras" ]] && covering+=("")
current=false
for c in "${covering[@]}"; do
  if [[ "$(cat "$(stamp "$c")" 2>/dev/null)" == "$(digest "$c")" ]]; then current=true; fi
done
if [[ ! -x .venv/bin/corral ]] || ! $current; then
  .venv/bin/python -m pip install -q -e ".${extras}"
  digest "$extras" >"$(stamp "$extras")"
fi
phase_done "Python packages" "$start"

# --- llama.cpp -----------------------------------------------------------------------------
start=$(now)
# Builds ggml-rpc-server and llama-server on first use (minutes), then reuses the cache.
bin_dir=$(.venv/bin/corral llama install)
phase_done "llama.cpp" "$start"
echo "setup: llama.cpp binaries in $bin_dir"

joined=$(printf '%s, ' "${timings[@]}")
echo "setup: took ${joined%, }"
