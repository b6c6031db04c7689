"""The demo: seed the example pipeline in fresh schemas, work it under `djsupervisor start`, show
`djsupervisor status` while it runs, stop it gracefully, then show each table's queue.

Run by ``djsupervisor demo`` (`djsupervisor.example.command`, which finds or starts the database; ./scripts/demo
sets up the virtualenv and calls it) with the database in the DJ_* variables. Schemas are named
``$DJS_EXAMPLE_PREFIX_*`` (default ``djs_demo``) and recreated on each run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("DJS_EXAMPLE_PREFIX", "djs_demo")
os.environ.setdefault("DJS_EXAMPLE_SLOW_SECONDS", "1.0")  # each Summary job: long enough to watch
STATUS_EVERY = float(os.environ.get("DJS_DEMO_STATUS_SECONDS", "2"))

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="No datajoint.json found")  # the demo uses DJ_* variables
warnings.filterwarnings("ignore", message="MariaDB is not officially supported")  # see README

import datajoint as dj  # noqa: E402

from djsupervisor.example import CONFIG  # noqa: E402


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
        print(
            f"  {table.__name__:10} rows={len(table()):3}  queue: "
            + ", ".join(f"{k}={v}" for k, v in progress.items() if k != "total")
        )


def djsupervisor(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run a `djsupervisor` command of this virtualenv."""
    command = [str(Path(sys.executable).with_name("djsupervisor")), *args]
    return subprocess.run(command, text=True, **kwargs)


def main() -> int:
    prefix = os.environ["DJS_EXAMPLE_PREFIX"]
    dj.config["safemode"] = False
    drop_demo_schemas(prefix)
    from djsupervisor.example.pipeline import Recording, Spikes, Summary, seed

    sessions = seed()
    print(f"demo: seeded {sessions} sessions in {prefix}_pipeline")
    config = str(CONFIG)
    log = Path(os.environ.get("DJS_DEMO_LOG", "demo-supervisor.log"))
    print(f"demo: djsupervisor start -c {config}   (its log: {log})")
    with open(log, "w") as log_file:
        supervisor = subprocess.Popen(
            [str(Path(sys.executable).with_name("djsupervisor")), "start", "-c", config],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        shown = 0.0
        while len(Summary()) < sessions and time.monotonic() < deadline:
            if supervisor.poll() is not None:
                print(f"demo: the supervisor exited with status {supervisor.returncode}; see {log}")
                return 1
            if time.monotonic() - shown >= STATUS_EVERY:
                shown = time.monotonic()
                status = djsupervisor("status", "-c", config, capture_output=True)
                print(status.stdout if status.returncode == 0 else "demo: (waiting for the supervisor to listen)")
            time.sleep(0.5)
        if len(Summary()) < sessions:
            print("demo: the pipeline did not complete within 300 s; djsupervisor status --queues:")
        else:
            print("demo: the pipeline is complete; djsupervisor status --queues:")
        djsupervisor("status", "-c", config, "--queues")
        print("demo: djsupervisor stop --wait (graceful: jobs in flight finish)")
        djsupervisor("stop", "-c", config, "--wait", "60")
        supervisor.wait(timeout=60)
        print(f"demo: the supervisor exited with status {supervisor.returncode}")
    finally:
        if supervisor.poll() is None:
            supervisor.terminate()
            supervisor.wait(timeout=60)
    show_progress([Recording, Spikes, Summary])
    complete = len(Summary()) == sessions and supervisor.returncode == 0
    print("demo: every session analysed" if complete else "demo: some sessions were not analysed")
    return 0 if complete else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl+C reached the supervisor too, which stops its children gracefully
        print("demo: interrupted")
        sys.exit(130)
