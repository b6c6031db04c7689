"""Jobs/s of DataJointWorker.run_once() against one plain populate(reserve_jobs=True) call.

Same tables, same number of keys, no-op-ish make(); A and B alternate, each on a fresh schema.
Usage: python bench/worker_overhead.py [--backend mysql|postgresql] [--keys 300] [--rounds 5]
Prints medians and min-max, and the ratio worker/plain.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import configure_datajoint, drop_schemas
from pipelines.lab import declare

from djsupervisor import DataJointWorker


def one_round(kind: str, keys: int) -> float:
    prefix = f"djsbench_{uuid.uuid4().hex[:8]}"
    pipe = declare(f"{prefix}_pipe")
    pipe.seed(range(1, keys + 1))
    table = pipe.Square()
    table.jobs.refresh()
    if kind == "worker":
        worker = DataJointWorker("bench", f"{prefix}_workers", sleep_duration=0, db_prefix=prefix)
        worker(table)
        worker.run_once()  # declares the worker schema: not part of the measurement
        pipe.Square.delete_quick()
        table.jobs.refresh()
        started = time.perf_counter()
        summary = worker.run_once()
        elapsed = time.perf_counter() - started
        assert summary.jobs_done == keys, summary
    else:
        started = time.perf_counter()
        result = table.populate(reserve_jobs=True)
        elapsed = time.perf_counter() - started
        assert result["success_count"] == keys
    drop_schemas(table.connection, prefix)
    return keys / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="mysql", choices=["mysql", "postgresql"])
    parser.add_argument("--keys", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    configure_datajoint(args.backend)
    from loguru import logger

    logger.remove()
    results = {"plain": [], "worker": []}
    for _ in range(args.rounds):
        for kind in ("plain", "worker"):
            results[kind].append(one_round(kind, args.keys))
    for kind, values in results.items():
        print(
            f"{args.backend} {kind:6}: median {statistics.median(values):7.1f} jobs/s "
            f"(min {min(values):.1f}, max {max(values):.1f}, {args.rounds} rounds of {args.keys} keys)"
        )
    ratio = statistics.median(results["worker"]) / statistics.median(results["plain"])
    print(f"{args.backend} ratio worker/plain: {ratio:.3f}")


if __name__ == "__main__":
    main()
