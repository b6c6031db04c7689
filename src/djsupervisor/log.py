"""Logging: loguru to stderr, one line per record, every line naming supervisor, worker and slot.

DataJoint logs through the standard library (logger "datajoint"); it is routed into loguru. `fmt="json"`
writes one JSON object per line for log shippers. Under journald (stderr is the journal stream) each line
starts with its syslog priority, so `journalctl -p warning` works. No `enqueue=True`: it starts a thread,
and the parent forks. Passwords never reach the output: the database password, DJ_PASS and any value given
to `add_secret` are masked in whole lines, exceptions included.

Every text record is one line that nobody but this module can start: control characters (newlines, carriage
returns, ESC, the other C0 and C1 controls) in a message are written escaped (`\\n`, `\\x1b`), so a message
cannot forge a record, a journald priority prefix (`<0>` is an emergency broadcast) or a terminal sequence. A
traceback keeps one line per frame for readability, each continuation line escaped the same way and starting
with `  | ` (under journald: the record's own `<N>` first), which no record's first line does.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import traceback
import warnings
from types import FrameType

from loguru import logger

_NO_CONTEXT = (None, "", "-")
# syslog priorities by loguru level number (journald reads a "<N>" prefix)
_PRIORITIES = ((40, 3), (30, 4), (25, 5), (15, 6), (0, 7))  # ERROR+, WARNING, SUCCESS, INFO/JOBS, DEBUG
_secrets: set[str] = set()
# C0 controls, DEL, C1 controls, and the Unicode line and paragraph separators
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
TRACE_PREFIX = "  | "


def escape_controls(text: str) -> str:
    """`text` with every control character written as an escape (`\\n`, `\\x1b`): one inert line."""
    return _CONTROLS.sub(_escape_one, text)


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def add_secret(value: str | None) -> None:
    """Mask `value` wherever it would appear in a log line (values under 3 characters are not masked)."""
    if value and len(value) >= 3:
        _secrets.add(value)


def mask(text: str) -> str:
    """`text` with every known secret replaced by ***."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


#: DataJoint's warnings said so far in this process (`_said_before`): each is said once.
_warned: set[str] = set()


def _said_before(record: logging.LogRecord) -> bool:
    """Whether this warning of DataJoint's was said already; the attribute it names does not count, so that
    "Native type 'int' is used in attribute ..." is said once per type, not once per attribute."""
    if record.levelno < logging.WARNING or not record.name.startswith("datajoint"):
        return False
    if record.levelno == logging.ERROR and record.funcName == "_populate1":
        return True  # a failed job's bare message: the worker's own line names table and key (progress.py)
    key = re.sub(r"attribute '[^']*'", "attribute", " ".join(record.getMessage().split()))
    if key in _warned:
        return True
    _warned.add(key)
    return False


def _about_a_job_table(record: logging.LogRecord) -> bool:
    """DataJoint's native-type warning about its own job table (`compat.declaring_job_table`)."""
    if record.levelno != logging.WARNING or not record.getMessage().startswith("Native type"):
        return False
    from djsupervisor.worker.compat import declaring_job_table  # DataJoint is loaded: it is logging

    return declaring_job_table()


class InterceptHandler(logging.Handler):
    """Hands standard-library records (DataJoint's) to loguru, keeping level and origin; DataJoint's
    warnings once each, on one line, and those about its own job tables at DEBUG."""

    def emit(self, record: logging.LogRecord) -> None:
        if _about_a_job_table(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        elif _said_before(record):
            return
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame: FrameType | None = logging.currentframe()
        depth = 0  # find the caller outside the logging module
        while frame is not None and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame, depth = frame.f_back, depth + 1
        message = record.getMessage()
        if record.name.startswith("datajoint"):  # a driver's error inside it may span lines
            message = " ".join(message.split())
        logger.opt(depth=depth, exception=record.exc_info).log(level, message)


def _patch(record) -> None:
    extra = record["extra"]
    for name in ("supervisor", "worker"):
        if extra.get(name) in _NO_CONTEXT:
            extra[name] = "-"
    slot = extra.get("slot")
    extra["slot_label"] = "" if slot in _NO_CONTEXT else f"[{slot}]"
    record["message"] = mask(record["message"])


def _priority(level_no: int) -> int:
    return next(priority for floor, priority in _PRIORITIES if level_no >= floor)


def _stderr_is_journal() -> bool:
    """Whether stderr is connected to journald (systemd sets JOURNAL_STREAM to its device:inode)."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def journal_prefix(priority: int) -> str:
    """``<priority>`` when stderr is journald's stream (it reads the prefix as the line's syslog priority), else
    "": for lines written without the logger, such as the command line's one-line errors."""
    return f"<{priority}>" if _stderr_is_journal() else ""


def _write(text: str) -> None:
    sys.stderr.write(mask(text))
    sys.stderr.flush()  # nothing important may live only in a buffer when a process dies


