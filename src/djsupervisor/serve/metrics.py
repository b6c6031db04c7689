"""Prometheus text exposition (format 0.0.4) of a supervisor's state: a pure function of what it is given.

`render_metrics` reads the dict of `Supervisor.status()`, the pools (desired replicas and the job counts
of slots that were removed) and the `FleetView` (queue depths the fleet agent last read). Counters stay
monotonic across child replacements because each slot carries the counts of its earlier children
(`Slot.jobs_done_before`) and each pool those of its removed slots.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from djsupervisor.fleet.view import QUEUE_STATES, FleetView
from djsupervisor.serve.status_format import status_slots
from djsupervisor.supervisor.states import SlotState, SupervisorState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SUPERVISOR_STATES = tuple(state.value for state in SupervisorState)  # every one listed, 0 or 1


def _escape_label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(value)


class _Family:
    """One metric family: HELP, TYPE and its samples."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name, self.kind, self.help = name, kind, help_text
        self.samples: list[tuple[dict[str, Any], float]] = []

    def add(self, value: float, **labels: Any) -> None:
        self.samples.append((labels, value))

    def lines(self) -> Iterable[str]:
        name = f"{self.name}_total" if self.kind == "counter" else self.name  # as client_python writes 0.0.4
        yield f"# HELP {name} {_escape_help(self.help)}"
        yield f"# TYPE {name} {self.kind}"
        for labels, value in self.samples:
            text = ",".join(f'{key}="{_escape_label(v)}"' for key, v in labels.items())
            yield f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}"


def render_metrics(
    status: Mapping[str, Any],
    pools: Mapping[str, Any],
    fleet: FleetView,
    *,
    version: str,
    parent_rss_bytes: float | None = None,
    now: float | None = None,
) -> str:
    """The metrics page.

    `status` is `Supervisor.status()`; `pools` maps a pool name to an object with `replicas`, `config` (None
    once its definition was removed) and optionally `jobs_done_retired`/`jobs_failed_retired`; `fleet` is the
    supervisor's FleetView; `now` is the monotonic time the fleet reading's age is measured against.
    """
    slots = list(status_slots(status))
    workers = sorted({*pools, *(str(s["worker"]) for s in slots)})
    supervisor = status.get("supervisor", "")

    up = _Family("djsupervisor_up", "gauge", "1 while the supervisor answers.")
    up.add(1)
    info = _Family("djsupervisor_info", "gauge", "The supervisor's name and version (value 1).")
    info.add(1, supervisor=supervisor, version=version)
    current = _Family("djsupervisor_state", "gauge", "1 for the supervisor's current state, 0 for the others.")
    for name in dict.fromkeys((*SUPERVISOR_STATES, status.get("state", ""))):
        current.add(int(name == status.get("state")), state=name)
    started = _Family("djsupervisor_start_time_seconds", "gauge", "When the supervisor started (Unix time).")
    if isinstance(status.get("started"), (int, float)):
        started.add(float(status["started"]))

    children = _Family("djsupervisor_children", "gauge", "Slots per worker and state.")
    desired = _Family("djsupervisor_replicas_desired", "gauge", "Children each pool is meant to have.")
    restarts = _Family("djsupervisor_restarts", "counter", "Children started in a slot after its first one.")
    done = _Family("djsupervisor_jobs_done", "counter", "Jobs completed by the children of a worker.")
    failed = _Family("djsupervisor_jobs_failed", "counter", "Jobs that failed in the children of a worker.")
    rss = _Family("djsupervisor_child_rss_bytes", "gauge", "Resident memory of a child and its descendants.")
    cpu = _Family("djsupervisor_child_cpu_percent", "gauge", "CPU use of a child and its descendants (percent).")
    gpu = _Family(
        "djsupervisor_child_gpu_memory_bytes",
        "gauge",
        "GPU memory used by a child and its descendants, per GPU (NVML; none without nvidia-ml-py or a GPU).",
    )
    for worker in workers:
        own = [s for s in slots if s["worker"] == worker]
        for state in SlotState:
            children.add(sum(1 for s in own if s.get("state") == state.value), worker=worker, state=state.value)
        pool = pools.get(worker)
        if pool is not None and getattr(pool, "config", None) is not None:
            desired.add(pool.replicas, worker=worker)
        done.add(getattr(pool, "jobs_done_retired", 0) + sum(_total(s, "jobs_done") for s in own), worker=worker)
        failed.add(getattr(pool, "jobs_failed_retired", 0) + sum(_total(s, "jobs_failed") for s in own), worker=worker)
        for s in own:
            restarts.add(s.get("restarts", 0), worker=worker, slot=s["slot"])
            if s.get("rss_mb") is not None and s.get("pid") is not None:
                rss.add(round(s["rss_mb"] * 2**20), worker=worker, slot=s["slot"])
            if s.get("cpu_percent") is not None and s.get("pid") is not None:
                cpu.add(float(s["cpu_percent"]), worker=worker, slot=s["slot"])
            if s.get("pid") is not None and s.get("gpu_memory") is not None:
                # the slot's own GPU with 0 until the child uses it; every GPU the child's processes use
                used = {**({s["gpu"]: 0} if s.get("gpu") is not None else {}), **s["gpu_memory"]}
                for device in sorted(used):
                    gpu.add(int(used[device]), worker=worker, slot=s["slot"], gpu=device)

    parent = _Family("djsupervisor_parent_rss_bytes", "gauge", "Resident memory of the supervisor process.")
    if parent_rss_bytes is not None:
        parent.add(int(parent_rss_bytes))
    queue = _Family("djsupervisor_queue_jobs", "gauge", "Rows of a table's job queue per state, as last read.")
    for table in sorted(fleet.depths):
        depth = fleet.depths[table]
        for queue_state in QUEUE_STATES:
            queue.add(getattr(depth, queue_state), table=table, state=queue_state)
    age = _Family("djsupervisor_fleet_reading_age_seconds", "gauge", "Seconds since the fleet agent's last reading.")
    reading_age = fleet.age(time.monotonic() if now is None else now)
    if reading_age is not None:
        age.add(round(reading_age, 3))

    families = (
        up,
        info,
        current,
        started,
        children,
        desired,
        restarts,
        done,
        failed,
        rss,
        cpu,
        gpu,
        parent,
        queue,
        age,
    )
    return "\n".join(line for family in families for line in family.lines()) + "\n"


def _total(slot: Mapping[str, Any], key: str) -> int:
    """A slot's count over all its children (`jobs_done_total`), or the current child's for older statuses."""
    return int(slot.get(f"{key}_total", slot.get(key, 0)) or 0)
