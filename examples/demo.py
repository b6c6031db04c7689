"""The demo: seed the example pipeline in fresh schemas and work it, then show each table's queue.

Run by ./scripts/demo (which sets up the virtualenv and the database). Schemas are named
``$DJS_EXAMPLE_PREFIX_*`` (default ``djs_demo``) and recreated on each run.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DJS_EXAMPLE_PREFIX", "djs_demo")
os.environ.setdefault("DJS_EXAMPLE_SLOW_SECONDS", "0.3")

import datajoint as dj  # noqa: E402


def drop_demo_schemas(prefix: str) -> None:
    """Drop the schemas of an earlier demo run."""
    connection = dj.conn()
    quote = connection.adapter.quote_identifier
    for suffix in ("workers", "pipeline"):
        name = f"{prefix}_{suffix}"
        if connection.adapter.backend == "postgresql":
            connection.query(f"DROP SCHEMA IF EXISTS {quote(name)} CASCADE")
        else:
            connection.query(f"DROP DATABASE IF EXISTS {quote(name)}")


def show_progress(tables) -> None:
    for table in tables:
        progress = table.jobs.progress()
        print(f"  {table.__name__:10} rows={len(table()):3}  queue: "
              + ", ".join(f"{k}={v}" for k, v in progress.items() if k != "total"))  # fmt: skip


def main() -> int:
    prefix = os.environ["DJS_EXAMPLE_PREFIX"]
    dj.config["safemode"] = False
    drop_demo_schemas(prefix)
    from examples.pipeline import Recording, Spikes, Summary, seed
    from examples.pipeline.workers import analysis, standard

    sessions = seed()
    print(f"demo: seeded {sessions} sessions in {prefix}_pipeline")
    for worker in (standard, analysis):
        print(f"demo: running worker {worker.name!r} in process until it idles: {', '.join(worker.processes)}")
        worker.configure(sleep_duration=0.5, max_sleep_duration=None, max_idled_cycle=1).run()
    print("demo: done")
    show_progress([Recording, Spikes, Summary])
    complete = len(Summary()) == sessions
    print("demo: every session analysed" if complete else "demo: some sessions were not analysed")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
