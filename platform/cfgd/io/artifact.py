"""Self-describing artifact directories: one format for every file cfgd writes and loads.

Model checkpoints (:mod:`cfgd.io.checkpoint`), evaluators (:mod:`cfgd.evaluate.evaluator`) and any
later artifact share it::

    <files>      whatever the artifact holds (safetensors weights, no pickle)
    meta.json    kind, format version, the artifact's own fields, and the size + sha256
                 of every file above, written last

The rules live here once:

* **Write atomically.** Locally, files go to a temporary sibling that replaces the
  final directory (:func:`cfgd.io.atomic.staged_dir`); on S3, meta.json is uploaded
  after the files. A reader never sees meta.json without them.
* **Verify every loaded file.** A loader names the files it will read (``required``);
  each must be listed in meta.json and match its size and sha256. A meta.json with
  ``"files": {}`` verifies nothing and is refused.
* **Fetch by digest.** A remote artifact is downloaded (only the files meta.json lists,
  under a size cap) into a cache private to the user (mode 0700), keyed by the sha256 of
  its meta.json, which pins every file's digest: a rewritten remote artifact gets a new
  entry, never stale weights. Entries are filled in a temporary directory and renamed
  into place, so replicas and tasks sharing a node never see half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from cfgd.io import storage, transfers
from cfgd.io.atomic import staged_dir
from cfgd.io.retry import with_retries
from cfgd.io.storage import StorageOptions

if TYPE_CHECKING:
    import pyarrow.fs as pafs

FORMAT_VERSION = 1
META = "meta.json"
MAX_FETCH_BYTES = 8 << 30  # a download larger than this is refused before it starts


class ArtifactError(ValueError):
    """An artifact that is missing, incomplete, corrupted, of another kind, or too large."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_root() -> Path:
    """The user's private download cache: $CFGD_CACHE, else ~/.cache/cfgd (created 0700)."""
    root = Path(os.environ.get("CFGD_CACHE") or Path.home() / ".cache" / "cfgd")
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)  # an existing directory too: other users must not plant weights
    return root


# ------------------------------------------------------------------------------ writing


def write(out: str, kind: str, stage: Callable[[Path], Sequence[str]], fields: dict[str, Any],
          opts: StorageOptions | None = None, overwrite: bool = False) -> str:
    """Write an artifact to ``out`` (a local directory or ``s3://`` prefix); returns where.

    ``stage(tmp)`` writes the artifact's files into the empty directory ``tmp`` and
    returns their names; meta.json (``fields`` + kind, version, file records) follows.
    An existing artifact at ``out`` is refused unless ``overwrite``.
    """
    fs = storage.fsspec_fs(out, opts)
    target = storage.arrow_path(out)
    if not overwrite and fs.exists(f"{target}/{META}"):
        raise ArtifactError(f"refusing to overwrite the {kind} at {out} (it already has a {META})")
    if storage.is_remote(out):
        with tempfile.TemporaryDirectory(prefix="cfgd-artifact-") as tmp:
            (Path(tmp) / META).write_bytes(_stage(Path(tmp), kind, stage, fields))
            persist(tmp, storage.arrow_fs(out, opts), target)  # the files verified, meta.json last
        return out
    with staged_dir(target, fs) as tmp:  # replaces an earlier artifact, or an incomplete leftover (no meta.json)
        (Path(tmp) / META).write_bytes(_stage(Path(tmp), kind, stage, fields))
    return target


def _stage(tmp: Path, kind: str, stage: Callable[[Path], Sequence[str]], fields: dict[str, Any]) -> bytes:
    names = list(stage(tmp))
    meta = {**fields, "kind": kind, "format_version": FORMAT_VERSION,
            "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)} for n in names}}
    return json.dumps(meta, indent=2, sort_keys=True).encode()


def persist(local_dir: str | Path, fs: pafs.FileSystem, dest: str, attempts: int = 5) -> list[str]:
    """Copy an artifact directory to ``dest`` on a pyarrow filesystem, verified: each file
    is written through an output stream that is closed explicitly (so an upload error is
    raised, not swallowed), then its size in the store is checked; meta.json goes last.
    Returns the names written. Raises StorageError naming ``dest`` when a file cannot be
    stored in ``attempts`` tries (each one the store client's own retries).

    This replaces ``pyarrow.fs.copy_files`` (Ray Train's default upload), which ignores a
    failed upload of a file and returns normally: measured with tests/faultproxy.py, a
    cut PUT leaves a checkpoint without its weights that Ray then records as committed
    (docs/storage-faults.md).
    """
    import pyarrow.fs as pafs

    local_dir = Path(local_dir)
    names = sorted(p.name for p in local_dir.iterdir() if p.is_file())
    names = [n for n in names if n != META] + ([META] if META in names else [])
    with_retries(lambda: fs.create_dir(dest, recursive=True), what=f"create {dest}", attempts=attempts)
    for name in names:
        src, target = local_dir / name, f"{dest.rstrip('/')}/{name}"

        def put(src=src, target=target) -> None:
            with open(src, "rb") as f, fs.open_output_stream(target) as out:
                for chunk in iter(lambda: f.read(8 << 20), b""):
                    out.write(chunk)
            info = fs.get_file_info(target)
            if info.type != pafs.FileType.File or info.size != src.stat().st_size:
                # Not transient by itself, but a store that lost the write may take the next.
                raise ConnectionError(f"{target}: the store holds {info.size} bytes, expected "
                                      f"{src.stat().st_size} ({info.type.name})")

        with_retries(put, what=f"store {name} of {dest}", attempts=attempts)
    return names


# ------------------------------------------------------------------------------ reading


def parse_meta(raw: bytes, where: str, kind: str, legacy_kind: bool = False) -> dict[str, Any]:
    """meta.json's content, checked for kind, format and a well-formed file table.

    ``legacy_kind``: accept a meta.json without ``kind`` (written before kinds existed).
    """
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{where}/{META} is corrupted: {err}") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{where}/{META} is corrupted: not a JSON object")
    found = meta.get("kind", kind if legacy_kind else None)
    if found != kind:
        raise ArtifactError(f"{where} holds a {found!r}, not a {kind!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{where} has format {meta.get('format_version')!r}; "
                            f"this version of cfgd reads format {FORMAT_VERSION}")
    files = meta.get("files")
    ok = isinstance(files, dict) and all(
        _safe_name(n) and isinstance(r, dict) and isinstance(r.get("bytes"), int) and r["bytes"] >= 0
        and isinstance(r.get("sha256"), str) for n, r in files.items())
    if not ok:
        raise ArtifactError(f"{where}/{META} is corrupted: its file table is malformed")
    return meta


