"""Shared command-line front for the jobs: ``--config FILE`` plus ``key=value`` overrides."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from cfgd.config import Config, ConfigError, config_yaml, load_structured, validate


def parse(description: str, argv: list[str] | None = None, schema: type = Config,
          check: Callable[[Any], Any] | None = validate) -> Any:
    """Parse ``[--config FILE] [key=value ...]`` into ``schema``, print the resolved
    config (secrets masked) and return it.

    ``check`` validates values beyond their types (default: the platform config's
    rules). A bad key or value exits with status 2 and a message naming it.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with a named setup (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    try:
        cfg = load_structured(schema, args.config, args.overrides)
        if check is not None:
            check(cfg)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    print("resolved config:\n" + config_yaml(cfg), flush=True)
    return cfg


def refuse(err: Exception) -> None:
    """A bad setting found after parsing (e.g. the sampling plan): exit 2, as parse does."""
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def fail(err: Exception) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)
