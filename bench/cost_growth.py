"""Cost growth of one worker cycle with the number of pending jobs (issue 5, figure 6).

A real `DataJointWorker` (the test pipeline's Square, tests/pipelines/lab.py: `JOBS_PER_CYCLE` jobs per
cycle, make()s that do nothing but read their Source row and insert) runs cycles against a job
table holding 1k, 10k and 100k pending keys, with 50 orphaned reservations (this host, dead pid, dead
session), 50 stale ones (another host, 48 h old, dead session) and 50 transient errors re-planted before
each measured cycle, so recovery always has work. Each step of the cycle is timed (exclusive time: a
step's figure does not include the steps it calls) and its database statements are counted:

* recovery: job-table listing, candidate scan, liveness check, re-pending, ErrorLog copies;
* refresh: DataJoint's `jobs.refresh()` that populate runs first (key_source − target − jobs);
* populate: the rest of `populate()`: the pending-key fetch (a worker's first call in a cycle fetches at
  most `steps.POPULATE_BATCH` keys), transactions, the per-job key checks;
* reserve, make, complete (per job); heartbeat and WorkerLog (bookkeeping).

Plus DataJoint's fetch of every pending key (what one `populate()` call does before its first job; a
worker's second call of a cycle does it, once per cycle), and an
EXPLAIN of each recovery statement at the largest size. Usage (also called by bench/run.py):

    .venv/bin/python bench/cost_growth.py [--backend mysql|postgresql|both] [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import collections
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import datajoint as dj

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' servers and pipeline
from conftest import BACKENDS, drop_schemas
from conftest import configure_datajoint as connect
from pipelines.lab import declare

JOBS_PER_CYCLE = 20
PLANTED = 50  # orphans, stale reservations and transient errors, each, before every measured cycle
STEPS = ("recovery", "refresh", "populate", "reserve", "make", "complete", "heartbeat", "WorkerLog", "other")


class Probe:
    """Exclusive wall time and statement count per step, from wrappers around the cycle's methods."""

    def __init__(self) -> None:
        self.stack: list[list] = []  # [name, started]
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.statements: dict[str, int] = collections.defaultdict(int)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self.active = False

    def _enter(self, name: str) -> None:
        now = time.perf_counter()
        if self.stack:
            top = self.stack[-1]
            self.seconds[top[0]] += now - top[1]
        self.stack.append([name, now])
        self.calls[name] += 1

    def _leave(self) -> None:
        now = time.perf_counter()
        name, started = self.stack.pop()
        self.seconds[name] += now - started
        if self.stack:
            self.stack[-1][1] = now

    def wrap(self, owner, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)
        probe = self

        def timed(*args, **kwargs):
            if not probe.active:
                return original(*args, **kwargs)
            probe._enter(name)
            try:
                return original(*args, **kwargs)
            finally:
                probe._leave()

        setattr(owner, attribute, timed)

    def count_statements(self, connection: dj.Connection) -> None:
        original = connection.query
        probe = self

        def query(*args, **kwargs):
            if probe.active:
                probe.statements[probe.stack[-1][0] if probe.stack else "other"] += 1
            return original(*args, **kwargs)

        connection.query = query

    def reset(self) -> None:
        self.seconds.clear(), self.statements.clear(), self.calls.clear()


def dead_connection_id(backend: str) -> int:
    s = BACKENDS[backend]
    other = dj.Connection(s["host"], s["user"], s["password"], s["port"], use_tls=False, backend=backend)
    cid = other.connection_id
    other.close()
    return cid


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


