"""Forking a supervisor's children, the same way for every kind: pool children, recovery, the fleet agent.

Three things must hold for every forked child, whatever it runs:

* **no parent handler ever runs in it**: the parent blocks the signals it handles around ``fork()`` (its
  handlers would write into the parent's wakeup pipe), so the child starts with them blocked; `isolate`
  then resets them to their defaults and unblocks all but SIGTERM, which stays blocked for good (every
  thread created later inherits the mask) so that `DataJointWorker.run()` reads it at job boundaries;
* **its own process group**, set by both sides of the fork (whichever runs first wins the race with a
  ``killpg``): a terminal's Ctrl+C reaches only the parent, and the parent kills a child together with
  whatever it started; and PR_SET_PDEATHSIG, so that it dies with the parent;
* **it never returns into the parent's code**: `run_then_exit` ends it with ``os._exit`` and its status
  (the parent's atexit handlers and buffers are not the child's business), and the parent's descriptors
  (its wakeup pipe, selector, the other children's pipes) are closed in the child.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from loguru import Logger

#: Exit statuses of a child, as the parent reads them.
EXIT_OK = 0  # the worker's loop ended by itself (run_duration, max_idled_cycle) or was stopped
EXIT_RECYCLE = 99  # max_jobs reached: replace me
EXIT_ERROR = 70  # the worker raised, or the child could not get going
EXIT_ORPHANED = 71  # the parent was already gone

PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)

#: Signals whose handlers the parent installs; the child puts them back to their defaults.
RESET_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGHUP", "SIGCHLD", "SIGQUIT", "SIGTTIN", "SIGTTOU", "SIGUSR1", "SIGUSR2", "SIGALRM")
    if hasattr(signal, name)
)


def fork_child(
    run: Callable[[list[int]], None],
    close_fds: list[int],
    blocked_signals: Iterable[int],
    *,
    log: Logger = logger,
) -> int | None:
    """Fork; the child runs ``run(close_fds)`` (which should end in `run_then_exit`) and never returns.

    `blocked_signals` (the signals the parent handles) stay blocked across the fork, restored in the parent
    afterwards; `close_fds` are the parent's descriptors the child must close. Returns the child's pid in
    the parent, or None after logging (on `log`) that the fork failed.
    """
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked_signals)
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
            run(close_fds)
        finally:
            os._exit(EXIT_ORPHANED)
    try:
        os.setpgid(pid, pid)  # also done by the child; whichever runs first wins the race to killpg
    except OSError:
        pass
    return pid


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; exit now if the parent is already gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the reporter thread watches getppid() instead
        pass
    if os.getppid() != parent_pid:
        os._exit(EXIT_ORPHANED)


def isolate(parent_pid: int, close_fds: list[int]) -> None:
    """Process group, death with the parent, default signal handlers, parent's fds closed, fresh random."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # already so; stated for the reader
    try:
        os.setpgid(0, 0)
    except OSError:  # the parent did it first
        pass
    die_with_parent(parent_pid)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    for signum in RESET_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # blocked anyway; never the parent's handler
    signal.pthread_sigmask(signal.SIG_SETMASK, {signal.SIGTERM})
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    random.seed()  # the parent's state would give every child the same "random" numbers


def run_then_exit(body: Callable[[], int]) -> None:
    """Run a forked child's `body` and end the process with its exit status, whatever happens: an
    exception is printed and gives EXIT_ERROR; output is flushed; `os._exit` skips the parent's atexit
    handlers and buffers."""
    code = EXIT_ERROR
    try:
        code = body()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else EXIT_ERROR
    except BaseException:
        try:  # through the logger: masked, and one record with its traceback lines marked as such
            from loguru import logger

            logger.opt(exception=True).error("child {} ended by an uncaught exception", os.getpid())
        except Exception:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


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