def _text_sink(message, journal: bool = False) -> None:
    """One escaped line per record; a traceback's lines follow, each escaped and starting with TRACE_PREFIX."""
    record = message.record
    extra = record["extra"]
    time = record["time"]
    head = (
        f"{time:%Y-%m-%d %H:%M:%S}.{time.microsecond // 1000:03d} {record['level'].name: <7} "
        f"[{extra['supervisor']} {extra['worker']}{extra['slot_label']}] {record['message']}"
    )
    prefix = f"<{_priority(record['level'].no)}>" if journal else ""
    lines = [prefix + escape_controls(mask(head))]
    if record["exception"] is not None:
        trace = mask("".join(traceback.format_exception(*record["exception"]))).rstrip("\n")
        lines.extend(prefix + TRACE_PREFIX + escape_controls(line) for line in trace.split("\n"))
    _write("\n".join(lines) + "\n")


def _json_sink(message, journal: bool = False) -> None:
    record = message.record
    extra = {k: v for k, v in record["extra"].items() if k != "slot_label"}
    data = {
        "time": record["time"].isoformat(),
        "level": record["level"].name,
        "message": record["message"],
        "supervisor": None if extra.get("supervisor") in _NO_CONTEXT else extra.get("supervisor"),
        "worker": None if extra.get("worker") in _NO_CONTEXT else extra.get("worker"),
        "slot": None if extra.get("slot") in _NO_CONTEXT else extra.get("slot"),
        "pid": record["process"].id,
        "module": record["name"],
    }
    data.update({k: v for k, v in extra.items() if k not in data})
    if record["exception"] is not None:
        data["exception"] = "".join(traceback.format_exception(*record["exception"]))
    # masked before encoding too: JSON escapes a secret holding quotes or backslashes
    data = {k: mask(v) if isinstance(v, str) else v for k, v in data.items()}
    prefix = f"<{_priority(record['level'].no)}>" if journal else ""
    _write(prefix + json.dumps(data, default=str) + "\n")


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings as one log line each (warnings' own format spans two lines), each text once."""
    text = " ".join(str(message).split())
    if f"{category.__name__}: {text}" in _warned:
        return
    _warned.add(f"{category.__name__}: {text}")
    logger.opt(depth=2).warning("{}: {} ({}:{})", category.__name__, text, filename, lineno)


def _route_standard_logging(level: str) -> None:
    root_level = logging.getLevelName(level)  # a library's debug records are only made when asked for
    logging.basicConfig(
        handlers=[InterceptHandler()], level=root_level if isinstance(root_level, int) else logging.INFO, force=True
    )
    warnings.showwarning = _log_warning
    from djsupervisor.preflight import import_datajoint  # a refused DJ_* setting: one line, not pydantic's

    try:  # DataJoint replaces its logger's handlers when imported: import it first, then take them over
        import_datajoint()
    except ImportError:
        pass
    if logging.getLevelName(15) == "JOBS":  # DataJoint's populate status level
        try:
            logger.level("JOBS")
        except ValueError:
            logger.level("JOBS", no=15)
    datajoint_logger = logging.getLogger("datajoint")
    datajoint_logger.handlers = [InterceptHandler()]
    datajoint_logger.propagate = False


def mask_value(value):
    """`value` (text, or JSON-ready dicts and lists of text) with every known secret masked, the database
    password DataJoint ends up with included: for rows written to the worker tables."""
    known_secrets()
    return _mask_deep(value)


def _mask_deep(value):
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {_mask_deep(k): _mask_deep(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask_deep(v) for v in value]
    return value


def known_secrets() -> None:
    """Add the password DataJoint holds (`dj.config["database.password"]`, which a pipeline module may set
    when imported) and DJ_PASS to the masked values."""
    add_secret(os.environ.get("DJ_PASS"))
    datajoint = sys.modules.get("datajoint")
    if datajoint is not None:
        try:
            password = datajoint.config["database.password"]
            add_secret(password.get_secret_value() if hasattr(password, "get_secret_value") else password)
        except Exception:  # a config without the key, or an unexpected config object
            pass


#: The level and format `setup_logging` set last (a child started from a fresh interpreter takes them).
CURRENT: dict[str, str] = {"level": "INFO", "fmt": "text"}


def setup_logging(level: str = "INFO", fmt: str = "text", **context) -> None:
    """Configure loguru for this process: stderr, `level`, "text" or "json", default context
    (supervisor, worker, slot: unbound lines show "-"); route DataJoint's logging and Python warnings
    into it."""
    level = level.upper()
    CURRENT.update(level=level, fmt=fmt)
    add_secret(os.environ.get("DJ_PASS"))
    logger.remove()
    logger.configure(extra={"supervisor": "-", "worker": "-", **context}, patcher=_patch)
    journal = _stderr_is_journal()
    if fmt == "json":
        logger.add(
            functools.partial(_json_sink, journal=journal),
            level=level,
            format="{message}",
            backtrace=False,
            diagnose=False,
        )
    else:  # tracebacks are formatted by the sink without local variables (they may hold credentials)
        logger.add(functools.partial(_text_sink, journal=journal), level=level, format="{message}")
    _route_standard_logging(level)  # after the sink exists: DataJoint's import-time output lands in it
    known_secrets()


def bind_context(**context) -> None:
    """Change the default context (a child names its worker and slot after fork)."""
    logger.configure(extra={"supervisor": "-", "worker": "-", **context}, patcher=_patch)
