"""The parent's side of the fleet agent, driven through its narrow interface without a supervisor: a real
forked agent with no pools (so it needs no database) answers each command the link writes."""

from __future__ import annotations

import dataclasses
import os
import selectors
import time
from collections.abc import Callable

import pytest
from helpers import agent_child

from djsupervisor.fleet.agent import AgentSpec
from djsupervisor.fleet.link import FleetAgentLink
from djsupervisor.protocol import AgentReport

pytestmark = pytest.mark.timeout(60)


def fork(child: Callable[[list[int]], None]) -> int | None:
    """What the supervisor's fork does, minus its bookkeeping: the child runs `child` and never returns."""
    pid = os.fork()
    if pid == 0:
        child([])
    return pid


@dataclasses.dataclass
class Harness:
    """A link, the readings it passed on, and the selector loop it lives in."""

    link: FleetAgentLink
    readings: list[AgentReport]
    selector: selectors.BaseSelector

    def drive(self, until: Callable[[], object], timeout: float = 20.0) -> None:
        """Run the selector loop, as the supervisor's does, until `until()` holds."""
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "timed out driving the loop"
            for key, mask in self.selector.select(0.05):
                key.data(mask)


@pytest.fixture
def harness():
    """A link to an agent of supervisor "lab" without pools, told of one child of a pool it does not have."""
    selector = selectors.DefaultSelector()
    readings: list[AgentReport] = []
    child = agent_child(pid=os.getpid(), state="idle", table=None, key=None)  # of a pool the agent does not have
    link = FleetAgentLink(
        spec=lambda: AgentSpec(
            supervisor="lab", host="", fleet_interval=1.0, parent_pid=os.getpid(), worker_configs=[]
        ),
        children=lambda: [child],
        fork=fork,
        selector=selector,
        on_report=readings.append,
    )
    yield Harness(link, readings, selector)
    link.stop(fast=True)
    selector.close()


def test_the_agent_answers_every_command(harness):
    link = harness.link
    link.start()  # forks the agent and sends the first command at once
    assert link.pid is not None and len(link.fds()) == 2
    harness.drive(lambda: len(harness.readings) == 1)
    assert harness.readings == [{"tables": {}, "depths": {}, "drained": {}}]
    link.child_gone("standard", 12345)
    link.tick()
    harness.drive(lambda: len(harness.readings) == 2)
    assert link.gone == [] and link.unsent == b""  # told to the agent in full


def test_stop_closes_the_pipe_and_the_agent_exits(harness):
    link = harness.link
    link.start()
    harness.drive(lambda: harness.readings)
    pid = link.pid
    link.stop()
    assert link.pid is None and link.fds() == []
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped by stop()


def test_a_failed_fork_is_retried_after_the_delay(harness):
    link = harness.link
    link.fork = lambda child: None
    link.start()
    assert link.pid is None and link.fds() == [] and link.restart_at > time.monotonic()
    link.restart_at = 0.0
    link.fork = fork
    link.tick()  # due: starts it now
    assert link.pid is not None
    harness.drive(lambda: harness.readings)


def test_a_command_larger_than_the_pipe_arrives_whole(harness):
    link = harness.link
    one = link.children()[0]
    link.children = lambda: [dict(one, slot=i, key={"pad": "x" * 100}) for i in range(2000)]  # ~400 kB
    link.child_gone("standard", 12345)
    link.start()
    assert link.unsent  # the pipe (64 kB) took only part of it; the rest waits, the gone child with it
    assert link.gone
    harness.drive(lambda: (link.tick() if link.unsent else None) or harness.readings)  # read: it came whole
    assert link.gone == []  # once all of the command that carried it was written
