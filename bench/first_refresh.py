"""The first refresh of a big table's job queue: DataJoint 2.3's own against djsupervisor's (issue 15).

DataJoint's ``Job.refresh`` inserts each new key with its own ``insert1``; a worker's refresh goes through
`djsupervisor.worker.compat.bulk_refresh`, which writes them `REFRESH_INSERT_BATCH` rows per INSERT. Each
round declares the test pipeline (tests/pipelines/lab.py) in a fresh schema, inserts `--keys` Source rows
(Square's key source), and times ``Square.jobs.refresh()`` one way, then the other; the schemas are dropped.
Rounds alternate the order. Usage:

    .venv/bin/python bench/first_refresh.py [--backend mysql|postgresql|both] [--keys 100000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' servers and pipeline

from conftest import configure_datajoint, drop_schemas
from pipelines.lab import declare

from djsupervisor.worker import compat

SOURCE_BATCH = 20_000


def first_refresh(connection, keys: int, bulk: bool) -> float:
    """Seconds of one first refresh of `keys` new keys (DataJoint's own, or `bulk`)."""
    name = f"djsbench_refresh_{uuid.uuid4().hex[:8]}"
    try:
        lab = declare(name)
        for start in range(0, keys, SOURCE_BATCH):
            stop = min(keys, start + SOURCE_BATCH)
            lab.Source.insert([dict(source_id=i, value=float(i)) for i in range(start + 1, stop + 1)])
        jobs = lab.Square.jobs
        began = time.perf_counter()
        if bulk:
            with compat.bulk_refresh(jobs):
                added = jobs.refresh()["added"]
        else:
            added = jobs.refresh()["added"]
        seconds = time.perf_counter() - began
        if added != keys or jobs.progress()["pending"] != keys:
            raise RuntimeError(f"refresh queued {added} of {keys} keys")
        return seconds
    finally:
        drop_schemas(connection, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="both", choices=["mysql", "postgresql", "both"])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print("| backend | new keys | DataJoint's refresh (s) | djsupervisor's (s) | speed-up |")
    print("|---|---|---|---|---|")
    for backend in ["mysql", "postgresql"] if args.backend == "both" else [args.backend]:
        connection = configure_datajoint(backend)
        times: dict[bool, list[float]] = {False: [], True: []}
        for round_ in range(args.rounds):
            for bulk in (False, True) if round_ % 2 == 0 else (True, False):
                times[bulk].append(first_refresh(connection, args.keys, bulk))
        plain, bulk = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {backend} | {args.keys:,} | {plain:.1f} | {bulk:.1f} | {plain / bulk:.1f}× |")


if __name__ == "__main__":
    main()
