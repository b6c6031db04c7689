"""`Roll` without processes: the order of a restart (surge of one, swap once the new child got going, the
next slot once the old child is gone) and where it halts, the actions carried out as the arbiter would."""

from __future__ import annotations

import itertools
import signal

import pytest

from djsupervisor.supervisor.autoscale import HostBudget
from djsupervisor.supervisor.config import SupervisorConfig, WorkerConfig
from djsupervisor.supervisor.pool import Pool, Spawn, Stop
from djsupervisor.supervisor.rolling import FIRST_CYCLE_TIMEOUT, Phase, Roll
from djsupervisor.supervisor.slot import Then
from djsupervisor.supervisor.states import SlotState

pytestmark = pytest.mark.timeout(30)

RULES = SupervisorConfig("lab", ())
_pids = itertools.count(5000)


def running_pools(*sizes: int) -> dict[str, Pool]:
    pools = {}
    for name, size in zip("ab", sizes, strict=False):
        pool = pools[name] = Pool.create(WorkerConfig(name, f"m:{name}", replicas=size), HostBudget(), "lab")
        for action in pool.reconcile(0.0, None):
            action.slot.spawned(next(_pids), -1, 0.0)
        for slot in pool.slots.values():
            slot.reported([{"cycles_done": 1}], 1.0)
    return pools


def probed_roll(*names: str) -> Roll:
    roll = Roll(1, list(names), 0.0)
    roll.probed({}, 0.5)
    return roll


def start(action) -> None:
    assert isinstance(action, Spawn)
    action.slot.spawned(next(_pids), -1, 1.0)


def gone(slot) -> None:
    """The slot's stopped child exits, as the arbiter reaps it."""
    assert slot.exited(0, RULES, 3.0, stopping=False).then is Then.RETIRE


def test_each_slot_gets_a_new_child_beside_the_old_one_then_the_old_one_stops():
    pools = running_pools(2)
    old = dict(pools["a"].slots)
    roll = probed_roll("a")
    for index in (0, 1):
        [spawn] = roll.advance(pools, 2.0)
        assert spawn.slot is not old[index] and spawn.slot.index == index
        start(spawn)
        assert roll.advance(pools, 2.1) == []  # not yet going: the old child stays in the slot
        assert pools["a"].slots[index] is old[index]
        spawn.slot.reported([{"state": "running", "cycles_done": 1}], 2.2)
        [stop] = roll.advance(pools, 2.3)
        assert isinstance(stop, Stop) and stop.slot is old[index] and stop.signal is signal.SIGTERM
        assert pools["a"].slots[index] is spawn.slot and spawn.slot.restarts == 1
        assert roll.advance(pools, 2.4) == []  # a surge of one: the next slot waits for the old child
        gone(old[index])
    assert roll.advance(pools, 3.0) == [] and roll.phase is Phase.DONE
    assert roll.rolled == {"a"} and len(roll.changes) == 2


def test_a_new_child_that_dies_halts_the_roll_and_the_slot_keeps_its_old_child():
    pools = running_pools(2)
    old = dict(pools["a"].slots)
    roll = probed_roll("a")
    [spawn] = roll.advance(pools, 2.0)
    start(spawn)
    assert roll.surge_exited("exit status 3", 3.0)
    assert roll.phase is Phase.FAILED and "a[0]" in (roll.error or "") and "exit status 3" in (roll.error or "")
    assert pools["a"].slots == old and all(s.state is SlotState.RUNNING for s in old.values())
    assert roll.advance(pools, 4.0) == [] and roll.rolled == set()  # the pool keeps forking its old code


def test_a_new_child_that_never_gets_going_is_stopped_at_the_deadline_unless_it_is_in_a_job():
    pools = running_pools(1)
    roll = probed_roll("a")
    [spawn] = roll.advance(pools, 2.0)
    start(spawn)
    spawn.slot.reported([{"state": "populating"}], 2.5)  # a first job that takes long: no deadline
    assert roll.advance(pools, 2.0 + FIRST_CYCLE_TIMEOUT + 1) == []
    spawn.slot.reported([{"state": "idle"}], 2.5)
    [stop] = roll.advance(pools, 2.0 + 3 * FIRST_CYCLE_TIMEOUT)
    assert stop.slot is spawn.slot and stop.signal is signal.SIGKILL
    assert roll.phase is Phase.FAILED and "did not start its first cycle" in (roll.error or "")


def test_a_probe_problem_moves_nothing_and_pools_without_children_are_marked_fresh():
    pools = running_pools(1, 0)
    roll = Roll(1, ["a", "b"], 0.0)
    roll.probed({"a": "m:a: cannot import 'm': RuntimeError: x (raised at m.py:3)"}, 1.0)
    assert roll.phase is Phase.FAILED and "m.py:3" in (roll.error or "")
    assert roll.advance(pools, 2.0) == []

    roll = probed_roll("b")
    assert roll.advance(pools, 2.0) == [] and roll.phase is Phase.DONE and roll.rolled == {"b"}


def test_a_slot_removed_during_the_roll_is_skipped_and_its_new_child_stopped():
    pools = running_pools(2)
    roll = probed_roll("a")
    [spawn] = roll.advance(pools, 2.0)
    start(spawn)
    pools["a"].scale(0)
    for action in pools["a"].reconcile(2.1, None):  # the pool retires both old slots
        assert isinstance(action, Stop)
    [stop] = roll.advance(pools, 2.2)
    assert stop.slot is spawn.slot
    assert roll.surge is None


def test_a_new_child_that_hangs_in_its_first_job_is_judged_as_a_pool_child_would_be():
    rules = SupervisorConfig("lab", (), heartbeat_timeout=10)
    pools = running_pools(1)
    roll = probed_roll("a")
    [spawn] = roll.advance(pools, 2.0, rules)
    start(spawn)
    spawn.slot.reported([{"state": "populating", "job_elapsed": 1.0}], 3.0)
    assert roll.advance(pools, 12.0, rules) == []  # in a job, reporting: waited for
    [stop] = roll.advance(pools, 14.0, rules)  # silent for 11 s > heartbeat_timeout
    assert stop.slot is spawn.slot and stop.signal is signal.SIGKILL
    assert roll.phase is Phase.FAILED and "no report for 11 s" in (roll.error or "")


def test_a_stop_during_the_roll_stops_the_new_child_and_ends_the_roll():
    pools = running_pools(2)
    roll = probed_roll("a")
    [spawn] = roll.advance(pools, 2.0)
    start(spawn)
    [stop] = roll.abort("supervisor stopping", 3.0)
    assert stop.slot is spawn.slot and stop.signal is signal.SIGTERM  # its job in flight, if any, finishes
    assert roll.phase is Phase.FAILED and roll.error == "interrupted: supervisor stopping"
    assert not roll.surge_exited("exit status 0", 4.0)  # its exit then changes nothing
