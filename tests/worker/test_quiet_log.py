"""Issue 19, the first hour: a worker is quiet by default. Idle cycles are DEBUG lines (one INFO line when it
goes idle, one when it finds work again), and a failed job is one ERROR line naming its table and key."""

from __future__ import annotations

import subprocess

import pytest
from helpers import djsupervisor_command, write_config
from pipelines.lab import declare

pytestmark = pytest.mark.timeout(120)


def run_worker(db, tmp_path, *extra: str) -> list[str]:
    config = write_config(
        tmp_path / "lab.toml",
        """
        [[worker]]
        name = "standard"
        target = "pipelines.supervised:standard"
        max_idled_cycle = 3
        sleep_duration = 0
    """,
    )
    result = subprocess.run(
        [*djsupervisor_command(), "run", "standard", "-c", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=90,
        env=db.env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr.splitlines()


def test_idle_cycles_are_debug_and_a_failed_job_is_one_error_line(db, tmp_path):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed([1, 2])
    pipe.seed([3], fail="bad source 3")
    lines = run_worker(db, tmp_path)
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1, "\n".join(lines)
    assert "__square" in errors[0] and "{'source_id': 3}" in errors[0] and "ValueError: bad source 3" in errors[0]
    cycles = [line for line in lines if "cycle " in line and " done in " in line]
    assert len(cycles) == 1 and "2 jobs done, 1 failed" in cycles[0], "\n".join(lines)  # the busy one only
    assert sum("idle from cycle 2" in line for line in lines) == 1, "\n".join(lines)

    debug = run_worker(db, tmp_path, "--log-level", "DEBUG")  # the idle cycles are there at DEBUG
    assert sum(" DEBUG " in line and " done in " in line for line in debug) >= 3, "\n".join(debug)
