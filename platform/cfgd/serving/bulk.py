"""Bulk jobs: where they write, what each shard holds, and the Ray task that writes a shard."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch

from cfgd.data.images import encode_png, to_uint8
from cfgd.diffusion.plan import Condition, Guidance, SamplingPlan, Solver
from cfgd.io import retry, storage, transfers
from cfgd.io.retry import StorageError
from cfgd.io.storage import StorageOptions
from cfgd.sampling.checkpoint_sampler import CheckpointSampler
from cfgd.serving.checkpoint_cache import load_sampler
from cfgd.serving.schemas import RequestError

SHARD_NAME = "shard-{:05d}.parquet"
SHARD_RE = re.compile(r"^shard-(\d{5})\.parquet$")
# Leading "_": Parquet readers (pyarrow datasets, Ray Data) skip these when reading the
# destination directory as one dataset.
MANIFEST = "_job.json"
JOB_INDEX = "_jobs"  # under output_prefix: job id -> destination
JOB_ID_RE = re.compile(r"^[0-9a-f]{16}$")
PNG_DIR = "_png"
# Path segments allowed in a bulk destination: no spaces, no "..", nothing a shell or URL
# would reinterpret.
SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")


def pinned(uri: str) -> str:
    """Shard tasks may run with another working directory: pin a local path down."""
    return uri if storage.is_remote(uri) else os.path.abspath(storage.strip_scheme(uri))


def _segments(path: str, what: str) -> list[str]:
    parts = [p for p in path.split("/") if p != ""]
    for p in parts:
        if p in (".", ".."):
            raise RequestError(422, "destination", f"{what} must not contain '{p}' segments")
        if not SEGMENT_RE.match(p):
            raise RequestError(422, "destination", f"{what} segment {p!r} has characters outside [A-Za-z0-9._=-] "
                                                   "or does not start with a letter or digit")
    return parts


def resolve_destination(destination: str, output_prefix: str) -> str:
    """The bulk output URI for ``destination``: a relative sub-path of ``output_prefix``
    or a URI/path under it. Anything else (``..``, another bucket or directory, the
    prefix itself) raises RequestError naming ``destination``."""
    dest = destination.strip()
    if not dest:
        raise RequestError(422, "destination", "destination is empty")
    remote = storage.is_remote(output_prefix)
    if remote:
        bucket, _, key = storage.strip_scheme(output_prefix).partition("/")
        base = [bucket] + [p for p in key.split("/") if p]
        root = "s3://"
    else:
        base_path = os.path.realpath(os.path.abspath(os.path.expanduser(storage.strip_scheme(output_prefix))))
        base = [p for p in base_path.split(os.sep) if p]
        root = "/"
    try:
        dest_remote = storage.is_remote(dest)
        scheme = storage._scheme(dest)
    except StorageError:
        raise RequestError(422, "destination", f"destination {destination!r} has an unsupported scheme") from None
    absolute = dest_remote or scheme == "file" or dest.startswith("/")
    if absolute:
        if dest_remote != remote:
            raise RequestError(422, "destination", f"destination {destination!r} is not under the output prefix "
                                                   f"{output_prefix!r}")
        full = _segments(storage.strip_scheme(dest), "destination")
        if not remote:  # compare real paths: a symlink must not lead outside
            real = os.path.realpath("/" + "/".join(full))
            full = [p for p in real.split(os.sep) if p]
    else:
        rel = _segments(dest, "destination")
        full = base + rel
        if not remote:
            real = os.path.realpath("/" + "/".join(full))
            full = [p for p in real.split(os.sep) if p]
    if full[:len(base)] != base or len(full) <= len(base):
        raise RequestError(422, "destination", f"destination {destination!r} must be a sub-path of the output "
                                               f"prefix {output_prefix!r}")
    return root + "/".join(full)


def job_id_for(destination: str) -> str:
    """One job per destination: re-POSTing it resumes rather than duplicates."""
    return hashlib.sha256(destination.encode()).hexdigest()[:16]


@dataclass
class BulkPlan:
    """A bulk job, fully determined: row i has seed ``seed + i``, rows ordered by cell (a
    class, or a prompt of a text checkpoint; with its conditioning image for an image
    checkpoint), then w, then sample; shard k holds rows [k·shard_size, (k+1)·shard_size)."""

    destination: str
    checkpoint: str
    checkpoint_uri: str
    checkpoint_step: int
    label_names: list[str]
    classes: list[int]
    counts: list[int]
    seed: int
    solver: dict  # cfgd.diffusion.plan.Solver fields
    guidance: list[dict]  # one cfgd.diffusion.plan.Guidance per strength (the "w" columns)
    guide_uris: dict  # autoguidance: guide name -> checkpoint URI
    png_files: bool
    shard_size: int
    pad_rows: int
    prompts: list[str] | None = None  # a text checkpoint's cells, in place of classes (which index them)
    negative_prompt: str | None = None
    images: list[str] | None = None  # an image checkpoint: each cell's conditioning image, base64 PNG

    @classmethod
    def from_dict(cls, d: dict) -> "BulkPlan":
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def job_id(self) -> str:
        return job_id_for(self.destination)

    @property
    def ws(self) -> list[float]:
        return [g["w"] for g in self.guidance]

    def sampling(self) -> tuple[Solver, list[Guidance]]:
        """The plan's solver and guidance rows, as validated when the job was submitted."""
        return Solver.model_validate(self.solver), [Guidance.model_validate(g) for g in self.guidance]

    @property
    def total_images(self) -> int:
        return sum(self.counts) * len(self.guidance)

    @property
    def total_shards(self) -> int:
        return math.ceil(self.total_images / self.shard_size)

    def condition(self, cell: int) -> Condition:
        """Cell ``cell``'s condition: its class, or its prompt (with the job's negative prompt),
        and its conditioning image if the job has them."""
        image = {"image": base64.b64decode(self.images[cell])} if self.images is not None else {}
        if self.prompts is None:
            return Condition(label=self.classes[cell], **image)
        return Condition(prompt=self.prompts[cell], negative_prompt=self.negative_prompt, **image)

    def shard_rows(self, shard: int) -> list[tuple[int, int, int, int]]:
        """(row index, cell index, guidance index, seed) of one shard."""
        lo, hi = shard * self.shard_size, min(self.total_images, (shard + 1) * self.shard_size)
        rows, i = [], 0
        for c, n in enumerate(self.counts):
            for w in range(len(self.guidance)):
                if i + n <= lo:  # skip whole cells before the shard
                    i += n
                    continue
                for _ in range(n):
                    if lo <= i < hi:
                        rows.append((i, c, w, self.seed + i))
                    i += 1
                if i >= hi:
                    return rows
        return rows

    def shard_len(self, shard: int) -> int:
        """Rows of one shard, by arithmetic (status pages must not walk the cells)."""
        return max(0, min(self.shard_size, self.total_images - shard * self.shard_size))

    def shard_uri(self, shard: int) -> str:
        return f"{self.destination}/{SHARD_NAME.format(shard)}"

    def manifest(self) -> dict:
        return {"job_id": self.job_id, "plan": self.to_dict(), "total_shards": self.total_shards,
                "total_images": self.total_images}


