#!/usr/bin/env bash
# `serve run serve/config.yaml` for this checkout, wherever it lives: the config's
# runtime_env.working_dir (local:///work/main) is rewritten to this directory.
# Extra arguments go to `serve run`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p outputs
sed "s|local:///work/main|local://$PWD|" serve/config.yaml > outputs/serve-config.yaml
export RAY_DISABLE_USAGE_STATS=1
exec .venv/bin/serve run outputs/serve-config.yaml "$@"
