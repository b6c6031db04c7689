"""The control socket's commands, one function each (circus keeps one file per command; these are short).

A command gets the supervisor (through the narrow `Controlled` interface: what a command may ask of it) and
the request, and returns the response's fields. `answer` dispatches and turns the errors a command raises
for bad input (KeyError, ValueError) into a refusal with one line, so that no request can end the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from djsupervisor.protocol import ControlRequest, ControlResponse


class Controlled(Protocol):
    """What the control commands ask of a supervisor."""

    pools: dict[str, Any]  # name -> Pool: `changes` says what the last reload did to each
    restarts: Any  # `rolling.Restarts`: the restart under way and the last finished ones
    state: Any  # `SupervisorState`

    def status(self) -> dict[str, Any]: ...
    def request_stop(self, fast: bool = False) -> None: ...
    def request_reload(self) -> str | None: ...
    def scale(self, worker: str, n: int) -> dict[str, Any]: ...


def status(supervisor: Controlled, request: ControlRequest) -> ControlResponse:
    """The supervisor's state, every slot and every pool."""
    return {"ok": True, **supervisor.status()}  # type: ignore[typeddict-item]


def stop(supervisor: Controlled, request: ControlRequest) -> ControlResponse:
    """Stop every child (``"fast": true``: without waiting for the jobs in flight), then exit."""
    supervisor.request_stop(fast=bool(request.get("fast")))
    return {"ok": True}


def reload(supervisor: Controlled, request: ControlRequest) -> ControlResponse:
    """Re-read the config file; refused (the running configuration stays) when it is not valid. The answer's
    `changes` say what the reload did to each pool (empty: the file changed nothing)."""
    problem = supervisor.request_reload()
    if problem is not None:
        return {"ok": False, "error": problem}
    changes = [change for pool in supervisor.pools.values() for change in getattr(pool, "changes", ())]
    return {"ok": True, "changes": changes}  # type: ignore[typeddict-unknown-key]


def scale(supervisor: Controlled, request: ControlRequest) -> ControlResponse:
    """Set a pool's size (of an autoscaled pool, its minimum)."""
    worker, replicas = request.get("worker"), request.get("replicas")
    return {"ok": True, **supervisor.scale(worker, replicas)}  # type: ignore[arg-type, typeddict-item]


def restart(supervisor: Controlled, request: ControlRequest) -> ControlResponse:
    """Roll a pool (``"worker"``), or every pool, onto freshly imported code; answers at once with the roll's
    id, which `roll` then reports on until it is done (the roll takes seconds to minutes)."""
    worker = request.get("worker")
    if supervisor.state.value == "stopping":
        raise ValueError("the supervisor is stopping")
    live = sorted(name for name, pool in supervisor.pools.items() if pool.config is not None)
    if worker is not None and worker not in live:
        raise ValueError(f"no worker named {worker!r} (workers: {', '.join(live) or 'none'})")
    roll = supervisor.restarts.start([worker] if worker else live, supervisor.pools, time.monotonic())
    return {"ok": True, **roll.answer()}


def roll(supervisor: Controlled, request: ControlRequest) -> ControlResponse:
    """Where restart ``"roll"`` (an id) stands: its phase, what changed, why it halted."""
    found = supervisor.restarts.rolls.get(request.get("roll"))
    if found is None:
        raise ValueError(f"no restart {request.get('roll')!r} (the supervisor keeps the last few)")
    return {"ok": True, **found.answer()}


COMMANDS: dict[str, Callable[[Controlled, ControlRequest], ControlResponse]] = {
    "status": status,
    "stop": stop,
    "reload": reload,
    "scale": scale,
    "restart": restart,
    "roll": roll,
}


def answer(supervisor: Controlled, request: ControlRequest) -> ControlResponse:
    """Run the command `request` names; an unknown command or bad arguments are refused with one line."""
    cmd = request.get("cmd") if isinstance(request, dict) else None
    command = COMMANDS.get(cmd) if isinstance(cmd, str) else None
    if command is None:
        return {"ok": False, "error": f"unknown command {cmd!r}"}
    try:
        return command(supervisor, request)
    except (KeyError, ValueError) as error:
        return {"ok": False, "error": str(error.args[0] if error.args else error)}
