"""Which storage errors are worth another try, and the retry loop around whole operations.

Transient failures (connection resets, timeouts, 5xx, throttling) are retried inside
botocore / the AWS SDK per request, and by :func:`with_retries` around multi-request
operations such as a directory upload. Errors a user must fix (a missing object, denied
access, bad arguments) are raised at once.
"""

from __future__ import annotations

import logging
import random
import re
import time
from typing import Callable, Iterator, TypeVar

log = logging.getLogger("cfgd.storage")
T = TypeVar("T")


class StorageError(ValueError):
    """A storage URI that cannot be used; the message says what to check."""


# ClientError codes worth another try (besides any HTTP 5xx).
TRANSIENT_CODES = {
    "SlowDown", "RequestTimeout", "RequestTimeoutException", "Throttling",
    "ThrottlingException", "ThrottledException", "RequestThrottled",
    "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
}
CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
    "InvalidToken", "ExpiredToken", "TokenRefreshRequired", "InvalidSecurity",
}
# Messages of errors that reach us as plain OSError (pyarrow's AWS SDK, aiohttp).
_TRANSIENT_TEXT = re.compile(
    r"connection reset|connection aborted|connection refused|broken pipe|"
    r"NETWORK_CONNECTION|curlCode: (?:6|7|28|52|55|56)\b|timed out|timeout|"
    r"SLOW_DOWN|SlowDown|THROTTLING|Throttl|SERVICE_UNAVAILABLE|service unavailable|"
    r"INTERNAL_FAILURE|InternalError|REQUEST_TIMEOUT|"
    r"(?:HTTP|status)\D{0,20}5\d\d\b|\(5\d\d\)",
    re.IGNORECASE,
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what caused it (s3fs wraps botocore errors in OSError)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _client_error(exc: BaseException) -> tuple[str, int] | None:
    """(code, HTTP status) of the botocore ClientError in the chain, if any."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            code = str(response["Error"].get("Code", ""))
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return code, status
    return None


def _botocore_kind(e: BaseException) -> str | None:
    """'connect', 'read' (transient network) or 'nocreds' for botocore errors."""
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover - s3fs always brings botocore
        return None
    if isinstance(e, bx.NoCredentialsError):
        return "nocreds"
    if isinstance(e, bx.SSLError):
        return None  # a certificate problem does not fix itself
    if isinstance(e, bx.ConnectionError):  # EndpointConnectionError, ConnectTimeoutError
        return "connect"
    if isinstance(e, bx.HTTPClientError):  # ReadTimeoutError, ConnectionClosedError
        return "read"
    return None


def _transient_one(e: BaseException) -> bool | None:
    """True/False when this exception decides, None to look at its cause."""
    if isinstance(e, (FileNotFoundError, PermissionError, FileExistsError,
                      IsADirectoryError, NotADirectoryError, ValueError, TypeError,
                      KeyError)):
        return False  # StorageError is a ValueError: never retried either
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    kind = _botocore_kind(e)
    if kind in ("connect", "read"):
        return True
    if kind == "nocreds":
        return False
    response = getattr(e, "response", None)
    if isinstance(response, dict) and "Error" in response:  # botocore ClientError
        code, status = _client_error(e) or ("", 0)
        return status >= 500 or code in TRANSIENT_CODES
    if isinstance(e, OSError) and _TRANSIENT_TEXT.search(str(e)):
        return True
    return None


def is_transient(exc: BaseException) -> bool:
    """Would the same call plausibly succeed if tried again in a moment?"""
    for e in _chain(exc):
        decided = _transient_one(e)
        if decided is not None:
            return decided
    return False


def with_retries(fn: Callable[[], T], *, what: str, attempts: int = 5,
                 base_delay: float = 0.5, max_delay: float = 20.0) -> T:
    """Call ``fn()``; retry transient storage errors with exponential backoff.

    Non-transient errors (missing object, access denied, bad arguments) are
    raised at once, unchanged. After ``attempts`` transient failures a
    :class:`StorageError` names ``what`` (e.g. the URI) and the last error.
    """
    attempts = max(1, attempts)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_transient(exc):
                raise
            if attempt == attempts:
                raise StorageError(
                    f"{what}: still failing after {attempts} attempts: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            # Full jitter around the exponential step: many workers retrying
            # in lockstep would hit a throttling server all at once again.
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            log.warning("%s: transient error (%s: %s), retry %d/%d in %.1fs",
                        what, type(exc).__name__, exc, attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
