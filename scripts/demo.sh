#!/usr/bin/env bash
# The main job: set up, then run the demo (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/corral demo "$@"
