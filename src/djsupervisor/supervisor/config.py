"""Supervisor configuration: a TOML file (or a list of modules) turned into typed, frozen settings.

Everything is validated before any child starts: the file's syntax, every key's name, type and range,
worker names, and each worker's target, which is imported and must be a `DataJointWorker` whose
setting overrides it accepts. Every problem raises `ConfigError`, whose message is one line naming the
file, the key and the problem.

Each key's type, default, bounds and meaning are declared once, in `djsupervisor.supervisor.settings` (the
worker's own settings in `djsupervisor.worker.settings`): the tables are read with those declarations and
the dataclasses below take their defaults from them. Checks across keys (max_replicas >= replicas) and of
targets (imported) are here.

Example::

    [supervisor]
    name = "lab"                 # default: the config file's stem
    graceful_timeout = 30

    [database]                   # optional; feeds DataJoint's config (DJ_* variables otherwise)
    host = "db.lab.org"

    [[worker]]
    name = "standard"
    target = "lab.workers:standard"
    replicas = 2
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import tomllib
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from loguru import logger

from djsupervisor.serve.http_access import exposure_problem
from djsupervisor.supervisor import gpu_memory, gpus
from djsupervisor.supervisor.autoscale import AutoscaleSettings, HostBudget
from djsupervisor.supervisor.config_read import (
    ConfigError as ConfigError,  # raised by everything here; defined with the readers that collect it
)
from djsupervisor.supervisor.config_read import (
    Problems,
    as_table,
    read_table,
    split_target,
    unknown_key,
)
from djsupervisor.supervisor.config_read import split_host_port as split_host_port  # serve.http's import
from djsupervisor.supervisor.import_path import ImportPathError, append_directories, config_directories
from djsupervisor.supervisor.settings import (
    DATABASE_SETTINGS,
    POOL_SETTINGS,
    SUPERVISOR_SETTINGS,
    WORKER_OVERRIDES,
    defaults,
    names,
)
from djsupervisor.worker.settings import type_name

_SUPERVISOR_DEFAULTS = defaults(SUPERVISOR_SETTINGS)
_POOL_DEFAULTS = defaults(POOL_SETTINGS)
_DATABASE_DEFAULTS = defaults(DATABASE_SETTINGS)


@dataclasses.dataclass(frozen=True)
class DatabaseConfig:
    """Connection settings given to DataJoint's config; unset ones leave DataJoint's own (DJ_*) alone."""

    host: str | None = _DATABASE_DEFAULTS["host"]
    port: int | None = _DATABASE_DEFAULTS["port"]
    user: str | None = _DATABASE_DEFAULTS["user"]
    password: str | None = dataclasses.field(default=_DATABASE_DEFAULTS["password"], repr=False)  # never in logs
    backend: str | None = _DATABASE_DEFAULTS["backend"]
    use_tls: bool | None = _DATABASE_DEFAULTS["use_tls"]

    def apply(self) -> None:
        """Set the given values in `datajoint.config` (they win over DJ_* variables and datajoint.json)."""
        import datajoint as dj

        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                dj.config[f"database.{field.name}"] = value


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """One worker definition: a pool of `replicas` children running the `target` DataJointWorker.

    Each field's meaning, default and bounds: `POOL_SETTINGS`; `overrides` are those of `WORKER_OVERRIDES` given."""

    name: str
    target: str
    replicas: int = _POOL_DEFAULTS["replicas"]
    restart: str = _POOL_DEFAULTS["restart"]
    max_memory_mb: float | None = _POOL_DEFAULTS["max_memory_mb"]
    max_jobs: int | None = _POOL_DEFAULTS["max_jobs"]
    job_timeout: float | None = _POOL_DEFAULTS["job_timeout"]
    overrides: tuple[tuple[str, Any], ...] = ()  # (key, value) of the worker settings this entry sets
    max_replicas: int | None = _POOL_DEFAULTS["max_replicas"]  # set: the pool autoscales between `replicas` and this
    scale_up_pending: float = _POOL_DEFAULTS["scale_up_pending"]
    scale_down_after: float = _POOL_DEFAULTS["scale_down_after"]
    scale_cooldown: float = _POOL_DEFAULTS["scale_cooldown"]
    scale_step: int = _POOL_DEFAULTS["scale_step"]
    gpus: tuple[str, ...] | None = _POOL_DEFAULTS["gpus"]  # a GPU pool: CUDA_VISIBLE_DEVICES of each slot (gpus.py)
    per_gpu: int = _POOL_DEFAULTS["per_gpu"]
    max_gpu_memory_mb: float | None = _POOL_DEFAULTS["max_gpu_memory_mb"]

    @property
    def definition(self) -> tuple:
        """Everything but the pool size: when this changes on reload, the pool's children are rolled."""
        gpu = (self.gpus, self.per_gpu, self.max_gpu_memory_mb)
        return (self.target, self.restart, self.max_memory_mb, self.max_jobs, self.job_timeout, self.overrides, *gpu)

    @property
    def autoscale(self) -> AutoscaleSettings | None:
        """The pool's autoscaling settings (None: fixed size); a GPU pool never grows past its GPUs."""
        if self.max_replicas is None:
            return None
        limit = gpus.capacity(self)
        return AutoscaleSettings(
            self.max_replicas if limit is None else min(self.max_replicas, limit),
            self.scale_up_pending,
            self.scale_down_after,
            self.scale_cooldown,
            self.scale_step,
        )

    def resolve(self):
        """The DataJointWorker instance the target names (imported, so already loaded after validation)."""
        module_name, attribute = split_target(self.target)
        return getattr(importlib.import_module(module_name), attribute)

    def build_worker(self):
        """The DataJointWorker to run: the target with this entry's setting overrides applied."""
        worker = self.resolve()
        return worker.configure(**dict(self.overrides)) if self.overrides else worker.configure()


