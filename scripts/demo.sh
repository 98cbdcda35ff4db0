#!/usr/bin/env bash
# The main job end to end on an embedded local Ray and local storage:
# Fashion-MNIST → Parquet shards → Ray Train (2 workers) → checkpoints → guided sample grid.
# Extra key=value arguments are passed to every step (e.g. train.steps=200).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "installing the Debian package dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
export RAY_DISABLE_USAGE_STATS=1
CFG=jobs/configs/fashion_mnist.yaml
.venv/bin/python jobs/prepare_data.py --config $CFG "$@"
.venv/bin/python jobs/train.py --config $CFG "$@"
.venv/bin/python jobs/sample.py --config $CFG sample.checkpoint=outputs/runs/fashion_mnist_demo "$@"
echo "demo finished in $(( $(date +%s) - start )) s"
