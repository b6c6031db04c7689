"""Every key of a supervisor config file, declared once: name, type, default, bounds and meaning.

Before, each default was written two or three times (the config dataclasses, the TOML checks, the
autoscaler, README.md) and they could drift apart. Now `supervisor.config` reads the TOML tables with
these declarations and takes its dataclasses' defaults from them, `supervisor.autoscale` takes its
defaults from them, and README.md's "Settings reference" table is generated from them
(``python -m djsupervisor.supervisor.settings --update README.md``; tests/test_settings.py fails when
the README's table differs from the generated one).

Tables of a config file and their declarations:

* ``[supervisor]``: `SUPERVISOR_SETTINGS`;
* ``[database]``: `DATABASE_SETTINGS` (unset ones leave DataJoint's own config alone);
* ``[[worker]]``: `POOL_SETTINGS` (the pool), then `WORKER_OVERRIDES`, the overridable settings of the
  worker itself (declared with DataJointWorker, in `djsupervisor.worker.settings`).

This module imports nothing heavy: the command line takes `LOG_LEVELS` and `LOG_FORMATS` from here for its
options, and every `djsupervisor` command should start fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from djsupervisor.worker.settings import WORKER_SETTINGS, Setting

LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")  # loguru's
LOG_FORMATS = ("text", "json")
RESTART_POLICIES = ("always", "on-failure", "never")
BACKENDS = ("mysql", "postgresql")
#: The most children one pool may have: `replicas`, `max_replicas` and `djsupervisor scale` above it are refused.
#: Each child is a Python process with its own database session (tens to hundreds of MB, one server connection);
#: 1024 is far more than one host runs, and stops a typo or `scale standard 1000000` from forking until the
#: process table, the memory or the server's connections run out. One number, not a multiple of the CPU count:
#: a config valid on one host is valid on every host.
REPLICAS_LIMIT = 1024

SUPERVISOR_SETTINGS = (
    Setting(
        "name",
        str,
        None,
        "process titles, logs, socket name, fleet registry",
        max_length=64,
        default_text="the file's stem",
    ),
    Setting("graceful_timeout", float, 30.0, "seconds from a stop request to SIGKILL of a child's process group"),
    Setting(
        "control_socket",
        str,
        None,
        "path of the control socket (no `..` in it)",
        default_text="`NAME.sock` in the runtime dir",
    ),
    Setting(
        "pythonpath",
        list,
        (),
        "directories to import targets from, appended after site-packages (relative: to the config file)",
        default_text="the config file's directory only",
    ),
    Setting("backoff_initial", float, 0.25, "seconds before the first restart after a crash"),
    Setting("backoff_max", float, 60.0, "cap of the doubling restart delay"),
    Setting("stable_after", float, 60.0, "up this long and the restart delay starts over"),
    Setting("fatal_after", int, 5, "consecutive exits before completing a cycle that make a slot FATAL", minimum=1),
    Setting("heartbeat_interval", float, 5.0, "how often a child reports while nothing else happens", exclusive=True),
    Setting(
        "heartbeat_timeout",
        float,
        30.0,
        "silence after which a child counts as hung (SIGSTOP, deadlock)",
        exclusive=True,
    ),
    Setting("hang_timeout", float, 600.0, "no progress outside a job for this long counts as hung", exclusive=True),
    Setting("sample_interval", float, 5.0, "seconds between CPU and memory samples of the children", exclusive=True),
    Setting(
        "host",
        str,
        "",
        "the host name in the fleet registry (or `start --host`)",
        max_length=255,
        default_text="the machine's host name",
    ),
    Setting(
        "fleet_interval",
        float,
        5.0,
        "seconds between fleet heartbeats, queue-depth and drain-flag readings",
        exclusive=True,
    ),
    Setting(
        "max_cpu_percent",
        float,
        None,
        "host CPU use at or above which no pool grows",
        exclusive=True,
        maximum=100,
        maximum_why="host-wide CPU use",
    ),
    Setting("min_available_memory_mb", float, None, "host available memory (MB) below which no pool grows"),
    Setting("log_level", str, "INFO", "the lowest level logged", choices=LOG_LEVELS),
    Setting("log_format", str, "text", "one line of text, or one JSON object, per record", choices=LOG_FORMATS),
    Setting("http", str, None, "metrics and status page address; port 0: any free port", form="host:port"),
    Setting(
        "http_allowed_hosts",
        list,
        (),
        "more names the `Host` header may give (DNS rebinding guard; ports not compared; `*`: any)",
        default_text="loopback names; for another bind also IP addresses and the machine's name",
    ),
    Setting(
        "http_token_file",
        str,
        None,
        "file holding the token every request must carry (bearer, or basic auth password); mode 600",
        default_text="no token",
    ),
    Setting(
        "http_allow_anonymous",
        bool,
        False,
        "serve a non-loopback `http` without a token: only on a network you trust",
    ),
    Setting(
        "notify_slack_webhook",
        str,
        None,
        "Slack-compatible webhook told of a FATAL slot, a job timeout, a memory recycle, a drain (never logged)",
        secret=True,
        form="url",
    ),
    Setting(
        "notify_json_webhook",
        str,
        None,
        "webhook that gets those events as JSON objects (never logged)",
        secret=True,
        form="url",
    ),
    Setting("notify_timeout", float, 5.0, "seconds a webhook's request may take", exclusive=True),
    Setting("notify_window", float, 60.0, "at most one message per webhook per this many seconds; the rest summed up"),
)

DATABASE_SETTINGS = (
    Setting("host", str, None, "database server host", default_text="DataJoint's (DJ_HOST)"),
    Setting("port", int, None, "database server port", minimum=1, maximum=65535, default_text="DataJoint's"),
    Setting("user", str, None, "database user", default_text="DataJoint's (DJ_USER)"),
    Setting("password", str, None, "database password (never logged)", secret=True, default_text="DataJoint's"),
    Setting("backend", str, None, "database backend", choices=BACKENDS, default_text="DataJoint's (DJ_BACKEND)"),
    Setting("use_tls", bool, None, "connect with TLS", default_text="DataJoint's"),
)

POOL_SETTINGS = (
    Setting("name", str, None, "the worker's name in logs, status and commands", required=True),
    Setting("target", str, None, "the DataJointWorker to run", required=True, form="module:attribute"),
    Setting(
        "replicas",
        int,
        1,
        "pool size (the minimum of an autoscaled pool)",
        maximum=REPLICAS_LIMIT,
        maximum_why="children per pool",
    ),
    Setting("restart", str, "always", "when an exited child is replaced", choices=RESTART_POLICIES),
    Setting("max_memory_mb", float, None, "RSS above which a child is recycled after its job", exclusive=True),
    Setting("max_jobs", int, None, "jobs after which a child is replaced", minimum=1),
    Setting("job_timeout", float, None, "seconds after which a child's job is killed", exclusive=True),
    Setting(
        "max_replicas",
        int,
        None,
        "set: the pool autoscales between replicas and this",
        minimum=1,
        maximum=REPLICAS_LIMIT,
        maximum_why="children per pool",
    ),
    Setting(
        "scale_up_pending",
        float,
        2.0,
        "pending jobs per live child above which an autoscaled pool grows",
        requires="max_replicas",
    ),
    Setting("scale_down_after", float, 60.0, "seconds of zero pending before it shrinks", requires="max_replicas"),
    Setting("scale_cooldown", float, 30.0, "seconds between two changes of its size", requires="max_replicas"),
    Setting("scale_step", int, 1, "children added per growth", minimum=1, requires="max_replicas"),
    Setting(
        "gpus",
        object,
        None,
        "the GPUs of a GPU pool: slot i's child sees GPU i mod len(gpus) (CUDA_VISIBLE_DEVICES)",
        form="gpus",
        default_text="no GPU pool",
    ),
    Setting(
        "per_gpu", int, 1, "children sharing one GPU; replicas defaults to len(gpus) × this", minimum=1, requires="gpus"
    ),
    Setting(
        "max_gpu_memory_mb",
        float,
        None,
        "GPU memory (NVML) above which a child is recycled after its job",
        exclusive=True,
    ),
)

#: The worker's own settings a ``[[worker]]`` entry may override (`DataJointWorker.configure`).
WORKER_OVERRIDES = tuple(setting for setting in WORKER_SETTINGS if setting.overridable)

#: README's table: each table of a config file with its declarations.
SECTIONS = (
    ("`[supervisor]`", SUPERVISOR_SETTINGS),
    ("`[database]`", DATABASE_SETTINGS),
    ("`[[worker]]`", POOL_SETTINGS),
    ("`[[worker]]` override", WORKER_OVERRIDES),
)
#: How README's table says what a `form` of a setting allows, where the form's name would not say it.
FORM_TEXTS = {"gpus": 'indices or UUIDs (`[0, 1]`), `"all"`, or a count'}
TABLE_START = "<!-- settings-table:start -->"
TABLE_END = "<!-- settings-table:end -->"


def names(settings: Iterable[Setting]) -> tuple[str, ...]:
    """The keys of `settings`, in declaration order."""
    return tuple(setting.name for setting in settings)


def defaults(settings: Iterable[Setting]) -> dict[str, Any]:
    """``{key: default}`` of `settings` (what the config dataclasses take as their fields' defaults)."""
    return {setting.name: setting.default for setting in settings}


def toml_value(value: Any) -> str:
    """`value` written as TOML (strings, numbers and booleans: what a config key takes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return f"{value:g}"  # 30.0 as 30: TOML reads it back as a number all the same
    return repr(value)


def _kind_text(setting: Setting) -> str:
    if setting.choices:
        return "string"
    kinds = {str: "string", float: "number", int: "integer", bool: "boolean", list: "list of strings"}
    return kinds.get(setting.kind, "list, integer or string")


def _allowed_text(setting: Setting) -> str:
    """The bounds in words, e.g. ``> 0 and <= 100``."""
    if setting.choices:
        return ", ".join(f"`{toml_value(choice)}`" for choice in setting.choices)
    if setting.form in FORM_TEXTS:
        return FORM_TEXTS[setting.form]
    if setting.form:
        return f"`{setting.form}`"
    if setting.secret:
        return "any string"
    if setting.max_length:
        return f"at most {setting.max_length} characters, not `*`"
    if setting.kind is bool:
        return "`true`, `false`"
    if setting.kind is list:
        return "non-empty strings"
    if setting.kind in (int, float):
        text = f"{'>' if setting.exclusive else '>='} {setting.minimum:g}"
        return f"{text} and <= {setting.maximum:g}" if setting.maximum is not None else text
    return "non-empty"


def _default_text(setting: Setting) -> str:
    if setting.default_text:
        return setting.default_text
    if setting.required:
        return "required"
    return "unset" if setting.default is None else f"`{toml_value(setting.default)}`"


def markdown_table() -> str:
    """README.md's settings table (Markdown), one row per key of a config file."""
    lines = ["| Key | Table | Type | Default | Allowed | Meaning |", "|---|---|---|---|---|---|"]
    for section, settings in SECTIONS:
        for setting in settings:
            meaning = setting.help + (f" (needs `{setting.requires}`)" if setting.requires else "")
            cells = [
                f"`{setting.name}`",
                section,
                _kind_text(setting),
                _default_text(setting),
                _allowed_text(setting),
                meaning,
            ]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def readme_with_table(text: str) -> str:
    """`text` (README.md) with the generated table between the `TABLE_START` and `TABLE_END` markers."""
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"no {TABLE_START} ... {TABLE_END} markers in the text")
    return text[: start + len(TABLE_START)] + "\n" + markdown_table() + text[end:]


def main(argv: list[str] | None = None) -> int:
    """``python -m djsupervisor.supervisor.settings --markdown`` prints the table; ``--update FILE`` writes
    it into FILE (README.md) between the markers."""
    parser = argparse.ArgumentParser(prog="python -m djsupervisor.supervisor.settings", description=main.__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--markdown", action="store_true", help="print the settings table")
    action.add_argument("--update", metavar="FILE", help="replace the table between the markers in FILE")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown_table())
    else:
        path = Path(args.update)
        path.write_text(readme_with_table(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
