"""The slot's state machine driven by hypothesis through every path: spawns, failed forks, reports, exits
of every kind under each restart policy, stops of every intent, time passing. No processes, no database:
`Slot` is pure, so a model of a few counters checks it step by step."""

from __future__ import annotations

import re
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from djsupervisor.supervisor import states
from djsupervisor.supervisor.config import SupervisorConfig, WorkerConfig
from djsupervisor.supervisor.fork import EXIT_RECYCLE
from djsupervisor.supervisor.slot import InvalidTransition, Slot, Then
from djsupervisor.supervisor.states import (
    DOWN_AFTER_EXIT,
    LIVE,
    TRANSITIONS,
    SlotState,
    StopIntent,
    StopMode,
    SupervisorState,
)

pytestmark = pytest.mark.timeout(120)

EXIT_CODES = (0, 1, 70, EXIT_RECYCLE, -signal.SIGKILL, -signal.SIGTERM)


def reachable() -> set[SlotState]:
    """The states the transition table reaches from STOPPED."""
    seen, todo = {SlotState.STOPPED}, [SlotState.STOPPED]
    while todo:
        for state in TRANSITIONS[todo.pop()]:
            if state not in seen:
                seen.add(state)
                todo.append(state)
    return seen


REACHABLE = reachable()


def present(machine: SlotMachine) -> bool:
    return not machine.removed


def may_start(machine: SlotMachine) -> bool:
    """Whether the pool would start a child now (never once the supervisor is stopping)."""
    return not machine.removed and not machine.stopping


