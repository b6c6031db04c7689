"""The job queue of every table a configuration's workers populate (`djsupervisor status --queues`).

Read from the database with DataJoint 2.x's ``Table.jobs.progress()``; only the command line uses this,
never the supervisor's parent process (it does no database work).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from djsupervisor.fleet.view import QUEUE_STATES


def worker_tables(worker: Any) -> list[Any]:
    """The table instances a DataJointWorker populates, in the order it runs them."""
    return list(worker.tables)


def queue_progress(workers: Iterable[tuple[str, Any]]) -> list[dict]:
    """One entry per (worker, table): ``{"worker", "table", "pending", "reserved", "success", "error",
    "ignore"}``; a table populated by several workers is listed once, under the first."""
    seen: set[str] = set()
    queues = []
    for worker_name, worker in workers:
        for table in worker_tables(worker):
            name = table.full_table_name
            if name in seen:
                continue
            seen.add(name)
            progress = table.jobs.progress()  # zeros while the job table is not declared yet
            queues.append({"worker": worker_name, "table": name, **{s: progress.get(s, 0) for s in QUEUE_STATES}})
    return queues
