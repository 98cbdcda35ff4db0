"""Fault injection for Ray Train runs: a wrapped worker loop that dies at a chosen moment."""

from __future__ import annotations

from pathlib import Path


def crash_after_commit(step: int, marker: Path, corrupt: bool = False):
    """A ``train_loop_per_worker`` that, the first time rank 0 reports a checkpoint at
    ``step``, commits it into the run directory the way Ray Train's upload does (complete,
    on the run's own filesystem) and then SIGKILLs itself before ``ray.train.report`` is
    called: the checkpoint is on storage, but Ray's controller never records it.
    ``corrupt`` truncates a weight file of that copy (an upload cut short).
    ``marker`` (a local file) says it already happened, so restarted workers run normally.
    """

    def loop(loop_config):
        import os
        import signal

        import pyarrow.fs as pafs
        import ray.train

        from cfgd.train.worker import train_loop_per_worker

        real_report = ray.train.report

        def report(metrics, checkpoint=None, **kwargs):
            if checkpoint is not None and metrics.get("step") == step and not marker.exists():
                store = ray.train.get_context().get_storage()
                fs, dest = store.storage_filesystem, f"{store.experiment_fs_path}/checkpoint_unrecorded_{step}"
                if corrupt:
                    weights = Path(checkpoint.path) / "ema.safetensors"
                    weights.write_bytes(weights.read_bytes()[:-64])
                fs.create_dir(dest)
                pafs.copy_files(checkpoint.path, dest, source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=fs)
                marker.write_text(dest)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_report(metrics, checkpoint=checkpoint, **kwargs)

        ray.train.report = report
        train_loop_per_worker(loop_config)

    return loop
