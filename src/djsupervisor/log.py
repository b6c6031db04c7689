"""Logging: loguru to stderr, one line per record, every line naming supervisor, worker and slot.

DataJoint logs through the standard library (logger "datajoint"); it is routed into loguru. `fmt="json"`
writes one JSON object per line for log shippers. No `enqueue=True`: it starts a thread, and the parent
forks. Passwords never reach the output: the database password (and DJ_PASS) are masked.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from loguru import logger

TEXT_FORMAT = (
    "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} [{extra[supervisor]} {extra[worker]}{extra[slot_label]}] {message}"
)
_secrets: set[str] = set()


def add_secret(value: str | None) -> None:
    """Mask `value` wherever it would appear in a log line."""
    if value and len(value) >= 3:
        _secrets.add(value)


def mask(text: str) -> str:
    """`text` with every known secret replaced by ***."""
    for secret in _secrets:
        text = text.replace(secret, "***")
    return text


class InterceptHandler(logging.Handler):
    """Hands standard-library records (DataJoint's) to loguru, keeping level and origin."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def _patch(record) -> None:
    extra = record["extra"]
    extra.setdefault("supervisor", "-")
    extra.setdefault("worker", "-")
    slot = extra.get("slot")
    extra["slot_label"] = f"[{slot}]" if slot is not None else ""
    record["message"] = mask(record["message"])


def _json_sink(message) -> None:
    record = message.record
    data = {
        "time": record["time"].isoformat(),
        "level": record["level"].name,
        "message": record["message"],
        "supervisor": record["extra"].get("supervisor"),
        "worker": record["extra"].get("worker"),
        "slot": record["extra"].get("slot"),
        "pid": record["process"].id,
        "module": record["name"],
    }
    if record["exception"] is not None:
        data["exception"] = mask("".join(__import__("traceback").format_exception(*record["exception"])))
    sys.stderr.write(json.dumps(data, default=str) + "\n")
    sys.stderr.flush()


def setup_logging(level: str = "INFO", fmt: str = "text", **context) -> None:
    """Configure loguru for this process: stderr, `level`, text or JSON, default context (supervisor,
    worker, slot); route DataJoint's logging into it."""
    add_secret(os.environ.get("DJ_PASS"))
    logger.remove()
    logger.configure(extra={"supervisor": "-", "worker": "-", **context}, patcher=_patch)
    if fmt == "json":
        logger.add(_json_sink, level=level.upper(), format="{message}", backtrace=False, diagnose=False)
    else:
        colorize = sys.stderr.isatty() and not os.environ.get("JOURNAL_STREAM")
        logger.add(sys.stderr, level=level.upper(), format=TEXT_FORMAT, colorize=colorize, backtrace=False,
                   diagnose=False)  # fmt: skip
    datajoint_logger = logging.getLogger("datajoint")
    datajoint_logger.handlers = [InterceptHandler()]
    datajoint_logger.propagate = False
    logging.basicConfig(handlers=[InterceptHandler()], level=0, force=True)


def bind_context(**context) -> None:
    """Change the default context (a child names its worker and slot after fork)."""
    logger.configure(extra={"supervisor": "-", "worker": "-", **context}, patcher=_patch)