@dataclasses.dataclass(frozen=True)
class SupervisorConfig:
    """The whole configuration: supervisor settings, database settings, and the worker definitions.

    Each setting's meaning, default and bounds: `SUPERVISOR_SETTINGS` (`name` defaults to the file's stem)."""

    name: str
    workers: tuple[WorkerConfig, ...]
    source: str = "<config>"
    graceful_timeout: float = _SUPERVISOR_DEFAULTS["graceful_timeout"]
    control_socket: str | None = _SUPERVISOR_DEFAULTS["control_socket"]
    pythonpath: tuple[str, ...] = _SUPERVISOR_DEFAULTS["pythonpath"]
    backoff_initial: float = _SUPERVISOR_DEFAULTS["backoff_initial"]
    backoff_max: float = _SUPERVISOR_DEFAULTS["backoff_max"]
    stable_after: float = _SUPERVISOR_DEFAULTS["stable_after"]
    fatal_after: int = _SUPERVISOR_DEFAULTS["fatal_after"]
    heartbeat_interval: float = _SUPERVISOR_DEFAULTS["heartbeat_interval"]
    heartbeat_timeout: float = _SUPERVISOR_DEFAULTS["heartbeat_timeout"]
    hang_timeout: float = _SUPERVISOR_DEFAULTS["hang_timeout"]
    sample_interval: float = _SUPERVISOR_DEFAULTS["sample_interval"]
    host: str = _SUPERVISOR_DEFAULTS["host"]
    fleet_interval: float = _SUPERVISOR_DEFAULTS["fleet_interval"]
    max_cpu_percent: float | None = _SUPERVISOR_DEFAULTS["max_cpu_percent"]
    min_available_memory_mb: float | None = _SUPERVISOR_DEFAULTS["min_available_memory_mb"]
    log_level: str = _SUPERVISOR_DEFAULTS["log_level"]
    log_format: str = _SUPERVISOR_DEFAULTS["log_format"]
    http: str | None = _SUPERVISOR_DEFAULTS["http"]
    http_allowed_hosts: tuple[str, ...] = _SUPERVISOR_DEFAULTS["http_allowed_hosts"]
    http_token_file: str | None = _SUPERVISOR_DEFAULTS["http_token_file"]  # the path; read at start only
    http_allow_anonymous: bool = _SUPERVISOR_DEFAULTS["http_allow_anonymous"]
    notify_slack_webhook: str | None = dataclasses.field(default=None, repr=False)  # never in logs: holds a token
    notify_json_webhook: str | None = dataclasses.field(default=None, repr=False)
    notify_timeout: float = _SUPERVISOR_DEFAULTS["notify_timeout"]
    notify_window: float = _SUPERVISOR_DEFAULTS["notify_window"]
    database: DatabaseConfig = DatabaseConfig()

    @property
    def webhooks(self) -> dict[str, Any]:
        """The webhooks the fleet agent tells of the supervisor's events (`notify.notifiers.webhooks` takes it)."""
        return dict(
            slack=self.notify_slack_webhook,
            json_url=self.notify_json_webhook,
            timeout=self.notify_timeout,
            window=self.notify_window,
        )

    @property
    def budget(self) -> HostBudget:
        """The host budget autoscaled pools grow within."""
        return HostBudget(self.max_cpu_percent, self.min_available_memory_mb)

    def worker_named(self, name: str) -> WorkerConfig:
        """The worker definition called `name` (ConfigError if there is none)."""
        for worker in self.workers:
            if worker.name == name:
                return worker
        known = ", ".join(w.name for w in self.workers) or "none"
        raise ConfigError(self.source, "worker", f"no worker named {name!r} (defined: {known})")


