"""The parent process: forks a pool of children per worker definition and keeps them alive.

One thread, one `selectors` loop. Everything arrives as a readable descriptor: signals (through
`signal.set_wakeup_fd`; the Python-level handlers do nothing, the loop reads the signal numbers and
dispatches each to its ``handle_<name>`` method), the children's report pipes, and the control socket.
Timers are a heap of deadlines that sets the select timeout; what is due is decided by `_manage` and the
checks, which scan the (few) slots each turn.

The arbiter decides nothing about slots and pools itself: `Slot` (a child's life), `Pool` (size, drain,
roll, autoscaling) and `Roll` (a code restart: `rolling`) are pure and return what to do; the arbiter forks,
signals, reaps and logs what they said, as gunicorn's arbiter and circus' watchers split it.

The parent does no database work: it imported the worker definitions (a respawn costs no import; a restarted
pool's children import anew, `fresh_child`) and never uses their session; each child reconnects on its own.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import selectors
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import psutil
from loguru import logger

from djsupervisor.fleet.agent import AgentSpec
from djsupervisor.fleet.link import FleetAgentLink, agent_children
from djsupervisor.fleet.view import FleetView
from djsupervisor.protocol import ChildReportMessage, ControlRequest, ControlResponse
from djsupervisor.serve import commands
from djsupervisor.serve.endpoints import Endpoints
from djsupervisor.supervisor.autoscale import STALE_INTERVALS
from djsupervisor.supervisor.children import ChildProcesses
from djsupervisor.supervisor.config import ConfigError, SupervisorConfig, kept_at_reload, load_config
from djsupervisor.supervisor.fork import describe_exit, killpg
from djsupervisor.supervisor.fresh_child import child_body
from djsupervisor.supervisor.pool import Action, Pool, Spawn, autoscale_pools, reconfigure_pools, summarize
from djsupervisor.supervisor.recovery_runs import RecoveryRuns
from djsupervisor.supervisor.rolling import Restarts
from djsupervisor.supervisor.slot import Outcome, Slot, Then
from djsupervisor.supervisor.states import StopIntent, StopMode, SupervisorState
from djsupervisor.supervisor.systemd import SystemdNotifier
from djsupervisor.supervisor.timers import Timers
from djsupervisor.supervisor.wakeup import SignalWakeup

#: The signals the supervisor handles, and the method each is dispatched to.
HANDLED_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
    signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2,
)  # fmt: skip
SIGNAL_HANDLERS: dict[int, str] = {signum: f"handle_{signum.name[3:].lower()}" for signum in HANDLED_SIGNALS}
_CHECK_INTERVAL = 0.5  # seconds between liveness/timeout checks and reaping safety net
_STATUS_INTERVAL = 1.0  # STATUS= when it changed, at most once a second (READY's says "2 starting")
_IDLE_CLIENT_SWEEP = 1.0  # seconds between sweeps of idle control-socket and HTTP clients


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
        self.timers = Timers(self.log)  # a callback that raises is logged there; the loop goes on
        self.fleet = FleetView()  # queue depths and drain flags, as the fleet agent last read them
        self._host_cpu: float | None = None  # host-wide CPU % over the last sample_interval
        self.selector = selectors.DefaultSelector()
        self.endpoints = Endpoints(self.log)  # the control socket and the HTTP endpoint
        self.agent: FleetAgentLink | None = None
        self.notifier = SystemdNotifier()
        self.wakeup = SignalWakeup()
        self.children = ChildProcesses(self.selector, HANDLED_SIGNALS, self._inherited_fds, self._on_reports, self.log)
        self.recoveries = RecoveryRuns(config.name, self.pid, self.timers)
        self.restarts = Restarts(self.selector, self.children.fork, self.log)  # `djsupervisor restart`
        self._stop_mode: StopMode | None = None
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
            "http": self.endpoints.http_address,
            "host": self.config.host or platform.node(),
            **self.fleet.status_fields(sorted(self.pools)),  # drained, fleet_age, pool_progress
            "slots": slots,
            "workers": slots,  # the old name of "slots", kept for one release
            "pools": [self.pools[name].status(self.fleet.pending(name)) for name in sorted(self.pools)],
            "restart": self.restarts.status(),  # the restart under way or last finished (None: none yet)
        }

    def request_stop(self, fast: bool = False) -> None:
        """Stop every child (gracefully unless `fast`) and make `run()` return 0 once they are gone."""
        mode = StopMode.FAST if fast else StopMode.GRACEFUL
        if self._stop_mode is not None and self._stop_mode >= mode:
            return
        self._stop_mode = mode
        self.state = SupervisorState.STOPPING
        self.log.info("{} stop of {} children", "fast" if fast else "graceful", len(self.children.by_pid))
        self.notifier.stopping()
        for pool in list(self.pools.values()):
            self._carry_out(pool.stop_all("supervisor stopping", StopIntent.STAY, fast=fast))
        self._carry_out(self.restarts.abort("supervisor stopping", time.monotonic()))

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

    def handle_control(self, request: ControlRequest) -> ControlResponse:
        """Answer one control-socket request (see `djsupervisor.serve.commands`)."""
        return commands.answer(self, request)

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
            while not (self._stop_mode and not self.children.by_pid and not self.recoveries.pids):
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
                manage = manage or not self.children.is_report_pipe(key.data)
        # A report that changed nothing about a slot's state needs no pass over every pool: with
        # many idle children, heartbeats are most wakeups (_on_reports flags the ones that count).
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
                webhooks=self.config.webhooks,
            ),
            children=lambda: agent_children(s for p in self.pools.values() for s in p.slots.values()),
            fork=self.children.fork,
            selector=self.selector,
            on_report=self.fleet.apply,
            events=lambda: [event for pool in self.pools.values() for event in pool.notices.take()],
        )
        self.agent.start()
        every = self.timers.every
        every(self.config.fleet_interval, self.agent.tick)
        every(_CHECK_INTERVAL, self._check_children)
        psutil.cpu_percent(None)  # the first call starts the measurement and returns nothing useful
        every(self.config.sample_interval, self._sample)
        self._autoscale_tick()
        every(_STATUS_INTERVAL, self._send_status)
        every(_IDLE_CLIENT_SWEEP, self.endpoints.expire_idle)  # a client that never asks loses its descriptor
        watchdog = self.notifier.watchdog_interval()
        if watchdog:
            every(watchdog / 2, self.notifier.watchdog)

    def _setup(self) -> None:
        self.selector.register(self.wakeup.install(HANDLED_SIGNALS), selectors.EVENT_READ, data=self._on_wakeup)
        config = self.config
        self.endpoints.open(
            self.selector,
            name=config.name,
            control_socket=config.control_socket,
            http=config.http,
            answer=self.handle_control,
            supervisor=self,
            allowed_hosts=config.http_allowed_hosts,
            token_file=config.http_token_file,
        )

    def _teardown(self) -> None:
        for pid in list(self.children.by_pid) + list(self.recoveries.pids):  # only if run() ends by an exception
            killpg(pid, signal.SIGKILL)
        if self.agent is not None:
            self.agent.stop(fast=True)
        self.endpoints.close()
        self.selector.close()
        self.wakeup.close()

    # ----- signals (see SIGNAL_HANDLERS)

    def _on_wakeup(self, mask: int) -> None:
        """Signals arrived: log each (not SIGCHLD: every child's exit sends one) and call its handler."""
        for signum in self.wakeup.read():
            handler = SIGNAL_HANDLERS.get(signum)  # only the handled signals have a handler that writes here
            if handler is not None and signum != signal.SIGCHLD:
                self.log.info("received {}", signal.Signals(signum).name)
            if handler is not None:
                getattr(self, handler)()

    def handle_term(self) -> None:
        """SIGTERM: graceful stop (children get SIGTERM, finish the job in flight and exit; a child still
        there after `graceful_timeout` is SIGKILLed with its process group), then exit 0."""
        self.request_stop()

    def handle_int(self) -> None:
        """SIGINT (Ctrl+C): graceful stop."""
        self.request_stop()

    def handle_quit(self) -> None:
        """SIGQUIT: fast stop (SIGKILL; the jobs in flight go back to pending by a recovery run)."""
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

    def handle_usr2(self) -> None:
        """SIGUSR2: restart every pool onto freshly imported code (`djsupervisor restart`), one slot at a time."""
        self.restarts.start_all(self.pools, time.monotonic(), stopping=self._stop_mode is not None)

    # ----- children: carrying out what slots and pools decide

    def _carry_out(self, actions: Iterable[Action]) -> None:
        for action in actions:
            if isinstance(action, Spawn):
                self._spawn(action.slot)
            elif action.slot.pid is None:
                continue
            elif action.signal is signal.SIGTERM:
                self._slot_log(action.slot).info(
                    "stopping {} (pid {}): {}", action.slot.label, action.slot.pid, action.reason
                )
                self.children.terminate(action.slot, self.timers, self.config.graceful_timeout)
            else:
                killpg(action.slot.pid, action.signal)

    def _follow(self, slot: Slot, outcome: Outcome) -> None:
        """Carry out what a child's exit (or a failed fork) leads to, and log it."""
        self._slot_log(slot).log(outcome.level, outcome.message, *outcome.args)
        if outcome.recover:
            self.recoveries.need(slot)
        if outcome.then is Then.RETIRE and (pool := self.pools.get(slot.worker)) is not None:
            pool.remove(slot)
        elif outcome.then is Then.RESPAWN:
            self._spawn(slot)
        elif outcome.restart_at is not None:
            self.timers.call_at(outcome.restart_at, lambda: None)  # wakes the loop; _manage spawns

    def _spawn(self, slot: Slot) -> None:
        """Start a child in `slot`, on its pool's current definition: forked, or from a fresh interpreter
        once its pool's code was restarted (`djsupervisor.supervisor.rolling`)."""
        config = self.pools[slot.worker].config
        slot.config = config or slot.config  # a respawn after the definition was removed: retired next turn
        fresh = self.restarts.is_fresh(slot)
        child = child_body(self.config, slot.config, slot, self.pid, fresh=fresh)
        pid = self.children.spawn(slot, child)
        if pid is None:
            self._follow(slot, slot.spawn_failed(self.config, time.monotonic(), *self.children.failure))
            return
        restart = f", restart {slot.restarts}" if slot.restarts else ""
        self._slot_log(slot).info("started {} (pid {}){}{}", slot.label, pid, restart, ", fresh" if fresh else "")

    def _inherited_fds(self) -> list[int]:
        """The parent's descriptors (besides the selector's) that a new child must close."""
        return [*self.wakeup.fds(), *(self.agent.fds() if self.agent is not None else ())]

    def _on_reports(self, slot: Slot, reports: list[ChildReportMessage]) -> None:
        """A child's reports arrived (none: its pipe closed): a first cycle makes the slot RUNNING."""
        if not reports or (not self._ready_sent and any("connection_ids" in report for report in reports)):
            self._report_changed = True  # READY may be due
        if reports and slot.reported(reports, time.monotonic(), time.time()):
            self._report_changed = True
            self._slot_log(slot).info("{} is running (pid {})", slot.label, slot.pid)

    def _reap(self) -> None:
        for pid, status in self.children.reap():
            if self.agent is not None and pid == self.agent.pid:
                self.agent.exited(status)
            elif not self.recoveries.reaped(pid, status) and (slot := self.children.by_pid.pop(pid, None)):
                if self.agent is not None:
                    self.agent.child_gone(slot.worker, pid)
                self.children.read_last_words(slot)
                stopping = self._stop_mode is not None
                code = os.waitstatus_to_exitcode(status)
                outcome = slot.exited(code, self.config, time.monotonic(), stopping=stopping)
                if self.restarts.owns(slot):  # a restart's new child that never took its slot: the roll halts
                    outcome = self.restarts.surge_exited(slot, outcome, describe_exit(code), time.monotonic())
                self.restarts.left(slot, self.pools)
                self._follow(slot, outcome)

    # ----- what should be running

    def _manage(self) -> None:
        """Run due job recoveries, bring every pool towards its definition (`Pool.reconcile`), send READY."""
        if not (self._stop_mode and self.children.by_pid):  # while stopping, once every child is gone
            self.recoveries.start(self.children.fork)
        if self._stop_mode:
            return
        now = time.monotonic()
        self._carry_out(self.restarts.advance(self.pools, now, self.config))
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
        new = kept_at_reload(self.config, new, self._host_override, self.log)
        reconfigure_pools(self.pools, new.workers, new.budget, self.config.name)
        self.config = new

    # ----- autoscaling, watching

    def _autoscale_tick(self) -> None:
        """Decide for every autoscaled pool, then run again in half a fleet interval (0.1 s to 5 s)."""
        interval = min(max(self.config.fleet_interval / 2, 0.1), 5.0)
        self.timers.call_at(time.monotonic() + interval, self._autoscale_tick)
        if self._stop_mode is None:
            autoscale_pools(
                self.pools.values(),
                time.monotonic(),
                self.fleet,
                stale_after=STALE_INTERVALS * self.config.fleet_interval,
                cpu_percent=self._host_cpu,
                available_mb=lambda: psutil.virtual_memory().available / 2**20,
            )

    def _check_children(self) -> None:
        self._reap()  # a safety net: SIGCHLDs coalesce
        now, config, stopping = time.monotonic(), self.config, self._stop_mode is not None
        timeouts = dict(heartbeat_timeout=config.heartbeat_timeout, hang_timeout=config.hang_timeout)
        for pool in list(self.pools.values()):
            self._carry_out(pool.judge_children(now, **timeouts, stopping=stopping))

    def _sample(self) -> None:
        self._host_cpu = psutil.cpu_percent(None)
        self.children.sample()
        self._check_children()

    def _send_status(self) -> None:
        self.notifier.status(summarize(self.pools.values()))
