"""The command line's side of the control socket: finding the supervisor, and what `status`, `reload` and
`scale` print.

- Without ``-c``, ``--name`` or ``--socket``, the supervisor is the one socket in the runtime directory that
  answers. A socket nobody answers on is left over from a supervisor that was killed: it is skipped, and
  removed when it is ours (the same user), so that it never makes ``several supervisors`` out of one.
- `reload` prints what it changed, pool by pool, and that worker code is not re-imported.
- `scale` prints the size before and after.
- A second `start` on the same socket is refused naming the running supervisor's pid and its stop command.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

#: What `reload` always says: it re-reads the config file, never the worker modules.
CODE_NOT_RELOADED = (
    "reload re-reads the config file only: to deploy changed worker code, run `djsupervisor restart`"
    " (one child at a time, no downtime)"
)


class NoSupervisor(Exception):
    """No socket to talk to; str() is one line."""


def live_sockets(directory: Path) -> tuple[list[str], list[str]]:
    """(sockets a supervisor answers on, dead sockets left) in `directory`; dead ones that are ours are removed."""
    from djsupervisor.serve.control import supervisor_listening

    live, dead = [], []
    for path in sorted(glob.glob(str(directory / "*.sock"))):
        if supervisor_listening(path):
            live.append(path)
            continue
        try:
            if os.stat(path).st_uid == os.geteuid():
                os.unlink(path)  # left by a supervisor that was killed: nobody will answer on it again
                continue
        except OSError:
            continue  # gone meanwhile
        dead.append(path)
    return live, dead


def find_socket() -> str:
    """The control socket of the one supervisor that answers in the default runtime directory."""
    from djsupervisor.serve.control import default_socket_path

    live, dead = live_sockets(Path(default_socket_path("x")).parent)
    if len(live) == 1:
        return live[0]
    if not live:
        left = f" ({len(dead)} dead sockets of other users skipped)" if dead else ""
        raise NoSupervisor(f"no supervisor found{left}: give -c FILE, --name NAME or --socket PATH")
    raise NoSupervisor(f"several supervisors ({', '.join(Path(f).stem for f in live)}): give --name NAME")


def refuse_second_start(source: str, socket_path: str) -> str | None:
    """Why `start` must not go on: another supervisor answers on `socket_path` (its pid and how to stop it)."""
    from djsupervisor.serve.control import ControlError, send_request, supervisor_listening

    if not supervisor_listening(socket_path):
        return None
    try:
        pid = send_request(socket_path, {"cmd": "status"}).get("pid", "?")
    except ControlError:
        pid = "?"
    return (
        f"{source}: another supervisor is listening on {socket_path} (pid {pid}); stop it with"
        f" `djsupervisor stop -c {source}` (or `kill -TERM {pid}`), or give this one another name"
    )


def reload_lines(response) -> list[str]:
    """What `reload` prints: each change, or that nothing changed, then that code is not reloaded."""
    changes = list(response.get("changes") or [])
    lines = ["reloaded: " + change for change in changes] or ["reloaded: no pool changed"]
    return [*lines, "note: " + CODE_NOT_RELOADED]


def scale_line(response) -> str:
    """What `scale` prints: ``ingest: 3 -> 1 children`` (an autoscaled pool: its minimum)."""
    worker, replicas, before = response.get("worker"), response.get("replicas"), response.get("before")
    if "min" in response:
        return (
            f"{worker}: minimum {before} -> {response['min']} (autoscaling {response['min']}..{response['max']},"
            f" now {replicas})"
        )
    if before == replicas:
        return f"{worker}: {replicas} children (unchanged)"
    return f"{worker}: {before} -> {replicas} children"
