"""The parent process: forks a pool of children per worker definition and keeps them alive.

One thread, one `selectors` loop. Everything arrives as a readable descriptor: signals (through
`signal.set_wakeup_fd`; the Python-level handlers do nothing, the loop reads the signal numbers), the
children's report pipes, and the control socket. Timers are a heap of deadlines that sets the select
timeout; what is due is decided by `_manage` and the checks, which scan the (few) slots each turn.

Signals: TERM/INT stop gracefully (children get SIGTERM, finish the job in flight, exit; their process
group is SIGKILLed after `graceful_timeout`), exit 0. QUIT stops fast (SIGKILL; the jobs in flight go back
to pending at the next start's orphan recovery). HUP reloads the config file. TTIN/TTOU grow/shrink every
pool by one. USR1 is accepted (logs go to stderr: nothing to reopen).

The parent does no database work: it imported the worker definitions (so a restart costs no import) and
may hold the session those imports opened, which it never uses; each child reconnects on its own.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import os
import platform
import selectors
import signal
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import psutil
from loguru import logger

from djsupervisor.fleet.agent import AgentSpec, heartbeat_window
from djsupervisor.fleet.link import FleetAgentLink, agent_children
from djsupervisor.fleet.view import FleetView
from djsupervisor.protocol import ProtocolError, parse_child_report
from djsupervisor.serve.control import ControlServer, default_socket_path
from djsupervisor.supervisor.autoscale import STALE_INTERVALS, Autoscaler, Decision, Observation
from djsupervisor.supervisor.child import run_child, run_recovery
from djsupervisor.supervisor.config import ConfigError, SupervisorConfig, WorkerConfig, load_config
from djsupervisor.supervisor.fork import EXIT_RECYCLE, fork_child
from djsupervisor.supervisor.monitor import ResourceSampler, judge
from djsupervisor.supervisor.slot import LIVE_STATES, Slot, SlotState, restart_delay
from djsupervisor.supervisor.systemd import SystemdNotifier

HANDLED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGCHLD,
    signal.SIGUSR1,
)
_CHECK_INTERVAL = 0.5  # seconds between liveness/timeout checks and reaping safety net
_STATUS_INTERVAL = 10.0  # seconds between systemd STATUS= updates
_RECOVERY_TIMEOUT = 30.0
_CONTROL_EXPIRY_INTERVAL = (
    5.0  # seconds between sweeps of idle control-socket clients  # seconds a recovery child may take
)
_AFTER_STOP_RANK = {"respawn": 0, "retire": 1, "stay": 2}  # a stronger reason to stay down wins


class Timers:
    """A heap of deadlines (monotonic seconds) with callbacks."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def call_at(self, deadline: float, callback: Callable[[], None]) -> None:
        """Run `callback` in the loop once `deadline` has passed."""
        heapq.heappush(self._heap, (deadline, next(self._seq), callback))

    def timeout(self, now: float) -> float | None:
        """Seconds until the next deadline (0 if one is due, None without timers)."""
        return max(0.0, self._heap[0][0] - now) if self._heap else None

    def run_due(self, now: float) -> bool:
        """Run the callbacks whose deadline has passed; whether there were any."""
        ran = False
        while self._heap and self._heap[0][0] <= now:
            _, _, callback = heapq.heappop(self._heap)
            callback()
            ran = True
        return ran


@dataclasses.dataclass
class Pool:
    """The slots of one worker definition; `config` is None once the definition was removed.

    `replicas` is the desired size; an autoscaled pool (`autoscaler` set) keeps it between `minimum`
    (the config's `replicas`, or what `scale` set) and the config's `max_replicas`.
    """

    name: str
    config: WorkerConfig | None
    replicas: int
    slots: dict[int, Slot] = dataclasses.field(default_factory=dict)
    jobs_done_retired: int = 0  # by slots removed from the pool (the metrics' counters never go down)
    jobs_failed_retired: int = 0
    minimum: int = 0
    autoscaler: Autoscaler | None = None
    hold_logged: str | None = None  # the kind of the autoscaler's last hold, logged once

    def active(self) -> list[Slot]:
        """Slots meant to stay (not being retired), by index."""
        return sorted((s for s in self.slots.values() if s.after_stop != "retire"), key=lambda s: s.index)

    def free_index(self) -> int:
        return next(i for i in itertools.count() if i not in self.slots)