class SlotMachine(RuleBasedStateMachine):
    """One slot, used as `Pool` and the arbiter use it, and what the module docstrings say it must do.

    Once the supervisor stops (`supervisor_stops`) nothing is started any more; once the slot is retired
    and has no child it is out of its pool (`removed`) and nothing happens to it any more.
    """

    @initialize(
        policy=st.sampled_from(["always", "on-failure", "never"]),
        backoff_initial=st.sampled_from([0.0, 0.01, 0.25, 1.0]),
        backoff_max=st.sampled_from([0.5, 5.0, 60.0]),
        stable_after=st.sampled_from([0.0, 5.0, 60.0]),
        fatal_after=st.integers(1, 4),
    )
    def setup(self, policy, backoff_initial, backoff_max, stable_after, fatal_after):
        self.rules = SupervisorConfig(
            "lab",
            (),
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            stable_after=stable_after,
            fatal_after=fatal_after,
        )
        self.slot = Slot("w", 0, WorkerConfig("w", "m:w", restart=policy, max_jobs=10))
        self.now = 1000.0
        self.next_pid = 100
        self.spawns = 0
        self.early = 0  # the model's count of exits in a row before getting going
        self.crashes = 0
        self.stopping = False  # the supervisor is stopping
        self.removed = False  # retired and gone from its pool

    # ----- spawning

    def _spawn(self) -> None:
        self.slot.spawned(self.next_pid, 3, self.now)
        self.next_pid += 1
        self.spawns += 1
        assert self.slot.state is SlotState.STARTING and self.slot.restarts == self.spawns - 1
        assert self.slot.stop_intent is StopIntent.STAY and not self.slot.got_going()

    @precondition(lambda self: may_start(self) and self.slot.due(self.now))
    @rule()
    def spawn_when_due(self):
        assert self.slot.state in (SlotState.STOPPED, SlotState.BACKOFF)
        self._spawn()

    @precondition(lambda self: may_start(self) and self.slot.pid is None and self.slot.state in DOWN_AFTER_EXIT)
    @rule()
    def roll(self):
        """A reload rolls a slot that is down after an exit: reset, then spawn (what `Pool._roll` does)."""
        self.slot.reset()
        self.early = self.crashes = 0
        self._spawn()

    @precondition(lambda self: present(self) and self.slot.state is SlotState.FATAL and self.slot.early_exits)
    @rule()
    def fatal_is_not_respawned_until_reset(self):
        with pytest.raises(InvalidTransition):
            self.slot.spawned(self.next_pid, 3, self.now)
        assert self.slot.state is SlotState.FATAL and self.slot.pid is None

    @precondition(lambda self: may_start(self) and self.slot.due(self.now))
    @rule()
    def fork_fails(self):
        outcome = self.slot.spawn_failed(self.rules, self.now)
        self._expect_crash(outcome, got_going=False)

    @precondition(lambda self: may_start(self) and self.slot.due(self.now))
    @rule()
    def start_fails_for_want_of_descriptors(self):
        """EMFILE in the parent is not the worker's fault: a backoff, never nearer to FATAL."""
        outcome = self.slot.spawn_failed(self.rules, self.now, "no descriptor for its report pipe", shortage=True)
        assert self.slot.early_exits == self.early and self.slot.state is SlotState.BACKOFF
        assert outcome.then is Then.BACKOFF and outcome.level == "ERROR" and not outcome.recover
        self.crashes += 1
        base = min(self.rules.backoff_max, self.rules.backoff_initial * 2 ** (self.crashes - 1))
        assert base / 2 - 1e-9 <= outcome.restart_at - self.now <= base + 1e-9

    # ----- a live child

    @precondition(lambda self: self.slot.pid is not None)
    @rule(got_going=st.booleans())
    def report(self, got_going):
        before = self.slot.state
        report = {"cycles_done": 1, "jobs_done": 2} if got_going else {"state": "idle", "cycles_done": 0}
        changed = self.slot.reported([report], self.now)
        assert self.slot.last_report == self.now
        becomes_running = before is SlotState.STARTING and self.slot.got_going()
        assert changed == becomes_running
        if becomes_running:
            assert self.slot.state is SlotState.RUNNING and self.slot.early_exits == 0
            self.early = 0

    @precondition(lambda self: self.slot.pid is not None)
    @rule(code=st.sampled_from(EXIT_CODES), stopping=st.booleans())
    def exit(self, code, stopping):
        """The child exits; `stopping` also says the supervisor is stopping when it is not (the arbiter
        never lets that happen to a child that is not STOPPING, but the branch is there)."""
        stopping = stopping or self.stopping
        slot = self.slot
        before, intent, got_going = slot.state, slot.stop_intent, slot.got_going()
        uptime = self.now - slot.started
        outcome = slot.exited(code, self.rules, self.now, stopping=stopping)
        assert slot.pid is None and slot.pipe_fd is None
        if before is SlotState.STOPPING:  # the stop's intent decides, never the restart rules
            assert slot.state is SlotState.STOPPED
            expected = {StopIntent.RETIRE: Then.RETIRE, StopIntent.STAY: Then.STAY}.get(intent)
            assert outcome.then is (expected or (Then.STAY if stopping else Then.RESPAWN))
            assert outcome.recover == (code != 0 and outcome.then is not Then.RESPAWN)
            self.removed = outcome.then is Then.RETIRE
            if outcome.then is Then.RESPAWN:  # at once, as the arbiter does
                self._spawn()
            return
        if stopping:
            assert slot.state is SlotState.EXITED and outcome.then is Then.STAY
            assert outcome.recover == (code != 0)
            return
        if code == EXIT_RECYCLE:
            assert slot.state is SlotState.BACKOFF and outcome.restart_at == self.now and slot.due(self.now)
            return
        policy = slot.config.restart
        if policy == "never" or (policy == "on-failure" and code == 0):
            assert slot.state is SlotState.EXITED and outcome.then is Then.STAY and "not restarted" in outcome.message
            assert outcome.recover == (code != 0)
            return
        if uptime >= self.rules.stable_after or (code == 0 and got_going):
            self.crashes = 0
        self._expect_crash(outcome, got_going)

    def _expect_crash(self, outcome, got_going: bool) -> None:
        """An exit the restart rules handle: only exits before getting going count towards FATAL."""
        self.early = 0 if got_going else self.early + 1
        assert self.slot.early_exits == self.early
        if self.early >= self.rules.fatal_after:
            assert self.slot.state is SlotState.FATAL and outcome.then is Then.STAY and outcome.recover
            assert outcome.level == "ERROR" and "FATAL" in outcome.message
            return
        self.crashes += 1
        assert self.slot.state is SlotState.BACKOFF and outcome.then is Then.BACKOFF
        delay = outcome.restart_at - self.now
        if self.crashes == 1 and got_going:  # a child that got going is replaced at once after one crash
            assert delay == 0
        else:
            base = min(self.rules.backoff_max, self.rules.backoff_initial * 2 ** (self.crashes - 1 - got_going))
            assert base / 2 - 1e-9 <= delay <= base + 1e-9, (delay, base)
        assert self.slot.next_start == outcome.restart_at

    # ----- stops

    @precondition(lambda self: self.slot.pid is not None)
    @rule(fast=st.booleans())
    def recycle_or_kill(self, fast):
        """The monitor's verdicts and a roll stop a working child to respawn it."""
        self._stop(StopIntent.RESPAWN, fast)

    @precondition(present)
    @rule()
    def retire(self):
        """Shrink, drain, definition removed."""
        self._stop(StopIntent.RETIRE, False)
        if self.slot.pid is None:  # the pool takes it out at once
            self.removed = True

    @precondition(present)
    @rule(fast=st.booleans())
    def supervisor_stops(self, fast):
        self.stopping = True
        self._stop(StopIntent.STAY, fast)

    def _stop(self, intent: StopIntent, fast: bool) -> None:
        slot = self.slot
        before, old_intent, had_child = slot.state, slot.stop_intent, slot.pid is not None
        sent = slot.stop("test", intent, fast=fast)
        if before is SlotState.STOPPING:
            assert slot.stop_intent == max(old_intent, intent)  # a stop under way only gets stronger
        else:
            assert slot.stop_intent is intent
        if not had_child:
            assert sent is None and slot.state is SlotState.STOPPED
        elif fast:
            assert sent is signal.SIGKILL and slot.state is SlotState.STOPPING and slot.kill_reason
        else:
            assert sent == (None if before is SlotState.STOPPING else signal.SIGTERM)
            assert slot.state is SlotState.STOPPING and slot.stop_reason

    @precondition(lambda self: self.slot.pid is not None)
    @rule()
    def graceful_stop_runs_out_of_time(self):
        stopping = self.slot.state is SlotState.STOPPING
        assert self.slot.stop_overdue(self.slot.pid, "graceful_timeout") == stopping
        assert self.slot.stop_overdue(-1, "another child") is False

    @rule(seconds=st.sampled_from([0.0, 0.1, 1.0, 30.0, 120.0]))
    def time_passes(self, seconds):
        self.now += seconds

    # ----- always

    @invariant()
    def state_is_one_the_table_reaches(self):
        assert self.slot.state in REACHABLE

    @invariant()
    def a_child_exactly_in_the_live_states(self):
        assert (self.slot.pid is not None) == (self.slot.state in LIVE)

    @invariant()
    def down_for_good_is_never_due(self):
        if self.slot.state in (SlotState.FATAL, SlotState.EXITED):
            assert not self.slot.due(self.now + 1e9)

    @invariant()
    def early_exits_below_fatal_after_unless_fatal(self):
        if self.slot.state is not SlotState.FATAL and not self.stopping and not self.removed:
            assert self.slot.early_exits < self.rules.fatal_after


