"""Shared command-line front for the jobs: ``--config FILE`` plus ``key=value`` overrides."""

from __future__ import annotations

import argparse
import sys

from cfgd.config import Config, ConfigError, load_config, to_yaml


def parse(description: str, argv: list[str] | None = None) -> Config:
    """Parse ``[--config FILE] [key=value ...]``, print the resolved config, return it.

    A bad key or value exits with status 2 and a message naming it.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file with a named setup (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    print("resolved config:\n" + to_yaml(cfg), flush=True)
    return cfg


def fail(err: Exception) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)
