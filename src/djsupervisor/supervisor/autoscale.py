"""Queue-depth autoscaling of one pool: whether to grow it, shrink it or hold, and why.

Pure logic: `Autoscaler.decide` takes the time and every reading in an `Observation` and returns a
`Decision`; the supervisor applies it to the pool's desired size (a shrink retires the highest slot after
its job in flight) and logs the reason. The rules, checked in this order:

* no queue reading yet, one older than ``stale_after`` (3 fleet intervals), or a pool drained or halted by
  a fleet flag: hold, and forget the streaks below (what happened between readings is unknown);
* below the minimum or above `max_replicas` (after a `scale` or a reload): back inside the bounds at once;
* pending > ``scale_up_pending`` × live children on two consecutive fleet readings (hysteresis): grow by
  ``scale_step`` (up to `max_replicas`) unless the pool is still starting children, the last change was
  less than ``scale_cooldown`` ago, host CPU is at ``max_cpu_percent`` or above, or available memory,
  less what the new children are expected to use (the pool's median child RSS each), would fall below
  ``min_available_memory_mb``;
* zero pending on every reading for ``scale_down_after`` seconds: shrink by one (down to the minimum),
  again at most once per ``scale_cooldown``;
* anything else: hold.
"""

from __future__ import annotations

import dataclasses

from djsupervisor.supervisor.settings import POOL_SETTINGS, SUPERVISOR_SETTINGS, defaults

#: Consecutive fleet readings above the threshold before a pool grows.
HYSTERESIS_READINGS = 2
#: A reading older than this many fleet intervals is stale: the autoscaler holds.
STALE_INTERVALS = 3

# the defaults of the [[worker]] and [supervisor] keys of the same names (declared in supervisor.settings)
_POOL_DEFAULTS = defaults(POOL_SETTINGS)
_SUPERVISOR_DEFAULTS = defaults(SUPERVISOR_SETTINGS)


@dataclasses.dataclass(frozen=True)
class AutoscaleSettings:
    """One pool's autoscaling settings (the `[[worker]]` keys of the same names)."""

    max_replicas: int
    scale_up_pending: float = _POOL_DEFAULTS["scale_up_pending"]
    scale_down_after: float = _POOL_DEFAULTS["scale_down_after"]
    scale_cooldown: float = _POOL_DEFAULTS["scale_cooldown"]
    scale_step: int = _POOL_DEFAULTS["scale_step"]


@dataclasses.dataclass(frozen=True)
class HostBudget:
    """Host limits above which no pool grows; None: no limit."""

    max_cpu_percent: float | None = _SUPERVISOR_DEFAULTS["max_cpu_percent"]
    min_available_memory_mb: float | None = _SUPERVISOR_DEFAULTS["min_available_memory_mb"]


@dataclasses.dataclass(frozen=True)
class Observation:
    """What the supervisor knows at time `now` (monotonic seconds).

    `reading_time` is the monotonic time of the fleet agent's latest reading (None before the first) and
    `pending` the pool's pending jobs in it; `desired` the pool's current size, `minimum` its floor,
    `live` its children that are starting or running; `drained` the fleet flag on the pool ("drain",
    "halt") if any; `cpu_percent`, `available_mb` the host's, and
    `child_rss_mb` the median RSS of the pool's children (None when unknown).
    """

    now: float
    reading_time: float | None
    pending: int | None
    desired: int
    minimum: int
    live: int
    stale_after: float
    drained: str | None = None
    cpu_percent: float | None = None
    available_mb: float | None = None
    child_rss_mb: float | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    """The pool's new size `replicas`; `action` "grow", "shrink" or "hold"; `kind` names the rule that
    decided (for logging each new kind of hold once); `reason` says why in a sentence."""

    replicas: int
    action: str
    kind: str
    reason: str


