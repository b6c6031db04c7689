"""A child that dies in a job is the job's failure, not the slot's: no FATAL, no restart delay, and the job
goes to the next child with how the child died. Pure: `Slot` alone, no processes."""

from __future__ import annotations

import signal

import pytest

from djsupervisor.supervisor.config import SupervisorConfig, WorkerConfig
from djsupervisor.supervisor.slot import Slot, Then
from djsupervisor.supervisor.states import SlotState, StopIntent

pytestmark = pytest.mark.timeout(30)

RULES = SupervisorConfig("lab", (), fatal_after=3)
JOB = {"table": "lab.__square", "key": {"source_id": 7}}


def started(slot: Slot, pid: int, now: float) -> Slot:
    slot.spawned(pid, -1, now)
    return slot


def in_job(slot: Slot, now: float) -> None:
    """The child reports the start of a job (its first: it has not got going yet)."""
    slot.reported([{"state": "populating", **JOB, "job_elapsed": 0.0}], now)


def test_deaths_in_a_job_never_make_a_slot_fatal_and_are_replaced_at_once():
    slot = Slot("w", 0, WorkerConfig("w", "m:w"))
    for n in range(10):  # far beyond fatal_after
        started(slot, 100 + n, now=float(n))
        in_job(slot, n + 0.1)
        slot.rss_mb = 3174.4
        outcome = slot.exited(-signal.SIGKILL, RULES, n + 0.5, stopping=False)
        assert outcome.then is Then.BACKOFF and outcome.restart_at == n + 0.5  # at once
        assert slot.state is SlotState.BACKOFF and slot.early_exits == 0
        assert slot.died_job == {**JOB, "pid": 100 + n, "kind": "died", "reason": "killed by SIGKILL, RSS 3.1 GiB"}
    started(slot, 200, now=20.0)
    assert slot.died_job is None  # handed to that child


def test_deaths_before_any_job_still_make_a_slot_fatal():
    slot = Slot("w", 0, WorkerConfig("w", "m:w"))
    for n in range(3):
        started(slot, 100 + n, now=float(n))
        outcome = slot.exited(1, RULES, n + 0.5, stopping=False)
        assert slot.died_job is None
    assert outcome.then is Then.STAY and slot.state is SlotState.FATAL


def test_a_job_timeout_kill_and_a_graceful_stop_that_ran_over():
    slot = started(Slot("w", 0, WorkerConfig("w", "m:w", job_timeout=60)), 100, now=0.0)
    in_job(slot, 0.1)
    slot.timed_out_job = {**JOB, "seconds": 60}
    assert slot.stop("ran 61 s > job_timeout 60 s", StopIntent.RESPAWN, fast=True) is signal.SIGKILL
    assert slot.exited(-signal.SIGKILL, RULES, 61.0, stopping=False).then is Then.RESPAWN
    assert slot.died_job == {**JOB, "pid": 100, "kind": "timeout", "reason": "after 60 s"}

    started(slot, 101, now=62.0)
    in_job(slot, 62.1)
    assert slot.stop("supervisor stopping", StopIntent.STAY) is signal.SIGTERM
    assert slot.stop_overdue(101, "graceful_timeout 30 s passed")
    outcome = slot.exited(-signal.SIGKILL, RULES, 95.0, stopping=True)
    assert outcome.then is Then.STAY and outcome.recover
    assert slot.died_job is not None and slot.died_job["kind"] == "stopped"  # not counted against the job


def test_a_child_that_got_going_is_replaced_at_once_once_then_backs_off():
    slot = started(Slot("w", 0, WorkerConfig("w", "m:w")), 100, now=0.0)
    slot.reported([{"cycles_done": 1, "state": "sleeping"}], 0.5)
    assert slot.exited(-signal.SIGKILL, RULES, 1.0, stopping=False).restart_at == 1.0
    started(slot, 101, now=1.0)
    slot.reported([{"cycles_done": 1, "state": "sleeping"}], 1.5)
    outcome = slot.exited(-signal.SIGKILL, RULES, 2.0, stopping=False)  # a second crash in a row
    assert outcome.restart_at is not None and outcome.restart_at > 2.0


def test_a_make_that_kills_every_process_makes_the_slot_fatal_after_fatal_after_different_jobs():
    slot = Slot("w", 0, WorkerConfig("w", "m:w"))
    for n in range(3):  # a broken deploy: each fresh child dies in its first job, each on another key
        started(slot, 100 + n, now=float(n))
        slot.reported([{"state": "populating", "table": "lab.__square", "key": {"source_id": n}}], n + 0.1)
        outcome = slot.exited(-signal.SIGSEGV, RULES, n + 0.5, stopping=False)
    assert outcome.then is Then.STAY and slot.state is SlotState.FATAL and outcome.recover
    assert "died in 3 different jobs in a row" in outcome.message.format(*outcome.args)
    assert slot.died_job is not None  # the recovery run settles it


def test_a_completed_job_in_between_starts_the_count_over():
    slot = Slot("w", 0, WorkerConfig("w", "m:w"))
    for n in range(6):
        started(slot, 100 + n, now=float(n))
        if n % 2:  # every other child completes a job before it dies in the next one
            slot.reported([{"jobs_done": 1}], n + 0.05)
        slot.reported([{"state": "populating", "table": "lab.__square", "key": {"source_id": n}}], n + 0.1)
        assert slot.exited(-signal.SIGSEGV, RULES, n + 0.5, stopping=False).then is Then.BACKOFF
