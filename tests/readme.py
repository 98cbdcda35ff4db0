"""The README's own command lines, for tests that run them as written.

    commands("Running on a Ray cluster")   # the section's ```bash commands, in order
    Shell(env).run(command)                # bash, with earlier export/source lines kept

A test that runs these lines fails when an edit to the README breaks a command.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")


def section(heading: str, text: str | None = None) -> list[str]:
    """The lines of the README section titled ``heading`` (any level), up to the next
    heading. Lines starting with ``#`` inside code blocks are comments, not headings."""
    lines = (README.read_text() if text is None else text).splitlines()
    body: list[str] | None = None
    fenced = False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced or line.startswith("```") else _HEADING.match(line)
        if match and body is not None:
            return body
        if match and match.group(2) == heading:
            body = []
        elif body is not None:
            body.append(line)
    if body is None:
        found = [m.group(2) for m in map(_HEADING.match, lines) if m]
        raise KeyError(f"README has no section {heading!r}; its headings: {found}")
    return body


def strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (a ``#`` outside quotes, at the start or
    after whitespace)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def commands(heading: str, text: str | None = None) -> list[str]:
    """The shell commands of the section's ```bash blocks, in order: backslash
    continuations joined into one line, comments and blank lines dropped."""
    out: list[str] = []
    in_bash = False
    pending = ""
    for line in section(heading, text):
        if line.startswith("```"):
            in_bash = line.strip() in ("```bash", "```sh") if not in_bash else False
            continue
        if not in_bash:
            continue
        code = strip_comment(line)
        if code.endswith("\\"):
            pending += code[:-1].strip() + " "
            continue
        code = (pending + code.strip()).strip()
        pending = ""
        if code:
            out.append(code)
    return out


class Shell:
    """Runs commands the way a user's shell would, one after the other, from the
    checkout: each in a fresh ``bash -e`` that first replays the earlier ``export``
    and ``source`` lines (so their settings carry over, as in one terminal)."""

    STATEFUL = ("export ", "source ", ". ")

    def __init__(self, env: dict[str, str], cwd: Path = ROOT):
        self.env = env
        self.cwd = cwd
        self.setup: list[str] = []

    def run(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess:
        script = "\n".join(["set -e", *self.setup, command])
        proc = subprocess.run(["bash", "-c", script], env=self.env, cwd=self.cwd, capture_output=True,
                              text=True, timeout=timeout)
        if command.startswith(self.STATEFUL) and proc.returncode == 0:
            self.setup.append(command)
        return proc
