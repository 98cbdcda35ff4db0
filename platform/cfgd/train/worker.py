"""Training on Ray Train: ``train_loop_per_worker``, the loop every worker runs.

The loop runs on every worker with only what it is handed (the resolved config
and the dataset's description); nothing reads the launching script's globals.
Rank 0 writes checkpoints every ``train.checkpoint_every`` steps through
``ray.train.report`` (:mod:`cfgd.train.worker_checkpoints`). A restarted worker group,
or a rerun with the same run name, resumes from the newest checkpoint in the run
directory that verifies, including one written in the moments before a crash that Ray
Train had not recorded yet (:mod:`cfgd.train.resume`). The trainer around it is
:mod:`cfgd.train.trainer`.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from typing import Any

import torch

from cfgd import config as cfglib
from cfgd.diffusion.process import make_schedule, training_loss
from cfgd.model.conditioning import drop_conditions
from cfgd.model.unet import build_model, count_params
from cfgd.spec import ModelSpec
from cfgd.train import checkpoint_eval
from cfgd.train.ema import EMA
from cfgd.train.lr_schedule import learning_rate
from cfgd.train.progress import eta, log
from cfgd.train.worker_checkpoints import report_checkpoint, resume_point


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

    spec = model_spec(cfg, data)
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = build_model(spec).to(device)
    ema = EMA(model, tc.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    step, epoch = 0, 0

    resume = resume_point(rank, world)
    if resume is not None:
        model.load_state_dict(resume.model_state)
        ema.state = {k: v.to(device) for k, v in resume.ema_state.items()}
        opt.load_state_dict(resume.optimizer_state)
        step, epoch = resume.step, int(resume.meta["epoch"])
        if rank == 0:
            log(f"resuming from checkpoint at step {step} (epoch {epoch}): {resume.path}")
    log(f"worker {rank}/{world} on node {ray.get_runtime_context().get_node_id()}")
    if resume is None and rank == 0:
        log(f"starting a new run: model {spec.size!r} ({count_params(model) / 1e6:.2f} M parameters), "
             f"{world} worker(s), {torch.get_num_threads()} thread(s) each")

    started_at = step
    net = ray.train.torch.prepare_model(model)  # DDP when world > 1
    if tc.compile:
        net = torch.compile(net)
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps, cfg.diffusion.zero_terminal_snr)
    # Per-rank stream, offset by the step so a resumed run does not replay the same noise.
    gen = torch.Generator(device=device).manual_seed(tc.seed * 100_003 + rank * 7919 + step)
    shard = ray.train.get_dataset_shard("train")
    per_worker = tc.batch_size // world
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda and tc.bf16
                else contextlib.nullcontext())

    if step >= tc.steps and rank == 0:
        log(f"already trained to step {step} of {tc.steps}: nothing to do")
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
            x0 = batch["image"]
            d = cfg.diffusion
            y = drop_conditions(condition_of(batch, spec), d.p_uncond, spec, gen, d.p_uncond_image, d.p_uncond_both)
            for group in opt.param_groups:
                group["lr"] = learning_rate(tc, step)
            with autocast:
                loss = training_loss(net, schedule, x0, y, gen, cfg.diffusion.parameterization,
                                     tc.loss_weighting, tc.min_snr_gamma, tc.min_snr_offset)
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
                    log(f"step {step}/{tc.steps} epoch {epoch} loss {float(window_loss) / window_n:.4f} "
                         f"{window_n * tc.batch_size / dt:.1f} samples/s ETA {eta((tc.steps - step) * dt / window_n)}"
                         + (_eval_note(tc) if tc.eval_every else ""))
                window_loss, window_n, window_t0 = 0.0, 0, time.perf_counter()
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                elapsed = time.perf_counter() - steady_t0 if steady_t0 else 0.0
                steady = (step - steady_from) * tc.batch_size / elapsed if elapsed and step > steady_from else 0.0
                report_checkpoint(cfg, spec, data, model, ema, opt, step, epoch, loss.item(),
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


def model_spec(cfg: cfglib.Config, data: dict) -> ModelSpec:
    """The network's spec from the config and the data set's description (``loop_config["data"]``)."""
    extra = {}
    if cfg.model.condition == "text":
        from cfgd.data import tokenizer as tokenizers

        tok = tokenizers.cached(data["tokenizer"])
        extra = {"vocab_size": tok.vocab_size, "max_tokens": tok.max_tokens}
    elif cfg.model.condition == "embedding":
        extra = {"embedding_tokens": data["embedding_shape"][0], "embedding_dim": data["embedding_shape"][1]}
    if data.get("cond_image_shape"):
        h, w, c = data["cond_image_shape"]
        extra.update(cond_channels=c, cond_height=h, cond_width=w)
    return ModelSpec(size=cfg.model.size, image_size=data["height"], in_channels=data["channels"],
                     num_classes=len(data["class_names"]), condition=cfg.model.condition, **extra)


def condition_of(batch: dict, spec: ModelSpec):
    """A training batch's raw condition y for the model of ``spec`` (cfgd.model.conditioning)."""
    y = _condition_y(batch, spec.condition)
    if not spec.has_image:
        return y
    image = batch["cond_image"]
    return {"y": y, "image": image, "image_null": torch.zeros(image.shape[0], dtype=torch.bool, device=image.device)}


def _condition_y(batch: dict, kind: str):
    if kind == "label":
        return batch["label"]
    if kind == "text":
        return {"tokens": batch["tokens"]}
    e = batch["embedding"]
    return {"embedding": e, "null": torch.zeros(e.shape[0], dtype=torch.bool, device=e.device)}


def _eval_note(tc: cfglib.TrainConfig) -> str:
    """The newest evaluation, for the progress line ("" when none has finished yet)."""
    import ray.train

    try:
        reported = ray.train.get_all_reported_checkpoints(
            # Rank 0 waits for this while the other ranks wait for rank 0: keep it short.
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=1)
    except Exception:  # noqa: BLE001 - a progress line never stops training
        return ""
    return checkpoint_eval.progress_note(checkpoint_eval.latest(reported), tc.eval_w)
