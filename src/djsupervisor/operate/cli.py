"""The `progress`, `errors` and `retry` subcommands: their arguments, and the one place they are run from.

Imported by `djsupervisor.cli` to build its parser, including in the supervisor's parent, so nothing here
imports DataJoint or the database modules at module level: `run` imports the command's module when called.
"""

from __future__ import annotations

import argparse
from typing import Any

COMMANDS = ("progress", "errors", "retry")


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1440:
        raise argparse.ArgumentTypeError(f"must be a number of minutes > 0 and <= 1440, got {text!r}")
    return value


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be a number of seconds from 0.1 to 3600, got {text!r}")
    return value


def _pattern(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must be an SQL LIKE pattern such as '%missing file%', got ''")
    return text


def add_arguments(commands: Any, source_options: Any) -> None:
    """Add the three subcommands; `source_options(parser, modules=True)` adds ``-c FILE`` and ``MODULE...``."""
    progress = commands.add_parser("progress", help="how far along each table is: total, done, remaining, ETA")
    source_options(progress, modules=True)
    progress.add_argument("--json", action="store_true", help="machine-readable output")
    progress.add_argument("--watch", action="store_true", help="redraw every --interval seconds until Ctrl+C")
    progress.add_argument("--interval", type=_interval, default=2.0, metavar="SECONDS", help="for --watch (2)")
    progress.add_argument(
        "--window", type=_minutes, default=10.0, metavar="MINUTES", help="throughput over the last MINUTES (10)"
    )

    errors = commands.add_parser("errors", help="error jobs grouped by table and message, and ErrorLog history")
    source_options(errors, modules=True)
    errors.add_argument("--table", metavar="T", help="one table (Class, schema.Class or its full name)")
    errors.add_argument("--match", type=_pattern, metavar="PATTERN", help="messages LIKE PATTERN (SQL LIKE)")
    errors.add_argument("--json", action="store_true", help="machine-readable output")
    errors.add_argument("--show-stack", action="store_true", help="the stack of each group's example")

    retry = commands.add_parser("retry", help="re-pend (or ignore) error jobs once their cause is fixed")
    source_options(retry, modules=True)
    retry.add_argument("--table", metavar="T", help="the error jobs of one table")
    retry.add_argument("--match", type=_pattern, metavar="PATTERN", help="those whose message is LIKE PATTERN")
    retry.add_argument("--all", action="store_true", help="every error job of the workers' tables")
    retry.add_argument("--ignore", action="store_true", help="mark them ignored instead of pending")
    retry.add_argument("--dry-run", action="store_true", help="say how many, change nothing")


def run(args: Any, load: Any) -> int:
    """Run `args.command` for the workers of the configuration `load(args)` gives; problems the user can fix
    raise `OperateError` (one line, exit 2)."""
    import importlib

    from djsupervisor.operate import OperateError
    from djsupervisor.operate.pipeline import Pipeline

    config, _ = load(args)
    try:
        pipeline = Pipeline.load((w.name, w.build_worker()) for w in config.workers)
        module = importlib.import_module(f"djsupervisor.operate.{args.command}")
        return int(module.run(args, pipeline))
    except OperateError:
        raise
    except Exception as error:  # the database is out of reach, a table cannot be read, no permission
        raise OperateError(f"{args.command}: {error.__class__.__name__}: {error}".splitlines()[0]) from None
