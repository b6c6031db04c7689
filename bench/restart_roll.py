"""What `djsupervisor restart` costs: a roll's duration, and a fresh child's start-up against a forked one's.

Usage: .venv/bin/python bench/restart_roll.py [--backend mysql|postgresql] [--replicas 2,3] [--rounds 2]

A supervisor with default settings runs the benchmarks' worker (bench_pipeline, 50 ms jobs, a queue that
never runs dry, so every stop waits for a job in flight). For each pool size:

- **forked start-up** (the baseline): SIGKILL each child in turn and time its replacement from the parent's
  ``started X (pid P)`` to the child's ``child X (pid P) running`` (connected, about to start its first
  cycle), read from the supervisor's log; one child at a time, `rounds` times;
- **restart**: the wall time of ``djsupervisor restart`` (probe, then every slot: the new child got going,
  the old one finished its job and exited), `rounds` times;
- **fresh start-up**: the same kills after the restart, whose replacements start from a fresh interpreter.

Printed as a markdown table: median (min–max), and the fresh/forked ratio. Added to RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import DB, DJS, Supervisor, env_for

_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) .*?(started|child) (bench\[\d+\]) \(pid (\d+)\)")


def start_times(log: str) -> dict[int, float]:
    """pid -> seconds from the parent's "started" line to the child's "running" line."""
    started: dict[int, float] = {}
    took: dict[int, float] = {}
    for line in log.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        when = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S.%f").timestamp()
        pid = int(match[4])
        if match[2] == "started":
            started[pid] = when
        elif line.rstrip().endswith("running") and pid in started:
            took[pid] = when - started[pid]
    return took


def kill_each(sup: Supervisor, rounds: int) -> list[int]:
    """SIGKILL every child in turn, waiting for its replacement to be running; the replacements' pids."""
    replaced = []
    for _ in range(rounds):
        for child in sorted(sup.children(), key=lambda p: p.pid):
            if "bench[" not in " ".join(child.cmdline()):
                continue
            title = " ".join(child.cmdline()).split("bench[")[1].split("]")[0]
            before = {c.pid for c in sup.children()}
            os.kill(child.pid, signal.SIGKILL)
            deadline = time.time() + 60
            while time.time() < deadline:
                log = (sup.tmp / "supervisor.log").read_text()
                new = [int(p) for p in re.findall(rf"child bench\[{title}\] \(pid (\d+)\) running", log)]
                if new and new[-1] != child.pid and new[-1] not in replaced and new[-1] not in before:
                    replaced.append(new[-1])
                    break
                time.sleep(0.02)
            time.sleep(0.5)  # the replacement has connected; let it take a job before the next kill
    return replaced


def fmt(values: list[float], digits: int = 0, scale: float = 1000) -> str:
    if not values:
        return "—"
    v = [x * scale for x in values]
    return f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f})"


def measure(db: DB, replicas: int, rounds: int) -> dict[str, list[float]]:
    prefix = f"djsbench_{uuid.uuid4().hex[:8]}_roll"
    env = env_for(db.backend, prefix, 50)
    db.seed(
        prefix, 6000, 50
    )  # more than the run uses (about 40 jobs/s for a minute), few enough for a quick first cycle
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ["DJS_BENCH_LOG_LEVEL"] = "INFO"
        sup = Supervisor(env, replicas, tmp)
        try:
            sup.wait_children()
            time.sleep(3)
            forked = kill_each(sup, rounds)
            rolls = []
            for _ in range(rounds):
                began = time.monotonic()
                answer = subprocess.run(
                    [DJS, "restart", "--socket", f"{tmp}/ctl.sock"], env=env, capture_output=True, text=True
                )
                rolls.append(time.monotonic() - began)
                if answer.returncode != 0:
                    raise RuntimeError(answer.stdout + answer.stderr)
                time.sleep(1)
            fresh = kill_each(sup, rounds)
            took = start_times((tmp / "supervisor.log").read_text())
            return {
                "forked": [took[p] for p in forked if p in took],
                "fresh": [took[p] for p in fresh if p in took],
                "roll": rolls,
            }
        finally:
            sup.stop()
            db.drop_prefix(prefix)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="mysql", choices=["mysql", "postgresql"])
    parser.add_argument("--replicas", default="2,3")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    db = DB(args.backend)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; backend {args.backend}; 50 ms jobs")
    print("| replicas | forked start (ms) | fresh start (ms) | fresh/forked | restart roll (s) |")
    print("|---|---|---|---|---|")
    for replicas in [int(n) for n in args.replicas.split(",")]:
        got = measure(db, replicas, args.rounds)
        ratio = statistics.median(got["fresh"]) / statistics.median(got["forked"]) if got["forked"] else 0
        print(
            f"| {replicas} | {fmt(got['forked'])} | {fmt(got['fresh'])} | {ratio:.1f}× | {fmt(got['roll'], 2, 1)} |",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
