"""`djsupervisor progress`: how far along each table of the pipeline is, and when it will be done.

Per table, in pipeline order: ``total`` keys in its key source, ``done`` (those already in the table),
``reserved``, ``error`` and ``ignore`` jobs, ``remaining = total - done - reserved - error - ignore``, the
workers that populate it, the throughput over the last `window` minutes and an ETA.

Everything is counted in SQL, never by fetching keys: per table one statement for total and done (the key
source's SQL, as populate() sees it, with an EXISTS probe of the table's primary key index per key) and one
GROUP BY over its job table; per worker schema one statement for the throughput of every table; two
catalog reads (`Pipeline.load`). One 100k-key table: 5 statements, 0.19 s on MariaDB, 0.34 s on
PostgreSQL (bench/RESULTS.md, figure 7).

Throughput comes from WorkerLog (jobs done per table in the cycles logged in the window) and, where the
job table keeps ``success`` rows (DataJoint's ``jobs.keep_completed``), from their completion times;
the larger wins. A cycle's WorkerLog row is written when the cycle ends, so a long backlog worked in one
cycle shows up late; `--watch` therefore also measures the rate it sees ``done`` grow by.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import sys
import time
from typing import Any, TextIO

from djsupervisor.operate.pipeline import Pipeline, PipelineTable, Sql

JOB_STATES = ("pending", "reserved", "success", "error", "ignore")


@dataclasses.dataclass
class TableProgress:
    """One row of `progress`."""

    table: str  # quoted full name
    label: str  # schema.Class
    workers: list[str]
    total: int
    done: int
    pending: int
    reserved: int
    error: int
    ignore: int
    done_in_window: int  # jobs done in the last `window` minutes
    rate_per_min: float  # jobs per minute
    window_minutes: float

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.done - self.reserved - self.error - self.ignore)

    @property
    def eta_seconds(self) -> float | None:
        """Seconds until `remaining` is done at `rate_per_min`; 0 when nothing remains, None at rate 0."""
        if self.remaining == 0:
            return 0.0
        return self.remaining / self.rate_per_min * 60 if self.rate_per_min > 0 else None

    def as_json(self) -> dict:
        return {
            "table": self.table,
            "label": self.label,
            "workers": self.workers,
            "total": self.total,
            "done": self.done,
            "remaining": self.remaining,
            "pending": self.pending,
            "reserved": self.reserved,
            "error": self.error,
            "ignore": self.ignore,
            "done_in_window": self.done_in_window,
            "rate_per_min": round(self.rate_per_min, 3),
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
        }


def count_keys(sql: Sql, entry: PipelineTable) -> tuple[int, int]:
    """(total, done): the keys of the table's key source, and those of them the table holds already."""
    key_source = entry.table.key_source
    source_sql = key_source.proj().make_sql()
    key = list(key_source.primary_key)
    target = entry.full_name
    matches = " AND ".join(f"t.{sql.q(k)} = ks.{sql.q(k)}" for k in key)
    (row,) = sql.rows(
        f"SELECT COUNT(*), COALESCE(SUM(CASE WHEN EXISTS (SELECT 1 FROM {target} AS t WHERE {matches}) "
        f"THEN 1 ELSE 0 END), 0) FROM ({source_sql}) AS ks"
    )
    return int(row[0]), int(row[1])


def count_jobs(sql: Sql, entry: PipelineTable, since: datetime.datetime) -> tuple[dict[str, int], int]:
    """Jobs by status, and the ``success`` rows completed since `since` (DataJoint keeps them only with
    ``jobs.keep_completed``); zeros while the job table is not declared."""
    counts = dict.fromkeys(JOB_STATES, 0)
    jobs = entry.job_table_sql(sql)
    if jobs is None:
        return counts, 0
    status, completed = sql.q("status"), sql.q("completed_time")
    rows = sql.rows(
        f"SELECT {status}, COUNT(*), SUM(CASE WHEN {status} = 'success' AND {completed} >= %s THEN 1 ELSE 0 END) "
        f"FROM {jobs} GROUP BY {status}",
        (since,),
    )
    recent = 0
    for state, n, success in rows:
        if state in counts:
            counts[state] = int(n)
        recent += int(success or 0)
    return counts, recent


def logged_done(sql: Sql, pipeline: Pipeline, since: datetime.datetime) -> dict[str, int]:
    """Jobs done per table (quoted full name) in the WorkerLog rows of cycles started since `since`."""
    done: dict[str, int] = {}
    names = [t.full_name for t in pipeline.tables]
    for schema in pipeline.worker_schemas:
        log = pipeline.worker_table(schema, "worker_log")
        if log is None:
            continue
        process, jobs_done, log_time = sql.q("process"), sql.q("jobs_done"), sql.q("log_time")
        for name, n in sql.rows(
            f"SELECT {process}, SUM({jobs_done}) FROM {log} WHERE {log_time} >= %s AND {process} IN ("
            + ", ".join(["%s"] * len(names))
            + f") GROUP BY {process}",
            (since, *names),
        ):
            done[name] = done.get(name, 0) + int(n or 0)
    return done


