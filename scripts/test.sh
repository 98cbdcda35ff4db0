#!/usr/bin/env bash
# The test suite: installs what it needs, then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_DISABLE_USAGE_STATS=1
exec .venv/bin/python -m pytest -q --durations=10 "$@"
