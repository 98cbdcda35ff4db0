"""Training's console lines: the ``[cfgd.train]`` tag, ETAs and the final summary.

Workers write with ``sys.stdout.write`` (Ray Train patches ``print`` in workers and would
log each line twice); the tag is what keeps a worker's line on a quiet job's console
(:mod:`cfgd.console`).
"""

from __future__ import annotations

import sys
from typing import Any


def log(msg: str) -> None:
    # Not print(): Ray Train patches print in workers and would log each line twice.
    # The tag is what keeps a worker's line on a quiet job's console (cfgd.console).
    sys.stdout.write(f"[cfgd.train] {msg}\n")
    sys.stdout.flush()


def eta(seconds: float) -> str:
    """h:mm:ss"""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def summary(metrics: dict[str, Any]) -> str:
    """The final checkpoint's metrics, short: step, loss, steady samples/s, peak worker memory."""
    parts = {"step": "step {:d}", "loss": "loss {:.4f}", "samples_per_s": "{:.1f} samples/s",
             "peak_rss_mib": "peak RSS {:.0f} MiB"}
    return ", ".join(fmt.format(metrics[k]) for k, fmt in parts.items() if k in metrics) or "no metrics"
