"""The `djsupervisor` command: start, status, stop, reload, restart, scale, check, run, drain, resume, forget,
progress, errors, retry (`djsupervisor.operate`), migrate-schema.

Every problem with what the user gave (arguments, config, socket) is one line on stderr,
``djsupervisor: error: ...``, and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any

from djsupervisor.protocol import ControlRequest, ControlResponse, refused
from djsupervisor.supervisor.settings import LOG_FORMATS, LOG_LEVELS

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        if " " in self.prog:  # a subcommand's parser: name it
            raise UsageError(f"{self.prog.split()[-1]}: {message}")
        if "required: command" in message:
            message = (  # the everyday commands (migrate-schema is a one-off: --help lists it)
                "no command given (start, status, stop, reload, restart, scale, check, run, drain, resume, forget, "
                "progress, errors, retry; --help for more)"
            )
        raise UsageError(message)


def _replicas(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from djsupervisor import __version__, cli_restart
    from djsupervisor.fleet import cli as fleet_cli
    from djsupervisor.operate import cli as operate_cli

    parser = _Parser(prog="djsupervisor", description="Run DataJoint pipeline workers in production.")
    parser.add_argument("--version", action="version", version=f"djsupervisor {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def source_options(command, modules: bool) -> None:
        command.add_argument("-c", "--config", help="the supervisor's TOML config file")
        if modules:
            command.add_argument(
                "modules", nargs="*", metavar="MODULE", help="modules whose DataJointWorkers to run (instead of -c)"
            )

    def socket_options(command) -> None:
        source_options(command, modules=False)
        command.add_argument("--socket", help="the control socket (default: from the config or --name)")
        command.add_argument("--name", help="the supervisor's name (finds its default control socket)")

    start = commands.add_parser("start", help="start the supervisor in the foreground")
    source_options(start, modules=True)
    start.add_argument("--log-level", choices=LOG_LEVELS, type=str.upper)
    start.add_argument("--log-format", choices=LOG_FORMATS)
    start.add_argument("--host", help="the host name in the fleet registry (overrides the config's host)")

    status = commands.add_parser("status", help="what every child is doing")
    socket_options(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--queues", action="store_true", help="also each table's job queue, read from the database (needs -c FILE)"
    )
    status.add_argument(
        "--fleet", action="store_true", help="every host's workers, from the database (needs -c FILE or --schema)"
    )
    fleet_cli.add_schema_option(status)

    stop = commands.add_parser("stop", help="graceful stop (jobs in flight finish)")
    socket_options(stop)
    stop.add_argument("--fast", action="store_true", help="do not wait for jobs in flight")
    stop.add_argument(
        "--wait",
        type=_seconds,
        nargs="?",
        const=120.0,
        metavar="SECONDS",
        help="return once the supervisor has exited (at most SECONDS, default 120)",
    )

    def fleet_source(command) -> None:
        command.add_argument("-c", "--config", help="the config whose workers' schemas to use")
        fleet_cli.add_schema_option(command)

    fleet_cli.add_arguments(commands, fleet_source)
    operate_cli.add_arguments(commands, source_options)

    reload = commands.add_parser("reload", help="re-read the config file")
    socket_options(reload)

    cli_restart.add_parser(commands, socket_options)

    scale = commands.add_parser("scale", help="set a pool's size")
    scale.add_argument("worker")
    scale.add_argument("replicas", type=_replicas, metavar="N")
    socket_options(scale)

    check = commands.add_parser("check", help="validate a config, import its targets, connect to the database")
    check.add_argument("-c", "--config", required=True)
    check.add_argument("--log-level", choices=LOG_LEVELS, type=str.upper)

    run = commands.add_parser("run", help="run one worker in the foreground, in process, for debugging")
    run.add_argument("worker")
    source_options(run, modules=True)
    run.add_argument("--log-level", choices=LOG_LEVELS, type=str.upper)
    run.add_argument("--log-format", choices=LOG_FORMATS)

    commands.add_parser("demo", help="work the example pipeline (DJ_* database, else the embedded PostgreSQL)")
    from djsupervisor.worker.migrate import MAPPING  # text only: importing it loads no DataJoint

    migrate = commands.add_parser(
        "migrate-schema",
        help="convert a worker schema made by datajoint-utilities, rows kept",
        description=MAPPING,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    migrate.add_argument("schema", metavar="NAME", help="the worker schema (a worker's worker_schema_name)")
    migrate.add_argument("-c", "--config", help="connect with this config file's [database] (default: DJ_* settings)")
    migrate.add_argument("--drop-old", action="store_true", help="drop the ~dju_* copies of the old tables at the end")
    return parser


def _load(args, *, check_targets: bool = True):
    from djsupervisor.supervisor.config import config_from_modules, load_config

    modules = getattr(args, "modules", None) or []
    if args.config and modules:
        raise UsageError("give either -c FILE or MODULE..., not both")
    if not args.config and not modules:
        raise UsageError("no configuration: give -c FILE or MODULE...")
    if not check_targets and args.config:
        return load_config(args.config, check_targets=False), args.config
    from djsupervisor.preflight import DatabaseError, login_first

    if args.config:  # the file's [database] settings, for the login checked before the targets are imported
        load_config(args.config, check_targets=False).database.apply()
    try:
        if args.config:
            return login_first(args.config, lambda: load_config(args.config)), args.config
        return login_first(None, lambda: config_from_modules(modules)), None
    except DatabaseError as error:
        raise UsageError(f"{args.config}: {error}" if args.config else str(error)) from None


def _socket_path(args) -> str:
    from djsupervisor.serve.control import default_socket_path

    if args.socket:
        return args.socket
    if args.config:
        config, _ = _load(args, check_targets=False)
        return config.control_socket or default_socket_path(config.name)
    if args.name:
        return default_socket_path(args.name)
    from djsupervisor.cli_control import NoSupervisor, find_socket

    try:  # the one that answers; dead sockets are skipped
        return find_socket()
    except NoSupervisor as error:
        raise UsageError(str(error)) from None


def _request(args, request: ControlRequest) -> ControlResponse:
    """Send `request` to the supervisor the arguments name; its answer if ok, else UsageError (one line)."""
    from djsupervisor.serve.control import ControlError, send_request

    try:
        response = send_request(_socket_path(args), request)
    except ControlError as error:
        raise UsageError(str(error)) from None
    problem = refused(response)
    if problem is not None:
        raise UsageError(f"{request['cmd']}: {problem}")
    return response


def _stop(args) -> int:
    import time

    from djsupervisor.serve.control import supervisor_listening

    path = _socket_path(args)
    _request(args, ControlRequest(cmd="stop", fast=args.fast))
    if args.wait is None:
        return 0
    deadline = time.monotonic() + args.wait
    while supervisor_listening(path):  # the supervisor closes its socket last, after its children are gone
        if time.monotonic() > deadline:
            print(
                f"djsupervisor: error: stop: the supervisor on {path} still runs after {args.wait:g} s", file=sys.stderr
            )
            return 1
        time.sleep(0.1)
    return 0


def _logging_for(args, *, context: dict, quiet: bool = False):
    """Set up logging before the worker definitions are imported (pipeline modules connect and log then).

    Returns the config file's settings read without importing anything (None without -c). `quiet`: only
    warnings and errors, for commands whose output is what they print."""
    from djsupervisor.log import add_secret, setup_logging
    from djsupervisor.supervisor.config import load_config

    if args.config and getattr(args, "modules", None):
        raise UsageError("give either -c FILE or MODULE..., not both")
    early, level, fmt = None, "INFO", "text"
    if args.config:  # only the [supervisor] and [database] tables count here
        early = load_config(args.config, check_targets=False)
        level, fmt = early.log_level, early.log_format
        add_secret(early.database.password)
        context.setdefault("supervisor", early.name)
    level = getattr(args, "log_level", None) or ("WARNING" if quiet else level)
    setup_logging(level, getattr(args, "log_format", None) or fmt, **context)
    if args.config:
        _warn_if_password_readable(args.config)
    return early


def _warn_if_password_readable(path) -> None:
    """One warning when the config file holds a `[database] password` that its group or others can read."""
    import stat
    import tomllib

    from loguru import logger

    try:
        mode = os.stat(path).st_mode
        with open(path, "rb") as file:
            database = tomllib.load(file).get("database")
    except (OSError, ValueError):
        return  # load_config has already said what is wrong with it
    if mode & (stat.S_IRWXG | stat.S_IRWXO) and isinstance(database, dict) and database.get("password"):
        logger.warning(
            "{} holds a [database] password and is readable by group or others (mode {:o}): chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )


def _start(args) -> int:
    from djsupervisor.cli_control import refuse_second_start
    from djsupervisor.log import add_secret, known_secrets
    from djsupervisor.serve.control import ControlError, default_socket_path
    from djsupervisor.serve.http import HttpError
    from djsupervisor.supervisor.arbiter import Supervisor

    early = _logging_for(args, context={})
    if early is not None:  # refuse before importing anything (pipeline modules connect when imported)
        socket_path = early.control_socket or default_socket_path(early.name)
        if refused_start := refuse_second_start(early.source, socket_path):
            raise UsageError(refused_start)
    config, path = _load(args)
    for secret in (config.database.password, config.notify_slack_webhook, config.notify_json_webhook):
        add_secret(secret)
    known_secrets()  # the targets are imported: a pipeline module may have set dj.config's password
    if not args.config:
        _logging_for(args, context={"supervisor": config.name})
    try:
        return Supervisor(config, path, host=args.host).run()
    except (ControlError, HttpError) as error:  # e.g. already running here, or the http port is taken
        raise UsageError(f"{config.source}: {error}") from None


def _status(args) -> int:
    from djsupervisor.serve.status_format import format_queues, format_status

    if args.fleet:
        from djsupervisor.fleet.cli import fleet_status

        _logging_for(args, context={"worker": "status"}, quiet=True)
        return fleet_status(args, _load)

    if args.queues and not args.config:
        raise UsageError("status --queues needs -c FILE (it imports the worker definitions)")
    try:
        response: dict[str, Any] = dict(_request(args, ControlRequest(cmd="status")))
    except UsageError:
        if not args.queues:
            raise
        response = {"supervisor": None}  # the queues come from the database: no supervisor needed
    response.pop("ok", None)
    if args.queues:
        response["queues"] = _queues(args)
    if args.json:
        print(json.dumps(response, indent=2, default=str))
    else:
        print(format_status(response) if response.get("supervisor") else f"no supervisor runs for {args.config}")
        if args.queues:
            print()
            print(format_queues(response["queues"]))
    return 0


def _queues(args) -> list[dict]:
    from djsupervisor.fleet.queues import queue_progress

    _logging_for(args, context={"worker": "status"}, quiet=True)
    config, _ = _load(args)
    try:
        return queue_progress((w.name, w.build_worker()) for w in config.workers)
    except Exception as error:  # the database is out of reach, or a table cannot be read
        raise UsageError(f"{args.config}: job queues: {error.__class__.__name__}: {error}".splitlines()[0]) from None


def _check(args) -> int:
    from djsupervisor.cli_check import check

    return check(args)


def _run(args) -> int:
    from djsupervisor.log import add_secret, known_secrets, setup_logging

    early = _logging_for(args, context={"worker": args.worker})
    if early is not None:
        early.worker_named(args.worker)  # an unknown name fails before anything is imported
    config, _ = _load(args)
    add_secret(config.database.password)
    worker = config.worker_named(args.worker).build_worker()
    known_secrets()
    setup_logging(
        args.log_level or config.log_level,
        args.log_format or config.log_format,
        supervisor=config.name,
        worker=worker.name,
    )
    worker.run()
    return 0


def _migrate(args) -> int:
    from djsupervisor.worker.migrate import MigrationError, run

    early = _logging_for(args, context={"worker": "migrate-schema"}, quiet=True)
    try:
        print(run(args.schema, drop_old=args.drop_old, database=early.database if early is not None else None))
    except MigrationError as error:
        raise UsageError(f"migrate-schema: {error}") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `djsupervisor` console script."""
    # The CLI reads DJ_* variables and the config's [database]; DataJoint's hint about a missing
    # datajoint.json would only stand in front of the one-line answers.
    warnings.filterwarnings("ignore", message="No datajoint.json found")
    from djsupervisor.credentials import CredentialError, apply_credential
    from djsupervisor.fleet.cli import FleetError
    from djsupervisor.operate import OperateError
    from djsupervisor.preflight import DatabaseError, SettingsError
    from djsupervisor.supervisor.config import ConfigError

    try:
        args = _parser().parse_args(argv)
        apply_credential()  # systemd's LoadCredential=dj_pass:... : the database password, before any import
        if args.command == "start":
            return _start(args)
        if args.command == "status":
            return _status(args)
        if args.command == "stop":
            return _stop(args)
        if args.command in ("reload", "scale"):
            from djsupervisor import cli_control

            if args.command == "reload":
                print("\n".join(cli_control.reload_lines(_request(args, ControlRequest(cmd="reload")))))
            else:
                request = ControlRequest(cmd="scale", worker=args.worker, replicas=args.replicas)
                print(cli_control.scale_line(_request(args, request)))
            return 0
        if args.command == "restart":
            from djsupervisor import cli_restart

            return cli_restart.restart(args, lambda request: _request(args, request))  # type: ignore[arg-type, return-value]
        if args.command == "check":
            return _check(args)
        if args.command in ("drain", "resume", "forget"):
            from djsupervisor.fleet import cli as fleet_cli

            _logging_for(args, context={"worker": args.command}, quiet=True)
            return getattr(fleet_cli, args.command)(args, _load)
        if args.command in ("progress", "errors", "retry"):
            from djsupervisor.operate import cli as operate_cli

            _logging_for(args, context={"worker": args.command}, quiet=True)
            return operate_cli.run(args, _load)
        if args.command == "run":
            return _run(args)
        if args.command == "migrate-schema":
            return _migrate(args)
        if args.command == "demo":
            from djsupervisor.example.command import main as demo

            return demo()
    except (UsageError, ConfigError, FleetError, SettingsError, DatabaseError, CredentialError, OperateError) as error:
        from djsupervisor.log import journal_prefix  # under systemd: in `journalctl -p err` (the unit fails)

        more = len(getattr(error, "problems", ())) - 1  # a config file's further problems: `check` lists them
        hint = f" (and {more} more: djsupervisor check -c {error.source})" if more > 0 else ""  # type: ignore[union-attr]
        print(f"{journal_prefix(3)}djsupervisor: error: {error}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `djsupervisor status | head -1`: the reader is gone, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
