"""The configuration reference, generated from the config classes themselves.

``python -m cfgd.reference > docs/configuration.md`` writes the page; a test keeps the
page equal to what this prints, so a new key, a changed default or a reworded comment
reaches the docs or fails the suite. Descriptions come from where the keys are declared:
the comment on (or just above) a dataclass field, or a plan field's own description
(``cfgd.diffusion.plan``, carried in the field's metadata).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

from cfgd import config

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")
_COMMENT = re.compile(r"^\s+#\s?(.*)$")


def _comments(cls: type) -> dict[str, str]:
    """Field name → its comment, for every dataclass in ``cls``'s MRO that has source."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # made by make_dataclass: no source of its own
            continue
        above: list[str] = []
        for line in lines[1:]:
            c = _COMMENT.match(line)
            if c:
                above.append(c.group(1).strip())
                continue
            m = _FIELD.match(line)
            if m and not line.strip().startswith(("def ", "@", '"""')):
                out[m.group(1)] = (m.group(2) or " ".join(above)).strip()
            above = []
    return out


def _shown(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if v == "":
        return '`""`'
    return f"`{v}`" if isinstance(v, str) else str(v)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def table(cls: type, prefix: str) -> str:
    """One section's keys as a Markdown table: key, default, what it is."""
    notes = _comments(cls)
    rows = ["| key | default | what it is |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or dataclasses.is_dataclass(_default(f)):
            continue
        doc = f.metadata.get("doc") or notes.get(f.name, "")
        rows.append(f"| `{prefix}{f.name}` | {_shown(_default(f))} | {doc.replace('|', '/')} |")
    return "\n".join(rows)


def config_reference() -> str:
    """docs/configuration.md: every key of the platform config, by section."""
    parts = ["# Configuration reference", "",
             "Generated from the config classes (`python -m cfgd.reference > docs/configuration.md`; "
             "`tests/test_docs.py` keeps this page equal to them). Every job takes `--config FILE` and "
             "`key=value` overrides; an unknown key, a wrong type or a bad value stops the job with "
             "exit status 2, naming the key. `jobs/configs/fashion_mnist.yaml` is the CPU demo, "
             "`jobs/configs/tiny.yaml` the test setup.", "",
             "The `sample.*` keys after `sample.out` are the sampling plan's: declared once in "
             "`cfgd.diffusion.plan`, they are also the sweep's keys (one value or a list: a grid dimension) and the "
             "HTTP request fields of `/generate` and `/bulk` (`/openapi.json` carries the same text). "
             "Old names still read, with a one-line notice: `sample.guidance_interval` → "
             "`sample.interval`, `sample.clip_denoised` → `sample.clip`.", ""]
    defaults = config.Config()
    for f in dataclasses.fields(config.Config):
        section = type(getattr(defaults, f.name))
        parts += [f"## `{f.name}`", "", table(section, f"{f.name}."), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(config_reference(), end="")
