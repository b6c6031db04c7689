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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from djsupervisor.supervisor.autoscale import AutoscaleSettings, HostBudget

#: Keys of a worker's own settings that a [[worker]] entry may override (DataJointWorker.configure).
WORKER_OVERRIDES = (
    "run_duration",
    "sleep_duration",
    "max_idled_cycle",
    "max_sleep_duration",
    "stale_timeout_hours",
    "recovery_scope",
)
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
    max_replicas: int | None = None  # set: the pool autoscales between `replicas` and this
    scale_up_pending: float = 2.0  # pending jobs per live child above which an autoscaled pool grows
    scale_down_after: float = 60.0  # seconds of zero pending before it shrinks by one
    scale_cooldown: float = 30.0  # seconds between two changes of its size
    scale_step: int = 1  # children added per growth

    @property
    def definition(self) -> tuple:
        """Everything but the pool size: when this changes on reload, the pool's children are rolled."""
        return (self.target, self.restart, self.max_memory_mb, self.max_jobs, self.job_timeout, self.overrides)

    @property
    def autoscale(self) -> AutoscaleSettings | None:
        """The pool's autoscaling settings (None: fixed size)."""
        if self.max_replicas is None:
            return None
        return AutoscaleSettings(
            self.max_replicas, self.scale_up_pending, self.scale_down_after, self.scale_cooldown, self.scale_step
        )

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
    host: str = ""  # the host name in the fleet registry ("" = the machine's host name)
    fleet_interval: float = 5.0  # seconds between fleet heartbeats and readings (queue depths, drain flags)
    max_cpu_percent: float | None = None  # host CPU use at or above which no pool grows
    min_available_memory_mb: float | None = None  # host available memory below which no pool grows
    log_level: str = "INFO"
    log_format: str = "text"
    http: str | None = None  # "host:port" of the metrics and status page endpoint; None: off
    database: DatabaseConfig = DatabaseConfig()

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
_AUTOSCALE_KEYS = ("max_replicas", "scale_up_pending", "scale_down_after", "scale_cooldown", "scale_step")
_WORKER_KEYS = (
    "name",
    "target",
    "replicas",
    "restart",
    "max_memory_mb",
    "max_jobs",
    "job_timeout",
    *_AUTOSCALE_KEYS,
    *WORKER_OVERRIDES,
)


def _parse_supervisor(source: str, table: Any, default_name: str) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(source, "supervisor", f"must be a table, got {_type_name(table)}")
    c = _Checker(source, table, "supervisor", _SUPERVISOR_KEYS)
    for key, longest in (("name", 64), ("host", 255)):
        value = table.get(key)
        if isinstance(value, str) and (value == "*" or len(value) > longest):
            c.fail(key, f"must be a name of at most {longest} characters other than '*', got {value!r}")
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
        host=c.string("host", ""),
        fleet_interval=float(c.number("fleet_interval", 5.0, exclusive=True)),
        max_cpu_percent=_cpu_percent(c),
        min_available_memory_mb=c.number("min_available_memory_mb"),
        log_level=c.string("log_level", "INFO", choices=LOG_LEVELS),
        log_format=c.string("log_format", "text", choices=LOG_FORMATS),
        http=_http_address(c),
    )


def split_host_port(text: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) as (host, port); ValueError saying what is wrong.

    Port 0 means any free port."""
    host, colon, port_text = text.rpartition(":")
    if not colon or not host:
        raise ValueError(f"must be 'host:port', got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(ch.isspace() or ch in "/[]" for ch in host) or (":" in host and not text.startswith("[")):
        raise ValueError(f"must be 'host:port' (an IPv6 host in brackets), got {text!r}")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"port must be a number, got {text!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port must be 0..65535, got {port} in {text!r}")
    return host, port


def _http_address(c: _Checker) -> str | None:
    text = c.string("http")
    if text is not None:
        try:
            split_host_port(text)
        except ValueError as error:
            c.fail("http", str(error))
    return text


def _cpu_percent(c: _Checker) -> float | None:
    value = c.number("max_cpu_percent", exclusive=True)
    if value is not None and value > 100:
        c.fail("max_cpu_percent", f"must be <= 100 (host-wide CPU use), got {value!r}")
    return value


def _autoscale_settings(c: _Checker, table: Mapping[str, Any], replicas: int) -> dict:
    """The autoscaling keys of one [[worker]] entry (only with max_replicas)."""
    max_replicas = c.number("max_replicas", integer=True, minimum=1)
    if max_replicas is None:
        for key in _AUTOSCALE_KEYS[1:]:
            if key in table:
                c.fail(key, "only applies to an autoscaled pool: set max_replicas too")
        return {}
    if max_replicas < replicas:
        c.fail("max_replicas", f"must be >= replicas ({replicas}), got {max_replicas!r}")
    return dict(
        max_replicas=max_replicas,
        scale_up_pending=c.number("scale_up_pending", 2.0),
        scale_down_after=c.number("scale_down_after", 60.0),
        scale_cooldown=c.number("scale_cooldown", 30.0),
        scale_step=c.number("scale_step", 1, integer=True, minimum=1),
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
        host=c.string("host"),
        port=port,
        user=c.string("user"),
        password=table.get("password"),
        backend=c.string("backend", choices=BACKENDS),
        use_tls=c.boolean("use_tls"),
    )


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
        if key == "recovery_scope":
            overrides.append((key, c.string(key, choices=("own", "db_prefix"))))
            continue
        integer = key == "max_idled_cycle"
        # run_duration and max_idled_cycle accept -1 (no limit), as DataJointWorker does
        minimum = -1 if key in ("run_duration", "max_idled_cycle") else 0
        overrides.append((key, c.number(key, integer=integer, minimum=minimum)))
    replicas = c.number("replicas", 1, integer=True)
    return WorkerConfig(
        name=name,
        target=target,
        replicas=replicas,
        restart=c.string("restart", "always", choices=RESTART_POLICIES),
        max_memory_mb=c.number("max_memory_mb", exclusive=True),
        max_jobs=c.number("max_jobs", integer=True, minimum=1),
        job_timeout=c.number("job_timeout", exclusive=True),
        overrides=tuple(overrides),
        **_autoscale_settings(c, table, replicas),
    )


def _check_target(source: str, worker: WorkerConfig, key: str) -> None:
    """Import the target, check it is a DataJointWorker and that it accepts the overrides."""
    from djsupervisor.worker.loop import DataJointWorker

    module_name, _, attribute = worker.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise ConfigError(
            source, f"{key}.target", f"cannot import {module_name!r}: {error.__class__.__name__}: {error}"
        )
    if not hasattr(module, attribute):
        raise ConfigError(source, f"{key}.target", f"module {module_name!r} has no attribute {attribute!r}")
    value = getattr(module, attribute)
    if not isinstance(value, DataJointWorker):
        raise ConfigError(source, f"{key}.target", f"{worker.target!r} is a {_type_name(value)}, not a DataJointWorker")
    try:
        worker.build_worker()
    except (TypeError, ValueError) as error:
        raise ConfigError(source, key, f"invalid worker setting: {error}")


def parse_config(
    data: Mapping[str, Any], source: str, default_name: str, *, check_targets: bool = True
) -> SupervisorConfig:
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
            raise ConfigError(
                source, f"worker[{i}].name", f"duplicate worker name {worker.name!r} (also worker[{seen[worker.name]}])"
            )
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
    from djsupervisor.worker.loop import DataJointWorker

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
