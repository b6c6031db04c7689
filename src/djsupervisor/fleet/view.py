"""What the parent knows of the database: queue depths of its pools' tables and the drain flags set for it.

The parent does no database work. A long-lived *fleet agent* child (see `djsupervisor.fleet.agent`) holds one
connection, writes the children's heartbeats into RegisteredWorker, and reads back, every `fleet_interval` seconds,
the job-queue depth of every table the pools populate and the drain/halt flags that match this supervisor.
It reports them on its pipe; the parent keeps the latest reading here. The metrics endpoint and the
autoscaler read this view and nothing else.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from djsupervisor.protocol import AgentReport

#: Job states counted per table (DataJoint 2.x job-table statuses).
QUEUE_STATES = ("pending", "reserved", "success", "error", "ignore")


@dataclasses.dataclass
class TableDepth:
    """How many rows of one table's job queue are in each state."""

    pending: int = 0
    reserved: int = 0
    success: int = 0
    error: int = 0
    ignore: int = 0

    @classmethod
    def from_counts(cls, counts: Mapping[str, Any]) -> TableDepth:
        """From a ``{state: count}`` mapping (states not listed count 0, unknown states are ignored)."""
        return cls(**{state: int(counts.get(state, 0) or 0) for state in QUEUE_STATES})

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FleetView:
    """The parent's latest reading from the fleet agent.

    `tables` maps each pool (worker definition name) to the full names of the tables it populates;
    `depths` maps a table full name to its queue depth; `drained` maps a pool name to ``"drain"`` or
    ``"halt"`` while a matching flag is set in the database; `updated` is the monotonic time of the
    last reading (None before the first one).
    """

    tables: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    depths: dict[str, TableDepth] = dataclasses.field(default_factory=dict)
    drained: dict[str, str] = dataclasses.field(default_factory=dict)
    updated: float | None = None
    progress: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # `progress --json` rows
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # `errors --json` groups
    throughput: dict[str, list[list[int]]] = dataclasses.field(default_factory=dict)  # pool -> [[minute, done]]
    progress_updated: float | None = None  # monotonic time of the last progress reading (rarer than depths)

    def pending(self, pool: str) -> int | None:
        """Pending jobs over every table pool `pool` populates; None if they have not been read yet, or if
        the latest reading missed one of them (the agent could not read it: unknown, not zero)."""
        if self.updated is None or pool not in self.tables:
            return None
        if any(t not in self.depths for t in self.tables[pool]):
            return None
        return sum(self.depths[t].pending for t in self.tables[pool])

    def age(self, now: float | None = None) -> float | None:
        """Seconds since the last reading (None before the first)."""
        if self.updated is None:
            return None
        return (time.monotonic() if now is None else now) - self.updated

    def apply(self, report: AgentReport | Mapping[str, Any], now: float | None = None) -> None:
        """Take in one agent report: ``{"tables": {...}, "depths": {table: {state: n}}, "drained": {...}}``."""
        if "tables" in report:
            self.tables = {pool: list(tables) for pool, tables in report["tables"].items()}
        if "depths" in report:
            self.depths = {table: TableDepth.from_counts(c) for table, c in report["depths"].items()}
        if "drained" in report:
            self.drained = dict(report["drained"])
        self.updated = time.monotonic() if now is None else now
        if "throughput" in report:
            self.throughput = {pool: [list(b) for b in buckets] for pool, buckets in report["throughput"].items()}
        if "progress" in report:
            self.progress = [dict(row) for row in report["progress"]]
            self.errors = [dict(group) for group in report.get("errors", [])]
            self.progress_updated = self.updated

    def pool_queues(self, pools: list[str], now: float | None = None) -> list[dict[str, Any]]:
        """One entry per pool: how many tables it populates and their remaining and error counts summed, as
        the last progress reading gave them (None before the first); `age` in seconds."""
        if self.progress_updated is None:
            return []
        age = round((time.monotonic() if now is None else now) - self.progress_updated, 1)
        out = []
        for pool in pools:
            rows = [row for row in self.progress if pool in row.get("workers", ())]
            remaining = sum(int(row.get("remaining") or 0) for row in rows)
            error = sum(int(row.get("error") or 0) for row in rows)
            out.append({"worker": pool, "tables": len(rows), "remaining": remaining, "error": error, "age": age})
        return out

    def status_fields(self, pools: list[str]) -> dict[str, Any]:
        """The supervisor's status fields this view gives: drain flags, the reading's age, per-pool queues."""
        age = self.age()
        return {
            "drained": dict(self.drained),
            "fleet_age": None if age is None else round(age, 3),
            "pool_progress": self.pool_queues(pools),
        }

    def progress_report(self, now: float | None = None) -> dict[str, Any]:
        """``/progress.json``: the tables' progress rows, the jobs done per minute per pool, and the age (s)."""
        age = (
            None
            if self.progress_updated is None
            else (time.monotonic() if now is None else now) - self.progress_updated
        )
        return {
            "age": None if age is None else round(age, 1),
            "tables": self.progress,
            "throughput": self.throughput,
        }

    def errors_report(self, now: float | None = None) -> dict[str, Any]:
        """``/errors.json``: the grouped errors of the last reading and its age (s)."""
        age = (
            None
            if self.progress_updated is None
            else (time.monotonic() if now is None else now) - self.progress_updated
        )
        return {"age": None if age is None else round(age, 1), "errors": self.errors}
