"""Watching children: resource sampling (psutil) and the verdicts the supervisor acts on.

`ResourceSampler` measures each child's whole process tree (the child and anything it started, such as
``populate(processes=N)`` pools): current RSS, not peak (a peak-based limit recycles forever after one
spike), and CPU percent since the previous sample. `judge` looks at one slot and says whether its child
must be killed (no report for `heartbeat_timeout`: SIGSTOPped or wedged; a job past `job_timeout`; no
progress outside a job for `hang_timeout`) or recycled gracefully (above `max_memory_mb`, or above
`max_gpu_memory_mb` by the reading of `djsupervisor.supervisor.gpu_memory`: a CUDA context and what a
framework's caching allocator keeps go only with the process).
"""

from __future__ import annotations

import dataclasses
import os

import psutil

from djsupervisor.supervisor.slot import Slot
from djsupervisor.supervisor.states import WORKING


def _proc_children_supported() -> bool:
    pid = os.getpid()
    return os.path.exists(f"/proc/{pid}/task/{pid}/children")


class ResourceSampler:
    """CPU and memory of process trees, keeping psutil.Process objects between samples (CPU % needs it).

    A tree is found through Linux's ``/proc/PID/task/TID/children`` (a few small reads per child) where
    the kernel has it; psutil's `children()` reads the parent pid of every process on the host, once per
    sampled child, which made sampling the dearest thing an idle supervisor did.
    """

    def __init__(self) -> None:
        self._processes: dict[int, psutil.Process] = {}
        self._proc_children = _proc_children_supported()
        self.trees: dict[int, list[int]] = {}  # each sampled child's tree (pids) at its last sample, for NVML

    def _descendants(self, root: psutil.Process) -> list[psutil.Process]:
        if not self._proc_children:
            return root.children(recursive=True)
        found, todo = [], [root.pid]
        while todo:
            pid = todo.pop()
            try:
                threads = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in threads:
                try:
                    with open(f"/proc/{pid}/task/{tid}/children", "rb") as file:
                        children = [int(c) for c in file.read().split()]
                except OSError:  # the thread or the process ended meanwhile
                    continue
                todo += children
                found += children
        processes = []
        for pid in found:
            try:
                processes.append(self._processes.get(pid) or psutil.Process(pid))
            except psutil.Error:
                pass
        return processes

    def _process(self, pid: int) -> psutil.Process:
        process = self._processes.get(pid)
        if process is None:
            process = self._processes[pid] = psutil.Process(pid)
        return process

    def sample(self, root_pid: int) -> tuple[float, float] | None:
        """(RSS in MB, CPU %) of `root_pid` and its descendants, or None if it is gone."""
        try:
            root = self._process(root_pid)
            if not root.is_running():
                raise psutil.NoSuchProcess(root_pid)
            tree = [root, *self._descendants(root)]
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            self.forget(root_pid)
            return None
        self.trees[root_pid] = [member.pid for member in tree]
        rss = cpu = 0.0
        for member in tree:
            process = self._processes.setdefault(member.pid, member)
            try:
                with process.oneshot():
                    rss += process.memory_info().rss
                    cpu += process.cpu_percent(None)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                self._processes.pop(member.pid, None)
        return rss / 2**20, cpu

    def forget(self, pid: int) -> None:
        """Drop what is kept about a process that is gone."""
        self._processes.pop(pid, None)
        self.trees.pop(pid, None)

    def prune(self) -> None:
        """Drop every kept process that has ended."""
        for pid, process in list(self._processes.items()):
            try:
                running = process.is_running()
            except psutil.Error:
                running = False
            if not running:
                del self._processes[pid]
                self.trees.pop(pid, None)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What to do with a child: `action` "kill" (SIGKILL its group now) or "recycle" (graceful stop and
    replace); `timed_out_job` is the job to record as timed out, for a job_timeout kill. `kind` says why, for
    the notifiers: ``hung``, ``job_timeout`` or ``memory``."""

    action: str
    reason: str
    timed_out_job: dict | None = None
    kind: str = ""


def judge(slot: Slot, now: float, *, heartbeat_timeout: float, hang_timeout: float) -> Verdict | None:
    """Whether the child in `slot` must be killed or recycled, from its reports and last sample."""
    if slot.pid is None or slot.state not in WORKING:  # a stopping child is on its way out already
        return None
    silence = now - slot.last_report
    if silence > heartbeat_timeout:
        return Verdict("kill", f"no report for {silence:.0f} s (stopped or hung)", kind="hung")
    config = slot.config
    report = slot.report
    if report.job_elapsed is not None:
        running_for = report.job_elapsed + silence
        if config.job_timeout and running_for > config.job_timeout:
            job = None
            if report.key is not None and report.table:
                job = {"table": report.table, "key": report.key, "seconds": config.job_timeout}
            what = f"{report.table} {report.key or ''}".strip()
            reason = f"{what} ran {running_for:.0f} s > job_timeout {config.job_timeout:g} s"
            return Verdict("kill", reason, job, kind="job_timeout")
    else:
        stalled = report.stalled
        if stalled is not None and stalled + silence > hang_timeout:
            return Verdict(
                "kill", f"no progress for {stalled + silence:.0f} s outside a job (hang_timeout)", kind="hung"
            )
    if config.max_memory_mb and slot.rss_mb is not None and slot.rss_mb > config.max_memory_mb:
        return Verdict("recycle", f"RSS {slot.rss_mb:.0f} MB > max_memory_mb {config.max_memory_mb:g}", kind="memory")
    gpu_mb = slot.gpu_reading.total_mb if slot.gpu_reading is not None else None
    if config.max_gpu_memory_mb and gpu_mb is not None and gpu_mb > config.max_gpu_memory_mb:
        limit = config.max_gpu_memory_mb
        return Verdict("recycle", f"GPU memory {gpu_mb:.0f} MB > max_gpu_memory_mb {limit:g}", kind="memory")
    return None
