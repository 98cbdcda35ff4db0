"""One way to check values that types alone cannot: a table of rules, the first failure raised.

Configs (omegaconf dataclasses: types already checked), the sweep's and the evaluator's
configs and the Serve settings all validate with :func:`check`, so every refusal reads
the same: ``<key>=<value> is not valid; it must be <rule>``.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple


class Rule(NamedTuple):
    name: str  # the key as the user writes it (e.g. train.steps)
    value: Any
    ok: bool
    valid: str  # what is valid, completing "it must be ..."


def one_of(name: str, value: Any, choices: Iterable[Any]) -> Rule:
    choices = list(choices)
    return Rule(name, value, value in choices, f"one of {choices}")


def check(rules: Iterable[Rule], error: type[Exception] = ValueError, prefix: str = "") -> None:
    """Raise ``error`` naming the first rule that fails (key, value, what is valid)."""
    for name, value, ok, valid in rules:
        if not ok:
            raise error(f"{prefix}{name}={value!r} is not valid; it must be {valid}")
