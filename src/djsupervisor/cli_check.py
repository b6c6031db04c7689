"""`djsupervisor check -c FILE`: every problem of a config file in one pass, then the database and the targets.

Order: the file's keys (every problem, each with its closest known key when it is misspelt), the database
login (`preflight.check_database`, before any target is imported: a lab's module connects when imported,
and a refused login would otherwise read as a broken target), then each target, imported as `start` would
import it. A refused login is asked again after the imports (a module may set ``dj.config``'s credentials);
if it is still refused, it replaces the import failures it explains. Problems are printed one a line on
stderr (``djsupervisor: error: FILE: KEY: PROBLEM``), exit status 2; warnings (``warning: ...``, on stdout
with the report) leave the exit status 0. A pool whose ``[[worker]] name`` is not its DataJointWorker's own
name is warned about: the registry, WorkerLog and ErrorLog use the worker's name, the status output and
the control commands the pool's. The GPUs NVML sees are reported (`gpu_line`); a pool naming a GPU that is not
there is one of the file's problems (`supervisor.gpus`)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

EXIT_OK, EXIT_PROBLEMS = 0, 2


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def pool_size(worker) -> str:
    """``2``, or ``1..4`` for an autoscaled pool."""
    return f"{worker.replicas}..{worker.max_replicas}" if worker.max_replicas is not None else str(worker.replicas)


def name_warnings(config, built: dict) -> list[str]:
    """One warning per pool whose name differs from its DataJointWorker's own name."""
    warnings = []
    for index, worker in enumerate(config.workers):
        own = getattr(built.get(worker.name), "name", worker.name)
        if own != worker.name:
            warnings.append(
                f"{config.source}: worker[{index}] ({worker.name}).name: the pool is named {worker.name!r} but its"
                f" DataJointWorker ({worker.target}) is named {own!r}; status and scale use {worker.name!r}, the"
                f" worker schema's registry and logs {own!r}"
            )
    return warnings


def check(args) -> int:
    """The `check` command; see the module's docstring."""
    from djsupervisor.log import add_secret, setup_logging
    from djsupervisor.preflight import DatabaseError, check_database, quiet_datajoint
    from djsupervisor.supervisor.config import ConfigError, Problems, load_config

    source = args.config
    early = load_config(source, check_targets=False, problems=Problems(source))
    add_secret(early.database.password)
    setup_logging(args.log_level or "WARNING", "text", supervisor=early.name, worker="check")
    from djsupervisor.cli import _warn_if_password_readable

    _warn_if_password_readable(source)
    problems = Problems(source)
    early.database.apply()
    refused: DatabaseError | None = None
    try:
        database = check_database(source)
    except DatabaseError as error:
        refused = error
    with quiet_datajoint() if refused is not None else contextlib.nullcontext():
        config = load_config(source, problems=problems)  # the targets; problems collected, none raised
    failed = {worker.name for worker in config.workers for p in problems if f"({worker.name})" in p.key}
    if refused is not None:  # a target may set dj.config's credentials when imported: ask again
        try:
            database = check_database(source)
        except DatabaseError as error:  # still refused: the cause of the targets' failures too
            kept = [p for p in problems if not (p.key.endswith(".target") and "cannot import" in p.problem)]
            kept += [p for p in problems if "ModuleNotFoundError" in p.problem and p not in kept]
            problems[:] = [ConfigError(source, "", str(error)), *kept]
    built = {}
    for worker in config.workers:
        if worker.name in failed:
            continue  # its import failed: importing it again would only repeat that
        try:
            built[worker.name] = worker.build_worker()
        except Exception:  # parse_config has already added the problem
            pass
    if config.http_token_file:  # as `start` will read it: run `check` as the supervisor's user
        from djsupervisor.serve.http_access import read_token_file

        try:
            read_token_file(Path(config.http_token_file))
        except ValueError as error:
            problems.add("supervisor.http_token_file", str(error))
    for warning in name_warnings(config, built):
        print(f"warning: {warning}")  # on stdout: the report; stderr holds the problems
    if problems:
        for problem in problems:
            print(f"djsupervisor: error: {problem}", file=sys.stderr)
        if len(problems) > 1:
            print(f"djsupervisor: {_plural(len(problems), 'problem')} in {source}", file=sys.stderr)
        return EXIT_PROBLEMS
    print(
        f"{source}: valid; {_plural(len(config.workers), 'worker')}: "
        + ", ".join(f"{w.name}×{pool_size(w)} ({w.target})" for w in config.workers)
    )
    print(f"database: {database}: ok")
    if gpus := gpu_line(config):
        print(gpus)
    return EXIT_OK


def gpu_line(config, devices=None) -> str | None:
    """``gpus: 2 (0: NVIDIA H200 143771 MiB, 1: ...)``, the GPUs NVML sees; or why it sees none when a pool
    has GPUs (nothing to say otherwise: a machine without GPUs running CPU pools needs no line about them).
    `devices`: what `gpu_memory.list_devices` returned (asked here if None)."""
    from djsupervisor.supervisor.gpu_memory import list_devices

    devices = list_devices() if devices is None else devices
    wanted = any(worker.gpus or worker.max_gpu_memory_mb for worker in config.workers)
    if isinstance(devices, str):
        return f"gpus: none seen: {devices}" if wanted else None
    if not devices and not wanted:
        return None
    seen = ", ".join(f"{d.index}: {d.name} {d.memory_total // 2**20} MiB ({d.uuid})" for d in devices)
    return f"gpus: {len(devices)}" + (f" ({seen})" if seen else "")