class Autoscaler:
    """The decisions for one pool, remembering what hysteresis, idle time and cooldown need."""

    def __init__(self, settings: AutoscaleSettings, budget: HostBudget = HostBudget()) -> None:
        self.settings = settings
        self.budget = budget
        self.last_reading: float | None = None  # reading_time of the last reading taken in
        self.high_readings = 0  # consecutive readings above the threshold
        self.idle_since: float | None = None  # reading_time of the first of the zero-pending readings
        self.last_change: float | None = None
        self.last_decision: Decision | None = None

    def decide(self, obs: Observation) -> Decision:
        """The decision for observation `obs` (also kept as `last_decision`)."""
        decision = self._decide(obs)
        if decision.action != "hold":
            self.last_change = obs.now
            self.high_readings = 0
        self.last_decision = decision
        return decision

    def _hold(self, obs: Observation, kind: str, reason: str) -> Decision:
        return Decision(obs.desired, "hold", kind, reason)

    def _decide(self, obs: Observation) -> Decision:
        s = self.settings
        if obs.reading_time is None or obs.pending is None:
            self.high_readings, self.idle_since = 0, None
            return self._hold(obs, "no-reading", "no queue reading of every table of the pool")
        if obs.drained:
            self.high_readings, self.idle_since = 0, None
            return self._hold(obs, "drained", f"{obs.drained}ed by a fleet flag")
        age = obs.now - obs.reading_time
        if age > obs.stale_after:
            self.high_readings, self.idle_since = 0, None
            return self._hold(obs, "stale", f"the queue reading is {age:.0f} s old (> {obs.stale_after:g} s): stale")
        high = obs.pending > s.scale_up_pending * obs.live
        if obs.reading_time != self.last_reading:
            self.last_reading = obs.reading_time
            self.high_readings = self.high_readings + 1 if high else 0
            if obs.pending:
                self.idle_since = None
            elif self.idle_since is None:
                self.idle_since = obs.reading_time
        elif not high:
            self.high_readings = 0  # the pool grew since this reading
        if obs.desired < obs.minimum:
            return Decision(obs.minimum, "grow", "bounds", f"below the minimum {obs.minimum}")
        if obs.desired > s.max_replicas:
            return Decision(s.max_replicas, "shrink", "bounds", f"above max_replicas {s.max_replicas}")
        load = f"{obs.pending} pending for {obs.live} {'child' if obs.live == 1 else 'children'}"
        if high:
            return self._grow(obs, load)
        if obs.pending == 0:
            return self._shrink(obs)
        return self._hold(obs, "steady", f"{load} (grows above {s.scale_up_pending:g} per child)")

    def _cooling(self, obs: Observation) -> float:
        """Seconds of cooldown left (0 when a change is allowed)."""
        if self.last_change is None:
            return 0.0
        return max(0.0, self.settings.scale_cooldown - (obs.now - self.last_change))

    def _grow(self, obs: Observation, load: str) -> Decision:
        s, budget = self.settings, self.budget
        over = f"{load} > {s.scale_up_pending:g} per child"
        if obs.desired >= s.max_replicas:
            return self._hold(obs, "at-max", f"{over}, but at max_replicas {s.max_replicas}")
        if obs.live < obs.desired:
            return self._hold(obs, "starting", f"{over}, but only {obs.live} of {obs.desired} children are up")
        if self.high_readings < HYSTERESIS_READINGS:
            return self._hold(obs, "hysteresis", f"{over} on {self.high_readings} of {HYSTERESIS_READINGS} readings")
        if cooling := self._cooling(obs):
            return self._hold(obs, "cooldown", f"{over}, but scale_cooldown has {cooling:.1f} s left")
        cpu_limit = budget.max_cpu_percent
        if cpu_limit is not None and obs.cpu_percent is not None and obs.cpu_percent >= cpu_limit:
            busy = f"host CPU {obs.cpu_percent:.0f}% >= max_cpu_percent {cpu_limit:g}"
            return self._hold(obs, "cpu", f"{over}, but {busy}")
        target = min(s.max_replicas, obs.desired + s.scale_step)
        floor = budget.min_available_memory_mb
        if floor is not None and obs.available_mb is not None:
            needed = (obs.child_rss_mb or 0.0) * (target - obs.desired)
            if obs.available_mb - needed < floor:
                return self._hold(
                    obs,
                    "memory",
                    f"{over}, but {obs.available_mb:.0f} MB available - {needed:.0f} MB "
                    f"for new children < min_available_memory_mb {floor:g}",
                )
        return Decision(target, "grow", "load", over)

    def _shrink(self, obs: Observation) -> Decision:
        s = self.settings
        if obs.desired <= obs.minimum:
            return self._hold(obs, "at-min", f"no pending jobs; at the minimum {obs.minimum}")
        idle = obs.now - self.idle_since if self.idle_since is not None else 0.0
        if idle < s.scale_down_after:
            wait = f"no pending jobs for {idle:.0f} s of scale_down_after {s.scale_down_after:g} s"
            return self._hold(obs, "idle-wait", wait)
        if cooling := self._cooling(obs):
            return self._hold(obs, "cooldown", f"no pending jobs, but scale_cooldown has {cooling:.1f} s left")
        return Decision(obs.desired - 1, "shrink", "idle", f"no pending jobs for {idle:.0f} s")
