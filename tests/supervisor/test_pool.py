"""`Pool.reconcile` and `Pool.reconfigure` without processes: the actions a pool asks for, carried out here
the way the arbiter would (a Spawn gives the slot a child, a Stop is a signal sent)."""

from __future__ import annotations

import dataclasses
import itertools
import signal

import pytest

from djsupervisor.supervisor.autoscale import HostBudget
from djsupervisor.supervisor.config import SupervisorConfig, WorkerConfig
from djsupervisor.supervisor.pool import Pool, Spawn, Stop
from djsupervisor.supervisor.settings import REPLICAS_LIMIT
from djsupervisor.supervisor.slot import Then
from djsupervisor.supervisor.states import SlotState, StopIntent

pytestmark = pytest.mark.timeout(30)

RULES = SupervisorConfig("lab", (), fatal_after=2)
WORKER = WorkerConfig("w", "m:w", replicas=3)
_pids = itertools.count(1000)


def spawn(pool: Pool, slot, now: float = 0.0) -> None:
    """What the arbiter's `_spawn` does to the slot when the fork works."""
    slot.config = pool.config
    slot.spawned(next(_pids), -1, now)


def carry_out(pool: Pool, actions, now: float = 0.0) -> list[tuple]:
    """Spawn what is to be spawned; the actions as (kind, slot index, signal, reason)."""
    done = []
    for action in actions:
        if isinstance(action, Spawn):
            spawn(pool, action.slot, now)
            done.append(("spawn", action.slot.index))
        else:
            assert isinstance(action, Stop) and action.slot.state is SlotState.STOPPING
            done.append(("stop", action.slot.index, action.signal, action.reason))
    return done


def running_pool(worker: WorkerConfig = WORKER) -> Pool:
    pool = Pool.create(worker, HostBudget(), "lab")
    carry_out(pool, pool.reconcile(0.0, None))
    for slot in pool.slots.values():
        assert slot.reported([{"cycles_done": 1}], 1.0)
    return pool


def exit_(pool: Pool, index: int, code: int = 0, now: float = 5.0) -> Then:
    """The child of slot `index` exits; a retired slot leaves the pool, as the arbiter does."""
    slot = pool.slots[index]
    outcome = slot.exited(code, RULES, now, stopping=False)
    if outcome.then is Then.RETIRE:
        pool.remove(slot)
    return outcome.then


def test_a_new_pool_adds_and_starts_its_slots_once():
    pool = Pool.create(WORKER, HostBudget(), "lab")
    assert carry_out(pool, pool.reconcile(0.0, None)) == [("spawn", 0), ("spawn", 1), ("spawn", 2)]
    assert [s.state for s in pool.active()] == [SlotState.STARTING] * 3
    assert pool.reconcile(0.0, None) == []
    assert not pool.connected()
    for slot in pool.slots.values():
        slot.reported([{"connection_ids": [1]}], 0.5)
    assert pool.connected()


def test_shrinking_retires_the_highest_slots_and_keeps_their_job_counts():
    pool = running_pool()
    pool.slots[2].reported([{"jobs_done": 7, "jobs_failed": 1}], 2.0)
    pool.scale(1)
    stops = carry_out(pool, pool.reconcile(3.0, None))
    assert stops == [
        ("stop", 1, signal.SIGTERM, "pool shrunk to 1"),
        ("stop", 2, signal.SIGTERM, "pool shrunk to 1"),
    ]
    assert [s.index for s in pool.active()] == [0] and pool.reconcile(3.0, None) == []  # stopped once
    assert exit_(pool, 2) is Then.RETIRE and exit_(pool, 1) is Then.RETIRE
    assert sorted(pool.slots) == [0]
    assert (pool.jobs_done_retired, pool.jobs_failed_retired) == (7, 1)
    pool.scale(2)
    assert carry_out(pool, pool.reconcile(6.0, None)) == [("spawn", 1)]  # the lowest free index


def test_a_drain_flag_stops_every_slot_and_a_slot_without_a_child_leaves_at_once():
    pool = running_pool()
    assert exit_(pool, 1, code=1) is Then.BACKOFF  # no child now, restarting later
    stops = carry_out(pool, pool.reconcile(5.0, "drain"))
    assert stops == [
        ("stop", 0, signal.SIGTERM, "drained by a fleet flag"),
        ("stop", 2, signal.SIGTERM, "drained by a fleet flag"),
    ]
    assert sorted(pool.slots) == [0, 2]  # slot 1 had no child: removed without a signal
    assert pool.active() == []


def test_a_slot_is_restarted_once_its_restart_delay_passed():
    pool = running_pool()
    # a child that got going is replaced at once after a crash
    assert exit_(pool, 0, code=1, now=5.0) is Then.BACKOFF and pool.slots[0].next_start == 5.0
    assert carry_out(pool, pool.reconcile(5.0, None), now=5.0) == [("spawn", 0)]
    # its replacement crashes too before getting going: now the restart delay runs
    assert exit_(pool, 0, code=1, now=6.0) is Then.BACKOFF
    due = pool.slots[0].next_start
    assert 6.0 + RULES.backoff_initial <= due <= 6.0 + 2 * RULES.backoff_initial
    assert pool.reconcile(6.0, None) == []
    assert carry_out(pool, pool.reconcile(due, None)) == [("spawn", 0)]
    assert pool.slots[0].restarts == 2