# ----- validation: every key is read with its declaration (supervisor.settings); config_read collects problems


def _parse_supervisor(problems: Problems, table: Any, default_name: str) -> dict[str, Any]:
    values = read_table(problems, "supervisor", as_table(problems, "supervisor", table), SUPERVISOR_SETTINGS)
    values.setdefault("name", default_name)
    floats = {setting.name for setting in SUPERVISOR_SETTINGS if setting.kind is float}
    return {key: float(value) if key in floats else value for key, value in values.items()}  # 30 s -> 30.0


def _parse_worker(
    problems: Problems, table: Any, index: int, devices: Callable[[], Any] = gpu_memory.list_devices
) -> WorkerConfig | None:
    where = f"worker[{index}]"
    table = as_table(problems, where, table)
    if isinstance(table.get("name"), str) and table["name"]:
        where = f"worker[{index}] ({table['name']})"
    before = len(problems)
    values = read_table(problems, where, table, POOL_SETTINGS + WORKER_OVERRIDES)
    if "gpus" in values:  # resolved, and `replicas` defaulted to and checked against the GPUs (gpus.py)
        for key, problem in gpus.read_pool(values, devices):
            problems.add(f"{where}.{key}", problem)
    overrides = tuple((key, values.pop(key)) for key in names(WORKER_OVERRIDES) if key in values)
    replicas, max_replicas = values.get("replicas", _POOL_DEFAULTS["replicas"]), values.get("max_replicas")
    if max_replicas is not None and max_replicas < replicas:
        problems.add(f"{where}.max_replicas", f"must be >= replicas ({replicas}), got {max_replicas!r}")
    if len(problems) > before or "name" not in values or "target" not in values:
        return None
    return WorkerConfig(**values, overrides=overrides)


def _import_problem(module_name: str, error: Exception, looked_in: list[Path]) -> str:
    """Why `module_name` did not import: where it was looked for, or the file and line that raised."""
    text = f"cannot import {module_name!r}: {error.__class__.__name__}: {error}"
    if isinstance(error, ModuleNotFoundError) and error.name and module_name.startswith(error.name):
        places = ", ".join(str(p) for p in looked_in) or "the working directory"
        return f"{text} (looked in {places} and the installed packages; [supervisor] pythonpath adds directories)"
    frames = traceback.extract_tb(error.__traceback__)
    outside = [f for f in frames if "importlib" not in f.filename and f.filename != __file__]
    if outside:  # where it was raised; the whole traceback at --log-level DEBUG
        text += f" (raised at {outside[-1].filename}:{outside[-1].lineno})"
    logger.opt(exception=error).debug("importing {!r} failed", module_name)
    return text


