"""What a pool's notifiers hear of: a slot gone FATAL, a child killed or recycled, a drain or halt flag.

The pool decides these things (`djsupervisor.supervisor.pool`), so it says so here, where it happens, as
`protocol.SupervisorEvent`s; the arbiter hands them to the fleet agent with its next command, and the agent
sends them to the notifiers (the parent does no network I/O). Pure: no I/O, a bounded list.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable

from djsupervisor.protocol import SupervisorEvent
from djsupervisor.supervisor.slot import Slot
from djsupervisor.supervisor.states import SlotState

#: Events kept until the fleet agent's next command takes them; beyond, the oldest go first.
MAX_EVENTS = 100


@dataclasses.dataclass
class Notices:
    """The events of pool `pool` not yet taken, and what it has told already (so each is told once)."""

    pool: str
    events: list[SupervisorEvent] = dataclasses.field(default_factory=list)
    fatal_told: set[int] = dataclasses.field(default_factory=set)  # FATAL slots told of
    drained_told: str | None = None  # the fleet flag told of

    def tell(self, kind: str, slot: Slot | None, message: str) -> None:
        """Keep an event (see `protocol.SupervisorEvent` for the kinds)."""
        index = None if slot is None else slot.index
        self.events.append(SupervisorEvent(kind=kind, pool=self.pool, slot=index, message=message, time=time.time()))
        del self.events[:-MAX_EVENTS]

    def take(self) -> list[SupervisorEvent]:
        """The events kept since the last call."""
        events, self.events = self.events, []
        return events

    def observe(self, slots: Iterable[Slot], drained: str | None) -> None:
        """Slots newly FATAL, and a fleet flag newly set on the pool, become events."""
        fatal = {slot.index: slot for slot in slots if slot.state is SlotState.FATAL}
        for index in sorted(fatal.keys() - self.fatal_told):
            slot = fatal[index]
            self.tell(
                "fatal",
                slot,
                f"{slot.label} is FATAL: {slot.early_exits} children in a row exited ({slot.last_exit}) "
                "before completing a cycle; not restarted until a reload",
            )
        self.fatal_told = set(fatal)
        if drained and drained != self.drained_told:
            self.tell(drained, None, f"pool {self.pool} {drained}ed by a fleet flag: its children stop after their job")
        self.drained_told = drained
