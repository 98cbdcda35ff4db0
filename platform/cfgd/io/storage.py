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
  check, never the secret. :func:`cfgd.io.access.check_access` is meant to run
  before any long job starts so that such mistakes cost seconds, not a failed run.
* Transient failures (connection resets, timeouts, 5xx, throttling) are
  retried twice over: inside botocore / the AWS SDK per request, and by
  :func:`cfgd.io.retry.with_retries` around whole multi-request operations such as a
  directory upload.

Here: :class:`StorageOptions`, URIs, and the two filesystem builders. Access checks
are :mod:`cfgd.io.access`; copying and atomic writes are :mod:`cfgd.io.transfers`.
"""


from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, TypeVar
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

from cfgd.io.retry import StorageError

log = logging.getLogger("cfgd.storage")

T = TypeVar("T")

REMOTE_SCHEMES = ("s3", "s3a")
LOCAL_SCHEMES = ("", "file")
DEFAULT_REGION = "us-east-1"
# Per socket read, not per transfer: a large upload is many reads, so this only
# has to outlast one slow server response.
READ_TIMEOUT_S = 60.0
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
