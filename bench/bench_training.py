"""Training benchmark: Ray Train against a plain PyTorch loop, and the data pipeline's rate.

    .venv/bin/python bench/bench_training.py                  # shards from the demo (prepare_data first)
    .venv/bin/python bench/bench_training.py --steps 60 --batch 64 --data outputs/data/fashion_mnist

Same network (the demo's `small` UNet), same global batch:

  plain       a plain PyTorch loop in this process, batches already decoded in memory
  ray-1       cfgd.train.worker (train_loop_per_worker under Ray Train), 1 worker
  ray-2       the same with 2 workers (DDP over gloo)
  data        Ray Data read + PNG decode of the train shards alone (rows/s)

Ray Train throughput is measured inside the workers from their 3rd step on (reported
with the final checkpoint), so the fixed start-up cost of a run (~40–60 s here) is not
counted; it is printed separately. Peak resident memory is per worker process.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
import torch

from cfgd.config import load_config
from cfgd.data.images import decode_png, uint8_to_model
from cfgd.data.shards import read_split_meta
from cfgd.diffusion.process import drop_labels, make_schedule, training_loss
from cfgd.model.unet import ModelSpec, build_model
from cfgd.rayenv import init_ray
from cfgd.spec import null_label
from cfgd.train.input_pipeline import read_dataset
from cfgd.train.trainer import fit


def plain_loop(data: str, steps: int, batch: int, threads: int) -> float:
    """Samples/s of the same training step in one process, data decoded up front."""
    import pyarrow.parquet as pq

    meta = read_split_meta(data, "train")
    table = pq.read_table(meta.files[0], columns=["image", "label"]).slice(0, batch * 8)
    x = uint8_to_model(np.stack([decode_png(b) for b in table.column("image").to_pylist()])).contiguous()
    y = torch.tensor(table.column("label").to_numpy())
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(ModelSpec("small", meta.height, meta.channels, meta.num_classes))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule, null, g = make_schedule("cosine", 1000), null_label(meta.num_classes), torch.Generator()
    t0 = None
    for step in range(steps):
        if step == 2:
            t0 = time.perf_counter()
        i = (step % 8) * batch
        loss = training_loss(model, schedule, x[i:i + batch], drop_labels(y[i:i + batch], 0.1, null, g), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return (steps - 2) * batch / (time.perf_counter() - t0)


def ray_train(data: str, steps: int, batch: int, workers: int, runs: str) -> tuple[float, float, float, float]:
    """(samples/s, peak RSS MiB of rank 0, start-up s, fraction of steady time rank 0 waited on data)."""
    cfg = load_config("jobs/configs/fashion_mnist.yaml", [
        f"data.root={data}", f"train.storage_path={runs}", f"train.run_name=bench_{workers}",
        f"train.num_workers={workers}", f"train.steps={steps}", f"train.checkpoint_every={steps}",
        f"train.batch_size={batch}", f"train.log_every={steps}", "train.num_cpus=2",
        f"train.cpus_per_worker={0.5 if workers > 1 else 1.0}", f"train.threads_per_worker={2 // workers}"])
    t0 = time.perf_counter()
    metrics = fit(cfg).metrics
    wall = time.perf_counter() - t0
    return (metrics["samples_per_s"], metrics["peak_rss_mib"], wall - steps * batch / metrics["samples_per_s"],
            metrics["data_wait_frac"])


def data_rate(data: str, batch: int) -> float:
    meta = read_split_meta(data, "train")
    ds = read_dataset(data, "train", meta)
    t0, rows = time.perf_counter(), 0
    for b in ds.iter_torch_batches(batch_size=batch):
        rows += len(b["label"])
    return rows / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="outputs/data/fashion_mnist")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()

    plain = plain_loop(args.data, args.steps, args.batch, threads=2)
    plain_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    init_ray(num_cpus=2, dashboard=True)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    rate = data_rate(args.data, args.batch)
    with tempfile.TemporaryDirectory() as runs:
        r1, rss1, start1, wait1 = ray_train(args.data, args.steps, args.batch, 1, runs)
        r2, rss2, start2, wait2 = ray_train(args.data, args.steps, args.batch, 2, runs)
    print(f"\nsmall UNet, global batch {args.batch}, {args.steps} steps, 2 cores\n")
    print(f"{'variant':<8} {'samples/s':>10} {'peak RSS MiB':>13} {'start-up s':>11} {'data wait':>10}")
    print(f"{'plain':<8} {plain:10.1f} {plain_rss:13.0f} {'-':>11} {'-':>10}")
    print(f"{'ray-1':<8} {r1:10.1f} {rss1:13.0f} {start1:11.0f} {wait1:10.1%}")
    print(f"{'ray-2':<8} {r2:10.1f} {rss2:13.0f} {start2:11.0f} {wait2:10.1%}")
    print(f"{'data':<8} {rate:10.1f} {'-':>13} {'-':>11}   (rows/s: Ray Data read + decode)")
    print(f"\nray-1 / plain   {r1 / plain:.3f}   (target >= 0.9)")
    print(f"ray-2 / plain   {r2 / plain:.3f}")
    print(f"data / ray-2    {rate / r2:.1f}   (target >= 3: training never waits on data)")


if __name__ == "__main__":
    main()