def _safe_name(name: Any) -> bool:
    """A plain file name inside the artifact (no path that could escape it)."""
    return isinstance(name, str) and name not in ("", ".", "..", META) and "/" not in name and "\\" not in name


def verify(directory: str | Path, kind: str, required: Sequence[str], legacy_kind: bool = False) -> dict[str, Any]:
    """meta.json of a local artifact, after checking every file in it and that ``required``
    (the files the caller will load) are among them. Raises ArtifactError saying what is wrong."""
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"no {kind} directory at {d}")
    if not (d / META).is_file():
        raise ArtifactError(f"{d} is not a complete {kind}: {META} is missing (interrupted write?)")
    meta = parse_meta((d / META).read_bytes(), str(d), kind, legacy_kind)
    unlisted = [n for n in required if n not in meta["files"]]
    if unlisted:
        raise ArtifactError(f"{kind} {d} is refused: {META} does not list {unlisted}, "
                            f"so they cannot be verified before loading")
    for name, rec in meta["files"].items():
        f = d / name
        if not f.is_file():
            raise ArtifactError(f"{kind} {d} is incomplete: {name} is missing")
        if f.stat().st_size != rec["bytes"]:
            raise ArtifactError(f"{kind} {d} is corrupted: {name} has {f.stat().st_size} bytes, "
                                f"expected {rec['bytes']} (truncated?)")
        if sha256_file(f) != rec["sha256"]:
            raise ArtifactError(f"{kind} {d} is corrupted: {name} does not match its sha256")
    return meta


def fetch(uri: str, kind: str, required: Sequence[str], opts: StorageOptions | None = None,
          meta_bytes: bytes | None = None, legacy_kind: bool = False,
          max_bytes: int = MAX_FETCH_BYTES) -> tuple[Path, dict[str, Any]]:
    """A verified local directory for the artifact at ``uri`` (path or ``s3://``), and its
    meta.json (verified once here: callers need not hash the files again).

    Local paths are verified in place. Remote ones go through the private cache (see the
    module docstring). ``meta_bytes``: the remote meta.json, if the caller read it already.
    """
    if not storage.is_remote(uri):
        return Path(uri), verify(uri, kind, required, legacy_kind)
    uri = uri.rstrip("/")
    raw = meta_bytes if meta_bytes is not None else transfers.read_bytes(f"{uri}/{META}", opts)
    meta = parse_meta(raw, uri, kind, legacy_kind)
    total = sum(r["bytes"] for r in meta["files"].values())
    if total > max_bytes:
        raise ArtifactError(f"{kind} {uri} is refused: its files total {total} bytes, over the "
                            f"download cap of {max_bytes}")
    root = cache_root()
    local = root / hashlib.sha256(raw).hexdigest()[:32]
    try:
        return local, verify(local, kind, required, legacy_kind)  # cached and intact
    except ArtifactError:
        shutil.rmtree(local, ignore_errors=True)
    fs = storage.fsspec_fs(uri, opts)
    names = sorted(meta["files"])
    rpaths = [storage.arrow_path(f"{uri}/{n}") for n in names]
    try:
        with staged_dir(str(local), exclusive=True) as tmp:
            with_retries(lambda: fs.get(rpaths, [f"{tmp}/{n}" for n in names]), what=f"download {uri}")
            Path(tmp, META).write_bytes(raw)
            verified = verify(tmp, kind, required, legacy_kind)
    except FileExistsError:  # another process filled the entry first: use theirs
        if not (local / META).is_file():
            raise
    return local, verified  # the same digest: the same files, whoever renamed them in
