"""What verified checkpoint uploads cost: cfgd.io.artifact.persist against Ray Train's default.

    .venv/bin/python bench/bench_checkpoint_upload.py --checkpoint outputs/runs/fashion_mnist_demo

Uploads one checkpoint directory (default: the demo run's newest) --repeats times with
each method, interleaved, to a local directory and to a SeaweedFS S3 server started here
on 127.0.0.1 (tests/s3server.py), and prints the median milliseconds:

  copy_files   pyarrow.fs.copy_files, as Ray Train uploads (use_threads=False on S3,
               64 MiB chunks): returns normally when an upload fails
  persist      cfgd.io.artifact.persist: each file through an explicitly closed stream,
               its stored size checked, meta.json last (what cfgd.train.worker_checkpoints reports with)
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from cfgd.io import artifact, storage  # noqa: E402
from cfgd.io.checkpoint import resolve_checkpoint  # noqa: E402
from s3server import S3Server  # noqa: E402


def copy_files(src: str, fs: pafs.FileSystem, dest: str) -> None:
    fs.create_dir(dest, recursive=True)
    kw = {"use_threads": False} if isinstance(fs, pafs.S3FileSystem) else {}
    pafs.copy_files(src, dest, destination_filesystem=fs, chunk_size=64 << 20, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="outputs/runs/fashion_mnist_demo")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    src = resolve_checkpoint(args.checkpoint)
    size = sum(p.stat().st_size for p in Path(src).iterdir() if p.is_file())
    print(f"checkpoint {src}: {len(list(Path(src).iterdir()))} files, {size / 2**20:.1f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        server = S3Server(Path(tmp) / "s3").start()
        try:
            server.make_bucket("bench")
            targets = {"local": (pafs.LocalFileSystem(), f"{tmp}/local"),
                       "s3": (storage.arrow_fs("s3://bench", server.storage_options()), "bench/ck")}
            methods = {"copy_files": copy_files, "persist": artifact.persist}
            times = {(t, m): [] for t in targets for m in methods}
            for i in range(args.repeats):
                for t, (fs, base) in targets.items():
                    for m, fn in methods.items():
                        t0 = time.perf_counter()
                        fn(str(src), fs, f"{base}/{m}-{i}")
                        times[t, m].append(1000 * (time.perf_counter() - t0))
        finally:
            server.stop()
            shutil.rmtree(Path(tmp) / "s3", ignore_errors=True)
    print(f"{'target':8} {'method':12} {'median ms':>10}")
    for (t, m), v in times.items():
        print(f"{t:8} {m:12} {statistics.median(v):10.1f}")
    for t in targets:
        a, b = statistics.median(times[t, "persist"]), statistics.median(times[t, "copy_files"])
        print(f"{t}: persist / copy_files = {a / b:.2f} ({a - b:+.1f} ms per checkpoint)")


if __name__ == "__main__":
    main()
