"""The parent's side of the fleet agent: fork it, feed it the children's state, take in its readings, restart it.

The agent itself (`djsupervisor.fleet.agent`) runs in a child. The link is given exactly what it needs of the
supervisor, as callables and values, instead of the supervisor itself: what to start an agent with (read
afresh at each start, since a reload changes it), the live children's state, a fork function, the selector
its report pipe joins, and where the agent's readings go. So it can be understood, and driven in a test,
without a supervisor, and the supervisor's internals can change without it.

Both pipes carry JSON lines of `djsupervisor.protocol`: an `AgentCommand` every `fleet_interval` seconds
(written non-blocking: the loop must never wait for a database-bound agent), an `AgentReport` back. The
command also carries the supervisor's events for the notifiers (a slot gone FATAL, a child killed or
recycled, a drain): the agent sends them, since the parent does no network I/O.
"""

from __future__ import annotations

import os
import selectors
import signal
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from loguru import logger

from djsupervisor.fleet.agent import AgentSpec, run_agent
from djsupervisor.protocol import (
    AgentChild,
    AgentCommand,
    AgentReport,
    GoneChild,
    LineDecoder,
    SupervisorEvent,
    encode,
    parse_agent_report,
)
from djsupervisor.supervisor.shortage import Throttle

if TYPE_CHECKING:
    from djsupervisor.supervisor.slot import Slot

_RESTART_FIRST = 1.0  # seconds before restarting an agent that died, doubling up to _RESTART_MAX
_RESTART_MAX = 60.0
_STABLE_AFTER = 60.0  # seconds an agent must have run for its restart delay to start over
_STOP_WAIT = 3.0  # seconds the parent waits for the agent's last write at shutdown
_MAX_EVENTS = 500  # supervisor events waiting for the agent (it is down, or behind); the oldest go first

#: `fork(child) -> pid | None`: fork; the child runs ``child(fds_to_close)`` and never returns; None if it failed.
Fork = Callable[[Callable[[list[int]], None]], int | None]


def agent_children(slots: Iterable[Slot]) -> list[AgentChild]:
    """The children the agent stamps: those live and connected (a child's row does not exist before its
    first cycle anyway), with what their latest report says they do."""
    children: list[AgentChild] = []
    for slot in slots:
        report = slot.report
        if slot.pid is None or not report.connected:
            continue
        state = "stopping" if slot.state.value == "stopping" else (report.activity or slot.state.value)
        children.append(
            AgentChild(
                worker=slot.worker,
                slot=slot.index,
                pid=slot.pid,
                state=state,
                table=report.table,
                key=report.key,
                jobs_done=report.jobs_done,
                jobs_failed=report.jobs_failed,
                cycles=report.cycles_done,
            )
        )
    return children


