"""A child started from a fresh interpreter: fork, then exec ``python -m djsupervisor.supervisor.fresh_child``.

Why: a forked child runs the code its parent imported once, at start. After ``djsupervisor restart`` a pool's
children must run the worker code as it is on disk now, so they are started this way instead: the parent
forks as for any child (`fork.fork_child`: signals blocked, own process group, death with the parent), and
the forked process execs a new interpreter, which imports the target anew and then runs the very same
`child.run_child` a forked child runs. Everything else (reports, heartbeats, graceful stop) is unchanged.

What the new interpreter needs of its parent travels in an anonymous file (``memfd_create``) whose descriptor
it inherits, with the report pipe's: a pickle of `run_child`'s arguments, the parent's ``sys.path`` (the config
file's directory and ``[supervisor] pythonpath``), its logging settings and DataJoint's database settings as
the parent holds them (a password read from systemd's credentials, or set by a pipeline module, included).
Not on the command line, where ``ps`` shows it, and not in the environment, which ``make()``'s own
subprocesses would inherit.

The same module is the **probe** a restart runs first (`exec_probe`): it imports each pool's target in a
short-lived fresh interpreter and checks it as ``djsupervisor check`` does (the file and line an import error
was raised at), and writes one JSON line of problems; a problem stops the restart before any child moves.

The cost: a fresh child pays the interpreter's start and the imports (djsupervisor, DataJoint, the pipeline
module) and the connection that a forked child gets for free: 2.6 to 5.6 s against 0.08 to 0.38 s on the loaded
2-core development machine (``bench/restart_roll.py``; ARCHITECTURE.md has the table). So forking stays the
default, and only the pools that were restarted pay it.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from djsupervisor.supervisor.config import SupervisorConfig, WorkerConfig
    from djsupervisor.supervisor.slot import Slot

#: Exit status of a probe that found a problem (its line says which).
PROBE_FAILED = 3


def _interpreter(payload_fd: int, *flags: str) -> list[str]:
    # -P: the working directory is not put first on sys.path (it could shadow djsupervisor itself; issue 18)
    return [sys.executable, "-P", "-m", "djsupervisor.supervisor.fresh_child", *flags, str(payload_fd)]


def _payload_file(payload: dict[str, Any]) -> int:
    """An inheritable descriptor the new interpreter reads `payload` (pickled) from: an anonymous file, or
    where ``memfd_create`` is refused (a seccomp filter), a pipe already written and closed (a payload is a
    few KiB; a pipe holds 64)."""
    data = pickle.dumps(payload)
    try:
        fd = os.memfd_create("djsupervisor-child", 0)  # not MFD_CLOEXEC: the new interpreter inherits it
    except (AttributeError, OSError):
        read_fd, write_fd = os.pipe()
        if len(data) > 60000:
            raise OSError(f"child payload of {len(data)} bytes does not fit a pipe") from None
        os.write(write_fd, data)
        os.close(write_fd)
        os.set_inheritable(read_fd, True)
        return read_fd
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def parent_settings() -> dict[str, Any]:
    """What the new interpreter takes from its parent besides the child's arguments: import path, logging,
    DataJoint's database settings (as the parent holds them now)."""
    from djsupervisor import log

    database: dict[str, Any] = {}
    datajoint = sys.modules.get("datajoint")
    if datajoint is not None:
        for key in ("host", "port", "user", "password", "backend", "use_tls"):
            try:
                value = datajoint.config[f"database.{key}"]
            except Exception:  # a DataJoint without that setting
                continue
            database[key] = value.get_secret_value() if hasattr(value, "get_secret_value") else value
    secrets = sorted(log._secrets)  # the values the parent masks in its logs (password, webhook URLs)
    return {"sys_path": list(sys.path), "logging": dict(log.CURRENT), "database": database, "secrets": secrets}


def exec_fresh(report_fd: int, child_args: dict[str, Any]) -> None:
    """In a forked child: become a fresh interpreter that runs `run_child(**child_args)`; never returns.

    `report_fd` (the report pipe) keeps its number; `child_args` is `run_child`'s keywords but for
    `report_fd` and `close_fds` (the exec closes every descriptor not marked inheritable, which is all of the
    parent's)."""
    try:
        os.setpgid(0, 0)  # as `fork.isolate` does, before the exec: the parent's setpgid fails after it
    except OSError:
        pass
    payload = {**parent_settings(), "child": {**child_args, "report_fd": report_fd, "close_fds": []}}
    fd = _payload_file(payload)
    os.set_inheritable(report_fd, True)
    os.execv(sys.executable, _interpreter(fd))