def read_progress(pipeline: Pipeline, window_minutes: float = 10.0) -> list[TableProgress]:
    """The progress of every table of `pipeline` (see the module docstring)."""
    sql = pipeline.sql
    # WorkerLog's log_time is the worker's local clock; the job table's completed_time the server's. A naive
    # local time compares right with the first and, on a server in the same zone, with the second.
    since = datetime.datetime.now() - datetime.timedelta(minutes=window_minutes)
    logged = logged_done(sql, pipeline, since)
    out = []
    for entry in pipeline.tables:
        total, done = count_keys(sql, entry)
        jobs, completed = count_jobs(sql, entry, since)
        in_window = max(logged.get(entry.full_name, 0), completed)
        out.append(
            TableProgress(
                entry.full_name,
                entry.label,
                list(entry.workers),
                total,
                done,
                jobs["pending"],
                jobs["reserved"],
                jobs["error"],
                jobs["ignore"],
                in_window,
                in_window / window_minutes,
                window_minutes,
            )
        )
    return out


def format_eta(seconds: float | None) -> str:
    """``done``, ``-`` (no throughput to go by), ``45 s``, ``12 min``, ``3.5 h``, ``2.1 d``. (A table with
    nothing remaining but jobs reserved or in error is printed ``0 left`` by its callers, not ``done``.)"""
    if seconds is None:
        return "-"
    if seconds == 0:
        return "done"
    if seconds < 120:
        return f"{math.ceil(seconds)} s"
    if seconds < 7200:
        return f"{math.ceil(seconds / 60)} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def format_rate(rate: float) -> str:
    return f"{rate:.1f}/min" if rate else "0/min"


def bar(done: int, total: int, width: int = 20) -> str:
    """``[#######.............]`` for `done` of `total`."""
    filled = width if total <= 0 else min(width, int(width * done / total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def format_progress(rows: list[TableProgress], *, bars: bool = False) -> str:
    """The text of `progress`: one line per table, in pipeline order; `bars` adds a bar and a percentage."""
    from djsupervisor.serve.status_format import format_table  # escapes control characters in every cell

    header = ["TABLE", "TOTAL", "DONE", "REMAINING", "RESERVED", "ERROR", "IGNORE", "WORKER", "RATE", "ETA"]
    if bars:
        header.insert(1, "PROGRESS")
    lines = []
    for row in rows:
        cells = [
            row.label,
            str(row.total),
            str(row.done),
            str(row.remaining),
            str(row.reserved),
            str(row.error),
            str(row.ignore),
            ",".join(row.workers),
            format_rate(row.rate_per_min),
            "0 left" if row.remaining == 0 and (row.reserved or row.error) else format_eta(row.eta_seconds),
        ]
        if bars:
            share = 100.0 if row.total == 0 else 100.0 * row.done / row.total
            cells.insert(1, f"{bar(row.done, row.total)} {share:5.1f}%")
        lines.append(tuple(cells))
    window = rows[0].window_minutes if rows else 10.0
    return "\n".join([*format_table(tuple(header), lines), f"(rate: jobs done in the last {window:g} min)"])


def progress_json(rows: list[TableProgress], sql: Sql, window_minutes: float) -> dict:
    """What `progress --json` prints."""
    return {
        "window_minutes": window_minutes,
        "tables": [row.as_json() for row in rows],
        "statements": sql.statements,
        "seconds": round(sql.seconds, 4),
    }


def watch(
    pipeline: Pipeline, window_minutes: float, interval: float, out: TextIO = sys.stdout, rounds: int | None = None
) -> int:
    """Redraw the progress every `interval` seconds until Ctrl+C (or `rounds` redraws): in place with a bar
    per table on a terminal, as successive plain blocks otherwise (a log file, a pipe)."""
    terminal = out.isatty()
    first: dict[str, tuple[float, int]] = {}  # table -> (when, done) at the first draw: the observed rate
    drawn = 0
    try:
        while rounds is None or drawn < rounds:
            rows = read_progress(pipeline, window_minutes)
            now = time.monotonic()
            for row in rows:
                started, done0 = first.setdefault(row.table, (now, row.done))
                if now - started >= interval and row.done > done0:  # seen growing: at least that fast
                    row.rate_per_min = max(row.rate_per_min, (row.done - done0) / (now - started) * 60)
            stamp = datetime.datetime.now().strftime("%H:%M:%S")
            text = f"progress at {stamp} (every {interval:g} s; Ctrl+C ends)\n" + format_progress(rows, bars=True)
            if terminal:  # home, draw, clear what an earlier, longer frame left below
                out.write("\x1b[H\x1b[2J" + text.replace("\n", "\x1b[K\n") + "\x1b[K\n")
            else:
                out.write(text + "\n\n")
            out.flush()
            drawn += 1
            if rounds is None or drawn < rounds:
                time.sleep(interval)  # the redraw period itself, not a wait for a condition
    except KeyboardInterrupt:
        pass
    return 0


def run(args: Any, pipeline: Pipeline) -> int:
    """`djsupervisor progress`."""
    if args.watch:
        return watch(pipeline, args.window, args.interval)
    rows = read_progress(pipeline, args.window)
    if args.json:
        print(json.dumps(progress_json(rows, pipeline.sql, args.window), indent=2))
    else:
        print(format_progress(rows))
    return 0
