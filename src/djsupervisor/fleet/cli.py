"""`djsupervisor status --fleet`, `drain`, `resume` and `forget`: the fleet as the database sees it.

These read and write the worker schemas directly (RegisteredWorker, FleetFlag), so they work from any host
that reaches the database, whether a supervisor runs there or not. The worker schemas come from the
config's worker definitions (``-c FILE``) or from ``--schema NAME``.
"""

from __future__ import annotations

import json
from typing import Any

from djsupervisor.log import escape_controls
from djsupervisor.serve.status_format import format_table

ANY = "*"  # registry.ANY, repeated so that building the parser loads no DataJoint (registry imports it)


class FleetError(Exception):
    """A problem the user can fix (no schema given, database out of reach): one line, exit status 2."""


def add_arguments(parsers, source_options) -> None:
    """Add `drain` and `resume` to the subcommand parsers (`status --fleet` is an option of `status`)."""
    for name, text in (
        ("drain", "stop matching pools on every host after their jobs in flight (database flag)"),
        ("resume", "clear the drain/halt flags a selector covers"),
    ):
        command = parsers.add_parser(name, help=text)
        source_options(command)
        command.add_argument("--host", default=ANY, help="a host name (default: every host)")
        command.add_argument("--supervisor", default=ANY, help="a supervisor name (default: every supervisor)")
        command.add_argument("--worker", default=ANY, help="a worker definition name (default: every worker)")
        command.add_argument("--all", action="store_true", help="every pool of every host (no selector needed)")
        if name == "drain":
            command.add_argument(
                "--halt",
                action="store_true",
                help="also make the matching supervisors exit once every pool of theirs is halted",
            )
    forget = parsers.add_parser("forget", help="remove a decommissioned host's RegisteredWorker rows at once")
    source_options(forget)
    forget.add_argument("--host", required=True, help="the host name, as `status --fleet` shows it")


def add_schema_option(command) -> None:
    command.add_argument(
        "--schema",
        action="append",
        default=[],
        metavar="NAME",
        help="a worker schema (repeatable; default: those of the -c FILE's workers)",
    )


def _schemas(args, load) -> list[Any]:
    """The WorkerSchemas named by --schema, or those of the config's worker definitions."""
    import datajoint as dj

    from djsupervisor.worker.schema import WorkerSchema

    names = list(dict.fromkeys(args.schema or []))
    connection = None
    if not names:
        if not args.config:
            raise FleetError("give -c FILE (its workers' schemas) or --schema NAME")
        config, _ = load(args)
        workers = [w.build_worker() for w in config.workers]
        names = list(dict.fromkeys(w.worker_schema_name for w in workers))
        connection = workers[0].connection if workers else None
    try:
        connection = connection or dj.conn()
        return [WorkerSchema(name, connection) for name in names]
    except Exception as error:  # the database is out of reach
        raise FleetError(f"database: {error.__class__.__name__}: {error}".splitlines()[0]) from None


def _selector(args):
    from djsupervisor.fleet.registry import Selector

    selector = Selector(args.host, args.supervisor, args.worker)
    if selector == Selector() and not args.all:
        raise FleetError(f"{args.command}: say which pools: --host, --supervisor, --worker, or --all")
    return selector


def _guarded(what: str, action):
    try:
        return action()
    except FleetError:
        raise
    except Exception as error:
        if error.__class__.__name__ == "AccessError":  # DataJoint's: (summary, the server's message, ...)
            detail = " ".join(str(error.args[1] if len(error.args) > 1 else error).split())
            raise FleetError(
                f"{what}: permission denied ({detail}); README, Security, gives worker and operator accounts' grants"
            ) from None
        raise FleetError(f"{what}: {error.__class__.__name__}: {error}".splitlines()[0]) from None


