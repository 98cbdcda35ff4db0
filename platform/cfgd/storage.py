"""Object storage: one place that turns a URI plus options into filesystems.

Every part of the platform (data shards, Ray Train checkpoints, sampling
outputs, Serve model loading) reads and writes through this module, so that an
``s3://bucket/prefix`` and a local path behave the same and are configured in
one place.

Design
------
* A URI is either remote (``s3://`` / ``s3a://``) or local (a plain path or
  ``file://``). Any other scheme is refused rather than silently treated as a
  local path.
* Two client stacks are needed because the libraries we use speak different
  filesystem APIs: fsspec (``s3fs`` → aiobotocore/botocore) for our own file
  handling, and ``pyarrow.fs`` (AWS C++ SDK) for Ray Data and Ray Train's
  ``storage_filesystem``. :class:`StorageOptions` is resolved once (explicit
  value, else the standard ``AWS_*`` environment variables, else a default)
  and both stacks are built from the *same* resolved values. This matters
  because pyarrow's ``S3FileSystem`` ignores ``AWS_ENDPOINT_URL*``: left to
  itself it would talk to AWS while s3fs talks to the local endpoint.
* Filesystem objects are cached per resolved options. Listing caches are off:
  several processes (and pyarrow next to s3fs) write the same prefixes, and a
  stale cached listing is a silent correctness bug, while a LIST is cheap.
* Errors a user can fix (endpoint, bucket, credentials) surface as
  :class:`StorageError` with a message that names the URI and the setting to
  check, never the secret. :func:`check_access` is meant to run before any
  long job starts so that such mistakes cost seconds, not a failed run.
* Transient failures (connection resets, timeouts, 5xx, throttling) are
  retried twice over: inside botocore / the AWS SDK per request, and by
  :func:`cfgd.retry.with_retries` around whole multi-request operations such as a
  directory upload.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, TypeVar
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

from cfgd.retry import CREDENTIAL_CODES, StorageError, _botocore_kind, _chain, _client_error, is_transient, \
    with_retries

log = logging.getLogger(__name__)

T = TypeVar("T")

REMOTE_SCHEMES = ("s3", "s3a")
LOCAL_SCHEMES = ("", "file")
DEFAULT_REGION = "us-east-1"
# Per socket read, not per transfer: a large upload is many reads, so this only
# has to outlast one slow server response.
READ_TIMEOUT_S = 60.0
# check_access must answer within seconds, whatever the configured retries.
CHECK_CONNECT_TIMEOUT_S = 3.0
CHECK_READ_TIMEOUT_S = 5.0
CHECK_ATTEMPTS = 2
PROBE_NAME = ".cfgd-write-probe"

CREDENTIALS_HINT = (
    "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
    "storage.access_key_id/secret_access_key"
)
ENDPOINT_HINT = "check storage.endpoint_url (or AWS_ENDPOINT_URL) and that the server is running"


@dataclass(repr=False)
class StorageOptions:
    """How to reach object storage. Every "" / default falls back to the AWS
    conventions (environment variables), so a config file can leave it empty.

    Only str/int/float/bool fields: this is embedded in an omegaconf structured
    config. Prefer leaving the secret empty and exporting
    ``AWS_SECRET_ACCESS_KEY``: a resolved config printed by omegaconf shows
    every field as is.
    """

    endpoint_url: str = ""  # e.g. http://127.0.0.1:8333; "" = AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL or AWS
    region: str = ""  # "" = AWS_REGION/AWS_DEFAULT_REGION or us-east-1
    access_key_id: str = ""  # "" = AWS_ACCESS_KEY_ID
    secret_access_key: str = ""  # "" = AWS_SECRET_ACCESS_KEY
    path_style: bool = True  # bucket in the path (SeaweedFS, MinIO) rather than the host name
    retries: int = 5  # total attempts per request (botocore / AWS SDK max_attempts)
    connect_timeout_s: float = 5.0  # seconds to open a connection to the store

    def __repr__(self) -> str:
        # Never print credentials: logs and tracebacks end up in CI output.
        key = _mask(self.access_key_id, keep=4)
        secret = "'***'" if self.secret_access_key else "''"
        return (
            f"StorageOptions(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
            f"access_key_id={key}, secret_access_key={secret}, "
            f"path_style={self.path_style!r}, retries={self.retries!r}, "
            f"connect_timeout_s={self.connect_timeout_s!r})"
        )

    __str__ = __repr__


def _mask(value: str, keep: int = 0) -> str:
    """'AKIAEXAMPLE1234' -> "'***1234'" (the tail tells two keys apart)."""
    if not value:
        return "''"
    tail = value[-keep:] if keep and len(value) > 2 * keep else ""
    return f"'***{tail}'"


# --------------------------------------------------------------------------- URIs


def _scheme(uri: str) -> str:
    """The URI's scheme, lower case; "" for a plain path."""
    scheme = urlparse(str(uri)).scheme.lower()
    # A one-letter "scheme" is a Windows drive letter, not a protocol.
    return "" if len(scheme) == 1 else scheme


