"""FID in InceptionV3 pool3 features: the number papers report (Heusel et al. 2017).

The network is torch-fidelity's ``FeatureExtractorInceptionV3`` (the extra ``fid``):
the TensorFlow FID Inception graph ported to PyTorch, with the TF1 bilinear resize to
299×299, so its 2048-d features, and FIDs from them, match pytorch-fid / torch-fidelity /
the original TF code. The FID itself is :func:`cfgd.evaluate.metrics.frechet_distance` of
:func:`cfgd.evaluate.metrics.feature_stats`, as for the evaluator's own features.

Nothing is downloaded: the config key ``inception_weights`` names a local copy of the
file torch-fidelity would fetch (:func:`weights_url`). It is read without running code:
``.safetensors`` by safetensors, anything else by ``torch.load(weights_only=True)``
(tensors and plain containers only).

    net = InceptionFID(path)
    cfgd.evaluate.metrics.fid(net.features(images_a), net.features(images_b))  # images: see to_inception_input

A sweep with ``inception_weights`` set adds the column ``fid_inception``
(:func:`sweep_fid_inception`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from cfgd.config import ConfigError
from cfgd.data.images import decode_png, to_uint8
from cfgd.data.split_loader import load_split
from cfgd.evaluate.evaluator import RealSplit
from cfgd.evaluate.metrics import Embedding, feature_stats, frechet_distance
from cfgd.io.artifact import sha256_file
from cfgd.io.storage import StorageOptions

CONFIG_KEY = "inception_weights"
LIBRARY = "torch-fidelity"
MODULE = "torch_fidelity.feature_extractor_inceptionv3"
FEATURES = "2048"  # the pool3 layer of the FID paper


def library() -> ModuleType:
    """torch-fidelity's InceptionV3 module, imported without the package's ``__init__``.

    ``torch_fidelity/__init__.py`` imports every extractor and dataset, hence torchvision,
    which cannot be installed beside the CPU torch this project pins (PyPI's torchvision
    fails to load its operators there). The InceptionV3 module itself needs only torch, so
    the package is entered through a bare module object that is removed again afterwards.
    """
    if MODULE in sys.modules:
        return sys.modules[MODULE]
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        raise ConfigError(f"{CONFIG_KEY} needs the {LIBRARY} package: install the extra 'fid' "
                          f"(bash scripts/setup.sh does; by hand: pip install --no-deps {LIBRARY})")
    bare = "torch_fidelity" not in sys.modules
    if bare:
        sys.modules["torch_fidelity"] = importlib.util.module_from_spec(spec)
    try:
        return importlib.import_module(MODULE)
    finally:
        if bare:
            # A later plain `import torch_fidelity` then runs the real __init__ (reusing this submodule).
            del sys.modules["torch_fidelity"]


def weights_url() -> str:
    """Where torch-fidelity downloads its InceptionV3 weights from (fetch it on a machine with internet)."""
    return library().URL_INCEPTION_V3


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors from ``.safetensors`` or a torch file, without running code from it."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return load_file(p)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # the restricted unpickler refuses anything but tensors and containers
        raise ValueError(f"{CONFIG_KEY}={str(path)!r} is not a state dict of tensors: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{CONFIG_KEY}={str(path)!r} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def to_inception_input(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) or float (N, C, H, W) in [-1, 1], C ∈ {1, 3} → uint8 (N, 3, H, W).

    Float images are quantised as samples are when stored (:func:`cfgd.data.images.to_uint8`);
    grayscale is repeated to 3 channels. The resize to 299×299 is the extractor's.
    """
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        if images.ndim != 4:
            raise ValueError(f"uint8 images must be (N, H, W, C), got {images.shape}")
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    else:
        t = torch.as_tensor(images)
        if not t.is_floating_point() or t.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C) or float (N, C, H, W) in [-1, 1], "
                             f"got {t.dtype} {tuple(t.shape)}")
        x = torch.from_numpy(to_uint8(t.float())).permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    return x.expand(-1, 3, -1, -1).contiguous()