def drain(args, load) -> int:
    """Set a drain (or halt) flag in every worker schema."""
    from djsupervisor.fleet.registry import set_flag

    selector = _selector(args)
    mode = "halt" if args.halt else "drain"
    for schema in _schemas(args, load):
        _guarded(f"schema {schema.schema_name}", lambda s=schema: set_flag(s, selector, mode))
        print(f"{mode}: {selector.describe()} in schema {schema.schema_name}")
    print("supervisors obey within their fleet_interval; the jobs in flight finish first")
    return 0


def resume(args, load) -> int:
    """Remove the flags the selector covers; say which remain."""
    from djsupervisor.fleet.registry import clear_flags, read_flags

    selector = _selector(args)
    for schema in _schemas(args, load):
        removed = _guarded(f"schema {schema.schema_name}", lambda s=schema: clear_flags(s, selector))
        for flag in removed:
            print(f"cleared {flag.mode}: {flag.selector.describe()} in schema {schema.schema_name}")
        if not removed:
            print(f"no flag covered by {selector.describe()} in schema {schema.schema_name}")
        for flag in _guarded(f"schema {schema.schema_name}", lambda s=schema: read_flags(s)):
            print(f"still set {flag.mode}: {flag.selector.describe()} (by {flag.set_by})")
    return 0


def forget(args, load) -> int:
    """Delete every RegisteredWorker row of one host (its logs stay until `log_retention_days` prunes them)."""
    from djsupervisor.worker.retention import forget_host

    host = args.host.strip()
    if not host or host == ANY:
        raise FleetError(f"forget: --host must name one host, got {args.host!r}")
    for schema in _schemas(args, load):
        removed = _guarded(f"schema {schema.schema_name}", lambda s=schema: forget_host(s, host))
        processes = "process" if removed == 1 else "processes"
        print(f"forgot {removed} worker {processes} of host {host} in schema {schema.schema_name}")
    return 0


def fleet_status(args, load) -> int:
    """Every registered worker process of the schemas, overdue heartbeats marked, and the flags set."""
    from djsupervisor.fleet.registry import fleet_rows, read_flags

    report = []
    for schema in _schemas(args, load):
        rows = _guarded(f"schema {schema.schema_name}", lambda s=schema: fleet_rows(s))
        flags = _guarded(f"schema {schema.schema_name}", lambda s=schema: read_flags(s))
        report.append(
            {
                "schema": schema.schema_name,
                "workers": rows,
                "flags": [
                    {**flag.selector.__dict__, "mode": flag.mode, "set_by": flag.set_by, "set_at": flag.set_at}
                    for flag in flags
                ],
            }
        )
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_fleet(report))
    return 0


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def format_fleet(report: list[dict]) -> str:
    """The text of `status --fleet`: one table per worker schema."""
    out = []
    header = ("HOST", "SUPERVISOR", "WORKER", "SLOT", "PID", "STATE", "DOING", "DONE", "FAILED", "LAST SEEN")
    for entry in report:
        out.append(escape_controls(f"schema {entry['schema']}: {len(entry['workers'])} worker processes"))
        rows = []
        for row in entry["workers"]:
            doing = row["current_table"] or ""
            if row.get("current_key"):
                key = row["current_key"]
                doing += " " + (json.dumps(key, default=str) if not isinstance(key, str) else key)
            seen = _ago(row["age"]) + ("  OVERDUE" if row["overdue"] else "")
            rows.append(
                (
                    row["host"],
                    row["supervisor"] or "-",
                    row["worker_name"],
                    str(row["slot"]) if row["slot"] >= 0 else "-",
                    str(row["pid"]),
                    row["state"],
                    doing[:60],
                    str(row["jobs_done"]),
                    str(row["jobs_failed"]),
                    seen,
                )
            )
        out.extend(format_table(header, rows))
        for flag in entry["flags"]:
            out.append(
                escape_controls(
                    f"flag {flag['mode']}: host={flag['host']} supervisor={flag['supervisor']} "
                    f"worker={flag['worker_name']} (set by {flag['set_by']} at {flag['set_at']})"
                )
            )
        out.append("")
    return "\n".join(out).rstrip()