def _check_scheme(uri: str) -> str:
    scheme = _scheme(uri)
    if scheme not in REMOTE_SCHEMES + LOCAL_SCHEMES:
        raise StorageError(
            f"unsupported storage URI {uri!r}: use s3://bucket/prefix or a local path"
        )
    return scheme


def is_remote(uri: str) -> bool:
    """True for object storage (s3://, s3a://), False for a local path."""
    return _check_scheme(uri) in REMOTE_SCHEMES


def strip_scheme(uri: str) -> str:
    """``s3://bucket/key`` -> ``bucket/key``; ``file:///a/b`` -> ``/a/b``; a plain path as is."""
    uri = str(uri)
    scheme = _check_scheme(uri)
    if not scheme:
        return uri
    rest = uri[len(scheme) + 1 :]
    if scheme in REMOTE_SCHEMES:
        return rest.lstrip("/")
    # file:///abs -> /abs ; file://host/abs is not supported, keep the path part.
    return "/" + rest.lstrip("/") if rest.startswith("//") else rest


def _bucket_key(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> (``bucket``, ``a/b``)."""
    bucket, _, key = strip_scheme(uri).partition("/")
    if not bucket:
        raise StorageError(f"storage URI {uri!r} names no bucket: use s3://bucket/prefix")
    return bucket, key.strip("/")


def arrow_path(uri: str) -> str:
    """The path to hand pyarrow / Ray together with :func:`arrow_fs`.

    S3: ``bucket/prefix`` (no scheme: Ray and pyarrow reject ``s3://`` when a
    filesystem object is given). Local: the absolute path.
    """
    if is_remote(uri):
        return strip_scheme(uri).rstrip("/")
    return os.path.abspath(os.path.expanduser(strip_scheme(uri)))


# ------------------------------------------------------------- resolved options


class _Resolved(NamedTuple):
    """StorageOptions after the environment fallbacks; the cache key."""

    endpoint_url: str
    region: str
    key: str | None
    secret: str | None
    token: str | None
    path_style: bool
    max_attempts: int
    connect_timeout_s: float


def _env(*names: str) -> str:
    for name in names:
        value = os.environ.get(name, "")
        if value:
            return value
    return ""


def _resolve(opts: StorageOptions | None) -> _Resolved:
    """Apply the environment fallbacks once, so both client stacks agree."""
    opts = opts or StorageOptions()
    endpoint = (opts.endpoint_url or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")).rstrip("/")
    if endpoint and "://" not in endpoint:
        raise StorageError(
            f"storage.endpoint_url {endpoint!r} needs a scheme, e.g. http://{endpoint}"
        )
    region = opts.region or _env("AWS_REGION", "AWS_DEFAULT_REGION") or DEFAULT_REGION
    key = opts.access_key_id or _env("AWS_ACCESS_KEY_ID")
    secret = opts.secret_access_key or _env("AWS_SECRET_ACCESS_KEY")
    if bool(key) != bool(secret):
        raise StorageError(
            "only half of the S3 credentials are set (access key id without secret or "
            f"the reverse): {CREDENTIALS_HINT}"
        )
    # A session token belongs to one temporary key pair: use it only with the
    # pair that came from the environment too.
    from_env = not opts.access_key_id and not opts.secret_access_key
    token = _env("AWS_SESSION_TOKEN") if from_env else ""
    return _Resolved(
        endpoint_url=endpoint,
        region=region,
        # None lets each library fall back to its own chain (config files, IMDS).
        key=key or None,
        secret=secret or None,
        token=token or None,
        path_style=bool(opts.path_style),
        max_attempts=max(1, int(opts.retries)),
        connect_timeout_s=float(opts.connect_timeout_s),
    )


def _scrub(text: str, r: _Resolved) -> str:
    """Remove the secret and token from a message built from a library error."""
    for secret in (r.secret, r.token):
        if secret:
            text = text.replace(secret, "***")
    return text


# ---------------------------------------------------------------- filesystems

_cache: dict[tuple, Any] = {}
_cache_lock = threading.Lock()


def _cached(key: tuple, build: Callable[[], T]) -> T:
    with _cache_lock:
        if key not in _cache:
            _cache[key] = build()
        return _cache[key]


def _s3fs(r: _Resolved, *, connect_timeout: float, read_timeout: float,
          max_attempts: int, mode: str = "adaptive", fresh: bool = False):
    import s3fs  # imported lazily: local-only users should not pay for botocore

    return s3fs.S3FileSystem(
        endpoint_url=r.endpoint_url or None,
        key=r.key,
        secret=r.secret,
        token=r.token,
        client_kwargs={"region_name": r.region},
        config_kwargs={
            "s3": {"addressing_style": "path" if r.path_style else "virtual"},
            "retries": {"max_attempts": max_attempts, "mode": mode},
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
        },
        # Other processes (and pyarrow) write the same prefixes: never answer
        # from a stale listing.
        use_listings_cache=False,
        skip_instance_cache=fresh,
    )


def fsspec_fs(uri: str, opts: StorageOptions | None = None) -> fsspec.AbstractFileSystem:
    """An fsspec filesystem for ``uri``: s3fs for s3://, the local one otherwise.

    Paths given to it are :func:`strip_scheme` paths (``bucket/key``).
    """
    if not is_remote(uri):
        return fsspec.filesystem("file")
    r = _resolve(opts)
    return _cached(
        ("fsspec", "s3", r),
        lambda: _s3fs(r, connect_timeout=r.connect_timeout_s, read_timeout=READ_TIMEOUT_S,
                      max_attempts=r.max_attempts),
    )


def _endpoint_parts(endpoint_url: str) -> tuple[str | None, str]:
    """``http://127.0.0.1:8333`` -> (``127.0.0.1:8333``, ``http``); "" -> (None, https)."""
    if not endpoint_url:
        return None, "https"
    parsed = urlparse(endpoint_url)
    return parsed.netloc, parsed.scheme or "https"


def arrow_fs(uri: str, opts: StorageOptions | None = None) -> pafs.FileSystem | None:
    """A pyarrow filesystem for ``uri`` (use with :func:`arrow_path`), or None for
    a local path, meaning: let Ray / pyarrow use their own local filesystem."""
    if not is_remote(uri):
        return None
    r = _resolve(opts)
    return _cached(("arrow", "s3", r), lambda: _arrow_s3(r))


def _arrow_s3(r: _Resolved) -> pafs.S3FileSystem:
    host, scheme = _endpoint_parts(r.endpoint_url)
    # Everything is passed explicitly: the constructor reads no AWS_ENDPOINT_URL*.
    return pafs.S3FileSystem(
        access_key=r.key,
        secret_key=r.secret,
        session_token=r.token,
        region=r.region,
        endpoint_override=host,
        scheme=scheme,
        force_virtual_addressing=not r.path_style,
        connect_timeout=r.connect_timeout_s,
        request_timeout=READ_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=r.max_attempts),
    )


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
    path = arrow_path(uri)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    # Same directory so os.replace is a rename within one filesystem.
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    path = arrow_path(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def read_bytes(uri: str, opts: StorageOptions | None = None) -> bytes:
    """The whole content of one file or object."""
    if is_remote(uri):
        fs = fsspec_fs(uri, opts)
        return with_retries(lambda: fs.cat_file(arrow_path(uri)), what=f"read {uri}")
    with open(arrow_path(uri), "rb") as f:
        return f.read()
