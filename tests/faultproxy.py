"""A fault injector for object storage: a TCP proxy on 127.0.0.1 in front of the S3 server.

Clients use the proxy's endpoint instead of the server's; the proxy forwards bytes both
ways and, on request, breaks chosen HTTP requests — deterministically, by what they are
(method and path), not by timing::

    proxy = FaultProxy(s3.port).start()
    opts = s3.storage_options(endpoint_url=proxy.endpoint_url)
    proxy.cut(r"PUT .*/model\\.safetensors", times=10)  # reset the next 10 such requests
    proxy.refuse(5.0)                                   # reset every new connection for 5 s
    proxy.stall(r"PUT .*meta\\.json", seconds=3.0)      # hold such requests 3 s, then forward
    proxy.seen(r"PUT .*meta\\.json")                    # request lines that came through

A cut request is answered with a TCP reset after its request line arrived and before a
byte of it reaches the server, so the server never stores it; a client sees
"connection reset" (what a crashed server, a load balancer restart or a dropped NAT
entry look like). Used by tests/test_storage_faults.py.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

# An HTTP/1.1 request line at the start of a request (the proxy only looks at the bytes
# a client sends; bodies are binary but never contain this shape at a chunk's start).
REQUEST_LINE = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/1\.[01]\r\n")


@dataclass
class _Rule:
    pattern: re.Pattern
    action: str  # "cut" | "stall"
    times: int  # how many more matching requests it applies to
    seconds: float = 0.0
    skip: int = 0  # matching requests let through before the rule starts
    sticky: bool = False  # after the first hit, only requests for that same path match
    path: bytes | None = None
    hits: list[str] = field(default_factory=list)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN: the peer sees a reset."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class FaultProxy:
    """A threaded TCP proxy 127.0.0.1:<port> → 127.0.0.1:<target_port> that injects faults."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._refuse_until = 0.0
        self._lines: list[str] = []
        self._closed = False

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        threading.Thread(target=self._accept, daemon=True, name="faultproxy-accept").start()
        return self

    def stop(self) -> None:
        self._closed = True
        _reset(self._listener)

    # ------------------------------------------------------------------ faults

    def cut(self, pattern: str, times: int = 1, skip: int = 0, sticky: bool = False) -> _Rule:
        """Reset the connection of the next ``times`` requests whose request line
        ("METHOD /path?query") matches ``pattern``, before any of it reaches the server.
        ``skip``: let that many matching requests through first. ``sticky``: once one is
        cut, cut only requests for the same path (every retry of one upload, not the next
        file's)."""
        return self._add(_Rule(re.compile(pattern.encode()), "cut", times, skip=skip, sticky=sticky))

    def stall(self, pattern: str, seconds: float, times: int = 1) -> _Rule:
        """Hold the next ``times`` matching requests for ``seconds``, then forward them."""
        return self._add(_Rule(re.compile(pattern.encode()), "stall", times, seconds))

    def refuse(self, seconds: float) -> None:
        """Reset every connection opened in the next ``seconds`` (a server that is down)."""
        with self._lock:
            self._refuse_until = time.monotonic() + seconds

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self._refuse_until = 0.0

    def seen(self, pattern: str = ".") -> list[str]:
        """Request lines that reached the server (cut ones excluded), oldest first."""
        rx = re.compile(pattern)
        with self._lock:
            return [line for line in self._lines if rx.search(line)]

    def _add(self, rule: _Rule) -> _Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def _match(self, line: bytes) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.times <= 0 or not rule.pattern.search(line):
                    continue
                path = line.split(b" ")[1].split(b"?")[0]
                if rule.path is not None and path != rule.path:
                    continue
                if rule.skip > 0:
                    rule.skip -= 1
                    continue
                if rule.sticky:
                    rule.path = path
                rule.times -= 1
                rule.hits.append(line.decode(errors="replace"))
                return rule
        return None

    # ------------------------------------------------------------------ plumbing

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refusing = time.monotonic() < self._refuse_until
            if refusing:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            threading.Thread(target=self._client_to_server, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _client_to_server(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                m = REQUEST_LINE.match(data)
                if m:
                    line = m.group(0).strip()
                    rule = self._match(line)
                    if rule is not None and rule.action == "cut":
                        _reset(client)
                        _reset(upstream)
                        return
                    if rule is not None and rule.action == "stall":
                        time.sleep(rule.seconds)
                    with self._lock:
                        self._lines.append(line.decode(errors="replace"))
                upstream.sendall(data)
        except OSError:
            pass
        _reset(upstream)
        _reset(client)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
