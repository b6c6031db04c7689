"""Every state the supervisor keeps, in one place: its slots', the stop intents, its own, its stop mode.

The slot states follow supervisord's (``states.py``). `TRANSITIONS` is the whole state machine; the list
below is the same table, edge for edge (a test reads this docstring and compares), with what takes each::

    STOPPED  ──▶ STARTING   spawn (the pool wants a child there)
    STARTING ──▶ RUNNING    the child completed its first cycle or job
             ──▶ STOPPING   stop requested (shrink, drain, roll, recycle, kill, supervisor stop)
             ──▶ BACKOFF    it exited and will be restarted after the restart delay (also: fork failed)
             ──▶ EXITED     it exited and the restart policy keeps it down (or the supervisor is stopping)
             ──▶ FATAL      it exited before getting going `fatal_after` times in a row (or died in
                            `fatal_after` different jobs before getting going, none completing)
    RUNNING  ──▶ STOPPING | BACKOFF | EXITED    as from STARTING (max_jobs reached: BACKOFF with no delay)
    BACKOFF  ──▶ STARTING   the restart delay passed
             ──▶ STOPPED    stop requested (no child to signal)
    STOPPING ──▶ STOPPED    the child is gone; its `StopIntent` says what next (respawn, retire, stay down)
    EXITED   ──▶ STARTING   a reload changed the definition (roll)
             ──▶ STOPPED    stop requested
    FATAL    ──▶ STARTING   a reload changed the definition (roll, after `Slot.reset`)
             ──▶ STOPPED    stop requested

A stopped child never goes to BACKOFF: what follows a stop is the stop's intent, not the restart rules. A
child that got going is always replaced (policy permitting), so RUNNING never goes FATAL (`fatal_after`
is at least 1 and counts only exits before a first cycle).
"""

from __future__ import annotations

import enum


class SlotState(str, enum.Enum):
    """States of a slot (see the module docstring)."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FATAL = "fatal"


#: States in which a child occupies the slot.
LIVE = frozenset({SlotState.STARTING, SlotState.RUNNING, SlotState.STOPPING})
#: States in which the slot's child is meant to keep working (alive and not being stopped).
WORKING = frozenset({SlotState.STARTING, SlotState.RUNNING})
#: States a child's own exit leaves the slot in, with no child and no stop asked for.
DOWN_AFTER_EXIT = frozenset({SlotState.BACKOFF, SlotState.EXITED, SlotState.FATAL})

TRANSITIONS: dict[SlotState, frozenset[SlotState]] = {
    SlotState.STOPPED: frozenset({SlotState.STARTING}),
    SlotState.STARTING: frozenset(
        {SlotState.RUNNING, SlotState.STOPPING, SlotState.BACKOFF, SlotState.EXITED, SlotState.FATAL}
    ),
    SlotState.RUNNING: frozenset({SlotState.STOPPING, SlotState.BACKOFF, SlotState.EXITED}),
    SlotState.BACKOFF: frozenset({SlotState.STARTING, SlotState.STOPPED}),
    SlotState.STOPPING: frozenset({SlotState.STOPPED}),
    SlotState.EXITED: frozenset({SlotState.STARTING, SlotState.STOPPED}),
    SlotState.FATAL: frozenset({SlotState.STARTING, SlotState.STOPPED}),
}


class StopIntent(enum.IntEnum):
    """What to do with a slot once its stopped child is gone, weakest first: while a stop is under way a
    stronger reason to stay down replaces a weaker one, never the reverse (a pool shrinking while the
    child is recycled retires the slot; a supervisor stop keeps every slot down)."""

    RESPAWN = 0  # start a new child in it at once (recycle, roll, kill of a hung child)
    RETIRE = 1  # take the slot out of its pool (shrink, drain, definition removed)
    STAY = 2  # leave it down (the supervisor is stopping)


class SupervisorState(str, enum.Enum):
    """The supervisor's own state, as `status()` and the metrics report it."""

    STARTING = "starting"
    RUNNING = "running"
    RELOADING = "reloading"
    STOPPING = "stopping"


class StopMode(enum.IntEnum):
    """How the supervisor stops; a fast stop may follow a graceful one, not the reverse."""

    GRACEFUL = 1  # SIGTERM: children finish the job in flight (SIGKILL after graceful_timeout)
    FAST = 2  # SIGKILL of every child's process group at once
