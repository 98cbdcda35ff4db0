"""What a job prints: a short story on the console, every detail in a log file.

A job run quietly (the default; ``--verbose`` turns it off) keeps on the console what
the job itself prints from its main thread (the config, data summary, results, errors)
and the lines tagged ``[cfgd.`` that Ray relays from workers (the training loop's
progress from rank 0). Everything else goes to the log file only:

* the output Ray relays from its workers, controllers and Ray Data (start-up notices,
  deprecation warnings, C++ log lines), which Ray's log thread writes to
  ``sys.stdout`` / ``sys.stderr`` of the driver;
* Python warnings and the ``logging`` records of libraries (Ray's driver logger
  included, see :func:`capture_logger`).

The log file also gets a copy of the console, so it reads as ``--verbose`` would have.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TextIO

MARK = "[cfgd."  # tag of the lines that reach the console from any thread
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Router(io.TextIOBase):
    """Stands in for sys.stdout or sys.stderr while a job runs quietly.

    Writes from the main thread pass straight through (tqdm's carriage returns
    included) and are copied to the log. Writes from other threads (Ray relays worker
    output from a thread of its own) are cut into lines: each goes to the log, and a
    line carrying MARK also goes to the console from MARK on, without Ray's
    "(RayTrainWorker pid=…)" prefix.
    """

    def __init__(self, console: TextIO, route: "_Route"):
        super().__init__()
        self._console, self._route = console, route
        self._partial: dict[int, str] = {}

    def write(self, s: str) -> int:
        with self._route.lock:
            if threading.current_thread() is threading.main_thread() and not self._route.closing:
                self._console.write(s)
                self._route.log.write(_ANSI.sub("", s))
                return len(s)
            key = threading.get_ident()
            *lines, self._partial[key] = (self._partial.get(key, "") + s).split("\n")
            for line in lines:
                plain = _ANSI.sub("", line)
                self._route.log.write(plain + "\n")
                if MARK in plain:
                    self._console.write(plain[plain.index(MARK):] + "\n")
            return len(s)

    def flush(self) -> None:
        with self._route.lock:
            self._console.flush()
            self._route.log.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._console.isatty()

    def fileno(self) -> int:
        return self._console.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._console, "encoding", "utf-8")


class _Route:
    """The quiet routing of one job: the log file and what to undo at the end."""

    def __init__(self, log_path: Path):
        self.path = log_path
        self.log = open(log_path, "w", buffering=1, encoding="utf-8")
        self.lock = threading.RLock()
        self.closing = False  # while Ray shuts down, what is printed is Ray's, from any thread
        self.undo: list[Callable[[], None]] = []
        self.before_close: list[Callable[[], None]] = []

    def capture_logger(self, name: str) -> None:
        logger = logging.getLogger(name)
        handlers, propagate = list(logger.handlers), logger.propagate
        handler = logging.StreamHandler(self.log)
        handler.setFormatter(logging.Formatter(_FORMAT))
        logger.handlers[:] = [handler]
        if name:  # the root logger has no parent to propagate to
            logger.propagate = False

        def restore() -> None:
            logger.handlers[:] = handlers
            logger.propagate = propagate
        self.undo.append(restore)


_active: _Route | None = None  # the routing of this process's job (sys.stdout is process-wide too)


def capture_logger(name: str) -> None:
    """Send logger ``name``'s records to the job's log file, if a job runs quietly.

    For libraries that install their own console handler at import (Ray does, on the
    "ray" logger): call it after importing them.
    """
    if _active is not None:
        _active.capture_logger(name)


def log_only(text: str) -> None:
    """Write ``text`` to the job's log file (not the console), if a job runs quietly."""
    if _active is not None:
        with _active.lock:
            _active.log.write(text if text.endswith("\n") else text + "\n")


def before_close(fn: Callable[[], None]) -> None:
    """Run ``fn`` while the routing still holds, at the end of a quiet job.

    Ray holds back repeated worker lines and prints them when it disconnects
    (``ray.shutdown``); called here, they go to the log rather than the console.
    """
    if _active is not None:
        _active.before_close.append(fn)


@contextmanager
def job_output(log_path: str | Path, verbose: bool = False) -> Iterator[Path | None]:
    """Route this process's output for the duration of a job (see the module docstring).

    Yields the log file's path, or None when ``verbose`` (nothing is routed: the
    console shows everything, as Ray and the libraries print it).
    """
    global _active
    if verbose:
        yield None
        return
    if _active is not None:
        raise RuntimeError(f"a job's output is already routed to {_active.path}")
    path = Path(log_path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    route = _Route(path)
    saved = sys.stdout, sys.stderr, warnings.showwarning
    sys.stdout, sys.stderr = _Router(sys.stdout, route), _Router(sys.stderr, route)

    def to_log(message, category, filename, lineno, file=None, line=None) -> None:
        route.log.write(warnings.formatwarning(message, category, filename, lineno, line))
    warnings.showwarning = to_log
    route.capture_logger("")  # the root logger: records of libraries without handlers of their own
    _active = route
    try:
        yield path
    finally:
        route.closing = True
        try:
            for fn in route.before_close:
                fn()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr, warnings.showwarning = saved
            for undo in reversed(route.undo):
                undo()
            _active = None
            route.log.close()
