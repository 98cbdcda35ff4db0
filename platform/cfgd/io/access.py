"""Storage access checks: fail within seconds, naming what to fix, before a long job starts.

:func:`check_access` reads (or, with ``write=True``, writes and deletes a probe under) a
URI with a dedicated client of short timeouts and few attempts, and turns a library
error into a :class:`~cfgd.io.retry.StorageError` that names the endpoint, the bucket or
the credentials to check, never the secret.
"""

from __future__ import annotations

import os
import tempfile
import uuid

from cfgd.io.retry import CREDENTIAL_CODES, StorageError, _botocore_kind, _chain, _client_error, is_transient
from cfgd.io.storage import (CREDENTIALS_HINT, ENDPOINT_HINT, StorageOptions, _bucket_key, _resolve, _Resolved,
                             _s3fs, _scrub, arrow_path, is_remote)

# check_access must answer within seconds, whatever the configured retries.
CHECK_CONNECT_TIMEOUT_S = 3.0
CHECK_READ_TIMEOUT_S = 5.0
CHECK_ATTEMPTS = 2
PROBE_NAME = ".cfgd-write-probe"

# ---------------------------------------------------------------- check_access


def _explain(uri: str, exc: BaseException, r: _Resolved, bucket: str) -> StorageError:
    """Turn a library error into a StorageError that says what to fix."""
    where = f"endpoint {r.endpoint_url}" if r.endpoint_url else "AWS S3"
    detail = _scrub(f"{type(exc).__name__}: {exc}", r)
    ce = _client_error(exc)
    code, status = ce if ce else ("", 0)
    kinds = {_botocore_kind(e) for e in _chain(exc)}
    if "nocreds" in kinds:
        msg = f"cannot access {uri}: no S3 credentials found: {CREDENTIALS_HINT}"
    elif "connect" in kinds or (not ce and is_transient(exc)):
        msg = f"cannot access {uri}: {where} is unreachable ({detail}): {ENDPOINT_HINT}"
    elif code == "NoSuchBucket":
        msg = f"cannot access {uri}: bucket {bucket!r} does not exist at {where}: create it first"
    elif code in CREDENTIAL_CODES or status == 403:
        msg = (f"cannot access {uri}: {where} refused the credentials or denied access "
               f"({code or status}): {CREDENTIALS_HINT}")
        if code in ("", "403"):
            # No S3 error document: possibly not an S3 server at all.
            msg += "; also check that storage.endpoint_url points at an S3 server"
    else:
        msg = (f"cannot access {uri} at {where} ({detail}): {ENDPOINT_HINT}; "
               f"{CREDENTIALS_HINT}")
    return StorageError(msg)


def check_access(uri: str, opts: StorageOptions | None = None, write: bool = False) -> None:
    """Fail within seconds, with a StorageError saying what to check, if ``uri``
    cannot be used. ``write=False``: it must exist (a bucket root only needs the
    bucket). ``write=True``: something can be written there (for S3 a small
    probe object is written under the prefix and deleted again)."""
    if is_remote(uri):
        _check_s3(uri, opts, write)
    else:
        _check_local(uri, write)


def _check_s3(uri: str, opts: StorageOptions | None, write: bool) -> None:
    r = _resolve(opts)
    bucket, key = _bucket_key(uri)
    # A dedicated client with short timeouts and few attempts: the point of
    # this check is to fail fast, the platform's client retries patiently.
    fs = _s3fs(r, connect_timeout=min(r.connect_timeout_s, CHECK_CONNECT_TIMEOUT_S),
               read_timeout=CHECK_READ_TIMEOUT_S, max_attempts=CHECK_ATTEMPTS,
               mode="standard", fresh=True)
    fs.retries = 1  # s3fs's own retry loop on top of botocore's: not for a quick check
    try:
        found = _s3_exists(fs, bucket, key)
        if write:
            probe = "/".join(p for p in (bucket, key, f"{PROBE_NAME}-{uuid.uuid4().hex}") if p)
            fs.pipe_file(probe, b"ok")
            fs.rm_file(probe)
    except Exception as exc:  # noqa: BLE001 - explained below
        raise _explain(uri, exc, r, bucket) from None  # the cause may quote request details
    if not write and not found:
        raise StorageError(f"cannot read {uri}: nothing exists there (bucket {bucket!r} is fine)")


def _s3_exists(fs, bucket: str, key: str) -> bool:
    """Does the bucket answer, and does ``key`` exist as an object or a prefix?"""
    # ListObjectsV2 rather than HeadBucket: a HEAD error has no body, so a bad
    # secret and a missing permission would both be a bare "403".
    prefix = f"{key}/" if key else ""
    listing = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
    if not key or listing.get("KeyCount", 0) > 0:
        return True
    try:
        fs.call_s3("head_object", Bucket=bucket, Key=key)
        return True
    except FileNotFoundError:
        return False


def _check_local(uri: str, write: bool) -> None:
    path = arrow_path(uri)
    if not write:
        if not os.path.exists(path):
            raise StorageError(f"cannot read {uri}: local path {path} does not exist")
        return
    if os.path.isdir(path):
        # A real write catches read-only mounts that os.access misses (root).
        try:
            fd, probe = tempfile.mkstemp(prefix=PROBE_NAME, dir=path)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StorageError(f"cannot write to {uri}: {exc}") from exc
        return
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise StorageError(f"cannot write to {uri}: {path} is not writable")
        return
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):  # it will be created on write
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise StorageError(f"cannot write to {uri}: {parent} is not a writable directory")
