#!/usr/bin/env bash
# Create .venv in the checkout and install cfgd with its test extras. Safe to rerun:
# it reinstalls only when pyproject.toml or the torch spec changed.
#   CFGD_TORCH   torch requirement (default torch==2.13.0, the CPU wheel); e.g.
#                CFGD_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#   CFGD_EXTRAS  optional dependency groups (default: test,bench: the tests compare DPM-Solver++
#                with diffusers, and the benchmarks use it too)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${CFGD_TORCH:-torch==2.13.0}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.cfgd-installed"
EXTRAS="${CFGD_EXTRAS:-test,bench}"
want="$(sha256sum pyproject.toml | cut -c1-16) $TORCH_SPEC [$EXTRAS]"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q $TORCH_SPEC
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi
