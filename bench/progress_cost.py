"""What `djsupervisor progress` and `errors` cost on a large table (issue 13): seconds and statements.

The test pipeline (tests/pipelines/lab.py) in a schema of its own: `--keys` Source rows (100k by default),
half of them computed into Square, the other half pending in Square's job table but for 1,000 errors (three
messages, numbers and paths varying per key), 100 reservations and 10 ignored jobs; one WorkerLog. Then
`progress` (what the command counts, `operate.progress.read_progress`) and `errors` (`operate.errors`)
run `--rounds` times each; the statements are those `operate.pipeline.Sql` counts (every one they send,
the catalog reads included, the dependency graph DataJoint loads once per process excepted).

    .venv/bin/python bench/progress_cost.py [--backend mysql|postgresql|both] [--keys 100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' servers and pipeline
from conftest import configure_datajoint as connect
from conftest import drop_schemas
from pipelines.lab import declare

from djsupervisor import DataJointWorker
from djsupervisor.operate.errors import job_errors
from djsupervisor.operate.pipeline import Pipeline
from djsupervisor.operate.progress import read_progress
from djsupervisor.worker import identifiers
from djsupervisor.worker.schema import WorkerSchema

_CHUNK = 10000  # rows per INSERT while building the table


def build(connection, prefix: str, keys: int):
    lab = declare(f"{prefix}_pipe", connection=connection)
    for start in range(0, keys, _CHUNK):
        ids = range(start + 1, min(keys, start + _CHUNK) + 1)
        lab.Source.insert({"source_id": i, "value": float(i)} for i in ids)
        done = [i for i in ids if i <= keys // 2]
        if done:
            lab.Square.insert(
                (
                    {"source_id": i, "square": float(i * i), "worker_pid": 0, "started": 0.0, "finished": 0.0}
                    for i in done
                ),
                allow_direct_insert=True,
            )
    lab.Square.jobs.refresh()  # the other half pending
    backend = connection.adapter.backend
    q = lambda name: identifiers.quote(backend, name)
    jobs = identifiers.full_name(backend, *identifiers.split_full_name(lab.Square.jobs.full_table_name))
    first = keys // 2 + 1
    messages = (
        ("CONCAT('FileNotFoundError: /data/raw/session', {id}, '/probe.dat')", 500),
        ("CONCAT('ValueError: calibration ', {id}, ' out of range')", 300),
        ("'RuntimeError: no probe for this session'", 200),
    )
    for expression, count in messages:
        sid = q("source_id")
        connection.query(
            f"UPDATE {jobs} SET {q('status')}='error', {q('completed_time')}=CURRENT_TIMESTAMP(3), "
            f"{q('error_message')}={expression.format(id=sid)} WHERE {sid} >= %s AND {sid} < %s",
            args=(first, first + count),
        )
        first += count
    connection.query(
        f"UPDATE {jobs} SET {q('status')}='reserved' WHERE {q('source_id')} >= %s AND {q('source_id')} < %s",
        args=(first, first + 100),
    )
    first += 100
    connection.query(
        f"UPDATE {jobs} SET {q('status')}='ignore' WHERE {q('source_id')} >= %s AND {q('source_id')} < %s",
        args=(first, first + 10),
    )
    worker = DataJointWorker("bench", f"{prefix}_workers", sleep_duration=0, db_prefix=[prefix])
    worker(lab.Square)
    _ = WorkerSchema(f"{prefix}_workers", connection).tables  # declared, as a running worker would have it
    return lab, worker


def measure(backend: str, keys: int, rounds: int) -> list[str]:
    connection = connect(backend)
    prefix = f"djsbench_{uuid.uuid4().hex[:8]}"
    try:
        started = time.perf_counter()
        _, worker = build(connection, prefix, keys)
        built = time.perf_counter() - started
        figures: dict[str, list[tuple[float, int]]] = {"progress": [], "errors": []}
        last = None
        for _ in range(rounds):
            for name in figures:
                began = time.perf_counter()
                pipeline = Pipeline.load([("bench", worker)])
                if name == "progress":
                    last = read_progress(pipeline)
                else:
                    job_errors(pipeline.sql, pipeline.tables[0], None, False)
                figures[name].append((time.perf_counter() - began, pipeline.sql.statements))
        row = last[0] if last else None
        lines = []
        for name, runs in figures.items():
            seconds = [s for s, _ in runs]
            lines.append(
                f"| {backend} | {name} on a {keys:,}-key table | {statistics.median(seconds):.3f} "
                f"({min(seconds):.3f}–{max(seconds):.3f}) | {runs[0][1]} |"
            )
        if row is not None:
            lines.append(
                f"| {backend} | (counted: total {row.total}, done {row.done}, remaining {row.remaining}, "
                f"reserved {row.reserved}, error {row.error}, ignore {row.ignore}; table built in {built:.0f} s) | | |"
            )
        return lines
    finally:
        drop_schemas(connect(backend), prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("mysql", "postgresql", "both"), default="both")
    parser.add_argument("--keys", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print("| backend | command | seconds, median (min–max) | statements |")
    print("|---|---|---|---|")
    for backend in ("mysql", "postgresql") if args.backend == "both" else (args.backend,):
        for line in measure(backend, args.keys, args.rounds):
            print(line, flush=True)


if __name__ == "__main__":
    main()
