"""Supervisor configuration: a TOML file (or a list of modules) turned into typed, frozen settings.

Everything is validated before any child starts: the file's syntax, every key's name, type and range,
worker names, and each worker's target, which is imported and must be a `DataJointWorker` whose
setting overrides it accepts. Every problem raises `ConfigError`, whose message is one line naming the
file, the key and the problem.

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
import importlib
import math
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping

#: Keys of a worker's own settings that a [[worker]] entry may override (DataJointWorker.configure).
WORKER_OVERRIDES = ("run_duration", "sleep_duration", "max_idled_cycle", "max_sleep_duration", "stale_timeout_hours")
RESTART_POLICIES = ("always", "on-failure", "never")
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
BACKENDS = ("mysql", "postgresql")


class ConfigError(Exception):
    """A configuration problem; ``str(error)`` is one line: ``FILE: KEY: PROBLEM``."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        text = f"{source}: {key}: {problem}" if key else f"{source}: {problem}"
        super().__init__(" ".join(text.split()))  # one line, whatever the problem's text holds


@dataclasses.dataclass(frozen=True)
class DatabaseConfig:
    """Connection settings given to DataJoint's config; unset ones leave DataJoint's own (DJ_*) alone."""

    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)  # never in logs or reprs
    backend: str | None = None
    use_tls: bool | None = None

    def apply(self) -> None:
        """Set the given values in `datajoint.config` (they win over DJ_* variables and datajoint.json)."""
        import datajoint as dj

        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                dj.config[f"database.{field.name}"] = value


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """One worker definition: a pool of `replicas` children running the `target` DataJointWorker."""

    name: str
    target: str
    replicas: int = 1
    restart: str = "always"
    max_memory_mb: float | None = None
    max_jobs: int | None = None
    job_timeout: float | None = None
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def definition(self) -> tuple:
        """Everything but the pool size: when this changes on reload, the pool's children are rolled."""
        return (self.target, self.restart, self.max_memory_mb, self.max_jobs, self.job_timeout, self.overrides)

    def resolve(self):
        """The DataJointWorker instance the target names (imported, so already loaded after validation)."""
        module_name, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attribute)

    def build_worker(self):
        """The DataJointWorker to run: the target with this entry's setting overrides applied."""
        worker = self.resolve()
        return worker.configure(**dict(self.overrides)) if self.overrides else worker.configure()


@dataclasses.dataclass(frozen=True)
class SupervisorConfig:
    """The whole configuration: supervisor settings, database settings, and the worker definitions."""

    name: str
    workers: tuple[WorkerConfig, ...]
    source: str = "<config>"
    graceful_timeout: float = 30.0
    control_socket: str | None = None
    backoff_initial: float = 0.25  # seconds before the first restart after a crash
    backoff_max: float = 60.0  # cap of the doubling restart delay
    stable_after: float = 60.0  # up this long and the restart delay starts over
    fatal_after: int = 5  # consecutive exits before completing a cycle that make a slot FATAL
    heartbeat_interval: float = 5.0  # how often a child reports while nothing else happens
    heartbeat_timeout: float = 30.0  # silence after which a child counts as hung (SIGSTOP, deadlock)
    hang_timeout: float = 600.0  # no progress outside a job for this long counts as hung
    sample_interval: float = 5.0  # psutil sampling period
    log_level: str = "INFO"
    log_format: str = "text"
    database: DatabaseConfig = DatabaseConfig()

    def worker_named(self, name: str) -> WorkerConfig:
        """The worker definition called `name` (ConfigError if there is none)."""
        for worker in self.workers:
            if worker.name == name:
                return worker
        known = ", ".join(w.name for w in self.workers) or "none"
        raise ConfigError(self.source, "worker", f"no worker named {name!r} (defined: {known})")


# ----- validation helpers


def _type_name(value: Any) -> str:
    return type(value).__name__