class Setup:
    """The pipeline, the worker and the probe for one backend."""

    def __init__(self, backend: str) -> None:
        from djsupervisor import DataJointWorker

        self.backend = backend
        self.connection = connect(backend)
        self.prefix = f"djsbench_{uuid.uuid4().hex[:8]}"
        self.lab = declare(f"{self.prefix}_pipe", connection=self.connection, job_tables=False)
        self.Source, self.Square = self.lab.Source, self.lab.Square
        self.worker = DataJointWorker("cost", f"{self.prefix}_workers", sleep_duration=0, db_prefix=[self.prefix])
        self.worker(self.Square)
        self._jobs_in_cycle = 0
        self.worker.add_listener(self._bound_the_cycle)
        self.worker.run_once()  # declares the worker schema and the job table
        self.jobs = self.worker._steps[0].table.jobs
        self.q = self.connection.adapter.quote_identifier
        self.probe = Probe()
        self._instrument()

    def _instrument(self) -> None:
        from datajoint.jobs import Job

        from djsupervisor.worker import loop as worker
        from djsupervisor.worker import recovery as djs_jobs
        from djsupervisor.worker import schema as tables
        from djsupervisor.worker import steps
        from djsupervisor.worker.record import WorkerRecord

        p = self.probe
        p.wrap(djs_jobs.JobRecovery, "run", "recovery")
        p.wrap(Job, "refresh", "refresh")
        p.wrap(Job, "reserve", "reserve")
        p.wrap(Job, "complete", "complete")
        p.wrap(self.Square, "make", "make")
        p.wrap(steps.TableStep, "run", "populate")
        p.wrap(WorkerRecord, "heartbeat", "heartbeat")
        p.wrap(tables.WorkerSchema, "log_cycle", "WorkerLog")
        p.wrap(worker.DataJointWorker, "run_once", "other")
        p.count_statements(self.connection)

    def _bound_the_cycle(self, event) -> None:
        """Stop the cycle after JOBS_PER_CYCLE jobs (the worker populates in batches until the queue is empty)."""
        if event.kind == "job_end":
            self._jobs_in_cycle += 1
            if self._jobs_in_cycle >= JOBS_PER_CYCLE:
                self.worker.stop("bench: enough jobs for one measured cycle")

    def grow(self, n: int) -> None:
        """Source rows 0..n-1 and a pending job for every key without a job or a result (bulk SQL)."""
        have = len(self.Source())
        for start in range(have, n, 10000):
            self.lab.seed(range(start, min(start + 10000, n)))
        q = self.q
        jobs, source, square = self.jobs.full_table_name, self.Source.full_table_name, self.Square.full_table_name
        self.connection.query(
            f"INSERT INTO {jobs} ({q('source_id')}, {q('status')}, {q('priority')}, {q('scheduled_time')}) "
            f"SELECT s.{q('source_id')}, 'pending', 5, CURRENT_TIMESTAMP(3) - "
            f"{self.connection.adapter.interval_expr(60, 'second')} FROM {source} s "
            f"WHERE NOT EXISTS (SELECT 1 FROM {jobs} j WHERE j.{q('source_id')}=s.{q('source_id')}) "
            f"AND NOT EXISTS (SELECT 1 FROM {square} w WHERE w.{q('source_id')}=s.{q('source_id')})"
        )

    def plant(self) -> None:
        """50 orphans, 50 stale reservations and 50 transient errors among the pending jobs."""
        q = self.q
        jobs = self.jobs.full_table_name
        ids = [
            r[0]
            for r in self.connection.query(
                f"SELECT {q('source_id')} FROM {jobs} WHERE {q('status')}='pending' "
                f"ORDER BY {q('source_id')} DESC LIMIT {3 * PLANTED}"
            ).fetchall()
        ]
        dead_cid, pid = dead_connection_id(self.backend), dead_pid()
        old = self.connection.adapter.interval_expr(48 * 3600, "second")
        groups = [
            (
                ids[:PLANTED],
                "status='reserved', host=%s, pid=%s, connection_id=%s, reserved_time=CURRENT_TIMESTAMP(3)",
                (platform.node(), pid, dead_cid),
            ),
            (
                ids[PLANTED : 2 * PLANTED],
                f"status='reserved', host=%s, pid=%s, connection_id=%s, reserved_time=CURRENT_TIMESTAMP(3) - {old}",
                ("bench-elsewhere", 1, dead_cid),
            ),
            (
                ids[2 * PLANTED :],
                "status='error', error_message=%s, completed_time=CURRENT_TIMESTAMP(3)",
                ("LostConnectionError: Connection lost during a transaction",),
            ),
        ]
        for group, assignments, args in groups:
            if group:
                marks = ", ".join(["%s"] * len(group))
                self.connection.query(
                    f"UPDATE {jobs} SET {assignments} WHERE {q('source_id')} IN ({marks})", args=(*args, *group)
                )

    def cycle(self) -> dict:
        """One measured cycle: {step: (seconds, statements)} and the jobs done."""
        self.probe.reset()
        self.probe.active = True
        self._jobs_in_cycle = 0
        try:
            summary = self.worker.run_once()
        finally:
            self.probe.active = False
            self.worker._stop_signal.clear()
        return dict(
            seconds=dict(self.probe.seconds),
            statements=dict(self.probe.statements),
            jobs=summary.jobs_done,
            recovered=summary.recovered_orphaned + summary.recovered_stale,
            cleared=summary.cleared_errors,
        )

    def full_key_fetch(self) -> float:
        """The pending-key fetch populate does without max_calls (every pending key)."""
        started = time.perf_counter()
        (self.jobs.pending & "scheduled_time <= CURRENT_TIMESTAMP(3)").keys(order_by="priority ASC, scheduled_time ASC")
        return time.perf_counter() - started

    def explain_recovery(self) -> list[str]:
        """EXPLAIN of each statement recovery sends to a job table (plan lines, shortened)."""
        from djsupervisor.worker import recovery as djs_jobs

        self.plant()
        seen: list[tuple[str, tuple]] = []
        original = self.connection.query

        def record(sql, args=(), **kwargs):
            text = " ".join(str(sql).split())
            if "~~" in text and text.split()[0] in ("SELECT", "UPDATE") and "information_schema" not in text:
                seen.append((text, tuple(args or ())))
            return original(sql, args=args, **kwargs)

        self.connection.query = record
        try:
            djs_jobs.JobRecovery(self.connection, db_prefix=[self.prefix]).run()
        finally:
            del self.connection.query
            self.probe.count_statements(self.connection)
        lines, kinds = [], set()
        for sql, args in seen:
            kind = " ".join(sql.split()[:1]) + (" error" if "'error'" in sql.split("WHERE")[-1][:40] else "")
            if kind in kinds:
                continue
            kinds.add(kind)
            cursor = original(f"EXPLAIN {sql}", args=args)
            rows = cursor.fetchall()
            if self.backend == "mysql":
                names = [d[0].lower() for d in cursor.description]
                rows = [dict(zip(names, r)) for r in rows]
                plan = "; ".join(
                    f"type={r['type']} key={r['key']} rows={r['rows']} {r.get('extra') or ''}".strip() for r in rows
                )
            else:
                plan = " / ".join(r[0].strip() for r in rows[:3])
            lines.append(f"`{sql[:90]}…` → {plan}")
        return lines

    def close(self) -> None:
        drop_schemas(self.connection, self.prefix)


