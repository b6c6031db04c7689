"""The parent process: forks a pool of children per worker definition and keeps them alive.

One thread, one `selectors` loop. Everything arrives as a readable descriptor: signals (through
`signal.set_wakeup_fd`; the Python-level handlers do nothing, the loop reads the signal numbers and
dispatches each to its ``handle_<name>`` method), the children's report pipes, and the control socket.
Timers are a heap of deadlines that sets the select timeout; what is due is decided by `_manage` and the
checks, which scan the (few) slots each turn.

The arbiter decides nothing about slots and pools itself: `Slot` (a child's life: exits, restart delays,
stops) and `Pool` (size, drain, roll, autoscaling) are pure and return what to do; the arbiter forks,
signals, reaps and logs what they said, as gunicorn's arbiter and circus' watchers split it.

Signals: TERM/INT stop gracefully (children get SIGTERM, finish the job in flight, exit; their process
group is SIGKILLed after `graceful_timeout`), exit 0. QUIT stops fast (SIGKILL; the jobs in flight go back
to pending at the next start's orphan recovery). HUP reloads the config file. TTIN/TTOU grow/shrink every
pool by one. USR1 is accepted (logs go to stderr: nothing to reopen).

The parent does no database work: it imported the worker definitions (so a restart costs no import) and
may hold the session those imports opened, which it never uses; each child reconnects on its own.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import selectors
import signal
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, cast

import psutil
from loguru import logger

from djsupervisor.fleet.agent import AgentSpec, heartbeat_window
from djsupervisor.fleet.link import FleetAgentLink, agent_children
from djsupervisor.fleet.view import FleetView
from djsupervisor.protocol import ProtocolError, parse_child_report
from djsupervisor.serve.control import ControlServer, default_socket_path
from djsupervisor.supervisor.autoscale import STALE_INTERVALS
from djsupervisor.supervisor.child import run_child
from djsupervisor.supervisor.config import ConfigError, SupervisorConfig, load_config
from djsupervisor.supervisor.fork import fork_child, killpg
from djsupervisor.supervisor.monitor import ResourceSampler
from djsupervisor.supervisor.pool import Action, Pool, Spawn, reconfigure_pools, summarize
from djsupervisor.supervisor.recovery_runs import RecoveryRuns
from djsupervisor.supervisor.slot import Outcome, Slot, Then
from djsupervisor.supervisor.states import StopIntent, StopMode, SupervisorState
from djsupervisor.supervisor.systemd import SystemdNotifier
from djsupervisor.supervisor.timers import Timers
from djsupervisor.supervisor.wakeup import SignalWakeup

#: The signals the supervisor handles, and the method each is dispatched to.
SIGNAL_HANDLERS: dict[int, str] = {
    signal.SIGTERM: "handle_term",
    signal.SIGINT: "handle_int",
    signal.SIGQUIT: "handle_quit",
    signal.SIGHUP: "handle_hup",
    signal.SIGTTIN: "handle_ttin",
    signal.SIGTTOU: "handle_ttou",
    signal.SIGCHLD: "handle_chld",
    signal.SIGUSR1: "handle_usr1",
}
HANDLED_SIGNALS = tuple(SIGNAL_HANDLERS)
_CHECK_INTERVAL = 0.5  # seconds between liveness/timeout checks and reaping safety net
_STATUS_INTERVAL = 10.0  # seconds between systemd STATUS= updates
_CONTROL_EXPIRY_INTERVAL = 5.0  # seconds between sweeps of idle control-socket clients


class Supervisor:
    """The supervisor of one configuration's worker pools; `run()` until stopped, returns the exit status."""

    def __init__(
        self, config: SupervisorConfig, config_path: str | Path | None = None, host: str | None = None
    ) -> None:
        self._host_override = host
        if host:
            config = dataclasses.replace(config, host=host)
        self.config = config
        self.config_path = config_path
        self.pools: dict[str, Pool] = {}
        self.state = SupervisorState.STARTING
        self.pid = os.getpid()
        self.started = time.time()
        self.timers = Timers()
        self.sampler = ResourceSampler()
        self.fleet = FleetView()  # queue depths and drain flags, as the fleet agent last read them
        self._host_cpu: float | None = None  # host-wide CPU % over the last sample_interval
        self.selector = selectors.DefaultSelector()
        self.control: ControlServer | None = None
        self.http: Any = None  # the metrics and status page endpoint (serve.http.StatusServer), if configured
        self.agent: FleetAgentLink | None = None
        self.notifier = SystemdNotifier()
        self._by_pid: dict[int, Slot] = {}
        self.recoveries = RecoveryRuns(config.name, self.pid, self.timers)
        self._stop_mode: StopMode | None = None
        self.wakeup = SignalWakeup()
        self._ready_sent = False
        self._report_changed = False  # a child's report changed its slot's state since the last _manage

    @property
    def log(self):
        return logger.bind(supervisor=self.config.name, worker="-", slot="-")

    def _slot_log(self, slot: Slot):
        return logger.bind(supervisor=self.config.name, worker=slot.worker, slot=slot.index)

    # ----- public API (the control socket calls these, in the loop)

    def status(self) -> dict:
        """The supervisor's state, one entry per slot (see `Slot.status`) and one per pool (`Pool.status`)."""
        now = time.monotonic()
        slots = [
            slot.status(now)
            for name in sorted(self.pools)
            for slot in sorted(self.pools[name].slots.values(), key=lambda s: s.index)
        ]
        return {
            "supervisor": self.config.name,
            "pid": self.pid,
            "started": self.started,
            "state": self.state.value,
            "http": self.http.address if self.http is not None else None,
            "host": self.config.host or platform.node(),
            "drained": dict(self.fleet.drained),
            "fleet_age": None if (age := self.fleet.age()) is None else round(age, 3),
            "slots": slots,
            "workers": slots,  # the old name of "slots", kept for one release
            "pools": [self.pools[name].status(self.fleet.pending(name)) for name in sorted(self.pools)],
        }

    def request_stop(self, fast: bool = False) -> None:
        """Stop every child (gracefully unless `fast`) and make `run()` return 0 once they are gone."""
        mode = StopMode.FAST if fast else StopMode.GRACEFUL
        if self._stop_mode is not None and self._stop_mode >= mode:
            return
        self._stop_mode = mode
        self.state = SupervisorState.STOPPING
        self.log.info("{} stop of {} children", "fast" if fast else "graceful", len(self._by_pid))
        self.notifier.stopping()
        for pool in list(self.pools.values()):
            self._carry_out(pool.stop_all("supervisor stopping", StopIntent.STAY, fast=fast))

    def request_reload(self) -> str | None:
        """Re-read the config file: new definitions start, removed ones stop, changed ones roll.

        Returns None once applied, else why nothing changed (the running configuration stays)."""
        if self._stop_mode:
            return "the supervisor is stopping"
        if self.config_path is None:
            self.log.warning("reload: started without a config file, nothing to reload")
            return "started without a config file: nothing to reload"
        self.notifier.reloading()
        self.state = SupervisorState.RELOADING
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
        self.state = SupervisorState.RUNNING
        self.notifier.ready()
        return problem

    def scale(self, worker: str, n: int) -> dict:
        """Set the size of pool `worker` to `n` children (see `Pool.scale`); KeyError if there is no such pool."""
        pool = self.pools.get(worker)
        if pool is None or pool.config is None:
            raise KeyError(f"no worker named {worker!r}")
        return pool.scale(n)

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
                return {"ok": True, **self.scale(cast(str, request.get("worker")), cast(int, request.get("replicas")))}
        except (KeyError, ValueError) as error:
            return {"ok": False, "error": str(error.args[0] if error.args else error)}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    # ----- the loop

    def run(self) -> int:
        """Start the pools and supervise them until stopped; returns the exit status (0 after a stop)."""
        try:
            self._setup()
            for worker in self.config.workers:
                self.pools[worker.name] = Pool.create(worker, self.config.budget, self.config.name)
            self.log.info(
                "supervisor {} (pid {}) starting {} pools: {}",
                self.config.name,
                self.pid,
                len(self.pools),
                ", ".join(f"{w.name}×{w.replicas}" for w in self.config.workers),
            )
            self.state = SupervisorState.RUNNING
            self._manage()
            self._start_ticks()
            while not (self._stop_mode and not self._by_pid and not self.recoveries.pids):
                self._turn()
            if self.agent is not None:
                self.agent.stop()
            self.log.info("supervisor {} stopped", self.config.name)
            return 0
        finally:
            self._teardown()

    def _turn(self) -> None:
        """One turn of the loop: wait for a descriptor or the next deadline, run what is ready, manage."""
        manage = False
        for key, mask in self.selector.select(self.timers.timeout(time.monotonic())):
            if self.selector.get_map().get(key.fd) is key:  # not unregistered by an earlier callback
                key.data(mask)
                manage = manage or getattr(key.data, "func", None) != self._on_report
        # A report that changed nothing about a slot's state needs no pass over every pool: with
        # many idle children, heartbeats are most wakeups (_take_reports flags the ones that count).
        if self.timers.run_due(time.monotonic()) or manage or self._report_changed:
            self._report_changed = False
            self._manage()

    def _start_ticks(self) -> None:
        """The fleet agent and the periodic work: checks, sampling, autoscaling, status, idle clients."""
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
            on_report=self.fleet.apply,
        )
        self.agent.start()
        every = self.timers.every
        every(self.config.fleet_interval, self.agent.tick)
        every(_CHECK_INTERVAL, self._check_children)
        psutil.cpu_percent(None)  # the first call starts the measurement and returns nothing useful
        every(self.config.sample_interval, self._sample)
        self._autoscale_tick()
        every(_STATUS_INTERVAL, self._send_status)
        if self.http is not None:
            every(1.0, self.http.expire_idle)
        if self.control is not None:  # a client that connects and never asks loses its descriptor
            every(_CONTROL_EXPIRY_INTERVAL, self.control.expire_idle)
        watchdog = self.notifier.watchdog_interval()
        if watchdog:
            every(watchdog / 2, self.notifier.watchdog)

    def _setup(self) -> None:
        self.selector.register(self.wakeup.install(HANDLED_SIGNALS), selectors.EVENT_READ, data=self._on_wakeup)
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
        for pid in list(self._by_pid) + list(self.recoveries.pids):  # only if run() ends by an exception
            killpg(pid, signal.SIGKILL)
        if self.agent is not None:
            self.agent.stop(fast=True)
        if self.control is not None:
            try:
                self.control.close()
            except Exception as error:
                self.log.warning("closing the control socket failed: {}", error)
        if self.http is not None:
            self.http.close()
        self.selector.close()
        self.wakeup.close()

    # ----- signals (see SIGNAL_HANDLERS)

    def _on_wakeup(self, mask: int) -> None:
        for signum in self.wakeup.read():
            self._handle_signal(signum)

    def _handle_signal(self, signum: int) -> None:
        """Log signal `signum` (not SIGCHLD: every child's exit sends one) and call its handler."""
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        if signum != signal.SIGCHLD:
            self.log.info("received {}", name)
        handler = SIGNAL_HANDLERS.get(signum)
        if handler is not None:
            getattr(self, handler)()

    def handle_term(self) -> None:
        """SIGTERM: graceful stop."""
        self.request_stop()

    def handle_int(self) -> None:
        """SIGINT (Ctrl+C): graceful stop."""
        self.request_stop()

    def handle_quit(self) -> None:
        """SIGQUIT: fast stop."""
        self.request_stop(fast=True)

    def handle_hup(self) -> None:
        """SIGHUP: reload the config file."""
        self.request_reload()

    def handle_ttin(self) -> None:
        """SIGTTIN: one child more in every pool (of an autoscaled pool, its minimum)."""
        for pool in self.pools.values():
            pool.resize_by(1)

    def handle_ttou(self) -> None:
        """SIGTTOU: one child fewer in every pool (of an autoscaled pool, its minimum)."""
        for pool in self.pools.values():
            pool.resize_by(-1)

    def handle_chld(self) -> None:
        """SIGCHLD: reap."""
        self._reap()

    def handle_usr1(self) -> None:
        """SIGUSR1: accepted; logs go to stderr, there is no log file to reopen."""

    # ----- children: carrying out what slots and pools decide

    def _carry_out(self, actions: Iterable[Action]) -> None:
        for action in actions:
            if isinstance(action, Spawn):
                self._spawn(action.slot)
            elif action.slot.pid is None:
                continue
            elif action.signal is signal.SIGTERM:
                self._terminate(action.slot, action.slot.pid, action.reason)
            else:
                killpg(action.slot.pid, action.signal)

    def _terminate(self, slot: Slot, pid: int, reason: str) -> None:
        """SIGTERM child `pid` of `slot` (STOPPING); SIGKILL its group if it is still there after graceful_timeout."""
        self._slot_log(slot).info("stopping {} (pid {}): {}", slot.label, pid, reason)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        self.timers.call_at(time.monotonic() + self.config.graceful_timeout, lambda: self._stop_overdue(slot, pid))

    def _stop_overdue(self, slot: Slot, pid: int) -> None:
        timeout = self.config.graceful_timeout
        if slot.stop_overdue(pid, f"graceful_timeout {timeout:g} s passed"):
            self._slot_log(slot).warning(
                "{} (pid {}) still running {:g} s after SIGTERM: SIGKILL", slot.label, pid, timeout
            )
            killpg(pid, signal.SIGKILL)

    def _follow(self, slot: Slot, outcome: Outcome) -> None:
        """Carry out what a child's exit (or a failed fork) leads to, and log it."""
        self._slot_log(slot).log(outcome.level, outcome.message, *outcome.args)
        if outcome.recover:
            self.recoveries.need(slot.config)
        if outcome.then is Then.RETIRE and (pool := self.pools.get(slot.worker)) is not None:
            pool.remove(slot)
        elif outcome.then is Then.RESPAWN:
            self._spawn(slot)
        elif outcome.restart_at is not None:
            self.timers.call_at(outcome.restart_at, lambda: None)  # wakes the loop; _manage spawns

    def _spawn(self, slot: Slot) -> None:
        """Fork a child into `slot`, on its pool's current definition."""
        config = self.pools[slot.worker].config
        slot.config = config or slot.config  # a respawn after the definition was removed: retired next turn
        read_fd, write_fd = os.pipe()
        timed_out_job = slot.timed_out_job

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
            self._follow(slot, slot.spawn_failed(self.config, time.monotonic()))
            return
        os.set_blocking(read_fd, False)
        slot.spawned(pid, read_fd, time.monotonic())
        self._by_pid[pid] = slot
        self.selector.register(read_fd, selectors.EVENT_READ, data=partial(self._on_report, slot, read_fd))
        self._slot_log(slot).info(
            "started {} (pid {}){}", slot.label, pid, f", restart {slot.restarts}" if slot.restarts else ""
        )

    def _fork(self, child: Callable[[list[int]], None]) -> int | None:
        """Fork a child that runs `child(fds_to_close)` (see `fork.fork_child`); its pid, or None."""
        registered = [key.fd for key in self.selector.get_map().values()]
        close_in_child = [*self.wakeup.fds(), self.selector.fileno(), *registered]
        if self.agent is not None:
            close_in_child += self.agent.fds()
        return fork_child(child, close_in_child, HANDLED_SIGNALS, log=self.log)

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
        reports = []
        for line in slot.reports:
            try:
                reports.append(parse_child_report(line.message))
            except ProtocolError:  # not JSON (line.message None), too long, or not a report: skipped
                continue
        if not self._ready_sent and any("connection_ids" in report for report in reports):
            self._report_changed = True  # READY may be due
        if slot.reported(reports, time.monotonic(), time.time()):
            self._report_changed = True
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
            if self.recoveries.reaped(pid, status):
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
        self._follow(slot, slot.exited(code, self.config, time.monotonic(), stopping=self._stop_mode is not None))

    # ----- what should be running

    def _manage(self) -> None:
        """Run due job recoveries, bring every pool towards its definition (`Pool.reconcile`), send READY."""
        if not (self._stop_mode and self._by_pid):  # while stopping, once every child is gone
            self.recoveries.start(self._fork)
        if self._stop_mode:
            return
        now = time.monotonic()
        for name, pool in list(self.pools.items()):
            self._carry_out(pool.reconcile(now, self.fleet.drained.get(name)))
            if pool.gone:
                del self.pools[name]
                self.log.info("pool {} removed", name)
        self._halt_if_flagged()
        if not self._ready_sent and all(pool.connected() for pool in self.pools.values()):
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

    def _apply_config(self, new: SupervisorConfig) -> None:
        """Reload: the supervisor's settings (name, http and host stay until the next start), then each pool's."""
        if new.name != self.config.name:
            self.log.warning("reload: the supervisor name change to {!r} applies at the next start", new.name)
            new = dataclasses.replace(new, name=self.config.name)
        if new.http != self.config.http:
            self.log.warning("reload: the http address change to {!r} applies at the next start", new.http)
            new = dataclasses.replace(new, http=self.config.http)
        if self._host_override:
            new = dataclasses.replace(new, host=self._host_override)
        reconfigure_pools(self.pools, new.workers, new.budget, self.config.name)
        self.config = new

    # ----- autoscaling, watching

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
        stale_after = STALE_INTERVALS * self.config.fleet_interval
        for pool in self.pools.values():
            if pool.autoscaler is None or pool.config is None:
                continue
            observation = pool.observe(
                now, self.fleet, stale_after=stale_after, cpu_percent=self._host_cpu, available_mb=available_mb
            )
            pool.apply(pool.autoscaler.decide(observation))

    def _check_children(self) -> None:
        self._reap()  # a safety net: SIGCHLDs coalesce
        now, config = time.monotonic(), self.config
        for pool in list(self.pools.values()):
            self._carry_out(
                pool.judge_children(
                    now,
                    heartbeat_timeout=config.heartbeat_timeout,
                    hang_timeout=config.hang_timeout,
                    stopping=self._stop_mode is not None,
                )
            )

    def _sample(self) -> None:
        self._host_cpu = psutil.cpu_percent(None)
        for pid, slot in list(self._by_pid.items()):
            sample = self.sampler.sample(pid)
            if sample is not None:
                slot.rss_mb, slot.cpu_percent = sample
        self.sampler.prune()
        self._check_children()

    def _send_status(self) -> None:
        self.notifier.status(summarize(self.pools.values()))
