"""Copying to and from storage, and writes a reader sees whole or not at all.

Directory uploads and downloads, whole-object reads and writes, and an exclusive create,
each retried as a whole (:func:`cfgd.io.retry.with_retries`) and, for writes, confirmed
by the size the store reports. Local atomic writes go through :mod:`cfgd.io.atomic`.
"""

from __future__ import annotations

import errno
import os

import fsspec

from cfgd.io.atomic import staged_file
from cfgd.io.retry import StorageError, _client_error, with_retries
from cfgd.io.storage import StorageOptions, arrow_path, fsspec_fs, is_remote

# ----------------------------------------------------------------- transfers


def _local_files(local_dir: str) -> list[str]:
    """Relative POSIX paths of every file under ``local_dir``, sorted."""
    out = []
    for root, _dirs, files in os.walk(local_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local_dir)
            out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def _safe_rel(rel: str, uri: str) -> str:
    """Refuse remote names that would land outside the download directory."""
    parts = rel.split("/")
    if rel.startswith("/") or ".." in parts:
        raise StorageError(f"refusing to download {uri}: unsafe object name {rel!r}")
    return rel


def upload_dir(local_dir: str, uri: str, opts: StorageOptions | None = None) -> list[str]:
    """Copy every file under ``local_dir`` to ``uri`` (the directory's contents,
    not the directory itself). Returns the relative paths copied."""
    local_dir = os.path.abspath(local_dir)
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(errno.ENOENT, "not a directory", local_dir)
    rels = _local_files(local_dir)
    if not rels:
        return []
    fs = fsspec_fs(uri, opts)
    base = arrow_path(uri)
    # Explicit source and destination lists: fsspec's directory semantics
    # (trailing slash, existing target) differ between versions.
    lpaths = [os.path.join(local_dir, rel) for rel in rels]
    rpaths = [f"{base}/{rel}" for rel in rels]
    if not is_remote(uri):
        for p in {os.path.dirname(p) for p in rpaths}:
            os.makedirs(p, exist_ok=True)
    def put() -> None:
        fs.put(lpaths, rpaths)
        for lp, rp in zip(lpaths, rpaths):
            _confirm_size(fs, rp, os.path.getsize(lp))

    with_retries(put, what=f"upload {local_dir} -> {uri}")
    return rels


def _confirm_size(fs: fsspec.AbstractFileSystem, path: str, expected: int) -> None:
    """The store holds ``expected`` bytes at ``path`` (one HEAD on S3), else a transient
    error: a write is complete when the store says so, not when the client returned."""
    size = fs.info(path).get("size")
    if size != expected:
        raise ConnectionError(f"{path}: the store holds {size} bytes after the write, expected {expected}")


def download_dir(uri: str, local_dir: str, opts: StorageOptions | None = None) -> list[str]:
    """Copy every object under ``uri`` into ``local_dir`` (created if needed).
    Returns the relative paths copied; a prefix with nothing under it raises
    FileNotFoundError."""
    fs = fsspec_fs(uri, opts)
    base = arrow_path(uri)
    found = with_retries(lambda: fs.find(base), what=f"list {uri}")
    # Keys ending in "/" are directory markers (some servers list them as
    # objects): nothing to download.
    rels = [_safe_rel(p[len(base):].lstrip("/"), uri) for p in found
            if p.startswith(base + "/") and not p.endswith("/")]
    if not rels:
        raise FileNotFoundError(errno.ENOENT, "no files under", uri)
    rpaths = [f"{base}/{rel}" for rel in rels]
    lpaths = [os.path.join(os.path.abspath(local_dir), *rel.split("/")) for rel in rels]
    for p in {os.path.dirname(p) for p in lpaths}:
        os.makedirs(p, exist_ok=True)
    with_retries(lambda: fs.get(rpaths, lpaths), what=f"download {uri} -> {local_dir}")
    return rels


def write_bytes_atomic(uri: str, data: bytes, opts: StorageOptions | None = None) -> None:
    """Write ``data`` so that readers see the old content or all of the new one."""
    if is_remote(uri):
        # One PUT (or a completed multipart upload) is atomic on S3 already.
        fs = fsspec_fs(uri, opts)
        def put() -> None:
            fs.pipe_file(arrow_path(uri), data)
            _confirm_size(fs, arrow_path(uri), len(data))

        with_retries(put, what=f"write {uri}")
        return
    with staged_file(arrow_path(uri)) as f:
        f.write(data)


def create_exclusive(uri: str, data: bytes, opts: StorageOptions | None = None) -> bool:
    """Write ``data`` only if nothing exists at ``uri``, atomically; False if something does.

    S3: a conditional PUT (``If-None-Match: *``), so two writers racing for one name
    cannot both win. Locally: the full file is staged, then hard-linked into place
    (``link`` fails if the name exists).
    """
    if is_remote(uri):
        fs = fsspec_fs(uri, opts)
        try:
            with_retries(lambda: fs.pipe_file(arrow_path(uri), data, IfNoneMatch="*"), what=f"create {uri}")
        except OSError as err:
            ce = _client_error(err)
            if (ce and (ce[1] == 412 or ce[0] in ("PreconditionFailed", "ConditionalRequestConflict"))) or \
                    "pre-condition" in str(err).lower() or "precondition" in str(err).lower():
                return False
            raise
        return True
    try:
        with staged_file(arrow_path(uri), exclusive=True) as f:
            f.write(data)
    except FileExistsError:
        return False
    return True


def read_bytes(uri: str, opts: StorageOptions | None = None) -> bytes:
    """The whole content of one file or object."""
    if is_remote(uri):
        fs = fsspec_fs(uri, opts)
        return with_retries(lambda: fs.cat_file(arrow_path(uri)), what=f"read {uri}")
    with open(arrow_path(uri), "rb") as f:
        return f.read()
