"""The slots of one worker definition, reconciling themselves with what the pool should be (circus' Watcher).

Pure, like `Slot`: no fork, no signal, no selector. `reconcile` compares the slots with the pool's size,
its fleet flag and its definition and returns the actions that close the gap, which the arbiter carries
out in order: `Spawn` (fork a child into the slot) and `Stop` (send the slot's child a signal). What needs
no process happens at once, inside the pool: a stop's state change and intent, the removal of a slot
that has no child, new empty slots. So a decision later in the same pass sees the earlier ones (a slot
being retired is no longer counted as active; a slot about to be spawned is not rolled as well).

The rest is the pool's share of reload (`reconfigure`: resize, roll a changed definition one slot at a
time), of `scale` and TTIN/TTOU, of autoscaling (`observe`, `apply`), and its line of the status.

What the notifiers hear of (a slot gone FATAL, a child killed or recycled, a drain) is decided here, where
it happens, and kept in the pool's `notices` (`djsupervisor.supervisor.notices`) for the fleet agent.
"""

from __future__ import annotations

import dataclasses
import itertools
import signal
import statistics
from collections.abc import Callable, Iterable
from typing import Any

from loguru import logger

from djsupervisor.fleet.view import FleetView
from djsupervisor.supervisor import gpus
from djsupervisor.supervisor.autoscale import Autoscaler, Decision, HostBudget, Observation
from djsupervisor.supervisor.config import WorkerConfig
from djsupervisor.supervisor.monitor import judge
from djsupervisor.supervisor.notices import Notices
from djsupervisor.supervisor.settings import REPLICAS_LIMIT
from djsupervisor.supervisor.slot import Slot
from djsupervisor.supervisor.states import DOWN_AFTER_EXIT, LIVE, WORKING, SlotState, StopIntent


@dataclasses.dataclass(frozen=True)
class Spawn:
    """Fork a child into `slot` (it is STOPPED or due to restart, or rolled onto a new definition)."""

    slot: Slot


@dataclasses.dataclass(frozen=True)
class Stop:
    """Send `signal` for `reason` to `slot`'s child: SIGTERM to the child (a graceful stop, SIGKILL of its
    group after graceful_timeout), or SIGKILL to its whole process group. The slot is STOPPING already."""

    slot: Slot
    signal: signal.Signals
    reason: str


Action = Spawn | Stop


