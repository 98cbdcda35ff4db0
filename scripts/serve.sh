#!/usr/bin/env bash
# `serve run serve/config.yaml` from the repository root, where Ray imports `serve.app`
# from and resolves the config's relative paths. Extra arguments go to `serve run`.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_DISABLE_USAGE_STATS=1
exec .venv/bin/serve run serve/config.yaml "$@"
