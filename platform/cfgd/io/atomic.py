"""Atomic commit: stage the new content beside its final name, then put it in place in one step.

One primitive for every write a reader must see whole or not at all:

* :func:`staged_file`: a local file, written to a hidden temporary sibling, fsync'd and
  renamed over the final name (or, ``exclusive``, hard-linked to it: fails if the name
  exists), so readers see the old content or all of the new one;
* :func:`staged_dir`: a directory on any fsspec filesystem (local or object storage),
  filled in a hidden temporary sibling which then replaces the final directory; the old
  one is moved aside first (not deleted), so a crash in between leaves it recoverable.

On an error inside the ``with`` block the staged content is removed and nothing changes
at the final name. Object storage writes one object atomically already (one PUT); a set
of objects is committed by writing its marker last (:mod:`cfgd.io.artifact`).
"""

from __future__ import annotations

import errno
import os
import posixpath
import tempfile
import uuid
from contextlib import contextmanager
from typing import BinaryIO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem


@contextmanager
def staged_file(path: str, exclusive: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write; on a normal exit it becomes ``path`` (local) in one step.

    ``exclusive``: commit only if nothing exists at ``path`` (FileExistsError otherwise).
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    # Same directory so the rename (or link) stays within one filesystem.
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # fails if the name exists
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def staged_dir(final: str, fs: fsspec.AbstractFileSystem | None = None, exclusive: bool = False) -> Iterator[str]:
    """A new, empty hidden sibling directory of ``final`` to fill; on a normal exit it
    replaces ``final`` (created or replaced), on an error it is removed.

    ``final`` is a path in ``fs``'s convention (posix, no protocol); ``fs``: local by default.
    ``exclusive`` (local only): commit only if nothing is at ``final`` — one rename, so of
    several processes filling the same entry exactly one wins; the others get
    FileExistsError and their staged copy is removed.
    """
    fs = fs if fs is not None else fsspec.filesystem("file")
    if exclusive and not isinstance(fs, LocalFileSystem):
        raise ValueError("staged_dir(exclusive=True) needs a local filesystem (one atomic rename)")
    parent, name = posixpath.dirname(final), posixpath.basename(final)
    tag = uuid.uuid4().hex[:8]
    tmp = posixpath.join(parent, f".{name}.tmp-{tag}")
    fs.makedirs(tmp, exist_ok=True)
    try:
        yield tmp
        if exclusive:
            _rename_new(tmp, final)
        else:
            _replace_dir(fs, tmp, final, posixpath.join(parent, f".{name}.old-{tag}"))
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
        raise


def _rename_new(src: str, dst: str) -> None:
    """Rename a local directory to a name that must not exist yet (an empty directory at
    ``dst`` counts as nothing: rename(2) replaces it)."""
    try:
        os.rename(src, dst)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "already exists", dst) from None
        raise


def _move(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move a directory. Object stores have no directories (only keys, and some
    servers keep empty "directory" markers that a recursive copy trips over), so
    there each file is moved on its own."""
    if isinstance(fs, LocalFileSystem):
        fs.mv(src, dst, recursive=True)
        return
    for path in fs.find(src):
        fs.mv(path, dst + path[len(src):])
    if fs.exists(src):  # leftover directory markers
        fs.rm(src, recursive=True)


def _replace_dir(fs: fsspec.AbstractFileSystem, src: str, dst: str, old: str) -> None:
    """Move src to dst, replacing dst. The old dst is moved aside first (not
    deleted) so a crash in between leaves it recoverable."""
    if fs.exists(dst):
        if fs.find(dst):
            _move(fs, dst, old)
        else:  # nothing in it (or only markers): a local move would land inside it
            fs.rm(dst, recursive=True)
    _move(fs, src, dst)
    if fs.exists(old):
        fs.rm(old, recursive=True)


def replace_dir(src: str, final: str, fs: fsspec.AbstractFileSystem | None = None) -> None:
    """Put the filled directory ``src`` at ``final`` (created or replaced) as :func:`staged_dir`
    commits, for content staged across runs (a resumable job's progress directory)."""
    fs = fs if fs is not None else fsspec.filesystem("file")
    parent, name = posixpath.dirname(final), posixpath.basename(final)
    _replace_dir(fs, src, final, posixpath.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}"))