class _Checker:
    """Reads typed values out of one TOML table, raising ConfigError that names file and key."""

    def __init__(self, source: str, table: Mapping[str, Any], prefix: str, known: Iterable[str]) -> None:
        self.source, self.table, self.prefix = source, table, prefix
        known = tuple(known)
        for key in table:
            if key not in known:
                self.fail(key, f"unknown key (known: {', '.join(known)})")

    def fail(self, key: str, problem: str):
        raise ConfigError(self.source, f"{self.prefix}.{key}" if self.prefix else key, problem)

    def string(self, key: str, default: Any = None, choices: Iterable[str] | None = None, required=False):
        if key not in self.table:
            if required:
                self.fail(key, "missing (required)")
            return default
        value = self.table[key]
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string, got {_type_name(value)} {value!r}")
        if choices is not None and value not in choices:
            self.fail(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def number(self, key: str, default: Any = None, *, minimum: float = 0, integer=False, exclusive=False):
        if key not in self.table:
            return default
        value = self.table[key]
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or (isinstance(value, float) and not math.isfinite(value)):
            kind = "an integer" if integer else "a number"
            self.fail(key, f"must be {kind}, got {_type_name(value)} {value!r}")
        if value < minimum or (exclusive and value == minimum):
            self.fail(key, f"must be {'>' if exclusive else '>='} {minimum}, got {value!r}")
        return value

    def boolean(self, key: str, default: Any = None):
        if key not in self.table:
            return default
        value = self.table[key]
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {_type_name(value)} {value!r}")
        return value


_SUPERVISOR_KEYS = tuple(
    f.name for f in dataclasses.fields(SupervisorConfig) if f.name not in ("workers", "source", "database")
)
_DATABASE_KEYS = tuple(f.name for f in dataclasses.fields(DatabaseConfig))
_WORKER_KEYS = ("name", "target", "replicas", "restart", "max_memory_mb", "max_jobs", "job_timeout", *WORKER_OVERRIDES)


def _parse_supervisor(source: str, table: Any, default_name: str) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(source, "supervisor", f"must be a table, got {_type_name(table)}")
    c = _Checker(source, table, "supervisor", _SUPERVISOR_KEYS)
    return dict(
        name=c.string("name", default_name),
        graceful_timeout=float(c.number("graceful_timeout", 30.0)),
        control_socket=c.string("control_socket"),
        backoff_initial=float(c.number("backoff_initial", 0.25)),
        backoff_max=float(c.number("backoff_max", 60.0)),
        stable_after=float(c.number("stable_after", 60.0)),
        fatal_after=c.number("fatal_after", 5, minimum=1, integer=True),
        heartbeat_interval=float(c.number("heartbeat_interval", 5.0, exclusive=True)),
        heartbeat_timeout=float(c.number("heartbeat_timeout", 30.0, exclusive=True)),
        hang_timeout=float(c.number("hang_timeout", 600.0, exclusive=True)),
        sample_interval=float(c.number("sample_interval", 5.0, exclusive=True)),
        log_level=c.string("log_level", "INFO", choices=LOG_LEVELS),
        log_format=c.string("log_format", "text", choices=LOG_FORMATS),
    )


def _parse_database(source: str, table: Any) -> DatabaseConfig:
    if not isinstance(table, dict):
        raise ConfigError(source, "database", f"must be a table, got {_type_name(table)}")
    c = _Checker(source, table, "database", _DATABASE_KEYS)
    port = c.number("port", integer=True, minimum=1)
    if port is not None and port > 65535:
        c.fail("port", f"must be <= 65535, got {port!r}")
    if "password" in table and not isinstance(table["password"], str):
        c.fail("password", f"must be a string, got {_type_name(table['password'])}")  # value never shown
    return DatabaseConfig(
        host=c.string("host"), port=port, user=c.string("user"), password=table.get("password"),
        backend=c.string("backend", choices=BACKENDS), use_tls=c.boolean("use_tls"),
    )  # fmt: skip


def _parse_worker(source: str, table: Any, index: int) -> WorkerConfig:
    where = f"worker[{index}]"
    if not isinstance(table, dict):
        raise ConfigError(source, where, f"must be a table, got {_type_name(table)}")
    if isinstance(table.get("name"), str) and table["name"]:
        where = f"worker[{index}] ({table['name']})"
    c = _Checker(source, table, where, _WORKER_KEYS)
    name = c.string("name", required=True)
    target = c.string("target", required=True)
    if target.count(":") != 1 or not all(target.split(":")):
        c.fail("target", f"must be 'module:attribute', got {target!r}")
    overrides = []
    for key in WORKER_OVERRIDES:
        if key not in table:
            continue
        integer = key == "max_idled_cycle"
        # run_duration and max_idled_cycle accept -1 (no limit), as DataJointWorker does
        minimum = -1 if key in ("run_duration", "max_idled_cycle") else 0
        overrides.append((key, c.number(key, integer=integer, minimum=minimum)))
    return WorkerConfig(
        name=name,
        target=target,
        replicas=c.number("replicas", 1, integer=True),
        restart=c.string("restart", "always", choices=RESTART_POLICIES),
        max_memory_mb=c.number("max_memory_mb", exclusive=True),
        max_jobs=c.number("max_jobs", integer=True, minimum=1),
        job_timeout=c.number("job_timeout", exclusive=True),
        overrides=tuple(overrides),
    )


def _check_target(source: str, worker: WorkerConfig, key: str) -> None:
    """Import the target, check it is a DataJointWorker and that it accepts the overrides."""
    from .worker import DataJointWorker

    module_name, _, attribute = worker.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise ConfigError(source, f"{key}.target", f"cannot import {module_name!r}: {error.__class__.__name__}: {error}")
    if not hasattr(module, attribute):
        raise ConfigError(source, f"{key}.target", f"module {module_name!r} has no attribute {attribute!r}")
    value = getattr(module, attribute)
    if not isinstance(value, DataJointWorker):
        raise ConfigError(source, f"{key}.target", f"{worker.target!r} is a {_type_name(value)}, not a DataJointWorker")
    try:
        worker.build_worker()
    except (TypeError, ValueError) as error:
        raise ConfigError(source, key, f"invalid worker setting: {error}")


def parse_config(data: Mapping[str, Any], source: str, default_name: str, *, check_targets: bool = True) -> SupervisorConfig:
    """Validate parsed TOML `data` (from `source`, for messages) into a SupervisorConfig."""
    for key in data:
        if key not in ("supervisor", "database", "worker"):
            raise ConfigError(source, key, "unknown key (known: supervisor, database, worker)")
    settings = _parse_supervisor(source, data.get("supervisor", {}), default_name)
    database = _parse_database(source, data.get("database", {}))
    entries = data.get("worker", [])
    if not isinstance(entries, list):
        raise ConfigError(source, "worker", "must be an array of tables ([[worker]])")
    if not entries:
        raise ConfigError(source, "worker", "no [[worker]] defined")
    workers = [_parse_worker(source, entry, i) for i, entry in enumerate(entries)]
    seen: dict[str, int] = {}
    for i, worker in enumerate(workers):
        if worker.name in seen:
            raise ConfigError(source, f"worker[{i}].name", f"duplicate worker name {worker.name!r} (also worker[{seen[worker.name]}])")
        seen[worker.name] = i
    if check_targets:
        database.apply()  # pipeline modules connect when imported
        if str(Path.cwd()) not in sys.path and "" not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # targets in the working directory, as `python -m` finds them
        for i, worker in enumerate(workers):
            _check_target(source, worker, f"worker[{i}] ({worker.name})")
    return SupervisorConfig(workers=tuple(workers), source=source, database=database, **settings)


def load_config(path: str | Path, *, check_targets: bool = True) -> SupervisorConfig:
    """Read and validate the TOML file at `path`; imports every target (ConfigError on any problem)."""
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
    return parse_config(data, source, path.stem, check_targets=check_targets)


def config_from_modules(modules: list[str], **settings: Any) -> SupervisorConfig:
    """A configuration with one child per DataJointWorker found in the given modules, after importing them.

    A module's DataJointWorker instances are its attributes that are instances; one bound to several
    names is run once. `settings` are SupervisorConfig fields (graceful_timeout=..., say).
    """
    from .worker import DataJointWorker

    source = "modules " + ",".join(modules) if modules else "<no modules>"
    if not modules:
        raise ConfigError(source, "", "no modules given")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    workers: list[WorkerConfig] = []
    names: dict[str, str] = {}
    found: set[int] = set()  # a worker imported into several of the modules runs once
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except Exception as error:
            raise ConfigError(source, module_name, f"cannot import: {error.__class__.__name__}: {error}")
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