def verdict(ratio: float, growth: float) -> str:
    """How a step grows, from its time ratio over a `growth`-fold increase of pending jobs."""
    if ratio < 2:
        return "flat"
    if ratio < growth / 2:
        return "sub-linear"
    if ratio < growth * 2:
        return "linear"
    return "WORSE than linear"


def ratios(medians: dict[int, float], growth: float) -> str:
    """Table cells: the largest size's time over the smallest's and over the next largest's, and the verdict
    (from the latter)."""
    sizes = sorted(medians)
    first, before, last = medians[sizes[0]], medians[sizes[max(len(sizes) - 2, 0)]], medians[sizes[-1]]
    whole = last / first if first > 0 else float("nan")
    step = last / before if before > 0 else float("nan")
    return f" | {whole:.2f}× / {step:.2f}× | {verdict(step, growth)}"


def run_backend(backend: str, sizes: list[int], rounds: int = 3) -> tuple[list[str], list[str]]:
    """Markdown rows (one per step) and notes (EXPLAIN plans) for one backend."""
    setup = Setup(backend)
    per_size: dict[int, list[dict]] = {}
    fetch: dict[int, float] = {}
    try:
        for n in sizes:
            setup.grow(n)
            setup.cycle()  # warm: first cycle at this size
            runs = []
            for _ in range(rounds):
                setup.plant()
                runs.append(setup.cycle())
            per_size[n] = runs
            fetch[n] = statistics.median(setup.full_key_fetch() for _ in range(rounds))
        notes = setup.explain_recovery()
    finally:
        setup.close()
    rows = []
    small, large = sizes[0], sizes[-1]
    before = sizes[-2] if len(sizes) > 1 else small
    growth = large / before  # judged on the two largest sizes: fixed costs dominate the smallest
    for step in STEPS:
        cells, meds = [], {}
        for n in sizes:
            values = [r["seconds"].get(step, 0.0) * 1000 for r in per_size[n]]
            stmts = statistics.median(r["statements"].get(step, 0) for r in per_size[n])
            if step in ("reserve", "make", "complete"):
                jobs = statistics.median(r["jobs"] for r in per_size[n]) or 1
                values = [v / jobs for v in values]
                stmts = stmts / jobs
            meds[n] = statistics.median(values)
            cells.append(f"{meds[n]:.2f} ({min(values):.2f}–{max(values):.2f}), {stmts:g} st")
        unit = " per job" if step in ("reserve", "make", "complete") else ""
        rows.append(
            f"| {backend} | 6. cycle step: {step}{unit} (ms, statements) | "
            + " | ".join(cells)
            + ratios(meds, growth)
            + " |"
        )
    cells = [f"{fetch[n] * 1000:.1f}" for n in sizes]
    rows.append(
        f"| {backend} | 6. fetch of every pending key (one plain populate() call, before its first job; ms) | "
        + " | ".join(cells)
        + ratios(fetch, growth)
        + " |"
    )
    totals = {n: statistics.median(sum(r["seconds"].values()) * 1000 for r in per_size[n]) for n in sizes}
    rows.append(
        f"| {backend} | 6. whole cycle ({JOBS_PER_CYCLE} jobs, {PLANTED} orphans + {PLANTED} stale + "
        f"{PLANTED} errors recovered, ms) | "
        + " | ".join(f"{totals[n]:.1f}" for n in sizes)
        + ratios(totals, growth)
        + " |"
    )
    recovered = {
        n: (
            statistics.median(r["recovered"] for r in per_size[n]),
            statistics.median(r["cleared"] for r in per_size[n]),
        )
        for n in sizes
    }
    notes = [
        f"- {backend}: re-pended/cleared per cycle: "
        + ", ".join(f"{n}: {a:g}/{b:g}" for n, (a, b) in recovered.items()),
        *(f"- {backend} EXPLAIN at {large} pending: {line}" for line in notes),
    ]
    return rows, notes


def header(sizes: list[int]) -> list[str]:
    cols = " | ".join(f"{n:,} pending" for n in sizes)
    last = f"{sizes[-1]:,}/{sizes[-2]:,}" if len(sizes) > 1 else "-"
    return [
        f"| backend | step | {cols} | ratio {sizes[-1]:,}/{sizes[0]:,} / {last} | growth (from the latter) |",
        "|---|---|" + "---|" * len(sizes) + "---|---|",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="both", choices=["mysql", "postgresql", "both"])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from loguru import logger

    logger.remove()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows, notes = [], []
    for backend in ["mysql", "postgresql"] if args.backend == "both" else [args.backend]:
        r, n = run_backend(backend, sizes, args.rounds)
        rows += r
        notes += n
    print("\n".join([*header(sizes), *rows, "", *notes]))


if __name__ == "__main__":
    main()
