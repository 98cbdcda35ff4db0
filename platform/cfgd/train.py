"""Training on Ray Train: ``train_loop_per_worker`` and the trainer around it.

The loop runs on every worker with only what it is handed (the resolved config
and the dataset's description); nothing reads the launching script's globals.
Rank 0 writes checkpoints every ``train.checkpoint_every`` steps through
``ray.train.report``. A restarted worker group, or a rerun with the same run name,
resumes from the newest checkpoint in the run directory that verifies, including one
written in the moments before a crash that Ray Train had not recorded yet
(:mod:`cfgd.resume`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cfgd import artifact
from cfgd import config as cfglib
from cfgd import resume as resumelib
from cfgd import storage
from cfgd import train_eval
from cfgd.checkpoint import Checkpoint, write_checkpoint
from cfgd.diffusion import drop_labels, make_schedule, training_loss
from cfgd.model import build_model, count_params
from cfgd.rayenv import init_ray
from cfgd.spec import ModelSpec


class EMA:
    """Exponential moving average of a model's parameters and buffers.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) so that short runs are not
    dominated by the random initial weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].lerp_(v.detach(), 1 - d)
            else:
                self.state[k].copy_(v)


def _log(msg: str) -> None:
    # Not print(): Ray Train patches print in workers and would log each line twice.
    # The tag is what keeps a worker's line on a quiet job's console (cfgd.console).
    sys.stdout.write(f"[cfgd.train] {msg}\n")
    sys.stdout.flush()


