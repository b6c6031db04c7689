"""The benchmarks still run: bench/run.py's harness (graceful stop and start to READY, --small) on MariaDB,
and the cost-growth probe of a real worker cycle on both backends. A smoke test, not a measurement: the
full `bench/run.py --small` takes about a minute per backend, too long for every CI run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.timeout(120)
def test_bench_run_small_writes_the_table(tmp_path):
    out = tmp_path / "results.md"
    done = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--small", "--backend", "mysql", "--only", "3,4", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    assert "| mysql | 3. graceful stop" in table and "< 500 ms" in table
    assert "| mysql | 4. footprint, 4 idle children: launch → READY=1 (ms) |" in table


@pytest.mark.timeout(120)
def test_cost_growth_times_every_step_of_a_cycle(backend):
    done = subprocess.run(
        [sys.executable, str(BENCH / "cost_growth.py"), "--backend", backend, "--sizes", "500,1000", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split(" | ")[1]: line for line in done.stdout.splitlines() if line.startswith(f"| {backend} |")}
    for step in ("recovery", "refresh", "populate", "reserve per job", "complete per job", "heartbeat", "WorkerLog"):
        assert f"6. cycle step: {step} (ms, statements)" in rows, done.stdout
    # every planted orphan, stale reservation and transient error was recovered in the measured cycles
    assert "re-pended/cleared per cycle: 500: 100/50, 1000: 100/50" in done.stdout, done.stdout


@pytest.mark.timeout(120)
def test_first_refresh_compares_datajoints_refresh_with_the_bulk_one(backend):
    done = subprocess.run(
        [sys.executable, str(BENCH / "first_refresh.py"), "--backend", backend, "--keys", "2000", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = [line for line in done.stdout.splitlines() if line.startswith(f"| {backend} | 2,000 |")]
    assert row.endswith("× |"), row


@pytest.mark.timeout(120)
def test_progress_cost_counts_a_table_in_a_few_statements(backend):
    done = subprocess.run(
        [sys.executable, str(BENCH / "progress_cost.py"), "--backend", backend, "--keys", "3000", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        line.split(" | ")[1]: line.split(" | ")
        for line in done.stdout.splitlines()
        if line.startswith(f"| {backend} |")
    }
    assert rows["progress on a 3,000-key table"][3].strip(" |") == "5"
    assert rows["errors on a 3,000-key table"][3].strip(" |") == "6"
    counted = next(cells[1] for name, cells in rows.items() if name.startswith("(counted"))
    assert "total 3000, done 1500, remaining 390, reserved 100, error 1000, ignore 10" in counted


@pytest.mark.timeout(300)
def test_fleet_scale_compares_workers_with_plain_loops_and_times_the_first_job():
    done = subprocess.run(
        [sys.executable, str(BENCH / "fleet_scale.py"), "--backend", "mysql", "--small", "--part", "scaling,first-job"],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    scaling = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| mysql | 2 |")]
    assert len(scaling) == 1 and len(scaling[0]) == 12, done.stdout
    first = [line for line in done.stdout.splitlines() if line.startswith("| mysql | 12,000 |")]
    assert [line.split(" | ")[2] for line in first] == [
        "before (whole refresh first)",
        "after (first batch, then jobs)",
    ]
