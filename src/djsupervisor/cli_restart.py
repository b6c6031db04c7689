"""``djsupervisor restart [--worker W]``: deploy new worker code without downtime, and wait for it.

The supervisor does the roll (`djsupervisor.supervisor.rolling`); the command starts it over the control
socket, then asks how it stands every `_POLL` seconds until it is done, and prints what moved, pool by pool.
A control request is answered at once (the socket never waits on a roll), so the command polls rather than
holding one request open for minutes. Exit status: 0 once every slot runs the new code, 1 when the roll
halted (the new code does not import, or a new child died before it got going: the line says which,
and the old children keep working), 2 for bad input (no such worker, no supervisor).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

_POLL = 0.2  # seconds between two questions to the supervisor (a roll takes seconds)
EXIT_HALTED = 1


def add_parser(commands, socket_options: Callable[[Any], None]) -> None:
    """The ``restart`` subcommand."""
    restart = commands.add_parser(
        "restart", help="roll the pools onto new worker code, one child at a time (no downtime)"
    )
    restart.add_argument("--worker", help="only this pool (default: every pool)")
    restart.add_argument(
        "--no-wait", action="store_true", help="return once the restart has begun (`status` shows the children)"
    )
    socket_options(restart)


def restart_lines(answer: dict[str, Any]) -> list[str]:
    """What the command prints of a finished (or halted) roll."""
    lines = ["restarted: " + change for change in answer.get("changes") or []]
    if answer.get("reason"):
        return [*lines, f"restart halted: {answer['reason']}"]
    seconds = answer.get("seconds")
    return [*lines, f"restart done in {seconds:.1f} s: new children run the new code" if seconds else "restart done"]


def restart(args, request: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """Start the roll, wait for it (unless --no-wait), print what changed; the exit status (see above)."""
    answer = request({"cmd": "restart", **({"worker": args.worker} if args.worker else {})})
    print(f"restart {answer['roll']}: probing the new code, then rolling one child at a time", flush=True)
    if args.no_wait:
        return 0
    while not answer.get("done"):
        time.sleep(_POLL)
        answer = request({"cmd": "roll", "roll": answer["roll"]})
    lines = restart_lines(answer)
    if answer.get("reason"):
        print("\n".join(lines[:-1]))
        print(f"djsupervisor: error: {lines[-1]}", file=sys.stderr)
        return EXIT_HALTED
    print("\n".join(lines))
    return 0