def check_target(worker: WorkerConfig, looked_in: list[Path]) -> tuple[str, str] | None:
    """Import the target, check it is a DataJointWorker that accepts the overrides: ``(key suffix, problem)``
    (the suffix ``.target`` or empty), or None."""
    from djsupervisor.worker.loop import DataJointWorker

    module_name, attribute = split_target(worker.target)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        return ".target", _import_problem(module_name, error, looked_in)
    if not hasattr(module, attribute):
        return ".target", f"module {module_name!r} ({getattr(module, '__file__', '?')}) has no attribute {attribute!r}"
    value = getattr(module, attribute)
    if not isinstance(value, DataJointWorker):
        return ".target", f"{worker.target!r} is a {type_name(value)}, not a DataJointWorker"
    try:
        worker.build_worker()
    except (TypeError, ValueError) as error:
        return "", f"invalid worker setting: {error}"
    return None


def parse_config(
    data: Mapping[str, Any],
    source: str,
    default_name: str,
    *,
    check_targets: bool = True,
    problems: Problems | None = None,
    gpu_devices: Callable[[], Any] = gpu_memory.list_devices,
) -> SupervisorConfig:
    """Validate parsed TOML `data` (from `source`, for messages) into a SupervisorConfig.

    `gpu_devices` gives the GPUs NVML sees (or why it cannot tell), for pools with ``gpus``.

    Without `problems`, the first problem is raised (ConfigError, `problems` holding them all) before any
    target is imported. With it, every problem is added there, targets are imported whatever else is wrong,
    and the configuration of what was valid is returned."""
    collect = problems is not None
    problems = problems if problems is not None else Problems(source)
    for key in data:
        if key not in ("supervisor", "database", "worker"):
            problems.add(key, unknown_key(key, ("supervisor", "database", "worker")))
    settings = _parse_supervisor(problems, data.get("supervisor", {}), default_name)
    database_table = as_table(problems, "database", data.get("database", {}))
    database = DatabaseConfig(**read_table(problems, "database", database_table, DATABASE_SETTINGS))
    entries = data.get("worker", [])
    if not isinstance(entries, list):
        problems.add("worker", "must be an array of tables ([[worker]])")
        entries = []
    elif not entries:
        problems.add("worker", "no [[worker]] defined")
    devices = functools.cache(gpu_devices)  # NVML asked once, and only if some pool has GPUs
    parsed = [(i, _parse_worker(problems, entry, i, devices)) for i, entry in enumerate(entries)]
    workers: list[WorkerConfig] = []
    seen: dict[str, int] = {}
    for i, worker in parsed:
        if worker is None:
            continue
        if worker.name in seen:
            also = f"also worker[{seen[worker.name]}]"
            problems.add(f"worker[{i}].name", f"duplicate worker name {worker.name!r} ({also})")
            continue
        seen[worker.name] = i
        workers.append(worker)
    socket_path = settings.get("control_socket")
    if socket_path is not None and ".." in Path(socket_path).parts:
        problems.add("supervisor.control_socket", f"must not contain '..' components, got {socket_path!r}")
        settings.pop("control_socket")
    if "http_token_file" in settings:  # relative: to the config file, as pythonpath
        settings["http_token_file"] = str(Path(source).parent / settings["http_token_file"])
    http, token_file = settings.get("http"), settings.get("http_token_file")  # a network bind needs a token
    if exposed := exposure_problem(http, token_file, settings.get("http_allow_anonymous", False)):
        problems.add("supervisor.http", exposed)
    if not collect:
        problems.raise_first()
    if check_targets:
        database.apply()  # pipeline modules connect when imported
        looked_in = config_directories(Path(source), settings.get("pythonpath", ()))
        try:  # after site-packages, never the working directory (import_path's docstring says why)
            append_directories(looked_in)
        except ImportPathError as error:
            problems.add("", str(error))
            workers = []
        for worker in workers:
            found = check_target(worker, looked_in)
            if found is not None:
                suffix, problem = found
                problems.add(f"worker[{seen[worker.name]}] ({worker.name}){suffix}", problem)
        if not collect:
            problems.raise_first()
    return SupervisorConfig(workers=tuple(workers), source=source, database=database, **settings)


