"""The `djsupervisor status` table: what a person reads at a glance."""

from __future__ import annotations

import json
import time


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _current(slot: dict) -> str:
    table = slot.get("table") or "-"
    key = slot.get("key")
    if key:
        table += " " + json.dumps(key, default=str, separators=(",", ":"))
    return table if len(table) <= 60 else table[:57] + "..."


def format_status(data: dict) -> str:
    """Render a status response as a header line and a table, one row per slot."""
    started = data.get("started")
    uptime = _duration(time.time() - started) if isinstance(started, (int, float)) else "-"
    workers = data.get("workers") or []
    lines = [f"supervisor {data.get('supervisor')} (pid {data.get('pid')}) {data.get('state')}, up {uptime}, "
             f"{sum(1 for w in workers if w.get('pid'))} children"]  # fmt: skip
    header = ("WORKER", "SLOT", "PID", "STATE", "UPTIME", "RESTARTS", "RSS MB", "CPU %", "JOBS", "CURRENT")
    rows = [
        (
            str(w.get("worker")), str(w.get("slot")), str(w.get("pid") or "-"), str(w.get("state")),
            _duration(w.get("uptime")), str(w.get("restarts", 0)), _number(w.get("rss_mb"), ".0f"),
            _number(w.get("cpu_percent"), ".1f"), str(w.get("jobs_done", 0)), _current(w),
        )  # fmt: skip
        for w in workers
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if not rows:
        lines.append("(no workers)")
    return "\n".join(lines)