def _eta(seconds: float) -> str:
    """h:mm:ss"""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _threads(cfg: cfglib.TrainConfig) -> int:
    """Torch threads per worker: explicit, or this node's cores shared by the workers.

    Ray sets OMP_NUM_THREADS=1 in workers, which would leave cores idle.
    """
    if cfg.threads_per_worker > 0:
        return cfg.threads_per_worker
    if cfg.cpus_per_worker >= 1:  # a cluster worker: the cores Ray reserved for it
        return int(cfg.cpus_per_worker)
    # Fractional CPUs (a small machine, room left for Ray Data): share this node's cores.
    return max(1, (os.cpu_count() or 1) // cfg.num_workers)


def learning_rate(cfg: cfglib.TrainConfig, step: int) -> float:
    """The rate of optimizer step ``step`` (0-based): linear warm-up over ``warmup_steps``, then
    ``constant``, or ``cosine``: half a cosine from ``lr`` down to 0 at ``steps`` (a short run
    ends on small steps, which lowers its final loss; a run resumed past ``steps`` stays at 0)."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_schedule == "constant" or step < cfg.warmup_steps:
        return cfg.lr * warm
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop. ``loop_config`` = {"config": cfglib.to_dict(cfg), "data": DatasetMeta fields}."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = cfglib.from_dict(loop_config["config"])
    data = loop_config["data"]
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(_threads(tc))
    device = ray.train.torch.get_device()
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.backends.cudnn.benchmark = True

    spec = ModelSpec(size=cfg.model.size, image_size=data["height"], in_channels=data["channels"],
                     num_classes=len(data["class_names"]))
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = build_model(spec).to(device)
    ema = EMA(model, tc.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    step, epoch = 0, 0

    resume = _resume_point(rank, world)
    if resume is not None:
        model.load_state_dict(resume.model_state)
        ema.state = {k: v.to(device) for k, v in resume.ema_state.items()}
        opt.load_state_dict(resume.optimizer_state)
        step, epoch = resume.step, int(resume.meta["epoch"])
        if rank == 0:
            _log(f"resuming from checkpoint at step {step} (epoch {epoch}): {resume.path}")
    _log(f"worker {rank}/{world} on node {ray.get_runtime_context().get_node_id()}")
    if resume is None and rank == 0:
        _log(f"starting a new run: model {spec.size!r} ({count_params(model) / 1e6:.2f} M parameters), "
             f"{world} worker(s), {torch.get_num_threads()} thread(s) each")

    started_at = step
    net = ray.train.torch.prepare_model(model)  # DDP when world > 1
    if tc.compile:
        net = torch.compile(net)
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps, cfg.diffusion.zero_terminal_snr)
    null = spec.null_label
    # Per-rank stream, offset by the step so a resumed run does not replay the same noise.
    gen = torch.Generator(device=device).manual_seed(tc.seed * 100_003 + rank * 7919 + step)
    shard = ray.train.get_dataset_shard("train")
    per_worker = tc.batch_size // world
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda and tc.bf16
                else contextlib.nullcontext())

    if step >= tc.steps and rank == 0:
        _log(f"already trained to step {step} of {tc.steps}: nothing to do")
    window_loss, window_n, window_t0 = 0.0, 0, time.perf_counter()
    # Throughput since the 3rd step of this process (the first ones pay for the pipeline start).
    steady_from, steady_t0 = started_at + 2, None
    # Seconds spent waiting for the next batch since steady_t0: > 0 means data is a bottleneck.
    data_wait = 0.0
    while step < tc.steps:
        batches = 0
        it = iter(shard.iter_torch_batches(batch_size=per_worker, drop_last=True, device=device,
                                           local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                                           pin_memory=use_cuda, prefetch_batches=2))
        while True:
            t_wait = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            if steady_t0 is not None:
                data_wait += time.perf_counter() - t_wait
            batches += 1
            x0, y = batch["image"], batch["label"]
            y = drop_labels(y, cfg.diffusion.p_uncond, null, gen)
            for group in opt.param_groups:
                group["lr"] = learning_rate(tc, step)
            with autocast:
                loss = training_loss(net, schedule, x0, y, gen, cfg.diffusion.parameterization,
                                     tc.loss_weighting, tc.min_snr_gamma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
            opt.step()
            ema.update(model, step)
            step += 1
            if step == steady_from:
                steady_t0 = time.perf_counter()
            window_loss += loss.detach()  # no .item() here: on a GPU it would sync every step
            window_n += 1
            if step % tc.log_every == 0 or step == tc.steps:
                dt = time.perf_counter() - window_t0
                if rank == 0:
                    _log(f"step {step}/{tc.steps} epoch {epoch} loss {float(window_loss) / window_n:.4f} "
                         f"{window_n * tc.batch_size / dt:.1f} samples/s ETA {_eta((tc.steps - step) * dt / window_n)}"
                         + (_eval_note(tc) if tc.eval_every else ""))
                window_loss, window_n, window_t0 = 0.0, 0, time.perf_counter()
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                elapsed = time.perf_counter() - steady_t0 if steady_t0 else 0.0
                steady = (step - steady_from) * tc.batch_size / elapsed if elapsed and step > steady_from else 0.0
                _report(cfg, spec, data, model, ema, opt, step, epoch, loss.item(),
                        {"started_at_step": started_at, "world_size": world},
                        {"samples_per_s": steady, "data_wait_frac": data_wait / elapsed if elapsed else 0.0,
                         "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
            if step >= tc.steps:
                break
        if batches == 0:
            raise ValueError(f"worker {rank} got no batch of {per_worker} rows in epoch {epoch}: "
                             f"the dataset is smaller than train.batch_size={tc.batch_size}")
        if step < tc.steps:
            epoch += 1


def _evaluated(tc: cfglib.TrainConfig, step: int) -> bool:
    """Whether the checkpoint at ``step`` is scored during training (cfgd.train_eval)."""
    return tc.eval_every > 0 and (step % tc.eval_every == 0 or step == tc.steps)


def _eval_note(tc: cfglib.TrainConfig) -> str:
    """The newest evaluation, for the progress line ("" when none has finished yet)."""
    import ray.train

    try:
        reported = ray.train.get_all_reported_checkpoints(
            # Rank 0 waits for this while the other ranks wait for rank 0: keep it short.
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=1)
    except Exception:  # noqa: BLE001 - a progress line never stops training
        return ""
    return train_eval.progress_note(train_eval.latest(reported), tc.eval_w)


def _report(cfg, spec, data, model, ema, opt, step, epoch, loss, extra, perf) -> None:
    """ray.train.report on every rank (it is a collective); rank 0 attaches the checkpoint.

    ``perf`` (throughput, peak memory of this worker) goes into the metrics only. A
    checkpoint to evaluate is reported with ``validation=True``: Ray Train scores it in
    a task of its own (cfgd.train_eval) and merges the metrics in later; until then its
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
        # record can be adopted later with the same score (see _resume_point).
        path = write_checkpoint(
            Path(tmp) / "ckpt", model_state=model.state_dict(), ema_state=ema.state,
            optimizer_state=opt.state_dict(), spec=spec, label_names=data["class_names"],
            step=step, epoch=epoch, config=cfglib.masked(cfglib.to_dict(cfg)),
            extra={**extra, "metrics": metrics})
        evaluate = _evaluated(cfg.train, step)
        ray.train.report({**metrics, **unscored}, checkpoint=ray.train.Checkpoint.from_directory(str(path)),
                         checkpoint_upload_fn=functools.partial(_persist_verified, attempts=cfg.storage.retries),
                         validation=evaluate)
    _log(f"checkpoint at step {step}" + (" (evaluating)" if evaluate else ""))


def _persist_verified(checkpoint, dir_name: str, attempts: int):
    """Ray Train's upload step, replaced: every file stored and its size confirmed,
    meta.json last (:func:`cfgd.artifact.persist`), so Ray records a checkpoint only once
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
        _log(f"could not list Ray Train's recorded checkpoints ({type(err).__name__}: {err}); "
             "using its latest only")
        paths = set()
    latest = ray.train.get_checkpoint()
    return paths | ({latest.path} if latest is not None else set())


def _resume_point(rank: int, world: int) -> Checkpoint | None:
    """The checkpoint every rank resumes from (None: a new run), chosen once by rank 0.

    Rank 0 picks the newest verified checkpoint in the run directory (cfgd.resume) and
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
            _log(line)
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
            _log(f"deleted unrecorded checkpoint directory {c.describe()}")
    return ck


def _summary(metrics: dict[str, Any]) -> str:
    """The final checkpoint's metrics, short: step, loss, steady samples/s, peak worker memory."""
    parts = {"step": "step {:d}", "loss": "loss {:.4f}", "samples_per_s": "{:.1f} samples/s",
             "peak_rss_mib": "peak RSS {:.0f} MiB"}
    return ", ".join(fmt.format(metrics[k]) for k, fmt in parts.items() if k in metrics) or "no metrics"


def _validation_config(cfg: cfglib.Config, out: str, ray):
    """Ray Train's ValidationConfig running cfgd.train_eval on the evaluated checkpoints.

    Refuses a cluster too small to run the evaluation task beside the workers: Ray
    Train waits for pending evaluations before it returns, so a task that can never be
    scheduled would hang the run at its end.
    """
    from ray.train import ValidationConfig, ValidationTaskConfig

    tc = cfg.train
    need = tc.num_workers * tc.cpus_per_worker + tc.eval_cpus
    have = ray.cluster_resources().get("CPU", 0.0)
    if need > have:
        raise cfglib.ConfigError(
            f"train.eval_cpus={tc.eval_cpus:g} does not fit beside {tc.num_workers} worker(s) of "
            f"train.cpus_per_worker={tc.cpus_per_worker:g}: that is {need:g} CPUs and the cluster has {have:g}")
    _log(f"evaluating checkpoints every {tc.eval_every} steps and the last: {tc.eval_samples} samples "
         f"at w {list(tc.eval_w)}, {tc.eval_steps} DDIM steps, evaluator {tc.evaluator}")
    return ValidationConfig(fn=train_eval.from_config(cfg, out),
                            task_config=ValidationTaskConfig(timeout_s=tc.eval_timeout_s),
                            ray_remote_kwargs={"num_cpus": tc.eval_cpus})


def _eval_summary(result, out: str, opts) -> None:
    """The best evaluated checkpoint, and the curve rewritten once every evaluation is in."""
    scored = [(m["fid"], m, c) for c, m in result.best_checkpoints if math.isfinite(m.get("fid", math.inf))]
    if scored:
        fid, m, c = min(scored, key=lambda x: x[0])
        _log(f"best evaluated checkpoint: step {m['eval_step']}, FID {fid:.2f} at w={m['fid_best_w']:g}: {c.path}")
    paths = train_eval.write_curve(out, opts)
    _log(f"evaluation curve: {paths['plot']} (table {paths['table']})")


def run_dir(tc: cfglib.TrainConfig) -> Path:
    """The local run directory (``train.storage_path`` is a local path)."""
    return Path(tc.storage_path).resolve() / tc.run_name


def run_uri(tc: cfglib.TrainConfig) -> str:
    """Where this run's checkpoints go: a local path or ``s3://bucket/prefix/<run_name>``."""
    if storage.is_remote(tc.storage_path):
        return tc.storage_path.rstrip("/") + "/" + tc.run_name
    return str(run_dir(tc))


def fit(cfg: cfglib.Config, loop_fn=None):
    """Train with Ray Train as configured; returns the ``ray.train.Result``.

    ``loop_fn`` replaces :func:`train_loop_per_worker` (tests wrap it to inject faults).

    Checks storage access and validates the dataset on the driver first (schema and
    labels), so a wrong endpoint, a missing bucket or a bad shard fails in seconds
    with a message naming it, rather than hanging or failing inside a worker.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cfgd.dataset import read_dataset
    from cfgd.shards import read_meta, validate_labels

    opts = cfg.storage
    storage.check_access(cfg.data.root, opts)
    storage.check_access(cfg.train.storage_path, opts, write=True)
    data_fs = storage.fsspec_fs(cfg.data.root, opts)
    meta = read_meta(cfg.data.root, "train", data_fs)
    validate_labels(cfg.data.root, "train", meta, data_fs)
    _log(f"data: {meta.num_rows} rows of {meta.height}x{meta.width}x{meta.channels} in {len(meta.files)} shard(s) "
         f"under {cfg.data.root}; {meta.num_classes} classes: {', '.join(meta.class_names)}")
    if cfg.train.eval_every:
        train_eval.check_evaluator(cfg, (meta.channels, meta.height, meta.width), meta.num_classes)
    out = run_uri(cfg.train)
    storage.write_bytes_atomic(out + "/config.yaml", cfglib.to_yaml(cfg).encode(), opts)
    _log(f"run directory: {out}")

    ray = init_ray(cfg.train.ray_address, cfg.train.num_cpus, dashboard=True)
    validation = _validation_config(cfg, out, ray) if cfg.train.eval_every else None
    import ray.data

    # Progress bars of the streaming split would interleave with the training log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = read_dataset(cfg.data.root, "train", meta, data_fs,
                                   arrow_filesystem=storage.arrow_fs(cfg.data.root, opts), seed=cfg.train.seed)
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        loop_fn or train_loop_per_worker,
        # Workers never need the storage credentials (Ray Train moves checkpoints with
        # storage_filesystem), so they get the masked config, which Ray may display.
        train_loop_config={"config": cfglib.masked(cfglib.to_dict(cfg)),
                           "data": {"class_names": meta.class_names, "height": meta.height,
                                    "width": meta.width, "channels": meta.channels}},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.train.placement_strategy),
        datasets={"train": dataset},
        run_config=RunConfig(
            name=cfg.train.run_name,
            storage_path=storage.arrow_path(cfg.train.storage_path),
            storage_filesystem=storage.arrow_fs(cfg.train.storage_path, opts),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=cfg.train.keep_best_by or None,
                checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
        validation_config=validation,
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    ck = result.checkpoint
    _log(f"done in {time.perf_counter() - t0:.0f} s; newest checkpoint: {ck.path if ck else None} "
         f"({_summary(result.metrics or {})})")
    if validation is not None:
        _eval_summary(result, out, opts)
    if math.isnan(float((result.metrics or {}).get("loss", 0.0))):
        raise RuntimeError("training diverged: the final loss is NaN")
    return result