class FleetAgentLink:
    """Forks the agent, feeds it the children's state, takes in its readings, restarts it (with a doubling
    delay) when it dies, and closes it last at shutdown.

    Parameters
    ----------
    spec
        What to start an agent with; called at each start.
    children
        The live children's state, for each command.
    fork
        Forks the agent (see `Fork`); every other forked child must close `fds()`.
    selector
        The supervisor's selector loop; the report pipe joins it with `_on_report` as its callback.
    on_report
        Takes each reading the agent sends (the supervisor's `FleetView.apply`).
    events
        Returns the supervisor's events since the last call, for the agent to send to the notifiers.
    """

    def __init__(
        self,
        *,
        spec: Callable[[], AgentSpec],
        children: Callable[[], list[AgentChild]],
        fork: Fork,
        selector: selectors.BaseSelector,
        on_report: Callable[[AgentReport], None],
        events: Callable[[], list[SupervisorEvent]] = list,
    ) -> None:
        self.spec = spec
        self.children = children
        self.fork = fork
        self.selector = selector
        self.on_report = on_report
        self.take_events = events
        self.events: list[SupervisorEvent] = []  # not yet told to the agent
        self.unsent_events = 0  # how many of `events` the command in hand carries
        self.pid: int | None = None
        self.command_w = -1
        self.report_r = -1
        self.reports = LineDecoder()
        self.unsent = b""  # the rest of a command the pipe did not take at once
        self.gone: list[GoneChild] = []  # reaped children not yet told to the agent
        self.unsent_gone = 0  # how many of `gone` the command in hand carries
        self.restart_at = 0.0
        self.delay = _RESTART_FIRST
        self.started = 0.0
        self.throttle = Throttle()

    @property
    def log(self) -> Any:
        return logger.bind(supervisor=self.spec().supervisor, worker="-", slot="-")

    def fds(self) -> list[int]:
        """The parent's ends of the agent's pipes (every other forked child must close them)."""
        return [fd for fd in (self.command_w, self.report_r) if fd >= 0]

    def start(self) -> None:
        """Fork the agent (or, if the fork fails, try again after the current delay)."""
        spec = self.spec()
        try:
            command_r, self.command_w = os.pipe()
            try:
                self.report_r, report_w = os.pipe()
            except OSError:
                os.close(command_r)
                raise
        except OSError as error:  # EMFILE: out of descriptors for now (held clients, a low ulimit -n)
            self._close()
            self.restart_at = time.monotonic() + self.delay
            if self.throttle.allow("pipes"):  # tried again every tick: said once a minute
                self.log.error("fleet agent: no descriptors for its pipes ({}); trying again later", error)
            return
        parent_ends = [self.command_w, self.report_r]

        def child(close_fds: list[int]) -> None:
            run_agent(spec, command_fd=command_r, report_fd=report_w, close_fds=[*close_fds, *parent_ends])

        pid = self.fork(child)
        os.close(command_r)
        os.close(report_w)
        if pid is None:
            self._close()
            self.restart_at = time.monotonic() + self.delay
            return
        self.pid = pid
        self.started = time.monotonic()
        self.reports = LineDecoder()
        self.unsent = b""
        os.set_blocking(self.command_w, False)
        os.set_blocking(self.report_r, False)
        self.selector.register(self.report_r, selectors.EVENT_READ, data=self._on_report)
        self.log.info("fleet agent started (pid {})", pid)
        self.tick()

    def _close(self) -> None:
        if self.report_r >= 0:
            try:
                self.selector.unregister(self.report_r)
            except (KeyError, ValueError):
                pass
        for fd in self.fds():
            os.close(fd)
        self.command_w = self.report_r = -1

    def _on_report(self, mask: int) -> None:
        try:
            data = os.read(self.report_r, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close()
            return
        self.reports.push(data)
        for line in self.reports:
            try:
                self.on_report(parse_agent_report(line.message))  # a bad line's message is None: refused
            except (ValueError, TypeError, AttributeError) as error:
                self.log.warning("fleet agent: unreadable report: {}", line.error or error)
        if time.monotonic() - self.started > _STABLE_AFTER:
            self.delay = _RESTART_FIRST

    def tick(self) -> None:
        """Send the agent the children's latest state (or restart the agent if it is due)."""
        if self.pid is None:
            if self.command_w < 0 and time.monotonic() >= self.restart_at:
                self.start()
            return
        if self.command_w < 0:
            return
        if self.unsent:  # the rest of the last command first: a torn line would be lost
            self._send()
            if self.unsent:
                return
        command = AgentCommand(children=self.children(), gone=self.gone)
        self._take_events()
        if self.events:
            command["events"] = self.events
        line = encode(command)
        self.unsent, self.unsent_gone, self.unsent_events = line, len(self.gone), len(self.events)
        if not self._send():  # the agent is behind (database slow): it gets the next one
            self.unsent = b""

    def _send(self) -> int:
        """Write what the pipe takes now of the command in hand (never blocks); returns the bytes written.
        The `gone` children and the `events` it carries are forgotten once all of it is written."""
        try:
            written = os.write(self.command_w, self.unsent)
        except OSError:  # full (BlockingIOError), or the agent is gone (it is reaped and restarted)
            return 0
        self.unsent = self.unsent[written:]
        if not self.unsent:
            del self.gone[: self.unsent_gone]
            del self.events[: self.unsent_events]
        return written

    def _take_events(self) -> None:
        """Add the supervisor's new events to those waiting (while no command carrying them is in hand)."""
        self.events += self.take_events()
        dropped = len(self.events) - _MAX_EVENTS
        if dropped > 0:
            del self.events[:dropped]
            self.log.warning("fleet agent: {} events for the notifiers dropped (the agent is not taking them)", dropped)

    def child_gone(self, worker: str, pid: int) -> None:
        """A child was reaped: its row is marked exited at the next tick."""
        self.gone.append(GoneChild(worker=worker, pid=pid))

    def exited(self, status: int) -> None:
        """The agent was reaped."""
        self.log.warning(
            "fleet agent (pid {}) exited ({}); restarting it in {:.0f} s",
            self.pid,
            os.waitstatus_to_exitcode(status),
            self.delay,
        )
        self.pid = None
        self._close()
        self.restart_at = time.monotonic() + self.delay
        self.delay = min(self.delay * 2, _RESTART_MAX)

    def restart(self) -> None:
        """Replace the agent now (after a reload: the pools changed)."""
        self.stop(fast=True)
        self.delay = _RESTART_FIRST
        self.start()

    def stop(self, fast: bool = False) -> None:
        """At shutdown: a last tick, close the pipe (the agent writes and exits), wait briefly, then kill."""
        if self.pid is None:
            return
        if not fast:
            self.tick()
        if self.command_w >= 0:
            os.close(self.command_w)
            self.command_w = -1
        deadline = time.monotonic() + (0 if fast else _STOP_WAIT)
        while True:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped already
                break
            if pid:
                break
            if time.monotonic() >= deadline:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except OSError:
                    pass
                try:
                    os.waitpid(self.pid, 0)
                except ChildProcessError:
                    pass
                break
            time.sleep(0.05)
        self.pid = None
        self._close()