TestSlotMachine = SlotMachine.TestCase
TestSlotMachine.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# ----- the table itself


def docstring_edges() -> set[tuple[SlotState, SlotState]]:
    """The edges the states module's docstring lists ("SOURCE ──▶ TARGET | TARGET ...", source carried over)."""
    edges, source = set(), None
    for line in states.__doc__.splitlines():
        match = re.match(r"^\s+([A-Z]+)?\s*──▶ ([A-Z |]+?)\s{2,}", line + "  ")
        if not match:
            continue
        source = SlotState[match.group(1)] if match.group(1) else source
        edges |= {(source, SlotState[name.strip()]) for name in match.group(2).split("|")}
    return edges


def test_the_docstring_lists_exactly_the_transition_table():
    table = {(old, new) for old, targets in TRANSITIONS.items() for new in targets}
    assert docstring_edges() == table


def test_dead_edges_are_gone():
    assert SlotState.BACKOFF not in TRANSITIONS[SlotState.STOPPING]  # a stop's intent decides, not backoff
    assert SlotState.FATAL not in TRANSITIONS[SlotState.BACKOFF]  # a failed fork goes through STARTING
    assert SlotState.FATAL not in TRANSITIONS[SlotState.RUNNING]  # got going: early exits start over
    assert set(SlotState) == REACHABLE


@given(st.sampled_from(list(StopIntent)), st.sampled_from(list(StopIntent)))
def test_stop_intents_are_ordered_weakest_first(first, second):
    assert StopIntent.RESPAWN < StopIntent.RETIRE < StopIntent.STAY
    assert max(first, second) is (first if first >= second else second)


def test_supervisor_states_and_stop_modes():
    assert [s.value for s in SupervisorState] == ["starting", "running", "reloading", "stopping"]
    assert SupervisorState.RUNNING == "running"  # a str enum: the status JSON and old readers see the string
    assert StopMode.GRACEFUL < StopMode.FAST