def _describe_exit(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class Supervisor:
    """The supervisor of one configuration's worker pools; `run()` until stopped, returns the exit status."""

    def __init__(
        self, config: SupervisorConfig, config_path: str | os.PathLike | None = None, host: str | None = None
    ) -> None:
        self._host_override = host
        if host:
            config = dataclasses.replace(config, host=host)
        self.config = config
        self.config_path = config_path
        self.pools: dict[str, Pool] = {}
        self.state = "starting"
        self.pid = os.getpid()
        self.started = time.time()
        self.timers = Timers()
        self.sampler = ResourceSampler()
        self.fleet = FleetView()  # queue depths and drain flags, as the fleet agent last read them
        self._host_cpu: float | None = None  # host-wide CPU % over the last sample_interval
        self.selector: selectors.BaseSelector | None = None
        self.control = None
        self.http = None  # the metrics and status page endpoint (http_status.StatusServer), if configured
        self.agent: FleetAgentLink | None = None
        self.notifier = SystemdNotifier()
        self._by_pid: dict[int, Slot] = {}
        self._recovery_pids: set[int] = set()
        self._to_recover: dict[str, WorkerConfig] = {}  # definitions whose dead children no one replaces
        self._stop_mode: str | None = None  # None, "graceful" or "fast"
        self._wake_r = self._wake_w = -1
        self._ready_sent = False
        self._report_changed = False  # a child's report changed its slot's state since the last _manage
        self._previous_handlers: dict[int, Any] = {}

    @property
    def log(self):
        return logger.bind(supervisor=self.config.name, worker="-", slot="-")

    def _slot_log(self, slot: Slot):
        return logger.bind(supervisor=self.config.name, worker=slot.worker, slot=slot.index)

    # ----- public API (the control socket calls these, in the loop)

    def status(self) -> dict:
        """The supervisor's state and one entry per slot (see `Slot.status`)."""
        now = time.monotonic()
        return {
            "supervisor": self.config.name,
            "pid": self.pid,
            "started": self.started,
            "state": self.state,
            "http": self.http.address if self.http is not None else None,
            "host": self.config.host or platform.node(),
            "drained": dict(self.fleet.drained),
            "fleet_age": round(self.fleet.age(), 3) if self.fleet.updated is not None else None,
            "workers": [
                slot.status(now)
                for name in sorted(self.pools)
                for slot in sorted(self.pools[name].slots.values(), key=lambda s: s.index)
            ],
            "pools": [self._pool_status(self.pools[name]) for name in sorted(self.pools)],
        }

    def _pool_status(self, pool: Pool) -> dict:
        """A pool's size; for an autoscaled one also its bounds, pending jobs and last decision."""
        entry: dict[str, Any] = {"worker": pool.name, "replicas": pool.replicas, "autoscale": None}
        if pool.autoscaler is not None:
            last = pool.autoscaler.last_decision
            entry["autoscale"] = {
                "min": pool.minimum,
                "max": pool.autoscaler.settings.max_replicas,
                "pending": self.fleet.pending(pool.name),
                "decision": last.action if last else None,
                "reason": last.reason if last else None,
            }
        return entry

    def request_stop(self, fast: bool = False) -> None:
        """Stop every child (gracefully unless `fast`) and make `run()` return 0 once they are gone."""
        if self._stop_mode == "fast" or (self._stop_mode == "graceful" and not fast):
            return
        self._stop_mode = "fast" if fast else "graceful"
        self.state = "stopping"
        self.log.info("{} stop of {} children", "fast" if fast else "graceful", len(self._by_pid))
        self.notifier.stopping()
        for pool in self.pools.values():
            for slot in list(pool.slots.values()):
                self._stop_slot(slot, "supervisor stopping", "stay", fast=fast)

    def request_reload(self) -> str | None:
        """Re-read the config file: new definitions start, removed ones stop, changed ones roll.

        Returns None once applied, else why nothing changed (the running configuration stays)."""
        if self._stop_mode:
            return "the supervisor is stopping"
        if self.config_path is None:
            self.log.warning("reload: started without a config file, nothing to reload")
            return "started without a config file: nothing to reload"
        self.notifier.reloading()
        self.state = "reloading"
        problem = None
        try:
            new = load_config(self.config_path)
        except ConfigError as error:
            self.log.error("reload failed, keeping the running configuration: {}", error)
            problem = f"reload failed, the running configuration stays: {error}"
        else:
            self._apply_config(new)
            if self.agent is not None:  # it reads the pools' tables and flags: give it the new pools
                self.agent.restart()
        self.state = "running"
        self.notifier.ready()
        return problem

    def scale(self, worker: str, n: int) -> dict:
        """Set the size of pool `worker` to `n` children; of an autoscaled pool, its minimum (the pool grows
        to `n` at once if smaller, and the autoscaler may shrink it down to `n` when idle)."""
        pool = self.pools.get(worker)
        if pool is None or pool.config is None:
            raise KeyError(f"no worker named {worker!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"replicas must be an integer >= 0, got {n!r}")
        if pool.autoscaler is not None:
            maximum = pool.autoscaler.settings.max_replicas
            if n > maximum:
                raise ValueError(
                    f"pool {worker} autoscales up to max_replicas {maximum}: scale sets its minimum, "
                    f"got {n} (raise max_replicas in the config and reload)"
                )
            self.log.info(
                "pool {} minimum set to {} (autoscaling {}..{}, now {})", worker, n, n, maximum, max(n, pool.replicas)
            )
            pool.minimum = n
            pool.replicas = max(n, pool.replicas)
            return {"worker": worker, "replicas": pool.replicas, "min": n, "max": maximum}
        if n != pool.replicas:
            self.log.info("pool {} scaled from {} to {}", worker, pool.replicas, n)
        pool.replicas = n
        return {"worker": worker, "replicas": n}

    def handle_control(self, request: dict) -> dict:
        """Answer one control-socket request: {"cmd": "status"|"stop"|"reload"|"scale", ...}."""
        cmd = request.get("cmd") if isinstance(request, dict) else None
        try:
            if cmd == "status":
                return {"ok": True, **self.status()}
            if cmd == "stop":
                self.request_stop(fast=bool(request.get("fast")))
                return {"ok": True}
            if cmd == "reload":
                problem = self.request_reload()
                return {"ok": True} if problem is None else {"ok": False, "error": problem}
            if cmd == "scale":
                return {"ok": True, **self.scale(request.get("worker"), request.get("replicas"))}
        except (KeyError, ValueError) as error:
            return {"ok": False, "error": str(error.args[0] if error.args else error)}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    # ----- the loop

    def run(self) -> int:
        """Start the pools and supervise them until stopped; returns the exit status (0 after a stop)."""
        try:
            self._setup()
            for worker in self.config.workers:
                self.pools[worker.name] = self._new_pool(worker, self.config)
            self.log.info(
                "supervisor {} (pid {}) starting {} pools: {}",
                self.config.name,
                self.pid,
                len(self.pools),
                ", ".join(f"{w.name}×{w.replicas}" for w in self.config.workers),
            )
            self.state = "running"
            self._manage()
            self.agent = FleetAgentLink(
                spec=lambda: AgentSpec(
                    supervisor=self.config.name,
                    host=self.config.host,
                    fleet_interval=self.config.fleet_interval,
                    parent_pid=self.pid,
                    worker_configs=[pool.config for pool in self.pools.values() if pool.config is not None],
                ),
                children=lambda: agent_children(s for p in self.pools.values() for s in p.slots.values()),
                fork=self._fork,
                selector=self.selector,
                on_report=lambda report: self.fleet.apply(report),
            )
            self.agent.start()
            self._every(self.config.fleet_interval, self.agent.tick)
            self._every(_CHECK_INTERVAL, self._check_children)
            psutil.cpu_percent(None)  # the first call starts the measurement and returns nothing useful
            self._every(self.config.sample_interval, self._sample)
            self._autoscale_tick()
            self._every(_STATUS_INTERVAL, self._send_status)
            if self.http is not None:
                self._every(1.0, self.http.expire_idle)
            if self.control is not None:  # a client that connects and never asks loses its descriptor
                self._every(_CONTROL_EXPIRY_INTERVAL, self.control.expire_idle)
            watchdog = self.notifier.watchdog_interval()
            if watchdog:
                self._every(watchdog / 2, self.notifier.watchdog)
            while not (self._stop_mode and not self._by_pid and not self._recovery_pids):
                timeout = self.timers.timeout(time.monotonic())
                manage = False
                for key, mask in self.selector.select(timeout):
                    if self.selector.get_map().get(key.fd) is key:  # not unregistered by an earlier callback
                        key.data(mask)
                        manage = manage or getattr(key.data, "func", None) != self._on_report
                # A report that changed nothing about a slot's state needs no pass over every pool: with
                # many idle children, heartbeats are most wakeups (_take_reports flags the ones that count).
                if self.timers.run_due(time.monotonic()) or manage or self._report_changed:
                    self._report_changed = False
                    self._manage()
            if self.agent is not None:
                self.agent.stop()
            self.log.info("supervisor {} stopped", self.config.name)
            return 0
        finally:
            self._teardown()

    def _every(self, interval: float, callback: Callable[[], None]) -> None:
        def tick() -> None:
            callback()
            self.timers.call_at(time.monotonic() + interval, tick)

        self.timers.call_at(time.monotonic() + interval, tick)

    def _setup(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, data=self._on_wakeup)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for signum in HANDLED_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, _note_signal)
        path = self.config.control_socket or default_socket_path(self.config.name)
        self.control = ControlServer(str(path), self.handle_control)
        self.control.register(self.selector)
        self.log.info("control socket {}", path)
        if self.config.http:  # after the control socket: a bind error stops the start before any child
            from djsupervisor.serve.http import StatusServer, supervisor_pages

            self.http = StatusServer(self.config.http, supervisor_pages(self))
            self.http.register(self.selector)
            self.log.info("status page on http://{}/ (metrics on /metrics)", self.http.address)

    def _teardown(self) -> None:
        for pid in list(self._by_pid) + list(self._recovery_pids):  # only if run() ends by an exception
            _killpg(pid, signal.SIGKILL)
        if self.agent is not None:
            self.agent.stop(fast=True)
        if self.control is not None:
            try:
                self.control.close()
            except Exception as error:
                self.log.warning("closing the control socket failed: {}", error)
        if self.http is not None:
            self.http.close()
        if self._wake_w >= 0:
            signal.set_wakeup_fd(-1)
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if self.selector is not None:
            self.selector.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)

    # ----- signals

    def _on_wakeup(self, mask: int) -> None:
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        for signum in dict.fromkeys(data):  # the same signal twice in one read acts once
            self._handle_signal(signum)

    def _handle_signal(self, signum: int) -> None:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        if signum == signal.SIGCHLD:
            self._reap()
            return
        self.log.info("received {}", name)
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.request_stop()
        elif signum == signal.SIGQUIT:
            self.request_stop(fast=True)
        elif signum == signal.SIGHUP:
            self.request_reload()
        elif signum in (signal.SIGTTIN, signal.SIGTTOU):
            step = 1 if signum == signal.SIGTTIN else -1
            for pool in self.pools.values():
                if pool.config is None:
                    continue
                size = (pool.minimum if pool.autoscaler else pool.replicas) + step  # autoscaled: the minimum
                if size >= 0 and (pool.autoscaler is None or size <= pool.autoscaler.settings.max_replicas):
                    self.scale(pool.name, size)

    # ----- children

    def _spawn(self, slot: Slot) -> None:
        pool = self.pools[slot.worker]
        slot.config = pool.config
        read_fd, write_fd = os.pipe()
        timed_out_job, slot.timed_out_job = slot.timed_out_job, None

        def child(close_fds: list[int]) -> None:
            run_child(
                supervisor=self.config.name,
                worker_config=slot.config,
                slot_index=slot.index,
                parent_pid=self.pid,
                report_fd=write_fd,
                close_fds=[read_fd, *close_fds],
                heartbeat_interval=min(self.config.heartbeat_interval, self.config.heartbeat_timeout / 3),
                timed_out_job=timed_out_job,
                host=self.config.host,
                fleet_window=heartbeat_window(self.config.fleet_interval),
            )

        pid = self._fork(child)
        os.close(write_fd)
        if pid is None:
            os.close(read_fd)
            slot.timed_out_job = timed_out_job
            slot.change(SlotState.STARTING)
            self._after_crash(slot, "fork failed", got_going=False)
            return
        os.set_blocking(read_fd, False)
        slot.occupied(pid, read_fd)
        slot.change(SlotState.STARTING)
        self._by_pid[pid] = slot
        self.selector.register(read_fd, selectors.EVENT_READ, data=partial(self._on_report, slot, read_fd))
        self._slot_log(slot).info(
            "started {} (pid {}){}", slot.label, pid, f", restart {slot.restarts}" if slot.restarts else ""
        )

    def _fork(self, child: Callable[[list[int]], None]) -> int | None:
        """Fork; the child runs `child(fds_to_close)` and never returns (see `fork.fork_child`)."""
        close_in_child = [self._wake_r, self._wake_w, self.selector.fileno(), *self.selector.get_map()]
        if self.agent is not None:
            close_in_child += self.agent.fds()
        return fork_child(child, close_in_child, HANDLED_SIGNALS, log=self.log)

    def _recover(self, worker_configs: list[WorkerConfig], why: str) -> None:
        """Fork a short-lived child that puts the jobs of dead children back to pending (none will replace them)."""
        if not worker_configs:
            return
        pid = self._fork(partial(self._run_recovery, worker_configs))
        if pid is None:
            return
        self._recovery_pids.add(pid)
        self.log.info("job recovery for {} (pid {})", why, pid)
        self.timers.call_at(
            time.monotonic() + _RECOVERY_TIMEOUT, lambda: pid in self._recovery_pids and _killpg(pid, signal.SIGKILL)
        )

    def _run_recovery(self, worker_configs: list[WorkerConfig], close_fds: list[int]) -> None:
        run_recovery(
            supervisor=self.config.name, worker_configs=worker_configs, parent_pid=self.pid, close_fds=close_fds
        )

    def _on_report(self, slot: Slot, fd: int, mask: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data or slot.pipe_fd != fd:
            self._close_pipe(slot, fd)
            self._report_changed = True
            return
        self._take_reports(slot, data)

    def _take_reports(self, slot: Slot, data: bytes) -> None:
        slot.reports.push(data)
        if not slot.reports.has_line():
            return
        for line in slot.reports:
            try:
                message = parse_child_report(line.message)
            except ProtocolError:  # not JSON (line.message None), too long, or not a report: skipped
                continue
            if "connection_ids" in message and not self._ready_sent:
                self._report_changed = True  # READY may be due
            slot.report.merge(message)
        slot.last_report = time.monotonic()
        slot.last_report_wall = time.time()
        if slot.state is SlotState.STARTING and slot.got_going():
            self._report_changed = True
            slot.change(SlotState.RUNNING)
            slot.early_exits = 0
            slot.rolled = False
            self._slot_log(slot).info("{} is running (pid {})", slot.label, slot.pid)

    def _close_pipe(self, slot: Slot, fd: int) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass
        os.close(fd)
        if slot.pipe_fd == fd:
            slot.pipe_fd = None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            try:
                os.killpg(pid, signal.SIGKILL)  # whatever the child started and left behind
            except OSError:
                pass
            if self.agent is not None and pid == self.agent.pid:
                self.agent.exited(status)
                continue
            if pid in self._recovery_pids:
                self._recovery_pids.discard(pid)
                self.log.info("job recovery (pid {}) ended: {}", pid, _describe_exit(status))
                continue
            slot = self._by_pid.pop(pid, None)
            self.sampler.forget(pid)
            if slot is not None:
                if self.agent is not None:
                    self.agent.child_gone(slot.worker, pid)
                self._child_exited(slot, status)

    def _child_exited(self, slot: Slot, status: int) -> None:
        fd = slot.pipe_fd
        if fd is not None:
            try:
                while data := os.read(fd, 65536):  # the child's last words
                    self._take_reports(slot, data)
            except OSError:
                pass
            self._close_pipe(slot, fd)
        code = os.waitstatus_to_exitcode(status)
        how = _describe_exit(status)
        got_going = slot.got_going()
        uptime = slot.uptime() or 0.0
        log = self._slot_log(slot)
        slot.vacated()
        if slot.state is SlotState.STOPPING:
            reason = slot.kill_reason or slot.stop_reason
            log.info("{} stopped ({}; {}) after {:.1f} s", slot.label, reason, how, uptime)
            slot.change(SlotState.STOPPED)
            if code != 0 and (slot.after_stop != "respawn" or self._stop_mode):
                self._to_recover[slot.config.name] = slot.config  # killed, and no replacement will recover
            if slot.after_stop == "retire":
                self._remove(slot)
            elif slot.after_stop == "respawn" and not self._stop_mode:
                self._spawn(slot)
            return
        if self._stop_mode:
            log.info("{} exited ({}) while stopping", slot.label, how)
            slot.change(SlotState.EXITED)
            if code != 0:
                self._to_recover[slot.config.name] = slot.config
            return
        if code == EXIT_RECYCLE:
            log.info("{} reached max_jobs ({}); replacing it", slot.label, slot.config.max_jobs)
            slot.change(SlotState.BACKOFF)
            slot.next_start = time.monotonic()
            return
        policy = slot.config.restart
        if policy == "never" or (policy == "on-failure" and code == 0):
            log.info("{} exited ({}) after {:.1f} s; restart={}: not restarted", slot.label, how, uptime, policy)
            slot.change(SlotState.EXITED)
            if code != 0:
                self._to_recover[slot.config.name] = slot.config
            return
        if uptime >= self.config.stable_after:
            slot.crashes = 0
        if code == 0 and got_going:  # the worker's loop ended by itself (run_duration, max_idled_cycle)
            slot.crashes = 0
        self._after_crash(slot, f"{how} after {uptime:.1f} s", got_going)

    def _after_crash(self, slot: Slot, what: str, got_going: bool) -> None:
        log = self._slot_log(slot)
        slot.early_exits = 0 if got_going else slot.early_exits + 1
        if slot.early_exits >= self.config.fatal_after:
            slot.change(SlotState.FATAL)
            log.error(
                "{} exited ({}) before completing a cycle, {} times in a row: FATAL, not restarted",
                slot.label,
                what,
                slot.early_exits,
            )
            self._to_recover[slot.config.name] = slot.config
            return
        slot.crashes += 1
        delay = restart_delay(slot.crashes, self.config.backoff_initial, self.config.backoff_max)
        slot.change(SlotState.BACKOFF)
        slot.next_start = time.monotonic() + delay
        self.timers.call_at(slot.next_start, lambda: None)  # wakes the loop; _manage spawns
        log.warning(
            "{} exited ({}){}; restarting in {:.2f} s",
            slot.label,
            what,
            "" if got_going else " before completing a cycle",
            delay,
        )

    def _stop_slot(self, slot: Slot, reason: str, after: str, *, fast: bool = False) -> None:
        """Stop the slot's child: SIGTERM (graceful) or SIGKILL of its group (fast); then `after`."""
        if _AFTER_STOP_RANK[after] > _AFTER_STOP_RANK.get(slot.after_stop, 0) or slot.state is not SlotState.STOPPING:
            slot.after_stop = after
        if slot.pid is None:
            if slot.state is not SlotState.STOPPED:
                slot.change(SlotState.STOPPED)
            if slot.after_stop == "retire":
                self._remove(slot)
            return
        log = self._slot_log(slot)
        if fast:
            if slot.state is not SlotState.STOPPING:
                slot.change(SlotState.STOPPING)
                slot.stop_reason = reason
            slot.kill_reason = slot.kill_reason or reason
            _killpg(slot.pid, signal.SIGKILL)
            return
        if slot.state is SlotState.STOPPING:
            return
        slot.change(SlotState.STOPPING)
        slot.stop_reason = reason
        log.info("stopping {} (pid {}): {}", slot.label, slot.pid, reason)
        try:
            os.kill(slot.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        slot.stop_deadline = time.monotonic() + self.config.graceful_timeout
        pid = slot.pid
        self.timers.call_at(slot.stop_deadline, lambda: self._stop_overdue(slot, pid))

    def _stop_overdue(self, slot: Slot, pid: int) -> None:
        if slot.pid == pid and slot.state is SlotState.STOPPING:
            self._slot_log(slot).warning(
                "{} (pid {}) still running {:g} s after SIGTERM: SIGKILL", slot.label, pid, self.config.graceful_timeout
            )
            slot.kill_reason = f"graceful_timeout {self.config.graceful_timeout:g} s passed"
            _killpg(pid, signal.SIGKILL)

    def _remove(self, slot: Slot) -> None:
        pool = self.pools.get(slot.worker)
        if pool is not None and pool.slots.get(slot.index) is slot:
            del pool.slots[slot.index]
            pool.jobs_done_retired += slot.jobs_done_total
            pool.jobs_failed_retired += slot.jobs_failed_total
            self._slot_log(slot).info("{} removed", slot.label)

    # ----- what should be running

    def _manage(self) -> None:
        """Bring every pool towards its definition: spawn, retire, roll, restart after backoff."""
        if self._to_recover and not (self._stop_mode and self._by_pid):
            configs, self._to_recover = list(self._to_recover.values()), {}
            self._recover(configs, ", ".join(c.name for c in configs))
        if self._stop_mode:
            return
        now = time.monotonic()
        for name in list(self.pools):
            pool = self.pools[name]
            if pool.config is None:
                for slot in list(pool.slots.values()):
                    self._stop_slot(slot, "worker definition removed", "retire")
                if not pool.slots:
                    del self.pools[name]
                    self.log.info("pool {} removed", name)
                continue
            active = pool.active()
            drained = self.fleet.drained.get(name)
            target = 0 if drained else pool.replicas
            for slot in active[target:]:
                why = f"{drained}ed by a fleet flag" if drained else f"pool shrunk to {pool.replicas}"
                self._stop_slot(slot, why, "retire")
            for _ in range(target - len(active)):
                index = pool.free_index()
                pool.slots[index] = Slot(name, index, pool.config)
            for slot in pool.active():
                if slot.state is SlotState.STOPPED or (
                    slot.state is SlotState.BACKOFF and slot.next_start is not None and slot.next_start <= now
                ):
                    self._spawn(slot)
            self._roll(pool)
        self._halt_if_flagged()
        if not self._ready_sent and all(
            "connection_ids" in s.report or s.state not in LIVE_STATES
            for p in self.pools.values()
            for s in p.slots.values()
        ):
            self._ready_sent = True
            self.notifier.ready()
            self._send_status()
            self.log.info("all children started")

    def _halt_if_flagged(self) -> None:
        """Stop (gracefully) once a halt flag covers every pool: the jobs in flight finish, then exit 0."""
        live = [name for name, pool in self.pools.items() if pool.config is not None]
        if live and all(self.fleet.drained.get(name) == "halt" for name in live):
            self.log.warning("halted by a fleet flag (djsupervisor resume clears it)")
            self.request_stop()

    def _roll(self, pool: Pool) -> None:
        """Restart children running an outdated definition, one at a time, each once the previous one runs."""
        outdated = [s for s in pool.active() if s.config.definition != pool.config.definition]
        if not outdated:
            return
        for slot in outdated:
            if slot.pid is None and slot.state in (SlotState.BACKOFF, SlotState.EXITED, SlotState.FATAL):
                slot.early_exits = slot.crashes = 0
                self._spawn(slot)  # nothing to lose: start it on the new definition now
        busy = any(
            (s.rolled and s.state is not SlotState.RUNNING)
            or (s.state is SlotState.STOPPING and s.after_stop == "respawn")
            for s in pool.slots.values()
        )
        if busy:
            return
        for slot in outdated:
            if slot.pid is not None and slot.state in (SlotState.STARTING, SlotState.RUNNING):
                slot.rolled = True
                self._stop_slot(slot, "worker definition changed", "respawn")
                return

    def _apply_config(self, new: SupervisorConfig) -> None:
        old_workers = {w.name: w for w in self.config.workers}
        new_names = {w.name for w in new.workers}
        if new.name != self.config.name:
            self.log.warning("reload: the supervisor name change to {!r} applies at the next start", new.name)
            new = dataclasses.replace(new, name=self.config.name)
        if new.http != self.config.http:
            self.log.warning("reload: the http address change to {!r} applies at the next start", new.http)
            new = dataclasses.replace(new, http=self.config.http)
        if self._host_override:
            new = dataclasses.replace(new, host=self._host_override)
        for name, pool in self.pools.items():
            if name not in new_names and pool.config is not None:
                self.log.info("reload: worker {} removed", name)
                pool.config = None
        for worker in new.workers:
            pool = self.pools.get(worker.name)
            old = old_workers.get(worker.name)
            if pool is None:
                self.log.info("reload: worker {} added ({}×{})", worker.name, worker.target, worker.replicas)
                self.pools[worker.name] = self._new_pool(worker, new)
                continue
            if pool.config is None:
                old = None
            if worker.autoscale is not None or pool.autoscaler is not None:
                self._resize_autoscaled(pool, old, worker, new)
            elif old is None:
                pool.replicas = worker.replicas
            elif worker.replicas != old.replicas:
                self.log.info("reload: worker {} resized to {}", worker.name, worker.replicas)
                pool.replicas = worker.replicas
            if pool.config is not None and pool.config.definition != worker.definition:
                self.log.info("reload: worker {} changed; rolling its children one at a time", worker.name)
            pool.config = worker
        self.config = new

    def _new_pool(self, worker: WorkerConfig, config: SupervisorConfig) -> Pool:
        """The pool of definition `worker` (of `config`, whose host budget an autoscaled pool grows within)."""
        pool = Pool(worker.name, worker, worker.replicas, minimum=worker.replicas)
        if worker.autoscale is not None:
            pool.autoscaler = Autoscaler(worker.autoscale, config.budget)
        return pool

    def _resize_autoscaled(
        self, pool: Pool, old: WorkerConfig | None, worker: WorkerConfig, new: SupervisorConfig
    ) -> None:
        """Reload of a pool that autoscales (before, after or both): a changed `replicas` sets the minimum,
        otherwise the runtime one (from `scale`) stays; the size is brought inside the new bounds; a pool
        that no longer autoscales takes its `replicas`."""
        settings = worker.autoscale
        if settings is None:
            self.log.info("reload: worker {} no longer autoscales: {} children", worker.name, worker.replicas)
            pool.autoscaler = None
            pool.replicas = pool.minimum = worker.replicas
            return
        if old is None or old.replicas != worker.replicas or pool.autoscaler is None:
            pool.minimum = worker.replicas
        pool.minimum = min(pool.minimum, settings.max_replicas)
        if pool.autoscaler is None:
            pool.autoscaler = Autoscaler(settings, new.budget)
        pool.autoscaler.settings, pool.autoscaler.budget = settings, new.budget
        size = min(max(pool.replicas, pool.minimum), settings.max_replicas)
        self.log.info(
            "reload: worker {} autoscales {}..{}, now {}", worker.name, pool.minimum, settings.max_replicas, size
        )
        pool.replicas = size

    # ----- autoscaling

    def _autoscale_tick(self) -> None:
        """Decide for every autoscaled pool, then run again in half a fleet interval (0.1 s to 5 s)."""
        try:
            self._autoscale()
        finally:
            interval = min(max(self.config.fleet_interval / 2, 0.1), 5.0)
            self.timers.call_at(time.monotonic() + interval, self._autoscale_tick)

    def _autoscale(self) -> None:
        if self._stop_mode or not any(p.autoscaler and p.config for p in self.pools.values()):
            return
        now = time.monotonic()
        available_mb = psutil.virtual_memory().available / 2**20
        for pool in self.pools.values():
            if pool.autoscaler is None or pool.config is None:
                continue
            active = pool.active()
            live = sum(1 for s in active if s.pid is not None and s.state in (SlotState.STARTING, SlotState.RUNNING))
            rss = [s.rss_mb for s in active if s.pid is not None and s.rss_mb is not None]
            decision = pool.autoscaler.decide(
                Observation(
                    now=now,
                    reading_time=self.fleet.updated,
                    pending=self.fleet.pending(pool.name),
                    desired=pool.replicas,
                    minimum=pool.minimum,
                    live=live,
                    drained=self.fleet.drained.get(pool.name),
                    stale_after=STALE_INTERVALS * self.config.fleet_interval,
                    cpu_percent=self._host_cpu,
                    available_mb=available_mb,
                    child_rss_mb=statistics.median(rss) if rss else None,
                )
            )
            self._apply_decision(pool, decision)

    def _apply_decision(self, pool: Pool, decision: Decision) -> None:
        if decision.action == "hold":
            if decision.kind != pool.hold_logged:  # each new kind of hold once, not every tick
                self.log.info("autoscale {}: hold at {}: {}", pool.name, pool.replicas, decision.reason)
            pool.hold_logged = decision.kind
            return
        self.log.info(
            "autoscale {}: {} from {} to {}: {}",
            pool.name,
            decision.action,
            pool.replicas,
            decision.replicas,
            decision.reason,
        )
        pool.hold_logged = None
        pool.replicas = decision.replicas

    # ----- watching

    def _check_children(self) -> None:
        self._reap()  # a safety net: SIGCHLDs coalesce
        now = time.monotonic()
        for slot in list(self._by_pid.values()):
            verdict = judge(
                slot, now, heartbeat_timeout=self.config.heartbeat_timeout, hang_timeout=self.config.hang_timeout
            )
            if verdict is None:
                continue
            log = self._slot_log(slot)
            if verdict.action == "kill":
                log.error("{} (pid {}): {}; killing its process group", slot.label, slot.pid, verdict.reason)
                slot.timed_out_job = verdict.timed_out_job
                self._stop_slot(slot, verdict.reason, "respawn", fast=True)
            elif not self._stop_mode:
                log.warning(
                    "{} (pid {}): {}; recycling it after its job in flight", slot.label, slot.pid, verdict.reason
                )
                self._stop_slot(slot, verdict.reason, "respawn")

    def _sample(self) -> None:
        self._host_cpu = psutil.cpu_percent(None)
        for pid, slot in list(self._by_pid.items()):
            sample = self.sampler.sample(pid)
            if sample is not None:
                slot.rss_mb, slot.cpu_percent = sample
        self.sampler.prune()
        self._check_children()

    def _send_status(self) -> None:
        counts: dict[str, int] = {}
        done = 0
        for pool in self.pools.values():
            for slot in pool.slots.values():
                counts[slot.state.value] = counts.get(slot.state.value, 0) + 1
                done += slot.report.get("jobs_done", 0)
        summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no children"
        self.notifier.status(f"{summary}; {done} jobs done by the current children")


def _note_signal(signum, frame) -> None:
    """The Python-level handler: nothing; the wakeup fd carries the signal into the loop."""


def _killpg(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            os.kill(pid, signum)
        except OSError:
            pass
