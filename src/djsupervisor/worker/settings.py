"""Settings declared once: the `Setting` type, and the settings of a `DataJointWorker`.

A setting's name, type, default, bounds and one-line meaning are written here and nowhere else; the
supervisor's configuration (`djsupervisor.supervisor.config`) validates TOML keys with them, builds its
dataclasses' defaults from them and renders README.md's settings table out of them (see
`djsupervisor.supervisor.settings`, which declares the supervisor's own settings).

Why in the worker package: `DataJointWorker.SETTINGS` comes from `WORKER_SETTINGS`, and the worker package
must stay importable without the supervisor (a user's own process runs the loop alone). So the declaration
type lives here, with no import of anything else in djsupervisor, and the supervisor imports it.

`Setting.check` writes problems the way the configuration reports them (``must be >= 0, got -1``); the
configuration prefixes the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import urllib.parse
from typing import Any


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: its name, type, default and bounds, and what it means in one line.

    Parameters
    ----------
    name : str
        The key (TOML) and the keyword (Python).
    kind : type
        ``str``, ``float`` (any finite number), ``int``, ``bool``, ``list`` (of non-empty strings, read as a
        tuple), or ``object`` (any TOML value, whose `form` checks it: ``gpus``).
    default : Any
        The value when the key is absent; None: unset.
    help : str
        What it does, one line (README's table shows it).
    minimum : float
        Numbers: the smallest allowed value (the bound itself is excluded when `exclusive`).
    exclusive : bool
        Numbers: the value must be above `minimum`, not equal to it.
    maximum : float, optional
        Numbers: the largest allowed value; `maximum_why` is added to the problem when it is exceeded.
    maximum_why : str
        Why the maximum (``"host-wide CPU use"``), shown in the error.
    choices : tuple of str
        Strings: the allowed values (empty: any non-empty string).
    required : bool
        The key must be given.
    secret : bool
        Any string, even empty, and the value never shows in an error.
    max_length : int, optional
        Strings that name something: at most this many characters, and never ``*`` (the fleet's wildcard).
    form : str
        Strings: a further format the configuration checks (``"host:port"``, ``"module:attribute"``).
    requires : str
        Another key of the same table without which this one means nothing (``max_replicas``).
    overridable : bool
        Worker settings: whether a ``[[worker]]`` entry may override it (False: Python only).
    default_text : str
        How README's table shows the default when the value alone would not say it (``"the file's stem"``).
    """

    name: str
    kind: type
    default: Any
    help: str
    minimum: float = 0
    exclusive: bool = False
    maximum: float | None = None
    maximum_why: str = ""
    choices: tuple[str, ...] = ()
    required: bool = False
    secret: bool = False
    max_length: int | None = None
    form: str = ""
    requires: str = ""
    overridable: bool = True
    default_text: str = ""

    def check(self, value: Any) -> Any:
        """`value` if this setting allows it; ValueError whose text is the problem otherwise."""
        if self.secret:
            if not isinstance(value, str):
                raise ValueError(f"must be a string, got {type_name(value)}")  # the value never shows
            return value
        if self.kind is str:
            return self._check_string(value)
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, got {type_name(value)} {value!r}")
            return value
        if self.kind in (int, float):
            return self._check_number(value)
        if self.kind is list:
            if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
                raise ValueError(f"must be a list of non-empty strings, got {type_name(value)} {value!r}")
            return tuple(value)
        if self.kind is object and self.form:
            return value
        raise TypeError(f"{self.name}: a {self.kind.__name__} setting cannot be read from a config file")

    def _check_string(self, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"must be a non-empty string, got {type_name(value)} {value!r}")
        if self.choices and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(map(repr, self.choices))}, got {value!r}")
        if self.max_length is not None and (value == "*" or len(value) > self.max_length):
            raise ValueError(f"must be a name of at most {self.max_length} characters other than '*', got {value!r}")
        return value

    def _check_number(self, value: Any) -> int | float:
        integer = self.kind is int
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"must be {'an integer' if integer else 'a number'}, got {type_name(value)} {value!r}")
        if value < self.minimum or (self.exclusive and value == self.minimum):
            raise ValueError(f"must be {'>' if self.exclusive else '>='} {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            why = f" ({self.maximum_why})" if self.maximum_why else ""
            raise ValueError(f"must be <= {self.maximum}{why}, got {value!r}")
        return value


def check_url(value: Any, what: str = "must be") -> str:
    """`value` if it is an http:// or https:// URL with a host; ValueError otherwise, whose text never holds
    the URL (a Slack webhook's path is its secret token). `what` starts the problem (``webhook url must be``)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} a string, got {type_name(value)}")
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} an http:// or https:// URL with a host")
    return value


def type_name(value: Any) -> str:
    """The name of `value`'s type, as problems show it (``got str 'two'``)."""
    return type(value).__name__


#: Which job tables recovery and error clearing touch (see `djsupervisor.worker.recovery`).
RECOVERY_SCOPES = ("own", "db_prefix")

#: The settings of a DataJointWorker: keywords of its constructor and of `DataJointWorker.configure`, in
#: this order; the overridable ones are also keys of a ``[[worker]]`` entry. The defaults are the
#: constructor's (tests/test_settings.py checks they agree).
WORKER_SETTINGS = (
    Setting("run_duration", float, -1, "seconds after which no new cycle starts; -1: no limit", minimum=-1),
    Setting("sleep_duration", float, 60, "seconds to sleep between cycles"),
    Setting(
        "max_idled_cycle", int, -1, "stop after more than this many consecutive idle cycles; -1: never", minimum=-1
    ),
    Setting("stale_timeout_hours", float, 24, "age after which a reservation whose connection is gone is re-pended"),
    Setting(
        "autoclear_error_patterns",
        list,
        (),
        "SQL LIKE patterns of error messages to re-pend, besides the built-in transient ones",
    ),
    Setting("db_prefix", list, None, "the prefixes of the lab's schemas"),
    Setting("max_sleep_duration", float, None, "adaptive sleep: the wait doubles per idle cycle up to this"),
    Setting(
        "recovery_scope",
        str,
        "own",
        "job tables recovery touches: the worker's own, or every one under db_prefix",
        choices=RECOVERY_SCOPES,
    ),
    Setting(
        "refresh_interval",
        float,
        None,
        "seconds between refreshes of a table's job queue across the fleet; 0: every cycle",
        default_text="sleep_duration",
    ),
    Setting(
        "max_attempts",
        int,
        3,
        "a job whose process died, that timed out or hit a transient error this often becomes an error",
        minimum=1,
    ),
    Setting(
        "retry_delay",
        float,
        10,
        "seconds a failed job waits before its next attempt, doubling per attempt (at most an hour)",
    ),
    Setting(
        "log_retention_days",
        float,
        30,
        "WorkerLog, ErrorLog and gone processes' RegisteredWorker rows older than this are pruned",
        exclusive=True,
    ),
)
WORKER_SETTING_NAMES = tuple(setting.name for setting in WORKER_SETTINGS)
