"""A worker's notifications: the jobs and steps its `notify_on` names, told to its notifiers.

datajoint-utilities did this with a log handler (``PopulateHandler``) that parsed DataJoint's DEBUG lines
("Making ...", "Success making ...", "Error making ... - message") for the tables a step named in
``notify_on``, after lowering DataJoint's logger to DEBUG for everyone. Here the worker's own events say
the same thing exactly (no log parsing, no log level changed), and a callable step can be watched too.

What a notifier receives is what upstream's handler passed, so a notifier written for datajoint-utilities
works unchanged: ``notify(title, message, schema_name=..., table_name=..., key=..., status=...,
error_message=..., **key)``, with the title ``DataJoint populate - schema.Table - ERROR`` and the message
``Error making {key} -> `schema`.`table` - ValueError: ...``. Added: ``worker_name`` and ``host``.

This listener runs in the worker's thread on every event, so it only builds the notification and queues
it (`djsupervisor.notify.Dispatcher`): the sending, the rate limit and the failures happen elsewhere.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Callable, Iterable
from typing import Any

from djsupervisor.notify.dispatch import Dispatcher, Notification
from djsupervisor.worker.events import WorkerEvent

#: Keyword names a notifier gets from us; a key attribute of the same name does not replace them.
_RESERVED = ("title", "message", "schema_name", "table_name", "key", "status", "error_message", "worker_name", "host")
_VERBS = {"START": "Making", "SUCCESS": "Success making", "ERROR": "Error making"}
_CALL_VERBS = {"START": "Calling", "SUCCESS": "Success calling", "ERROR": "Error calling"}


def to_camel_case(name: str) -> str:
    """``square`` -> ``Square``, ``cube__digit`` -> ``CubeDigit``: DataJoint's `to_camel_case`, as upstream
    names a table in its titles (leading tier marks ``_ # ~`` dropped)."""
    return re.sub(r"(^|[_\W])+[a-zA-Z]", lambda match: match.group(0)[-1].upper(), name)


def split_table_name(full_table_name: str) -> tuple[str, str]:
    """(schema, ClassName) of a full table name, quoted for MySQL (`` `s`.`t` ``) or PostgreSQL (``"s"."t"``)."""
    schema, _, table = full_table_name.rpartition(".")
    return schema.strip('`"'), to_camel_case(table.strip('`"'))


def step_notification(
    step: str, *, status: str, key: dict | None, error: str | None, is_table: bool, worker: str
) -> Notification:
    """The notification of one job of table `step` (or one call of callable `step`) with `status`."""
    key = dict(key or {})
    if is_table:
        schema, table = split_table_name(step)
        message = f"{_VERBS[status]} {key} -> {step}"
        title = f"DataJoint populate - {schema}.{table} - {status}"
    else:
        schema, table = "", step
        message = f"{_CALL_VERBS[status]} {step}"
        title = f"DataJoint worker {worker} - {step} - {status}"
    if error:
        message += f" - {error}"
    kwargs: dict[str, Any] = {k: v for k, v in key.items() if k not in _RESERVED}
    kwargs.update(
        schema_name=schema,
        table_name=table,
        key=key,
        status=status,
        error_message=error or "",
        worker_name=worker,
        host=platform.node(),
    )
    subject = f"{schema}.{table}" if schema else table
    return Notification(title=title, message=message, kwargs=kwargs, subject=subject, status=status)


def _status(event: WorkerEvent) -> str | None:
    """The upstream status an event is, or None (a failed callable's ``callable_end``: its ``step_failed``
    said it already)."""
    if event.kind in ("job_start", "callable_start"):
        return "START"
    if event.kind == "job_end":
        return "SUCCESS" if event.ok else "ERROR"
    if event.kind == "callable_end":
        return "SUCCESS" if event.ok else None
    if event.kind == "step_failed":
        return "ERROR"
    return None


class StepNotifications:
    """A worker listener (`DataJointWorker.add_listener`) that queues a notification for every event whose
    step's ``notify_on`` names its status, to `notifiers`.

    `steps` returns the worker's steps (objects with ``name``, ``notify_on`` and, for tables, ``table``);
    it is read again at each cycle's start, so a step registered between two runs is watched too.
    """

    def __init__(self, worker_name: str, notifiers: Iterable[Any], steps: Callable[[], Iterable[Any]]) -> None:
        self.worker_name = worker_name
        self.dispatcher = Dispatcher(notifiers, name=worker_name)
        self._steps = steps
        self._watched: dict[str, tuple[tuple[str, ...], bool]] = {}
        self._read_steps()

    def _read_steps(self) -> None:
        self._watched = {
            step.name: (tuple(step.notify_on), hasattr(step, "table")) for step in self._steps() if step.notify_on
        }

    def __call__(self, event: WorkerEvent) -> None:
        if event.kind == "cycle_start":
            self._read_steps()
            return
        status = _status(event)
        watched = self._watched.get(event.table or "")
        if status is None or watched is None or status.lower() not in watched[0]:
            return
        self.dispatcher.submit(
            step_notification(
                event.table or "",
                status=status,
                key=event.key,
                error=event.message,
                is_table=watched[1],
                worker=self.worker_name,
            )
        )

    def close(self) -> None:
        """Send what is pending (at most the notifiers' timeouts) and stop the sending thread."""
        self.dispatcher.close()
