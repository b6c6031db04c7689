"""The slot state machine, the restart delay and the monitor's verdicts, without processes; and the monitor's
ResourceSampler: the process tree it measures is the one psutil sees, and a gone process gives None."""

from __future__ import annotations

import random
import subprocess
import sys

import psutil
import pytest
from helpers import wait_until

from djsupervisor.supervisor.config import SupervisorConfig, WorkerConfig
from djsupervisor.supervisor.monitor import ResourceSampler, judge
from djsupervisor.supervisor.slot import InvalidTransition, Slot, SlotState, restart_delay


def slot(**config) -> Slot:
    return Slot("standard", 0, WorkerConfig(name="standard", target="m:w", **config))


def test_transitions_follow_the_state_machine():
    s = slot()
    s.change(SlotState.STARTING)
    s.change(SlotState.RUNNING)
    s.change(SlotState.STOPPING)
    s.change(SlotState.STOPPED)
    with pytest.raises(InvalidTransition):
        s.change(SlotState.RUNNING)  # never without starting
    s.change(SlotState.STARTING)
    s.change(SlotState.FATAL)
    with pytest.raises(InvalidTransition):
        s.change(SlotState.BACKOFF)


def test_restart_delay_doubles_with_jitter_up_to_the_cap():
    rng = random.Random(1)
    for crashes, base in [(1, 0.25), (2, 0.5), (3, 1.0), (10, 60.0), (100, 60.0)]:
        delays = [restart_delay(crashes, 0.25, 60.0, rng) for _ in range(200)]
        assert all(base / 2 <= d <= base for d in delays)
        assert max(delays) - min(delays) > base / 4  # jittered
    assert restart_delay(0, 0.25, 60) == 0


def test_got_going_means_a_cycle_or_a_job_was_completed():
    s = slot()
    s.spawned(100, -1, now=0.0)
    assert not s.got_going()
    s.report.update(cycles_done=0, jobs_done=0, jobs_failed=1)
    assert s.got_going()
    s.exited(0, SupervisorConfig("lab", ()), now=1.0, stopping=False)
    s.spawned(101, -1, now=1.0)
    assert not s.got_going() and s.restarts == 1


def running(now: float, **config) -> Slot:
    s = slot(**config)
    s.spawned(100, -1, now)
    return s


def test_verdicts():
    now = 1000.0
    quiet = running(now - 40)
    assert judge(quiet, now, heartbeat_timeout=30, hang_timeout=600).action == "kill"

    fine = running(now)
    fine.report.update(job_elapsed=100.0, table="s.__t", key={"id": 1})
    assert judge(fine, now, heartbeat_timeout=30, hang_timeout=600) is None  # no job_timeout: a job may run long

    slow = running(now - 2, job_timeout=60)
    slow.report.update(job_elapsed=59.0, table="s.__t", key={"id": 1})
    verdict = judge(slow, now, heartbeat_timeout=30, hang_timeout=600)
    assert verdict.action == "kill" and verdict.timed_out_job == {"table": "s.__t", "key": {"id": 1}, "seconds": 60}

    stuck = running(now)
    stuck.report.update(job_elapsed=None, stalled=601.0)
    assert "hang_timeout" in judge(stuck, now, heartbeat_timeout=30, hang_timeout=600).reason

    big = running(now, max_memory_mb=100)
    big.rss_mb = 150.0
    assert judge(big, now, heartbeat_timeout=30, hang_timeout=600).action == "recycle"
    big.change(SlotState.STOPPING)
    assert judge(big, now, heartbeat_timeout=30, hang_timeout=600) is None  # already on its way out


# ----- ResourceSampler, on real processes


def _spawning(code: str) -> str:
    """Python code that holds 20 MB, starts `code` in a new interpreter and sleeps."""
    return (
        f"import subprocess, sys, time; ballast = b'x' * (20 * 2**20); "
        f"subprocess.Popen([sys.executable, '-c', {code!r}]); time.sleep(60)"
    )


@pytest.mark.timeout(30)
def test_sampler_measures_the_whole_tree_and_forgets_the_gone():
    leaf = "import time; ballast = b'x' * (20 * 2**20); time.sleep(60)"
    root = subprocess.Popen([sys.executable, "-c", _spawning(_spawning(leaf))])
    tree = psutil.Process(root.pid)
    try:
        wait_until(lambda: len(tree.children(recursive=True)) == 2, 10, message="root, child and grandchild")
        sampler = ResourceSampler()
        assert {p.pid for p in sampler._descendants(tree)} == {p.pid for p in tree.children(recursive=True)}
        rss, cpu = sampler.sample(root.pid)
        assert rss > 3 * 20 and cpu >= 0
    finally:
        for member in tree.children(recursive=True):
            member.kill()
        root.kill()
        root.wait()
    assert sampler.sample(root.pid) is None