@dataclasses.dataclass(eq=False)
class Pool:
    """The slots of one worker definition; `config` is None once the definition was removed.

    `replicas` is the desired size; an autoscaled pool (`autoscaler` set) keeps it between `minimum`
    (the config's `replicas`, or what `scale` set) and the config's `max_replicas`. `supervisor` names
    the supervisor in the pool's log lines.
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
    supervisor: str = "-"
    changes: list[str] = dataclasses.field(default_factory=list)  # what the last reload did (its answer)
    notices: Notices = dataclasses.field(init=False, repr=False)  # what the notifiers hear of

    def __post_init__(self) -> None:
        self.notices = Notices(self.name)

    @classmethod
    def create(cls, worker: WorkerConfig, budget: HostBudget, supervisor: str = "-") -> Pool:
        """The pool of definition `worker`; an autoscaled one grows within the host `budget`."""
        pool = cls(worker.name, worker, worker.replicas, minimum=worker.replicas, supervisor=supervisor)
        if worker.autoscale is not None:
            pool.autoscaler = Autoscaler(worker.autoscale, budget)
        return pool

    @property
    def log(self) -> Any:
        return logger.bind(supervisor=self.supervisor, worker="-", slot="-")

    def _changed(self, text: str, *args: Any) -> None:
        """Log a reload's change to this pool and keep it for the reload command's answer."""
        self.log.info("reload: " + text, *args)
        self.changes.append(text.format(*args))

    def slot_log(self, slot: Slot) -> Any:
        return logger.bind(supervisor=self.supervisor, worker=slot.worker, slot=slot.index)

    # ----- what is there

    def active(self) -> list[Slot]:
        """Slots meant to stay (not being retired), by index."""
        return sorted((s for s in self.slots.values() if not s.retiring), key=lambda s: s.index)

    def free_index(self) -> int:
        """The lowest index no slot has."""
        return next(i for i in itertools.count() if i not in self.slots)

    @property
    def gone(self) -> bool:
        """Whether the definition was removed and its last slot is gone (the supervisor forgets the pool)."""
        return self.config is None and not self.slots

    def connected(self) -> bool:
        """Whether every child has connected to the database (or there is none): part of READY."""
        return all(s.report.connected or s.state not in LIVE for s in self.slots.values())

    # ----- reconciling

    def reconcile(self, now: float, drained: str | None) -> list[Action]:
        """What brings the pool towards its definition at monotonic time `now`: retire slots beyond its
        size (all of them while `drained` by a fleet flag, "drain" or "halt"), add and start missing
        ones, restart those whose restart delay passed, roll an outdated definition."""
        self.notices.observe(self.slots.values(), drained)
        if self.config is None:
            return self.stop_all("worker definition removed", StopIntent.RETIRE)
        actions: list[Action] = []
        active = self.active()
        target = 0 if drained else self.replicas
        for slot in active[target:]:
            why = f"{drained}ed by a fleet flag" if drained else f"pool shrunk to {self.replicas}"
            actions += self.stop(slot, why, StopIntent.RETIRE)
        for _ in range(target - len(active)):
            index = self.free_index()
            self.slots[index] = Slot(self.name, index, self.config)
        starting = [slot for slot in self.active() if slot.due(now)]
        actions += [Spawn(slot) for slot in starting]
        return actions + self._roll(self.config, starting)

    def _roll(self, config: WorkerConfig, starting: list[Slot]) -> list[Action]:
        """Restart children running an outdated definition, one at a time, each once the previous one runs
        (the slots in `starting` start on the new definition anyway)."""
        outdated = [s for s in self.active() if s not in starting and s.config.definition != config.definition]
        actions: list[Action] = []
        for slot in outdated:
            if slot.pid is None and slot.state in DOWN_AFTER_EXIT:
                slot.reset()
                actions.append(Spawn(slot))  # nothing to lose: start it on the new definition now
        busy = any(
            (s.rolled and s.state is not SlotState.RUNNING)
            or (s.state is SlotState.STOPPING and s.stop_intent is StopIntent.RESPAWN)
            for s in self.slots.values()
        )
        if busy:
            return actions
        for slot in outdated:
            if slot.pid is not None and slot.state in WORKING:
                slot.rolled = True
                return actions + self.stop(slot, "worker definition changed", StopIntent.RESPAWN)
        return actions

    def stop(self, slot: Slot, reason: str, intent: StopIntent, *, fast: bool = False) -> list[Action]:
        """Stop `slot` for `reason`, then `intent` (see `Slot.stop`); a slot without a child that is
        retired leaves the pool at once."""
        sent = slot.stop(reason, intent, fast=fast)
        if sent is not None:
            return [Stop(slot, sent, reason)]
        if slot.pid is None and slot.retiring:
            self.remove(slot)
        return []

    def stop_all(self, reason: str, intent: StopIntent, *, fast: bool = False) -> list[Action]:
        """Stop every slot (see `stop`)."""
        return [action for slot in list(self.slots.values()) for action in self.stop(slot, reason, intent, fast=fast)]

    def judge_children(
        self, now: float, *, heartbeat_timeout: float, hang_timeout: float, stopping: bool
    ) -> list[Action]:
        """Stop the children the monitor judges (`monitor.judge`): a hung one or one past job_timeout is
        killed and replaced, one above max_memory_mb is recycled after its job in flight (not while the
        supervisor is `stopping`: it is stopping them anyway)."""
        actions: list[Action] = []
        for slot in list(self.slots.values()):
            verdict = judge(slot, now, heartbeat_timeout=heartbeat_timeout, hang_timeout=hang_timeout)
            if verdict is None:
                continue
            log = self.slot_log(slot)
            told = f"{slot.label} (pid {slot.pid}): {verdict.reason}"
            if verdict.action == "kill":
                log.error("{} (pid {}): {}; killing its process group", slot.label, slot.pid, verdict.reason)
                self.notices.tell(verdict.kind, slot, f"{told}; killed and replaced")
                slot.timed_out_job = verdict.timed_out_job
                actions += self.stop(slot, verdict.reason, StopIntent.RESPAWN, fast=True)
            elif not stopping:
                log.warning(
                    "{} (pid {}): {}; recycling it after its job in flight", slot.label, slot.pid, verdict.reason
                )
                self.notices.tell(verdict.kind, slot, f"{told}; recycled after its job")
                actions += self.stop(slot, verdict.reason, StopIntent.RESPAWN)
        return actions

    def remove(self, slot: Slot) -> None:
        """Take `slot` out of the pool, keeping its job counts in the pool's."""
        if self.slots.get(slot.index) is slot:
            del self.slots[slot.index]
            self.jobs_done_retired += slot.jobs_done_total
            self.jobs_failed_retired += slot.jobs_failed_total
            self.slot_log(slot).info("{} removed", slot.label)

    # ----- reload, scale

    def reconfigure(self, worker: WorkerConfig | None, budget: HostBudget) -> None:
        """Reload: take definition `worker` (None: removed from the config file; the slots retire at the
        next `reconcile`) within host `budget`. A changed `replicas` resizes the pool; a changed definition
        rolls its children (at the next `reconcile`s, one at a time)."""
        old = self.config
        self.changes = []
        if worker is None:
            if old is not None:
                self._changed("worker {} removed", self.name)
                self.config = None
            return
        if worker.autoscale is not None or self.autoscaler is not None:
            self._reconfigure_autoscaling(old, worker, budget)
        elif old is None:
            self.replicas = worker.replicas
        elif worker.replicas != old.replicas:
            self._changed(
                "worker {} resized from {} to {} (the file's replicas)", worker.name, self.replicas, worker.replicas
            )
            self.replicas = worker.replicas
        elif self.replicas != worker.replicas:  # one rule for every pool: a runtime scale outlives a reload
            self._changed(
                "worker {} stays at {} (set by scale; the file's replicas, {}, did not change)",
                worker.name,
                self.replicas,
                worker.replicas,
            )
        if old is not None and old.definition != worker.definition:
            self._changed("worker {} changed; rolling its children one at a time", worker.name)
        if (limit := gpus.capacity(worker)) is not None and self.replicas > limit:  # a scale before fewer GPUs
            self._changed("worker {} cut to {} children (its GPUs take no more)", worker.name, limit)
            self.replicas, self.minimum = limit, min(self.minimum, limit)
        self.config = worker

    def _reconfigure_autoscaling(self, old: WorkerConfig | None, worker: WorkerConfig, budget: HostBudget) -> None:
        """Reload of a pool that autoscales (before, after or both): a changed `replicas` sets the minimum,
        otherwise the runtime one (from `scale`) stays; the size is brought inside the new bounds; a pool
        that no longer autoscales takes its `replicas`."""
        settings = worker.autoscale
        if settings is None:
            self._changed("worker {} no longer autoscales: {} children", worker.name, worker.replicas)
            self.autoscaler = None
            self.replicas = self.minimum = worker.replicas
            return
        if old is None or old.replicas != worker.replicas or self.autoscaler is None:
            self.minimum = worker.replicas
        self.minimum = min(self.minimum, settings.max_replicas)
        if self.autoscaler is None:
            self.autoscaler = Autoscaler(settings, budget)
        self.autoscaler.settings, self.autoscaler.budget = settings, budget
        size = min(max(self.replicas, self.minimum), settings.max_replicas)
        self._changed("worker {} autoscales {}..{}, now {}", worker.name, self.minimum, settings.max_replicas, size)
        self.replicas = size

    def scale(self, n: int) -> dict[str, Any]:
        """Set the size to `n` children; of an autoscaled pool, its minimum (the pool grows to `n` at once
        if smaller, and the autoscaler may shrink it down to `n` when idle). ValueError if `n` is not a
        size, above `REPLICAS_LIMIT` or above an autoscaled pool's max_replicas."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"replicas must be an integer >= 0, got {n!r}")
        if n > REPLICAS_LIMIT:
            raise ValueError(f"replicas must be <= {REPLICAS_LIMIT} (children per pool), got {n}")
        if self.config is not None and (beyond := gpus.limit_problem(self.config, n)):
            raise ValueError(f"replicas {beyond}")  # a GPU pool: never more children than its GPUs take
        if self.autoscaler is not None:
            maximum = self.autoscaler.settings.max_replicas
            if n > maximum:
                raise ValueError(
                    f"pool {self.name} autoscales up to max_replicas {maximum}: scale sets its minimum, "
                    f"got {n} (raise max_replicas in the config and reload)"
                )
            size, before = max(n, self.replicas), self.minimum
            self.log.info("pool {} minimum set to {} (autoscaling {}..{}, now {})", self.name, n, n, maximum, size)
            self.minimum, self.replicas = n, size
            return {"worker": self.name, "replicas": self.replicas, "min": n, "max": maximum, "before": before}
        before = self.replicas
        if n != self.replicas:
            self.log.info("pool {} scaled from {} to {}", self.name, self.replicas, n)
        self.replicas = n
        return {"worker": self.name, "replicas": n, "before": before}

    def resize_by(self, step: int) -> None:
        """TTIN/TTOU: one child more or fewer (of an autoscaled pool, its minimum), within the bounds."""
        if self.config is None:
            return
        size = (self.minimum if self.autoscaler else self.replicas) + step
        maximum = self.autoscaler.settings.max_replicas if self.autoscaler else REPLICAS_LIMIT
        maximum = min(maximum, gpus.capacity(self.config) or maximum)
        if 0 <= size <= maximum:
            self.scale(size)

    # ----- autoscaling

    def observe(
        self,
        now: float,
        fleet: FleetView,
        *,
        stale_after: float,
        cpu_percent: float | None,
        available_mb: float | None,
    ) -> Observation:
        """What the autoscaler decides from: the fleet's reading for this pool, its children, the host."""
        active = self.active()
        rss = [s.rss_mb for s in active if s.pid is not None and s.rss_mb is not None]
        return Observation(
            now=now,
            reading_time=fleet.updated,
            pending=fleet.pending(self.name),
            desired=self.replicas,
            minimum=self.minimum,
            live=sum(1 for s in active if s.pid is not None and s.state in WORKING),
            drained=fleet.drained.get(self.name),
            stale_after=stale_after,
            cpu_percent=cpu_percent,
            available_mb=available_mb,
            child_rss_mb=statistics.median(rss) if rss else None,
        )

    def apply(self, decision: Decision) -> None:
        """Take the autoscaler's `decision` (the size changes at the next `reconcile`)."""
        if decision.action == "hold":
            if decision.kind != self.hold_logged:  # each new kind of hold once, not every tick
                self.log.info("autoscale {}: hold at {}: {}", self.name, self.replicas, decision.reason)
            self.hold_logged = decision.kind
            return
        self.log.info(
            "autoscale {}: {} from {} to {}: {}",
            self.name,
            decision.action,
            self.replicas,
            decision.replicas,
            decision.reason,
        )
        self.hold_logged = None
        self.replicas = decision.replicas

    def status(self, pending: int | None) -> dict[str, Any]:
        """The pool's size; for an autoscaled one also its bounds, `pending` jobs and last decision."""
        entry: dict[str, Any] = {"worker": self.name, "replicas": self.replicas, "autoscale": None}
        if self.autoscaler is not None:
            last = self.autoscaler.last_decision
            entry["autoscale"] = {
                "min": self.minimum,
                "max": self.autoscaler.settings.max_replicas,
                "pending": pending,
                "decision": last.action if last else None,
                "reason": last.reason if last else None,
            }
        return entry