def child_body(
    supervisor: SupervisorConfig, worker_config: WorkerConfig, slot: Slot, parent_pid: int, *, fresh: bool
) -> Callable[[int, list[int]], None]:
    """What a new child of `slot` runs after fork, given its report pipe and the descriptors to close: the
    worker on `worker_config` in the forked process, or, if `fresh`, in a fresh interpreter (`exec_fresh`)."""
    from djsupervisor.fleet.agent import heartbeat_window

    args = dict(
        supervisor=supervisor.name,
        worker_config=worker_config,
        slot_index=slot.index,
        parent_pid=parent_pid,
        heartbeat_interval=min(supervisor.heartbeat_interval, supervisor.heartbeat_timeout / 3),
        died_job=slot.died_job,
        host=supervisor.host,
        fleet_window=heartbeat_window(supervisor.fleet_interval),
    )

    def body(report_fd: int, close_fds: list[int]) -> None:
        if fresh:
            try:
                exec_fresh(report_fd, args)
            finally:
                os._exit(70)  # the exec failed (the parent logs the early exit)
        from djsupervisor.supervisor.child import run_child

        run_child(**args, report_fd=report_fd, close_fds=close_fds)  # type: ignore[arg-type]

    return body


def exec_probe(targets: dict[str, Any]) -> None:
    """In a forked child whose stdout is the parent's pipe: become a fresh interpreter that imports and checks
    `targets` (pool name -> WorkerConfig) and writes its one JSON line there; never returns."""
    os.execv(sys.executable, _interpreter(_payload_file({**parent_settings(), "probe": targets}), "--probe"))


def _prepare(payload: dict[str, Any], context: dict[str, Any]) -> None:
    """Take the parent's import path, logging and database settings."""
    sys.path[:] = payload["sys_path"]
    import warnings

    warnings.filterwarnings("ignore", message="No datajoint.json found")  # as the command line does
    from djsupervisor.log import add_secret, known_secrets, setup_logging

    for secret in payload.get("secrets", ()):
        add_secret(secret)
    logging_settings = payload.get("logging") or {}
    setup_logging(logging_settings.get("level", "INFO"), logging_settings.get("fmt", "text"), **context)
    if payload.get("database"):
        from djsupervisor.preflight import import_datajoint, quiet_datajoint

        with quiet_datajoint():
            datajoint = import_datajoint()
            for key, value in payload["database"].items():
                if value is not None:
                    datajoint.config[f"database.{key}"] = value
        known_secrets()  # the password just set is masked here as in the parent


def _probe(payload: dict[str, Any]) -> int:
    """Import and check every target; print ``{"problems": {pool: line}}``; exit PROBE_FAILED if any."""
    from pathlib import Path

    from djsupervisor.supervisor.config import check_target

    problems: dict[str, str] = {}
    try:
        _prepare(payload, {"worker": "restart"})
        looked_in = [Path(p) for p in payload["sys_path"] if p]
        for name, worker in payload["probe"].items():
            found = check_target(worker, looked_in)
            if found is not None:
                problems[name] = f"{worker.target}: {found[1]}"
    except Exception as error:  # DataJoint's settings refused, say: one line all the same
        problems["*"] = f"{error.__class__.__name__}: {error}"
    sys.stdout.write(json.dumps({"problems": problems}) + "\n")
    sys.stdout.flush()
    return PROBE_FAILED if problems else 0


def main(argv: list[str]) -> int:
    """``fresh_child [--probe] FD``: read the payload from descriptor FD, then run the child (or the probe)."""
    probe = argv[:1] == ["--probe"]
    fd = int(argv[-1])
    with os.fdopen(fd, "rb") as file:
        payload = pickle.load(file)
    if probe:
        return _probe(payload)
    child = payload["child"]
    config = child["worker_config"]
    _prepare(payload, {"supervisor": child["supervisor"], "worker": config.name, "slot": child["slot_index"]})
    from djsupervisor.supervisor.child import run_child

    run_child(**child)  # never returns: ends the process with the child's status
    return 70


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
