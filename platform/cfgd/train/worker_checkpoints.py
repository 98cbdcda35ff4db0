"""The training worker's checkpoints through Ray Train: reporting, verified upload, resuming.

* :func:`report_checkpoint`: ``ray.train.report`` on every rank, rank 0 attaching the
  checkpoint (written with :func:`cfgd.io.checkpoint.write_checkpoint`);
* :func:`persist_verified`: Ray Train's upload step replaced by a verified one;
* :func:`resume_point`: the checkpoint every rank resumes from, chosen once by rank 0
  (:mod:`cfgd.train.resume`), adopting one Ray Train had not recorded.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from cfgd import config as cfglib
from cfgd.io import artifact
from cfgd.io.checkpoint import Checkpoint, write_checkpoint
from cfgd.train import resume as resumelib
from cfgd.train.progress import log


def evaluated(tc: cfglib.TrainConfig, step: int) -> bool:
    """Whether the checkpoint at ``step`` is scored during training (cfgd.train.checkpoint_eval)."""
    return tc.eval_every > 0 and (step % tc.eval_every == 0 or step == tc.steps)


def report_checkpoint(cfg, spec, data, model, ema, opt, step, epoch, loss, extra, perf) -> None:
    """ray.train.report on every rank (it is a collective); rank 0 attaches the checkpoint.

    ``perf`` (throughput, peak memory of this worker) goes into the metrics only. A
    checkpoint to evaluate is reported with ``validation=True``: Ray Train scores it in
    a task of its own (cfgd.train.checkpoint_eval) and merges the metrics in later; until then its
    ``fid`` is +inf, the worst, so ``keep_best_by=fid`` never keeps it for a score it
    does not have.
    """
    import ray.train

    metrics = {"step": step, "epoch": epoch, "loss": loss, **perf}
    unscored = {"fid": float("inf")} if cfg.train.eval_every else {}  # not in meta.json: JSON has no inf
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report({**metrics, **unscored})
        return
    with tempfile.TemporaryDirectory() as tmp:
        # The metrics go into meta.json too, so that a checkpoint Ray Train did not get to
        # record can be adopted later with the same score (see resume_point).
        path = write_checkpoint(
            Path(tmp) / "ckpt", model_state=model.state_dict(), ema_state=ema.state,
            optimizer_state=opt.state_dict(), spec=spec, label_names=data["class_names"],
            step=step, epoch=epoch, config=cfglib.masked(cfglib.to_dict(cfg)),
            extra={**extra, "metrics": metrics,
                   **({"tokenizer": data["tokenizer"]} if data.get("tokenizer") else {})})
        evaluate = evaluated(cfg.train, step)
        ray.train.report({**metrics, **unscored}, checkpoint=ray.train.Checkpoint.from_directory(str(path)),
                         checkpoint_upload_fn=functools.partial(persist_verified, attempts=cfg.storage.retries),
                         validation=evaluate)
    log(f"checkpoint at step {step}" + (" (evaluating)" if evaluate else ""))


def persist_verified(checkpoint, dir_name: str, attempts: int):
    """Ray Train's upload step, replaced: every file stored and its size confirmed,
    meta.json last (:func:`cfgd.io.artifact.persist`), so Ray records a checkpoint only once
    it is complete in the store. Ray's default (pyarrow's copy_files) returns normally
    when an upload fails, and Ray would record, keep and resume from the hole."""
    import ray.train

    store = ray.train.get_context().get_storage()
    dest = store.build_checkpoint_path_from_name(dir_name)
    artifact.persist(checkpoint.path, store.storage_filesystem, dest, attempts=attempts)
    return ray.train.Checkpoint(path=dest, filesystem=store.storage_filesystem)


def _recorded_paths() -> set[str]:
    """Paths of the checkpoints Ray Train's controller has recorded for this run."""
    import ray.train

    try:
        reported = ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=60)
        paths = {r.checkpoint.path for r in reported}
    except Exception as err:  # noqa: BLE001 - any failure: fall back to the one Ray hands us
        log(f"could not list Ray Train's recorded checkpoints ({type(err).__name__}: {err}); "
             "using its latest only")
        paths = set()
    latest = ray.train.get_checkpoint()
    return paths | ({latest.path} if latest is not None else set())


def resume_point(rank: int, world: int) -> Checkpoint | None:
    """The checkpoint every rank resumes from (None: a new run), chosen once by rank 0.

    Rank 0 picks the newest verified checkpoint in the run directory (cfgd.train.resume) and
    broadcasts its path; every rank loads it. A chosen checkpoint Ray Train had not
    recorded is then reported to Ray as it is (no upload), so Ray's retention manages it
    from here on, and the other unrecorded directories are deleted. Every rank has loaded
    its weights before that report (a collective), so retention cannot delete a
    checkpoint while it is being resumed from.
    """
    import ray.train

    store = ray.train.get_context().get_storage()  # the run directory and its filesystem
    fs, run_path = store.storage_filesystem, store.experiment_fs_path
    point = None
    if rank == 0:
        point = resumelib.choose(fs, run_path, _recorded_paths())
        for line in point.explain():
            log(line)
    choice = [(point.chosen.path, point.chosen.recorded) if point and point.chosen else None]
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None
    path, recorded = choice[0]
    ck = point.checkpoint if rank == 0 else resumelib.load(fs, path)
    if not recorded:
        # An adopted checkpoint was never evaluated: the worst FID until it is.
        metrics = {"loss": float("inf"), "fid": float("inf"), **ck.meta.get("metrics", {}), "step": ck.step,
                   "adopted": True}
        if rank == 0:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint(path, filesystem=fs),
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
        else:
            ray.train.report(metrics)
    if rank == 0:
        stale = resumelib.stale(point)
        resumelib.delete(fs, stale)
        for c in stale:
            log(f"deleted unrecorded checkpoint directory {c.describe()}")
    return ck
