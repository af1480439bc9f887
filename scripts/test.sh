#!/usr/bin/env bash
# The whole test suite, set-up included. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
export PATH="$PWD/.venv/bin:$PATH"
start=$(date +%s.%N)
ruff check src tests benchmarks
ruff format --check src tests benchmarks
mypy
lint-imports
# The tests' own time is pytest's last line; nothing is printed after it.
echo "test.sh: checks (ruff, mypy, lint-imports) took $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f s", b - a }')"
# pytest exits 5 when it collects no tests: that is a failure here, never a silent pass.
set +e
python -m pytest "$@"
code=$?
set -e
if [[ $code -eq 5 ]]; then
  echo "test.sh: pytest collected no tests" >&2
  exit 1
fi
exit $code
