"""The trainer around the worker loop: ``fit`` checks storage and data on the driver, then
runs :func:`cfgd.train.worker.train_loop_per_worker` on Ray Train (with evaluation during
training, :mod:`cfgd.train.checkpoint_eval`, when configured).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from cfgd import config as cfglib
from cfgd.io import access, storage, transfers
from cfgd.rayenv import init_ray
from cfgd.train import checkpoint_eval
from cfgd.train.progress import log, summary
from cfgd.train.worker import train_loop_per_worker


def _validation_config(cfg: cfglib.Config, out: str, ray):
    """Ray Train's ValidationConfig running cfgd.train.checkpoint_eval on the evaluated checkpoints.

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
    log(f"evaluating checkpoints every {tc.eval_every} steps and the last: {tc.eval_samples} samples "
         f"at w {list(tc.eval_w)}, {tc.eval_steps} {tc.eval_solver} steps, evaluator {tc.evaluator}")
    return ValidationConfig(fn=checkpoint_eval.from_config(cfg, out),
                            task_config=ValidationTaskConfig(timeout_s=tc.eval_timeout_s),
                            ray_remote_kwargs={"num_cpus": tc.eval_cpus})


def _eval_summary(result, out: str, opts) -> None:
    """The best evaluated checkpoint, and the curve rewritten once every evaluation is in."""
    scored = [(m["fid"], m, c) for c, m in result.best_checkpoints if math.isfinite(m.get("fid", math.inf))]
    if scored:
        fid, m, c = min(scored, key=lambda x: x[0])
        log(f"best evaluated checkpoint: step {m['eval_step']}, FID {fid:.2f} at w={m['fid_best_w']:g}: {c.path}")
    paths = checkpoint_eval.write_curve(out, opts)
    log(f"evaluation curve: {paths['plot']} (table {paths['table']})")


def _condition_data(cfg: cfglib.Config, meta, opts) -> dict:
    """What ``model.condition`` needs from the data set, checked on the driver: for text, the
    caption column and the tokenizer (its JSON: workers tokenize with it and every checkpoint
    carries it); for embeddings, the column and its shape. Returns the ``loop_config["data"]``
    entries and read_dataset's keywords; raises ConfigError naming the key and what to do."""
    out = {}
    if cfg.model.image_condition:
        from cfgd.data.image_condition import COND_IMAGE, cond_image_shape

        if COND_IMAGE not in meta.conditions:
            raise cfglib.ConfigError(f"model.image_condition=true needs a 'cond_image' column in {cfg.data.root}, "
                                     f"which has {['label', *meta.conditions]}; prepare it with "
                                     f"data.image_condition=low_res or masked")
        desc = meta.conditions[COND_IMAGE]
        out["cond_image_shape"] = list(cond_image_shape(desc, cfg.data.root))
        log(f"conditioning images: {desc.get('transform', '?')} {out['cond_image_shape']} (h, w, c)")
    cond = cfg.model.condition
    if cond == "label":
        return out
    column = "caption" if cond == "text" else cond
    if column not in meta.conditions:
        raise cfglib.ConfigError(
            f"model.condition={cond!r} needs a {column!r} column in {cfg.data.root}, which has "
            f"{['label', *meta.conditions]}" + ("; prepare it with data.captions=attributes (or captions from "
                                                  "the source)" if cond == "text" else ""))
    if cond == "embedding":
        shape = list(meta.conditions["embedding"]["shape"])
        log(f"embeddings: {shape[0]}×{shape[1]} per image, from {meta.conditions['embedding'].get('encoder', '?')}")
        return {**out, "embedding_shape": shape}
    from cfgd.data.tokenizer import TOKENIZER_FILE, CaptionTokenizer

    uri = f"{cfg.data.root.rstrip('/')}/{TOKENIZER_FILE}"
    text = transfers.read_bytes(uri, opts).decode()
    tok = CaptionTokenizer.from_json(text)
    log(f"captions: tokenizer {uri} ({tok.vocab_size} tokens, at most {tok.max_tokens} per caption)")
    return {**out, "tokenizer": text}


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

    ``loop_fn`` replaces :func:`cfgd.train.worker.train_loop_per_worker` (tests wrap it to inject faults).

    Checks storage access and validates the dataset on the driver first (schema and
    labels), so a wrong endpoint, a missing bucket or a bad shard fails in seconds
    with a message naming it, rather than hanging or failing inside a worker.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cfgd.data.shards import read_split_meta, validate_labels
    from cfgd.train.input_pipeline import read_dataset

    opts = cfg.storage
    access.check_access(cfg.data.root, opts)
    access.check_access(cfg.train.storage_path, opts, write=True)
    data_fs = storage.fsspec_fs(cfg.data.root, opts)
    meta = read_split_meta(cfg.data.root, "train", data_fs)
    validate_labels(cfg.data.root, "train", meta, data_fs)
    log(f"data: {meta.num_rows} rows of {meta.height}x{meta.width}x{meta.channels} in {len(meta.files)} shard(s) "
         f"under {cfg.data.root}; {meta.num_classes} classes: {', '.join(meta.class_names)}")
    conditioning = _condition_data(cfg, meta, opts)
    if cfg.train.eval_every:
        checkpoint_eval.check_evaluator(cfg, (meta.channels, meta.height, meta.width), meta.num_classes)
    out = run_uri(cfg.train)
    transfers.write_bytes_atomic(out + "/config.yaml", cfglib.to_yaml(cfg).encode(), opts)
    log(f"run directory: {out}")

    ray = init_ray(cfg.train.ray_address, cfg.train.num_cpus, dashboard=True)
    validation = _validation_config(cfg, out, ray) if cfg.train.eval_every else None
    import ray.data

    # Progress bars of the streaming split would interleave with the training log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = read_dataset(cfg.data.root, "train", meta, data_fs,
                           arrow_filesystem=storage.arrow_fs(cfg.data.root, opts), seed=cfg.train.seed,
                           **conditioning)
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        loop_fn or train_loop_per_worker,
        # Workers never need the storage credentials (Ray Train moves checkpoints with
        # storage_filesystem), so they get the masked config, which Ray may display.
        train_loop_config={"config": cfglib.masked(cfglib.to_dict(cfg)),
                           "data": {"class_names": meta.class_names, "height": meta.height,
                                    "width": meta.width, "channels": meta.channels, **conditioning}},
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
    log(f"done in {time.perf_counter() - t0:.0f} s; newest checkpoint: {ck.path if ck else None} "
         f"({summary(result.metrics or {})})")
    if validation is not None:
        _eval_summary(result, out, opts)
    if math.isnan(float((result.metrics or {}).get("loss", 0.0))):
        raise RuntimeError("training diverged: the final loss is NaN")
    return result
