"""The parent's side of its forked children: fork them safely, read their report pipes, reap them.

The arbiter decides when a child starts and what its exit means; this class does the process plumbing it
needs for that, on the arbiter's selector: a pipe per child for its JSON-lines reports (`djsupervisor.protocol`,
decoded by the slot's `LineDecoder`), the descriptors a new child must not inherit, and `waitpid` until no
child is left to reap. Every child leads its own process group; what it started is killed with it when it
is reaped, so a crashed child's own subprocesses (``populate(processes=N)`` pools) never outlive it.
"""

from __future__ import annotations

import os
import selectors
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

from djsupervisor.protocol import ChildReportMessage, ProtocolError, parse_child_report
from djsupervisor.supervisor.fork import fork_child, killpg
from djsupervisor.supervisor.gpu_memory import GpuMemorySampler
from djsupervisor.supervisor.monitor import ResourceSampler
from djsupervisor.supervisor.shortage import is_shortage
from djsupervisor.supervisor.slot import Slot
from djsupervisor.supervisor.timers import Timers

_READ_SIZE = 65536  # bytes read from a report pipe at once (a report line is a few hundred)

#: Called with a slot and the reports its child just sent (possibly none: the pipe closed).
ReportSink = Callable[[Slot, list[ChildReportMessage]], None]


class ChildProcesses:
    """The supervisor's children by pid, their report pipes on `selector`, forking and reaping."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        blocked_signals: Iterable[int],
        inherited: Callable[[], list[int]],
        on_reports: ReportSink,
        log: Any,
    ) -> None:
        self.selector = selector
        self.blocked_signals = tuple(blocked_signals)
        self.inherited = inherited  # descriptors of the parent's own that no child may keep
        self.on_reports = on_reports
        self.log = log
        self.by_pid: dict[int, Slot] = {}
        self.failure: tuple[str, bool] = ("fork failed", False)  # why the last spawn failed; a shortage?
        self.sampler = ResourceSampler()
        self.gpu_sampler: GpuMemorySampler | None = None

    def fork(self, child: Callable[[list[int]], None]) -> int | None:
        """Fork a child that runs `child(fds_to_close)` (see `fork.fork_child`); its pid, or None."""
        registered = [key.fd for key in self.selector.get_map().values()]
        own = getattr(self.selector, "fileno", None)  # epoll/kqueue selectors hold a descriptor of their own
        close_in_child = [*self.inherited(), *([own()] if own else []), *registered]
        return fork_child(child, close_in_child, self.blocked_signals, log=self.log)

    def spawn(self, slot: Slot, body: Callable[[int, list[int]], None]) -> int | None:
        """Fork a child into `slot` that runs `body(report_fd, fds_to_close)`; its pid (None if the start
        failed: the slot is left as it was, and `failure` says why, for `Slot.spawn_failed`)."""
        try:
            read_fd, write_fd = os.pipe()
        except OSError as error:  # EMFILE: clients hold the parent's descriptors (ulimit -n, LimitNOFILE=)
            self.failure = (f"no descriptor for its report pipe: {error.strerror or error}", is_shortage(error))
            return None
        self.failure = ("fork failed", False)
        pid = self.fork(lambda close_fds: body(write_fd, [read_fd, *close_fds]))
        os.close(write_fd)
        if pid is None:
            os.close(read_fd)
            return None
        os.set_blocking(read_fd, False)
        slot.spawned(pid, read_fd, time.monotonic())
        self.by_pid[pid] = slot
        self.selector.register(read_fd, selectors.EVENT_READ, data=partial(self.on_readable, slot, read_fd))
        return pid

    def terminate(self, slot: Slot, timers: Timers, graceful_timeout: float) -> None:
        """SIGTERM the child of `slot` (STOPPING); SIGKILL its process group if it is still the slot's child,
        still stopping, `graceful_timeout` seconds later."""
        pid = slot.pid
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return

        def overdue() -> None:
            if slot.stop_overdue(pid, f"graceful_timeout {graceful_timeout:g} s passed"):
                self.log.bind(worker=slot.worker, slot=slot.index).warning(
                    "{} (pid {}) still running {:g} s after SIGTERM: SIGKILL", slot.label, pid, graceful_timeout
                )
                killpg(pid, signal.SIGKILL)

        timers.call_at(time.monotonic() + graceful_timeout, overdue)

    def is_report_pipe(self, callback: Any) -> bool:
        """Whether a selector callback is a report pipe's (a wakeup that only brought reports)."""
        return getattr(callback, "func", None) == self.on_readable

    def on_readable(self, slot: Slot, fd: int, mask: int) -> None:
        """A report pipe has data, or was closed by its child."""
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data or slot.pipe_fd != fd:
            self._close_pipe(slot, fd)
            self.on_reports(slot, [])
            return
        self._take(slot, data)

    def _take(self, slot: Slot, data: bytes) -> None:
        slot.reports.push(data)
        if not slot.reports.has_line():
            return
        reports = []
        for line in slot.reports:
            try:
                reports.append(parse_child_report(line.message))
            except ProtocolError:  # not JSON (line.message None), too long, or not a report: skipped
                continue
        self.on_reports(slot, reports)

    def _close_pipe(self, slot: Slot, fd: int) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass
        os.close(fd)
        if slot.pipe_fd == fd:
            slot.pipe_fd = None

    def read_last_words(self, slot: Slot) -> None:
        """Take what the (reaped) child of `slot` wrote before it ended, and close its pipe."""
        fd = slot.pipe_fd
        if fd is None:
            return
        try:
            while data := os.read(fd, _READ_SIZE):
                self._take(slot, data)
        except OSError:
            pass
        self._close_pipe(slot, fd)

    def reap(self) -> Iterator[tuple[int, int]]:
        """(pid, wait status) of every child that has ended, its process group SIGKILLed (whatever the child
        started and left behind); a child of this class is forgotten, its slot left to the caller."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            self.sampler.forget(pid)
            yield pid, status

    def sample(self) -> None:
        """Measure every child's process tree (RSS, CPU) into its slot; and the GPU memory of the children of
        GPU pools and of pools with max_gpu_memory_mb, by one NVML reading for all of them."""
        for pid, slot in list(self.by_pid.items()):
            sample = self.sampler.sample(pid)
            if sample is not None:
                slot.rss_mb, slot.cpu_percent = sample
        self.sampler.prune()
        watched = {pid: slot for pid, slot in self.by_pid.items() if slot.config.gpus or slot.config.max_gpu_memory_mb}
        if watched:
            if self.gpu_sampler is None:  # NVML is loaded on the first GPU pool's sample, never without one
                self.gpu_sampler = GpuMemorySampler()
            readings = self.gpu_sampler.sample({pid: self.sampler.trees.get(pid, [pid]) for pid in watched})
            for pid, reading in readings.items():
                watched[pid].gpu_reading = reading
