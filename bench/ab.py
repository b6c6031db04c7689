"""No-regression A/B: this checkout's djsupervisor against another checkout's, on figure 1's throughput cells.

A merge is judged against the code it replaced, side by side in one invocation, on one machine: RESULTS.md's
figures come from other days and other machines (a 2-CPU machine here ran figure 1 at 0.6-0.8x of the one
behind RESULTS.md), and one figure-1 run of 3 rounds spreads ±10-20 % at 5 ms jobs on 2 busy CPUs. Here the
two sides alternate (B, A, A, B, B, A, ...: each side first as often as second) over more rounds, on the same
bench pipeline (this checkout's bench/bench_pipeline.py), and the ratio is this side's median over the
baseline's.

    git worktree add /tmp/djs-base <commit> && python3 -m venv /tmp/djs-base/.venv \\
        && /tmp/djs-base/.venv/bin/pip install -e '/tmp/djs-base[postgres]'
    .venv/bin/python bench/ab.py --baseline /tmp/djs-base [--backend both] [--replicas 1,2,4] [--ms 5]
        [--rounds 8] [--window 4]

The baseline is the ``djsupervisor`` console script of ``BASELINE/.venv`` (or ``--baseline-command``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run  # noqa: E402  (bench/ is not a package)


def rate(db: run.DB, command: str, replicas: int, ms: float, window: float, prefix: str) -> float:
    """Jobs/s of `replicas` children of the supervisor `command`: figure 1's cell (`run.throughput`)."""
    run.DJS = command  # run.Supervisor launches run.DJS
    try:
        return run.throughput(
            db, "djsupervisor", replicas, ms, window, int(window * replicas * 1000 / ms * 1.5) + 200, prefix
        )
    finally:
        db.drop_prefix(prefix)


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="the other checkout (its .venv/bin/djsupervisor is run)")
    parser.add_argument("--baseline-command", help="the baseline's djsupervisor executable, instead of --baseline")
    parser.add_argument("--backend", default="both", choices=["mysql", "postgresql", "both"])
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--window", type=float, default=4.0)
    args = parser.parse_args()
    baseline = args.baseline_command or (args.baseline and str(args.baseline / ".venv" / "bin" / "djsupervisor"))
    if not baseline or not os.access(baseline, os.X_OK):
        parser.error(f"no baseline djsupervisor to run: {baseline or 'give --baseline or --baseline-command'}")
    baseline = os.path.abspath(baseline)  # the supervisors run in bench/
    sides = {"this": run.DJS, "baseline": baseline}
    print(f"- this: {sides['this']}\n- baseline: {baseline}\n- load average at the start: {os.getloadavg()[0]:.2f}")
    print(f"\n| backend | replicas, {args.ms:g} ms jobs | this (jobs/s) | baseline (jobs/s) | ratio |")
    print("|---|---|---|---|---|")
    for backend in ["mysql", "postgresql"] if args.backend == "both" else [args.backend]:
        db = run.DB(backend)
        base = f"djsbench_ab_{os.getpid()}"
        for replicas in (int(x) for x in args.replicas.split(",")):
            got: dict[str, list[float]] = {"this": [], "baseline": []}
            for n in range(args.rounds):
                order = ("baseline", "this") if n % 4 in (0, 3) else ("this", "baseline")
                for side in order:
                    got[side].append(rate(db, sides[side], replicas, args.ms, args.window, f"{base}_{n}_{side}"))
            ratio = statistics.median(got["this"]) / statistics.median(got["baseline"])
            line = f"| {backend} | {replicas} | {cell(got['this'])} | {cell(got['baseline'])} | {ratio:.3f} |"
            print(line, flush=True)
    print(f"\n- load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