_SHARD_SAMPLERS: dict[tuple, CheckpointSampler] = {}  # per worker process, reused by later shards


def run_shard(plan_dict: dict, shard: int, opts: StorageOptions | None, threads: int = 1) -> dict:
    """Sample one shard and write ``shard-NNNNN.parquet`` (and PNG files, before it).

    The Parquet file is written last and atomically: its presence marks the shard done.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    plan = BulkPlan.from_dict(plan_dict)
    torch.set_num_threads(threads)

    def cached(uri: str) -> CheckpointSampler:
        key = (uri, repr(opts), plan.pad_rows)
        if key not in _SHARD_SAMPLERS:
            _SHARD_SAMPLERS[key] = load_sampler(uri, opts, plan.pad_rows)
        return _SHARD_SAMPLERS[key]

    wanted = {(u, repr(opts), plan.pad_rows) for u in (plan.checkpoint_uri, *plan.guide_uris.values())}
    for key in set(_SHARD_SAMPLERS) - wanted:  # this job's networks are enough per worker
        del _SHARD_SAMPLERS[key]
    gen = cached(plan.checkpoint_uri)
    rows = plan.shard_rows(shard)
    idx, cells, ks, seeds = (list(v) for v in zip(*rows))
    labels = [plan.classes[c] for c in cells]
    solver, guidance = plan.sampling()
    guides = {name: cached(uri) for name, uri in plan.guide_uris.items()}
    conditions = {c: plan.condition(c) for c in set(cells)}  # each cell's image decoded once
    images = gen.sample([conditions[c] for c in cells], seeds,
                        SamplingPlan(solver=solver, rows=tuple(guidance[k] for k in ks)), guides=guides,
                        batch_size=len(rows))
    ws = [guidance[k].w for k in ks]
    pngs = [encode_png(img) for img in to_uint8(images)]
    if plan.png_files:
        for i, png in zip(idx, pngs):
            transfers.write_bytes_atomic(f"{plan.destination}/{PNG_DIR}/{i:08d}.png", png, opts)
    w_arr = np.asarray(ws, dtype=np.float64)
    if plan.prompts is None:
        columns = {"label": pa.array(labels, type=pa.int64()),
                   "class_name": pa.array([plan.label_names[c] for c in labels], type=pa.string())}
    else:
        columns = {"prompt": pa.array([plan.prompts[c] for c in cells], type=pa.string()),
                   "negative_prompt": pa.array([plan.negative_prompt] * len(rows), type=pa.string())}
    if plan.images is not None:
        columns["cond_image"] = pa.array([conditions[c].image for c in cells], type=pa.binary())
    table = pa.table({
        "image": pa.array(pngs, type=pa.binary()),
        **columns,
        "w": pa.array(w_arr),
        "guidance_scale": pa.array(1.0 + w_arr),
        "seed": pa.array(seeds, type=pa.int64()),
        "index": pa.array(idx, type=pa.int64()),
        "checkpoint": pa.array([plan.checkpoint] * len(rows), type=pa.string()),
        "checkpoint_step": pa.array([plan.checkpoint_step] * len(rows), type=pa.int64()),
    })
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    uri = plan.shard_uri(shard)
    transfers.write_bytes_atomic(uri, buf.getvalue().to_pybytes(), opts)
    return {"shard": shard, "rows": len(rows), "uri": uri}


def existing_shards(destination: str, opts: StorageOptions | None) -> set[int]:
    """Indices of the shard files already under ``destination``."""
    fs = storage.fsspec_fs(destination, opts)
    base = storage.arrow_path(destination)
    try:
        entries = retry.with_retries(lambda: fs.ls(base, detail=True), what=f"list {destination}")
    except FileNotFoundError:
        return set()
    found = set()
    for e in entries:
        m = SHARD_RE.match(e["name"].rstrip("/").rsplit("/", 1)[-1])
        if m and e.get("type") == "file":  # a directory named like a shard is not a finished shard
            found.add(int(m.group(1)))
    return found


def index_uri(output_prefix: str, job_id: str) -> str:
    """Where a job's id is mapped to its destination, so a restarted state actor finds it."""
    return f"{output_prefix.rstrip('/')}/{JOB_INDEX}/{job_id}.json"