def load_config(
    path: str | Path,
    *,
    check_targets: bool = True,
    problems: Problems | None = None,
    gpu_devices: Callable[[], Any] = gpu_memory.list_devices,
) -> SupervisorConfig:
    """Read and validate the TOML file at `path`; imports every target (ConfigError on any problem).

    `problems`: collect the problems there instead of raising (parse_config); a file that cannot be read or
    parsed is raised all the same."""
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(source, "", "file not found")
    except OSError as error:
        raise ConfigError(source, "", f"cannot read: {error.strerror or error}")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(source, "", f"not UTF-8 text: {error.reason} at byte {error.start}")
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(source, "", f"TOML syntax error: {error}")  # the message holds line and column
    return parse_config(
        data, source, path.stem, check_targets=check_targets, problems=problems, gpu_devices=gpu_devices
    )


def config_from_modules(modules: list[str], **settings: Any) -> SupervisorConfig:
    """A configuration with one child per DataJointWorker found in the given modules, after importing them.

    A module's DataJointWorker instances are its attributes that are instances; one bound to several
    names is run once. `settings` are SupervisorConfig fields (graceful_timeout=..., say).
    """
    from djsupervisor.worker.loop import DataJointWorker

    source = "modules " + ",".join(modules) if modules else "<no modules>"
    if not modules:
        raise ConfigError(source, "", "no modules given")
    try:  # appended after site-packages: a planted module cannot shadow the standard library
        append_directories([Path.cwd()])
    except ImportPathError as error:
        raise ConfigError(source, "", str(error))
    workers: list[WorkerConfig] = []
    names: dict[str, str] = {}
    found: set[int] = set()  # a worker imported into several of the modules runs once
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except Exception as error:
            raise ConfigError(source, module_name, _import_problem(module_name, error, [Path.cwd()]))
        defines_one = False
        for attribute, value in vars(module).items():
            if not isinstance(value, DataJointWorker):
                continue
            defines_one = True
            if id(value) in found:
                continue
            found.add(id(value))
            target = f"{module_name}:{attribute}"
            if value.name in names:
                raise ConfigError(source, target, f"duplicate worker name {value.name!r} (also {names[value.name]})")
            names[value.name] = target
            workers.append(WorkerConfig(name=value.name, target=target))
        if not defines_one:
            raise ConfigError(source, module_name, "defines no DataJointWorker")
    settings.setdefault("name", modules[0].rsplit(".", 1)[-1])
    return SupervisorConfig(workers=tuple(workers), source=source, **settings)


def kept_at_reload(
    running: SupervisorConfig, new: SupervisorConfig, host_override: str | None, log: Any
) -> SupervisorConfig:
    """`new` as a reload applies it: the supervisor's name and HTTP settings stay until the next start (with
    a warning if the file changed them), and a host given on the command line stays."""
    if new.name != running.name:
        log.warning("reload: the supervisor name change to {!r} applies at the next start", new.name)
        new = dataclasses.replace(new, name=running.name)
    for key in ("http", "http_allowed_hosts", "http_token_file", "http_allow_anonymous"):  # the endpoint's
        if getattr(new, key) != getattr(running, key):
            log.warning("reload: the {} change to {!r} applies at the next start", key, getattr(new, key))
            new = dataclasses.replace(new, **{key: getattr(running, key)})
    if host_override:
        new = dataclasses.replace(new, host=host_override)
    return new