def test_a_changed_definition_rolls_one_slot_at_a_time_in_index_order():
    pool = running_pool()
    pool.reconfigure(dataclasses.replace(WORKER, max_jobs=5), HostBudget())
    assert pool.config.max_jobs == 5 and all(s.config.max_jobs is None for s in pool.slots.values())
    order = []
    for step in range(3):
        actions = carry_out(pool, pool.reconcile(10.0 + step, None))
        assert actions == [("stop", step, signal.SIGTERM, "worker definition changed")]
        assert pool.reconcile(10.0 + step, None) == []  # the next one waits for this one
        slot = pool.slots[step]
        assert slot.rolled and slot.stop_intent is StopIntent.RESPAWN
        assert exit_(pool, step) is Then.RESPAWN
        spawn(pool, slot, 11.0 + step)  # the arbiter respawns it at once, on the new definition
        assert pool.reconcile(11.0 + step, None) == []  # rolled but not running yet: the roll waits
        slot.reported([{"cycles_done": 1}], 11.5 + step)
        order.append(step)
        assert not slot.rolled and slot.config.max_jobs == 5
    assert order == [0, 1, 2] and pool.reconcile(20.0, None) == []


def test_a_roll_starts_slots_that_are_down_at_once_and_stops_one_running_child():
    pool = running_pool()
    fatal = pool.slots[0]
    fatal.exited(1, RULES, 2.0, stopping=False)
    while fatal.state is SlotState.BACKOFF:  # its next children never get going: FATAL after fatal_after
        spawn(pool, fatal, 3.0)
        fatal.exited(1, RULES, 3.0, stopping=False)
    assert fatal.state is SlotState.FATAL and pool.reconcile(4.0, None) == []
    pool.reconfigure(dataclasses.replace(WORKER, restart="on-failure"), HostBudget())
    actions = carry_out(pool, pool.reconcile(5.0, None))
    # the FATAL slot starts on the new definition (its exits forgotten); the first running one is stopped
    assert actions == [("spawn", 0), ("stop", 1, signal.SIGTERM, "worker definition changed")]
    assert pool.slots[0].state is SlotState.STARTING and pool.slots[0].early_exits == 0


def test_a_removed_definition_retires_every_slot_then_the_pool_is_gone():
    pool = running_pool()
    assert exit_(pool, 2, code=1) is Then.BACKOFF
    pool.reconfigure(None, HostBudget())
    assert pool.config is None
    stops = carry_out(pool, pool.reconcile(6.0, None))
    assert [s[:2] for s in stops] == [("stop", 0), ("stop", 1)] and {s[3] for s in stops} == {
        "worker definition removed"
    }
    assert not pool.gone
    exit_(pool, 0)
    exit_(pool, 1)
    assert pool.gone


def test_reconfigure_resizes_and_a_readded_definition_takes_its_size():
    pool = running_pool()
    pool.reconfigure(dataclasses.replace(WORKER, replicas=5), HostBudget())
    assert pool.replicas == 5
    assert carry_out(pool, pool.reconcile(6.0, None)) == [("spawn", 3), ("spawn", 4)]
    pool.reconfigure(None, HostBudget())
    pool.reconfigure(dataclasses.replace(WORKER, replicas=2), HostBudget())  # back before the slots retired
    assert pool.replicas == 2 and pool.config.replicas == 2


def test_a_stop_during_a_stop_only_gets_stronger():
    pool = running_pool()
    slot = pool.slots[0]
    assert carry_out(pool, pool.stop(slot, "recycle", StopIntent.RESPAWN)) == [("stop", 0, signal.SIGTERM, "recycle")]
    assert pool.stop(slot, "shrink", StopIntent.RETIRE) == []  # already stopping: no second SIGTERM
    assert slot.stop_intent is StopIntent.RETIRE
    assert carry_out(pool, pool.stop(slot, "again", StopIntent.RESPAWN, fast=True)) == [
        ("stop", 0, signal.SIGKILL, "again")
    ]
    assert slot.stop_intent is StopIntent.RETIRE and slot.stop_reason == "recycle" and slot.kill_reason == "again"


def test_no_pool_grows_past_the_replicas_limit():
    pool = running_pool()
    for n in (REPLICAS_LIMIT + 1, 10**12):
        with pytest.raises(ValueError, match=f"replicas must be <= {REPLICAS_LIMIT} \\(children per pool\\), got {n}"):
            pool.scale(n)
    assert pool.replicas == 3
    pool.scale(REPLICAS_LIMIT)
    pool.resize_by(1)  # SIGTTIN at the limit: nothing
    assert pool.replicas == REPLICAS_LIMIT
