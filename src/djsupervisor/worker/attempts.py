"""Attempts at a job: how often it failed for a reason outside its ``make()``, counted for every host.

Without a count a job that kills its worker process (an OOM kill, a segfault in a C extension) goes back to
pending and is taken again at once, for ever, and so does a job that keeps hitting a transient error or
keeps running past `job_timeout`. DataJoint 2.x's job table has no column for it, so the count lives in
the worker schema's JobAttempt table, keyed by the target table and the key's hash: every host that shares
the worker schema shares the counts, and they survive restarts.

Counting is idempotent per failure. Several processes may see the same failure (the child that replaces a
dead one, and its siblings' recovery; two hosts clearing the same error): each failure has an `incident`
(the reservation's holder and time, or the error's time), and the row counts one more attempt only when the
incident differs from the last one counted. Every job update that follows is guarded by the job's state, so
of several processes settling one failure, one changes the job and the others change nothing.

After `max_attempts` the job is set to ``error`` with a message that starts with `GAVE_UP` (recovery never
clears such an error, whatever its text matches) and its row here is deleted: an operator who re-pends the
job gives it `max_attempts` new tries. Before that, a re-pended job waits ``retry_delay * 2**(attempts-1)``
seconds (capped at `RETRY_DELAY_CAP`) through DataJoint's `scheduled_time`, so one bad key does not take a
slot over. Rows of jobs that failed and then succeeded are pruned with the worker logs (`retention`).
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import datajoint as dj

from djsupervisor.worker import compat, identifiers

#: Error messages of jobs given up on start with this; recovery never clears them.
GAVE_UP = "gave up after "
#: Seconds a re-pended job waits at most, however many attempts it has had.
RETRY_DELAY_CAP = 3600.0
_BATCH = 200  # failures counted per statement

KINDS = ("died", "timeout", "stale", "transient", "stopped")


def _plain(value: Any) -> Any:
    """A key value as the same JSON whichever driver read it (the hash must agree across backends and hosts)."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return value.hex
    return str(value)


def plain_key(key: dict) -> dict:
    """`key` with JSON-safe values, as stored and hashed."""
    return {name: _plain(value) for name, value in key.items()}