def read_job(output_prefix: str, job_id: str, opts: StorageOptions | None) -> BulkPlan | None:
    """The plan of job ``job_id`` from its index entry and manifest, or None if unknown."""
    try:
        destination = json.loads(transfers.read_bytes(index_uri(output_prefix, job_id), opts))["destination"]
        manifest = json.loads(transfers.read_bytes(f"{destination}/{MANIFEST}", opts))
        plan = BulkPlan.from_dict(manifest["plan"])
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return None
    return plan if plan.job_id == job_id else None


def prepare_destination(plan: BulkPlan, output_prefix: str, opts: StorageOptions | None) -> set[int]:
    """Create the job manifest, conditionally (two servers racing for one destination cannot
    both claim it), or check that the one there is this job's; return the shards already
    done. A different job in the same destination is a 409."""
    uri = f"{plan.destination}/{MANIFEST}"
    try:
        old = json.loads(transfers.read_bytes(uri, opts))
    except FileNotFoundError:
        old = None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(409, "destination", f"{uri} is not a readable job manifest; choose another "
                                               "destination or remove it") from None
    if old is None and not transfers.create_exclusive(uri, json.dumps(plan.manifest(), indent=2).encode(), opts):
        old = json.loads(transfers.read_bytes(uri, opts))  # another server created it first
    if old is not None:  # read through BulkPlan: a manifest from before a field existed has its default
        try:
            old = {**old, "plan": BulkPlan.from_dict(old["plan"]).to_dict()}
        except (KeyError, TypeError):
            pass
    if old is not None and old.get("plan") != plan.to_dict():
        changed = sorted(k for k, v in plan.to_dict().items() if old.get("plan", {}).get(k) != v)
        raise RequestError(409, "destination", f"{plan.destination} already holds a different bulk job "
                                               f"(differs in {changed}); choose another destination")
    transfers.write_bytes_atomic(index_uri(output_prefix, plan.job_id),
                               json.dumps({"destination": plan.destination}).encode(), opts)
    return {k for k in existing_shards(plan.destination, opts) if k < plan.total_shards}
