#!/usr/bin/env bash
# The benchmark suite: sampling (floor, platform with DDIM and DPM-Solver++, naive CFG,
# diffusers DDIM and DPM-Solver++, guidance interval, every solver × guidance rule,
# scaling, memory) then training (plain loop, Ray Train 1 and 2 workers, Ray Data rate).
# ≈ 13 min on a 2-core CPU. Prints the tables and saves them under outputs/bench/.
#   bash scripts/bench.sh              # sampling + training
#   bash scripts/bench.sh --serve      # also Serve over HTTP (≈ 3 min more)
# Uses the demo checkpoint (outputs/runs/fashion_mnist_demo) when it exists, else an
# untrained network of the same size (same cost); prepares the Fashion-MNIST shards
# for the training rows if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_DISABLE_USAGE_STATS=1
PY=.venv/bin/python
out="outputs/bench/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
ck=()
[ -d outputs/runs/fashion_mnist_demo ] && ck=(--checkpoint outputs/runs/fashion_mnist_demo)
{
  echo "machine: $(uname -m), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; fi
} | tee "$out/machine.txt"
start=$(date +%s)
$PY bench/bench_sampling.py "${ck[@]}" 2>&1 | tee "$out/sampling.txt"
# Shards for the training rows (kept if they exist and read back fine).
$PY jobs/prepare_data.py --config jobs/configs/fashion_mnist.yaml > "$out/prepare_data.log" 2>&1
echo "training benchmark (≈ 6 min; Ray's log goes to $out/training.log)"
$PY bench/bench_training.py > "$out/training.log" 2>&1 || { tail -40 "$out/training.log"; exit 1; }
sed -n '/^small UNet/,$p' "$out/training.log" | tee "$out/training.txt"
if [ "${1:-}" = "--serve" ]; then
  $PY bench/bench_serve.py "${ck[@]}" --duration 15 --steps 10 2>&1 | tee "$out/serve.txt"
fi
echo "benchmarks finished in $(( $(date +%s) - start )) s; tables in $out/"
