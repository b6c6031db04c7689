"""The parent's process plumbing: fork a child safely, kill a child's process group, say how a child ended.

Kept apart from the arbiter so that the arbiter holds only the loop, and so that the slot's pure exit
rules can word their log lines without importing the loop.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Any

from djsupervisor.supervisor.child import EXIT_ORPHANED


def fork_child(
    child: Callable[[list[int]], None], close_in_child: list[int], blocked: Iterable[int], log: Any
) -> int | None:
    """Fork; the child runs ``child(close_in_child)`` and never returns (`EXIT_ORPHANED` if it does).

    The signals in `blocked` stay blocked across the fork: a signal meant for the child must not run the
    parent's handlers in it (it would write into the parent's wakeup pipe); the child unblocks them
    itself. The child leads its own process group, so that it can be killed with what it started.
    Returns the child's pid, or None if the fork failed (logged on `log`).
    """
    sys.stdout.flush()  # or the child would write out the parent's buffered output again
    sys.stderr.flush()
    parent = os.getpid()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        pid = os.fork()
    except OSError as error:
        log.error("fork failed: {}", error)
        return None
    finally:
        if os.getpid() == parent:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if pid == 0:
        try:
            child(close_in_child)
        finally:
            os._exit(EXIT_ORPHANED)
    try:
        os.setpgid(pid, pid)  # also done by the child; whichever runs first wins the race to killpg
    except OSError:
        pass
    return pid


def describe_exit(code: int) -> str:
    """How a child ended, from its exit code as `os.waitstatus_to_exitcode` gives it (negative: a signal)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def killpg(pid: int, signum: int) -> None:
    """Send `signum` to the process group led by `pid` (every child leads its own group: what it started
    goes too); to `pid` alone where the group is not ours to signal; nothing if it is gone."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            os.kill(pid, signum)
        except OSError:
            pass
