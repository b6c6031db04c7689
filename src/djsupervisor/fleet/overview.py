"""What the fleet agent reads for the status page, `/progress.json`, `/errors.json` and `djsupervisor status`:
each pool table's progress (key source, done, remaining, errors), the pipeline's errors grouped by message,
and the jobs done per minute by each pool over the last hour.

Runs in the fleet agent child (the parent does no database work). Progress and errors are the
`djsupervisor progress` and `errors` computations (`djsupervisor.operate`), read at most every
`READ_INTERVAL` seconds: counting a key source costs a scan of it (bench/RESULTS.md gives the figure on a
100k-key table), far more than the job-queue depths read on every `fleet_interval`.

The jobs done per minute come from the children's own counters, which the parent passes to the agent in
every command (`AgentChild.jobs_done`): no database read, and live (WorkerLog is written when a cycle ends,
which may be an hour into a backlog). A child first seen counts from its current total only when the
agent itself has just started (its earlier jobs were done before this agent's hour began).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

READ_INTERVAL = 30.0  # seconds between readings of progress and errors
MINUTES = 60  # the throughput chart's span
MAX_GROUPS = 50  # error groups sent to the parent (the most frequent)
_TEXT = 500  # characters of a message kept for the page


class Overview:
    """The agent's readings for the page, and the per-minute job counts of its pools."""

    def __init__(self, read_interval: float = READ_INTERVAL) -> None:
        self.read_interval = read_interval
        self._last_read: float | None = None
        self._seen: dict[int, int] = {}  # child pid -> jobs_done at the last command
        self._started = False
        self._minutes: dict[str, deque[list[int]]] = {}  # pool -> [[minute (epoch // 60), jobs done], ...]

    def note_children(self, children: Iterable[Mapping[str, Any]], now: float | None = None) -> None:
        """Count the jobs each live child did since the last command into its pool's current minute."""
        minute = int((time.time() if now is None else now) // 60)
        live: dict[int, int] = {}
        for child in children:
            pid, done = int(child["pid"]), int(child.get("jobs_done") or 0)
            live[pid] = done
            before = self._seen.get(pid, done if not self._started else 0)
            delta = max(0, done - before)
            buckets = self._minutes.setdefault(str(child["worker"]), deque())
            if buckets and buckets[-1][0] == minute:
                buckets[-1][1] += delta
            else:
                buckets.append([minute, delta])
            while buckets and buckets[0][0] <= minute - MINUTES:
                buckets.popleft()
        self._seen = live
        self._started = True

    def throughput(self) -> dict[str, list[list[int]]]:
        """Per pool, ``[[minute since the epoch, jobs done], ...]`` over the last hour (minutes with none left out
        only where no command came)."""
        return {pool: [list(b) for b in buckets] for pool, buckets in self._minutes.items()}

    def due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self._last_read is None or now - self._last_read >= self.read_interval

    def read(self, workers: dict[str, Any], now: float | None = None) -> dict[str, Any]:
        """``{"progress": [...], "errors": [...]}``: the rows `progress --json` gives (with ``workers`` the
        pools) and the error groups `errors --json` gives (at most `MAX_GROUPS`, no stacks)."""
        from djsupervisor.operate.errors import job_errors
        from djsupervisor.operate.pipeline import Pipeline
        from djsupervisor.operate.progress import read_progress

        self._last_read = time.monotonic() if now is None else now
        pipeline = Pipeline.load(workers.items())
        progress = [row.as_json() for row in read_progress(pipeline)]
        groups = [g for entry in pipeline.tables for g in job_errors(pipeline.sql, entry, None, False)]
        groups.sort(key=lambda g: -g.count)
        errors = []
        for group in groups[:MAX_GROUPS]:
            found = group.as_json()
            found["message"] = found["message"][:_TEXT]
            found["example_message"] = found["example_message"][:_TEXT]
            errors.append(found)
        return {"progress": progress, "errors": errors}
