"""Shared command-line front for the jobs: ``--config FILE`` plus ``key=value`` overrides.

A job prints a short story (:mod:`cfgd.console`): the resolved config once, compactly,
then what it does; Ray's and the libraries' output goes to a log file whose path it
prints. ``--verbose`` prints the config in full and leaves all output on the console.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import yaml
from omegaconf import OmegaConf

from cfgd import console
from cfgd.config import Config, ConfigError, config_yaml, load_structured, masked, validate
from cfgd.io.storage import StorageOptions

LOG_DIR = Path("outputs/logs")
WIDTH = 100  # columns of the compact config


def _parser(description: str, job_name: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with a named setup (see jobs/configs/)")
    parser.add_argument("--verbose", action="store_true",
                        help="print the full config and leave Ray's and the libraries' output on the console")
    if job_name:
        parser.add_argument("--log-file", help=f"where Ray's and the libraries' output goes "
                                               f"(default {LOG_DIR}/{job_name}-<time>.log)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    return parser


def _load(parser: argparse.ArgumentParser, args: argparse.Namespace, schema: type,
          check: Callable[[Any], Any] | None) -> Any:
    try:
        cfg = load_structured(schema, args.config, args.overrides)
        if check is not None:
            check(cfg)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    return cfg


def config_summary(cfg: Any, sections: Sequence[str] | None = None) -> str:
    """The resolved config (secrets masked), one flow-style YAML mapping per section,
    wrapped at WIDTH columns; ``sections`` picks the top-level keys (None: all).
    Top-level scalars (a flat schema) share one mapping. The storage section is left
    out while it holds only its defaults (local files: nothing to say)."""
    data = masked(OmegaConf.to_container(OmegaConf.structured(cfg)))
    names = list(sections) if sections is not None else list(data)
    if "storage" in names and getattr(cfg, "storage", None) == StorageOptions():
        names.remove("storage")
    flat = {k: data[k] for k in names if not isinstance(data[k], dict)}
    blocks = [("", flat)] if flat else []
    blocks += [(f"{k}: ", data[k]) for k in names if isinstance(data[k], dict)]
    lines = []
    for label, value in blocks:
        flow = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False).strip()
        lines += textwrap.wrap(label + flow, WIDTH, initial_indent="  ", subsequent_indent="      ",
                               break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines)


def _print_config(cfg: Any, verbose: bool, sections: Sequence[str] | None) -> None:
    text = config_yaml(cfg) if verbose else config_summary(cfg, sections) + "\n"
    print("resolved config:\n" + text, end="", flush=True)


def parse(description: str, argv: list[str] | None = None, schema: type = Config,
          check: Callable[[Any], Any] | None = validate, sections: Sequence[str] | None = None) -> Any:
    """Parse ``[--config FILE] [--verbose] [key=value ...]`` into ``schema``, print the
    resolved config (secrets masked; only ``sections`` unless --verbose) and return it.

    ``check`` validates values beyond their types (default: the platform config's
    rules). A bad key or value exits with status 2 and a message naming it.
    """
    parser = _parser(description, None)
    args = parser.parse_args(argv)
    cfg = _load(parser, args, schema, check)
    _print_config(cfg, args.verbose, sections)
    return cfg


@contextmanager
def job(description: str, name: str, sections: Sequence[str] | None = None, argv: list[str] | None = None,
        schema: type = Config, check: Callable[[Any], Any] | None = validate) -> Iterator[Any]:
    """``parse``, then run the job's body with its output routed (cfgd.console): yields the config.

    Prints the log file's path first, so that it can be followed while the job runs.
    """
    parser = _parser(description, name)
    args = parser.parse_args(argv)
    cfg = _load(parser, args, schema, check)
    _print_config(cfg, args.verbose, sections)
    log = args.log_file or LOG_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    with console.job_output(log, verbose=args.verbose) as path:
        if path is not None:
            print(f"log: {path} (Ray's and the libraries' output; --verbose prints it here)", flush=True)
            console.log_only("resolved config:\n" + config_yaml(cfg))
        yield cfg


def refuse(err: Exception) -> None:
    """A bad setting found after parsing (e.g. the sampling plan): exit 2, as parse does."""
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def fail(err: Exception) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)
