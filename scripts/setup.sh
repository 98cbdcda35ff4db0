#!/usr/bin/env bash
# Create .venv in the checkout and install cfgd with its test extras. Safe to rerun:
# it reinstalls only when pyproject.toml or the torch spec changed.
#   CFGD_TORCH   torch requirement (default torch==2.13.0, the CPU wheel); e.g.
#                CFGD_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#   CFGD_EXTRAS  optional dependency groups (default: test,bench,fid,docs: the tests compare DPM-Solver++
#                with diffusers, and the benchmarks use it too; fid is torch-fidelity's InceptionV3; docs
#                builds the documentation site, which the suite checks)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${CFGD_TORCH:-torch==2.13.0}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.cfgd-installed"
EXTRAS="${CFGD_EXTRAS:-test,bench,fid,docs}"
# Extras installed without their dependencies: torch-fidelity declares torchvision, which pip
# would satisfy with another torch (a multi-GB CUDA build); cfgd imports only its torch-only module.
NO_DEPS_EXTRAS="fid"
want="$(sha256sum pyproject.toml | cut -c1-16) $TORCH_SPEC [$EXTRAS]"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q $TORCH_SPEC
  with_deps=() no_deps=()
  IFS=',' read -ra wanted <<< "$EXTRAS"
  for x in "${wanted[@]}"; do
    if [[ ",$NO_DEPS_EXTRAS," == *",$x,"* ]]; then no_deps+=("$x"); else with_deps+=("$x"); fi
  done
  extras="$(IFS=','; echo "${with_deps[*]}")"
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
  for x in "${no_deps[@]}"; do
    # The extra's requirements, as pyproject.toml pins them (one source for the versions).
    mapfile -t reqs < <(.venv/bin/python - "$x" <<'PY'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"][sys.argv[1]]))
PY
)
    .venv/bin/python -m pip install -q --no-deps "${reqs[@]}"
  done
  echo "$want" > "$stamp"
fi