class InceptionFID:
    """torch-fidelity's InceptionV3 with weights from a local file (eval mode, CPU)."""

    def __init__(self, weights_path: str | Path):
        """Refuses an empty or missing ``weights_path`` (the config key ``inception_weights``)."""
        lib = library()
        path = str(weights_path or "")
        if not path or not Path(path).is_file():
            what = "is not set" if not path else f"={path!r} is not a file"
            raise ConfigError(f"{CONFIG_KEY} {what}: a paper-comparable FID needs the InceptionV3 weights as a "
                              f"local file. Download {lib.URL_INCEPTION_V3} on a machine with internet, copy it "
                              f"here and set {CONFIG_KEY}=<path of that file>")
        state = read_state_dict(path)
        # The extractor's constructor always loads weights itself, with the full unpickler;
        # handing it the bytes of the tensors just read safely keeps the file's code out.
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        try:
            self.net = lib.FeatureExtractorInceptionV3("inception-v3-compat", [FEATURES],
                                                       feature_extractor_weights_path=buf)
        except RuntimeError as err:  # load_state_dict: missing / unexpected keys, wrong shapes
            raise ValueError(f"{CONFIG_KEY}={path!r} does not hold torch-fidelity's InceptionV3 weights "
                             f"(get them from {lib.URL_INCEPTION_V3}): {str(err)[:300]}") from None
        self.path = path
        self.sha256 = sha256_file(path)

    @torch.inference_mode()
    def features(self, images: torch.Tensor | np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Pool3 features of images (see :func:`to_inception_input`) → (N, 2048) float64."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = [self.net(to_inception_input(images[lo:lo + batch_size]))[0].double()
               for lo in range(0, len(images), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, int(FEATURES)))

    def stats(self, images: torch.Tensor | np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Mean (2048,) and covariance (2048, 2048) of the images' features; needs N ≥ 2."""
        return feature_stats(self.features(images, batch_size))


# ------------------------------------------------------------------ in a sweep


class SweepFiles(Protocol):
    """What :func:`sweep_fid_inception` needs of the sweep's output location (paths relative to it)."""

    def exists(self, rel: str) -> bool: ...
    def read(self, rel: str) -> bytes: ...
    def write(self, rel: str, data: bytes) -> str: ...


def real_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers (held-out, reference) of the real split's halves, the evaluator metrics' own:
    :meth:`RealSplit.of` applied to the row numbers themselves."""
    rows = np.arange(n, dtype=np.float64)[:, None]
    split = RealSplit.of(Embedding(rows, rows), np.zeros(n, np.int64), seed)
    return split.held_out.features[:, 0].astype(np.int64), split.reference.features[:, 0].astype(np.int64)


def _reference_stats(inception: InceptionFID, real_x: torch.Tensor, reference: np.ndarray, key: dict,
                     files: SweepFiles, log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray]:
    """Feature statistics of the reference half, cached under points/ (on a CPU they cost minutes)."""
    rel = "points/inception-ref-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".npz"
    if files.exists(rel):
        with np.load(io.BytesIO(files.read(rel))) as z:
            return z["mu"], z["sigma"]
    t0 = time.perf_counter()
    mu, sigma = inception.stats(real_x[torch.from_numpy(reference)])
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma)
    files.write(rel, buf.getvalue())
    log(f"[cfgd.sweep] InceptionV3 reference: {len(reference)} real images ({time.perf_counter() - t0:.0f}s)")
    return mu, sigma


def sweep_fid_inception(inception: InceptionFID, files: SweepFiles, point_ids: list[str], floor_id: str,
                        data_root: str, real_split: str, seed: int, storage: StorageOptions | None = None,
                        log: Callable[[str], None] = print) -> dict[str, float]:
    """fid_inception of each done grid point (its stored samples) and of the floor (the first
    n held-out real images), each against the reference half of the real split.

    Results are kept as points/<id>.fid_inception-<weights>.json, beside the points'
    other metrics, so a rerun, or setting ``inception_weights`` on a finished sweep,
    computes only the missing ones and never resamples. Returns {id: fid_inception}.
    """
    ids = [*point_ids, floor_id]
    rel = {pid: f"points/{pid}.fid_inception-{inception.sha256[:16]}.json" for pid in ids}
    todo = [pid for pid in ids if not files.exists(rel[pid])]
    if todo:
        real_x, real_y, _ = load_split(data_root, real_split, storage)
        held_out, reference = real_halves(len(real_y), seed)
        ref = _reference_stats(inception, real_x, reference, {"data_root": data_root, "real_split": real_split,
                                                               "seed": seed, "weights_sha256": inception.sha256},
                               files, log)
        for pid in todo:
            if pid == floor_id:
                n = json.loads(files.read(f"points/{floor_id}.json"))["n_samples"]
                images = real_x[torch.from_numpy(held_out[:n])]
            else:
                table = pq.read_table(pa.BufferReader(files.read(f"points/{pid}.samples.parquet")), columns=["image"])
                images = np.stack([decode_png(b) for b in table.column("image").to_pylist()])
            record = {"fid_inception": frechet_distance(*inception.stats(images), *ref), "n_samples": len(images),
                      "weights_sha256": inception.sha256}
            files.write(rel[pid], json.dumps(record, indent=2).encode())
        log(f"[cfgd.sweep] fid_inception of {len(todo)} points")
    return {pid: json.loads(files.read(rel[pid]))["fid_inception"] for pid in ids}
