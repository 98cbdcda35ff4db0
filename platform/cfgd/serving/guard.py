"""What stands between the network and the app: the API token and the body-size limit.

One ASGI middleware (:class:`Guard`) in front of every route, so no route can forget it:

* **Token.** ``CFGD_API_TOKEN`` in the ingress replica's environment, or a file named by
  ``CFGD_API_TOKEN_FILE`` (a Kubernetes Secret in ``serve/rayservice.yaml``; never the
  ``user_config``, which ``serve status`` prints, nor a ``runtime_env`` value, which Ray logs). Callers send ``Authorization: Bearer <token>``; compared in constant time.
  Several comma-separated tokens are all accepted, which is how a token is rotated.
  Without a token the app answers loopback clients only (and says so at start).
* **Open routes.** ``/healthz`` (liveness, reveals nothing), ``/docs`` and
  ``/openapi.json`` (the public schema).
* **Body size.** A body over ``max_body_bytes`` is answered 413 before it is parsed,
  whether it declares its length or streams it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from typing import Awaitable, Callable

TOKEN_ENV = "CFGD_API_TOKEN"
TOKEN_FILE_ENV = "CFGD_API_TOKEN_FILE"
OPEN_PATHS = frozenset({"/healthz", "/docs", "/openapi.json"})
MAX_BODY_BYTES = 64 * 1024  # requests are small JSON objects; the largest legal one is a few KiB


def configured_tokens(environ: dict | None = None) -> tuple[bytes, ...]:
    """The accepted tokens (empty: none configured): ``CFGD_API_TOKEN``, else the file named
    by ``CFGD_API_TOKEN_FILE`` (a mounted Secret). Comma- or newline-separated; blanks ignored.

    Why a file: a value put in a Ray ``runtime_env`` is written to Ray's own logs (the
    runtime-env agent logs the whole env); a file path is not a secret.
    """
    env = os.environ if environ is None else environ
    raw = env.get(TOKEN_ENV, "")
    if not raw.strip() and env.get(TOKEN_FILE_ENV):
        with open(env[TOKEN_FILE_ENV], encoding="utf-8") as f:
            raw = f.read()
    return tuple(t.strip().encode() for t in raw.replace("\n", ",").split(",") if t.strip())


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def authorize(path: str, authorization: str | None, client_host: str | None,
              tokens: tuple[bytes, ...]) -> tuple[int, str] | None:
    """None if the request may pass, else (status, reason). Reasons name no secret."""
    if path in OPEN_PATHS:
        return None
    if not tokens:
        if is_loopback(client_host):
            return None
        return 403, (f"this server has no API token configured ({TOKEN_ENV}), so it answers "
                     "127.0.0.1 only")
    scheme, _, given = (authorization or "").partition(" ")
    ok = False
    for t in tokens:  # every token compared, in constant time each
        ok |= scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), t)
    return None if ok else (401, "missing or wrong API token: send 'Authorization: Bearer <token>'")


def startup_message(tokens: tuple[bytes, ...]) -> str:
    if tokens:
        return f"API token required on every route but {sorted(OPEN_PATHS)} ({len(tokens)} accepted)"
    return (f"no API token ({TOKEN_ENV} is unset): answering 127.0.0.1 clients only; set it "
            "before exposing this server")


Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


async def _reply(send: Send, status: int, detail: str, field: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail, "field": field}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: token check, then a body-size cap. ``tokens`` default to the env."""

    def __init__(self, app, tokens: tuple[bytes, ...] | None = None, max_body_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.tokens = configured_tokens() if tokens is None else tokens
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        client = scope.get("client")
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # an app under a route prefix sees its own paths
            path = path[len(root):] or "/"
        refusal = authorize(path, headers.get("authorization"), client[0] if client else None,
                            self.tokens)
        if refusal is not None:
            extra = [(b"www-authenticate", b"Bearer")] if refusal[0] == 401 else []
            return await _reply(send, refusal[0], refusal[1], "authorization", extra)
        limit = self.max_body_bytes
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            return await _reply(send, 400, "Content-Length is not a number", "body")
        if declared > limit:
            return await _reply(send, 413, f"request body of {declared} bytes is over the {limit}-byte limit", "body")
        # Read the whole body first (bounded), then replay it: the app never sees a body
        # over the limit, declared or streamed.
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            more = message.get("more_body", False)
            if seen > limit:
                return await _reply(send, 413, f"request body is over the {limit}-byte limit", "body")
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