def autoscale_pools(
    pools: Iterable[Pool],
    now: float,
    fleet: FleetView,
    *,
    stale_after: float,
    cpu_percent: float | None,
    available_mb: Callable[[], float],
) -> None:
    """One autoscaling decision for every autoscaled pool, taken at once (`available_mb` is only asked when
    some pool autoscales: reading the host's memory is not free)."""
    scaled = [pool for pool in pools if pool.autoscaler is not None and pool.config is not None]
    if not scaled:
        return
    memory = available_mb()
    for pool in scaled:
        observation = pool.observe(now, fleet, stale_after=stale_after, cpu_percent=cpu_percent, available_mb=memory)
        assert pool.autoscaler is not None  # (scaled: set)
        pool.apply(pool.autoscaler.decide(observation))


def reconfigure_pools(
    pools: dict[str, Pool], workers: Iterable[WorkerConfig], budget: HostBudget, supervisor: str
) -> None:
    """Reload: give every pool its definition among `workers` (see `Pool.reconfigure`); a pool whose
    definition is gone retires its slots, a new definition gets a new pool (in `pools`)."""
    workers = list(workers)
    names = {worker.name for worker in workers}
    for name, pool in pools.items():
        if name not in names:
            pool.reconfigure(None, budget)
    for worker in workers:
        if worker.name in pools:
            pools[worker.name].reconfigure(worker, budget)
        else:
            pools[worker.name] = Pool.create(worker, budget, supervisor)
            pools[worker.name]._changed("worker {} added ({}×{})", worker.name, worker.target, worker.replicas)


def summarize(pools: Iterable[Pool]) -> str:
    """One line on every slot: how many in each state, jobs done (systemd's STATUS=)."""
    counts: dict[str, int] = {}
    done = 0
    for pool in pools:
        for slot in pool.slots.values():
            counts[slot.state.value] = counts.get(slot.state.value, 0) + 1
            done += slot.report.jobs_done
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no children"
    return f"{summary}; {done} jobs done by the current children"