def key_hash(key: dict) -> str:
    """md5 (hex) of a job's key: its attribute names and values, order-independent."""
    return hashlib.md5(json.dumps(plain_key(key), sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Failure:
    """One sighting of a failed attempt at the job `key`.

    `incident` tells this failure from the next one (``host:pid:connection:reserved_time`` of the dead
    holder, ``error:completed_time`` of an error); `kind` is one of `KINDS`; `reason` says what happened in
    one line. `detailed`: the reason comes from whoever saw the failure happen (the supervisor: "killed by
    SIGKILL, RSS 3.1 GiB") and replaces the generic one another process may have counted the incident with.
    """

    key: dict
    incident: str
    kind: str
    reason: str
    detailed: bool = False


def give_up_message(kind: str, attempts: int, reason: str) -> str:
    """The error message of a job given up after `attempts` failures, the last of `kind` for `reason`."""
    times = "once" if attempts == 1 else f"{attempts} times"
    if kind == "timeout":
        what = f"timed out {times} {reason}"
    elif kind == "transient":
        what = f"a transient error {times} (last: {reason})"
    elif kind == "stale":
        what = f"its reservation went stale {times} (last: {reason})"
    else:
        what = f"the worker process died {times} running this job (last: {reason})"
    return f"{GAVE_UP}{attempts} attempt{'s' * (attempts != 1)}: {what}"[:2047]


def retry_delay(attempts: int, initial: float) -> float:
    """Seconds before a job that failed `attempts` times may be taken again: doubling from `initial`."""
    if attempts <= 0 or initial <= 0:
        return 0.0
    return float(min(RETRY_DELAY_CAP, initial * 2.0 ** min(attempts - 1, 32)))


class AttemptBook:
    """The JobAttempt table of one worker schema, and the rules: `max_attempts` and `retry_delay`.

    `table_name` is called for JobAttempt's quoted full name when first needed (declaring the worker schema
    if it must)."""

    def __init__(
        self,
        connection: dj.Connection,
        table_name: Callable[[], str],
        *,
        max_attempts: int = 3,
        retry_delay: float = 10.0,
    ) -> None:
        self.connection = connection
        self._table_name = table_name
        self._table: str | None = None
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay

    @property
    def table(self) -> str:
        if self._table is None:
            self._table = self._table_name()
        return self._table

    def _q(self, name: str) -> str:
        return identifiers.quote(compat.backend(self.connection), name)

    def delay(self, attempts: int) -> float:
        """Seconds a job re-pended after `attempts` failures waits."""
        return retry_delay(attempts, self.retry_delay)

    def count(self, target: str, failures: Sequence[Failure]) -> list[int]:
        """Count `failures` of jobs of `target` (a quoted full table name); returns each job's attempts so far."""
        counted: dict[str, int] = {}
        for start in range(0, len(failures), _BATCH):
            batch = list({key_hash(f.key): f for f in failures[start : start + _BATCH]}.items())
            detailed = [(h, f) for h, f in batch if f.detailed]
            for group, is_detailed in ((detailed, True), ([b for b in batch if not b[1].detailed], False)):
                if group:
                    self._upsert(target, group, is_detailed)
            hashes = [h for h, _ in batch]
            rows = self.connection.query(
                f"SELECT {self._q('key_hash')}, {self._q('attempts')} FROM {self.table} "
                f"WHERE {self._q('table_name')}=%s AND {self._q('key_hash')} IN ({', '.join(['%s'] * len(hashes))})",
                args=(target, *hashes),
            ).fetchall()
            counted.update({h: int(n) for h, n in rows})
        return [counted.get(key_hash(f.key), 1) for f in failures]

    def _upsert(self, target: str, group: list[tuple[str, Failure]], detailed: bool) -> None:
        q = self._q
        columns = ("table_name", "key_hash", "job_key", "attempts", "incident", "kind", "reason", "last_time")
        row = "(%s, %s, %s, 1, %s, %s, %s, CURRENT_TIMESTAMP(3))"
        args: list[Any] = []
        for digest, failure in group:
            args += [target, digest, json.dumps(plain_key(failure.key), sort_keys=True)]
            args += [failure.incident[:255], failure.kind, failure.reason[:2047]]
        insert = f"INSERT INTO {self.table} ({', '.join(map(q, columns))}) VALUES {', '.join([row] * len(group))}"
        keep = "FALSE" if detailed else "TRUE"  # a generic sighting keeps the reason a detailed one gave
        if compat.backend(self.connection) == "postgresql":
            same = f"a.{q('incident')} = EXCLUDED.{q('incident')}"
            sql = (
                f"{insert.replace(f'INSERT INTO {self.table}', f'INSERT INTO {self.table} AS a', 1)} "
                f"ON CONFLICT ({q('table_name')}, {q('key_hash')}) DO UPDATE SET "
                f"{q('attempts')} = CASE WHEN {same} THEN a.{q('attempts')} ELSE a.{q('attempts')} + 1 END, "
                f"{q('kind')} = CASE WHEN {same} AND {keep} THEN a.{q('kind')} ELSE EXCLUDED.{q('kind')} END, "
                f"{q('reason')} = CASE WHEN {same} AND {keep} THEN a.{q('reason')} ELSE EXCLUDED.{q('reason')} END, "
                f"{q('incident')} = EXCLUDED.{q('incident')}, {q('last_time')} = CURRENT_TIMESTAMP(3)"
            )
        else:
            # MySQL applies the assignments left to right, each seeing the ones before: incident goes last
            same = f"{q('incident')} = VALUES({q('incident')})"
            sql = (
                f"{insert} ON DUPLICATE KEY UPDATE "
                f"{q('attempts')} = IF({same}, {q('attempts')}, {q('attempts')} + 1), "
                f"{q('kind')} = IF({same} AND {keep}, {q('kind')}, VALUES({q('kind')})), "
                f"{q('reason')} = IF({same} AND {keep}, {q('reason')}, VALUES({q('reason')})), "
                f"{q('last_time')} = CURRENT_TIMESTAMP(3), {q('incident')} = VALUES({q('incident')})"
            )
        self.connection.query(sql, args=tuple(args))

    def last(self, target: str, key: dict) -> tuple[int, str, str, str] | None:
        """(attempts, incident, kind, reason) counted for the job `key` of `target`, None if none."""
        q = self._q
        row = self.connection.query(
            f"SELECT {q('attempts')}, {q('incident')}, {q('kind')}, {q('reason')} FROM {self.table} "
            f"WHERE {q('table_name')}=%s AND {q('key_hash')}=%s",
            args=(target, key_hash(key)),
        ).fetchone()
        return None if row is None else (int(row[0]), row[1], row[2], row[3])

    def forget(self, target: str, keys: Sequence[dict]) -> None:
        """Delete the counts of jobs given up on (an operator's retry starts them afresh)."""
        q = self._q
        for start in range(0, len(keys), _BATCH):
            hashes = [key_hash(k) for k in keys[start : start + _BATCH]]
            self.connection.query(
                f"DELETE FROM {self.table} WHERE {q('table_name')}=%s "
                f"AND {q('key_hash')} IN ({', '.join(['%s'] * len(hashes))})",
                args=(target, *hashes),
            )


def attempt_book(worker: Any) -> AttemptBook:
    """The attempt counts of `worker` (a `DataJointWorker`): its schema's JobAttempt table, its rules."""
    return AttemptBook(
        worker.connection,
        lambda: worker.schema.tables["JobAttempt"].full_table_name,
        max_attempts=worker.max_attempts,
        retry_delay=worker.retry_delay,
    )
