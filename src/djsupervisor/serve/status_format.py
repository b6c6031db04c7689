"""The `djsupervisor status` table: what a person reads at a glance."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from djsupervisor.log import escape_controls


def status_slots(status: Mapping[str, Any]) -> list[Any]:
    """The per-slot entries of a supervisor's status: under "slots", or "workers" from an older supervisor."""
    return list(status.get("slots", status.get("workers")) or [])


def format_duration(seconds) -> str:
    """Seconds as "42s", "3m05s", "2h07m" or "4d03h" ("-" for None)."""
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


def current_work(slot: Mapping[str, Any], width: int | None = None) -> str:
    """The table (and key) a child works on; otherwise what it does (sleeping, idle, ...).

    Longer than `width` characters: cut, ending in "..." (the status table's column stays readable)."""
    table = slot.get("table")
    if not table:
        return slot.get("activity") or "-"
    key = slot.get("key")
    text = f"{table} {json.dumps(key, default=str, separators=(',', ':'))}" if key else str(table)
    return text if width is None or len(text) <= width else text[: width - 3] + "..."


def gpu_columns(slots: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the GPU and GPU MB columns are shown: some slot has a GPU or a GPU reading (GPU pools, pools
    with max_gpu_memory_mb); a supervisor without either shows none of it."""
    return any(slot.get("gpu") or slot.get("gpu_memory") is not None or slot.get("gpu_note") for slot in slots)


def gpu_notes(slots: Sequence[Mapping[str, Any]]) -> list[str]:
    """Why GPU memory was not measured (nvidia-ml-py not installed, no driver, ...), each reason once."""
    return list(dict.fromkeys(str(slot["gpu_note"]) for slot in slots if slot.get("gpu_note")))


def _summary(data: dict, workers: list[dict]) -> str:
    started = data.get("started")
    uptime = format_duration(time.time() - started) if isinstance(started, (int, float)) else "-"
    states: dict[str, int] = {}
    for slot in workers:
        states[str(slot.get("state"))] = states.get(str(slot.get("state")), 0) + 1
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no children"
    jobs = sum(slot.get("jobs_done") or 0 for slot in workers)
    return (
        f"supervisor {data.get('supervisor')} (pid {data.get('pid')}) {data.get('state')}, up {uptime}: "
        f"{counts}; {jobs} jobs done"
    )


def format_table(header: tuple[str, ...], rows: Sequence[tuple[Any, ...]]) -> list[str]:
    """Left-aligned columns, two spaces apart, header first; control characters in a cell are escaped (the
    cells come from children and the database: a newline or an ESC sequence must not reach the terminal)."""
    header = tuple(escape_controls(str(cell)) for cell in header)
    rows = [tuple(escape_controls(str(cell)) for cell in row) for row in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def format_status(data: dict) -> str:
    """Render a status response as a summary line and a table, one row per slot."""
    workers = status_slots(data)
    lines = [_summary(data, workers)]
    for pool, mode in sorted((data.get("drained") or {}).items()):
        lines.append(f"pool {pool}: {mode}ed by a fleet flag (djsupervisor resume clears it)")
    lines.extend(_queue_lines(data.get("pool_progress") or []))
    gpu = gpu_columns(workers)
    header: tuple[str, ...] = ("WORKER", "SLOT", "PID", "STATE", "UPTIME", "RESTARTS", "RSS MB", "CPU %")
    header += ("GPU", "GPU MB") * gpu + ("DONE", "FAILED", "CURRENT")
    rows = [
        (
            str(w.get("worker")),
            str(w.get("slot")),
            str(w.get("pid") or "-"),
            str(w.get("state")),
            format_duration(w.get("uptime")),
            str(w.get("restarts", 0)),
            _number(w.get("rss_mb"), ".0f"),
            _number(w.get("cpu_percent"), ".1f"),
            *((w.get("gpu") or "-", _number(w.get("gpu_memory_mb"), ".0f")) * gpu),
            str(w.get("jobs_done", 0)),
            str(w.get("jobs_failed", 0)),
            current_work(w, 60),
        )
        for w in workers
    ]
    if rows:
        lines.extend(format_table(header, rows))
    lines.extend(f"GPU memory not measured: {note}" for note in gpu_notes(workers))
    lines.extend(_autoscale_lines(data.get("pools") or []))
    return "\n".join(lines)


def _queue_lines(queues: list[dict]) -> list[str]:
    """One line per pool: its tables' remaining and error counts, as the fleet agent last read them."""
    lines = []
    for queue in queues:
        tables = queue.get("tables", 0)
        lines.append(
            f"pool {queue.get('worker')}: {queue.get('remaining')} remaining, {queue.get('error')} in error "
            f"({tables} table{'s' * (tables != 1)}, read {format_duration(queue.get('age'))} ago)"
        )
    return [escape_controls(line) for line in lines]


def _autoscale_lines(pools: list[dict]) -> list[str]:
    """One line per autoscaled pool: its size within its bounds, pending jobs, the last decision."""
    lines = []
    for pool in pools:
        auto = pool.get("autoscale")
        if not auto:
            continue
        pending = "-" if auto.get("pending") is None else auto["pending"]
        bounds = f"{auto.get('min')}..{auto.get('max')}"
        line = f"autoscale {pool.get('worker')}: {pool.get('replicas')} of {bounds} children, {pending} pending"
        if auto.get("decision"):
            line += f"; {auto['decision']}: {auto.get('reason')}"
        lines.append(line)
    return lines


def format_queues(queues: list[dict]) -> str:
    """Render each table's job queue (``status --queues``) as a table."""
    header = ("TABLE", "WORKER", "PENDING", "RESERVED", "SUCCESS", "ERROR", "IGNORE")
    rows = [
        (str(q.get("table")), str(q.get("worker")), *(str(q.get(s, 0)) for s in header[2:] for s in [s.lower()]))
        for q in queues
    ]
    if not rows:
        return "(no tables)"
    return "\n".join(format_table(header, rows))
