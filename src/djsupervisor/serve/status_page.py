"""The HTML status page: the supervisor, one row per slot, and the job queues; every value HTML-escaped."""

from __future__ import annotations

import html
import time
from collections.abc import Mapping
from typing import Any

from djsupervisor.fleet.view import QUEUE_STATES, FleetView
from djsupervisor.serve.overview_page import STYLE as OVERVIEW_STYLE
from djsupervisor.serve.overview_page import pipeline_sections
from djsupervisor.serve.status_format import current_work, format_duration, gpu_columns, gpu_notes, status_slots

REFRESH_SECONDS = 5

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f0f0; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.running td.state { color: #1a7f37; } tr.backoff td.state, tr.fatal td.state { color: #cf222e; }
"""

_SLOT_COLUMNS = ("Worker", "Slot", "PID", "State", "Current", "Done", "Failed", "Restarts", "RSS MB", "CPU %", "Uptime")
_GPU_COLUMNS = ("GPU", "GPU MB")  # after CPU %, when some slot has a GPU or a GPU reading (`gpu_columns`)


def _cell(value: Any, numeric: bool = False, css: str = "") -> str:
    classes = " ".join(c for c in ("n" if numeric else "", css) if c)
    attribute = f' class="{classes}"' if classes else ""
    return f"<td{attribute}>{html.escape('-' if value is None else str(value))}</td>"


def _slot_row(slot: Mapping[str, Any], gpu: bool) -> str:
    rss, cpu, gpu_mb = slot.get("rss_mb"), slot.get("cpu_percent"), slot.get("gpu_memory_mb")
    cells = [
        _cell(slot.get("worker")),
        _cell(slot.get("slot"), True),
        _cell(slot.get("pid"), True),
        _cell(slot.get("state"), css="state"),
        _cell("-" if slot.get("pid") is None else current_work(slot)),  # a dead child's report is history
        _cell(slot.get("jobs_done_total", slot.get("jobs_done")), True),
        _cell(slot.get("jobs_failed_total", slot.get("jobs_failed")), True),
        _cell(slot.get("restarts"), True),
        _cell(None if rss is None else f"{rss:.0f}", True),
        _cell(None if cpu is None else f"{cpu:.1f}", True),
        *(_cell(slot.get("gpu")), _cell(None if gpu_mb is None else f"{gpu_mb:.0f}", True))[: 2 * gpu],
        _cell(format_duration(slot.get("uptime")), True),
    ]
    state = html.escape(str(slot.get("state")), quote=True)
    return f'<tr class="{state}">{"".join(cells)}</tr>'


def _queue_rows(fleet: FleetView) -> list[str]:
    pools_of: dict[str, list[str]] = {}
    for pool, tables in fleet.tables.items():
        for table in tables:
            pools_of.setdefault(table, []).append(pool)
    rows = []
    for table in sorted(fleet.depths):
        depth = fleet.depths[table]
        cells = [_cell(table), _cell(", ".join(sorted(pools_of.get(table, []))) or "-")]
        cells += [_cell(getattr(depth, state), True) for state in QUEUE_STATES]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return rows


def _drained(status: Mapping[str, Any]) -> str:
    """Pools held by a drain or halt flag, as "pool (mode)"."""
    drained = status.get("drained") or {}
    return ", ".join(f"{pool} ({mode})" for pool, mode in sorted(drained.items()))


def render_page(status: Mapping[str, Any], fleet: FleetView, *, version: str, now: float | None = None) -> str:
    """The status page for `status` (`Supervisor.status()`) and `fleet` (queue depths); `now` is monotonic."""
    name = html.escape(str(status.get("supervisor")))
    started = status.get("started")
    uptime = format_duration(time.time() - started) if isinstance(started, (int, float)) else "-"
    slots = status_slots(status)
    gpu = gpu_columns(slots)
    at = _SLOT_COLUMNS.index("CPU %") + 1
    columns = _SLOT_COLUMNS[:at] + _GPU_COLUMNS * gpu + _SLOT_COLUMNS[at:]
    summary = f"pid {status.get('pid')}, {status.get('state')}, up {uptime}, {len(slots)} slots, djsupervisor {version}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        f"<title>djsupervisor {name}</title><style>{_STYLE}{OVERVIEW_STYLE}</style></head><body>",
        f'<h1>djsupervisor <span id="supervisor">{name}</span></h1>',
        f'<p id="summary">{html.escape(summary)}</p>',
        *(f'<p id="drained">Drained: {html.escape(drained)}</p>' for drained in [_drained(status)] if drained),
        "<h2>Children</h2>",
        '<table id="slots"><thead><tr>' + "".join(f"<th>{c}</th>" for c in columns) + "</tr></thead><tbody>",
        *(_slot_row(slot, gpu) for slot in slots),
        "</tbody></table>",
        *(f'<p class="gpu-note">GPU memory not measured: {html.escape(note)}</p>' for note in gpu_notes(slots)),
        *pipeline_sections(fleet),
        "<h2>Job queues</h2>",
    ]
    age = fleet.age(time.monotonic() if now is None else now)
    if age is None:
        parts.append('<p id="queues-none">No reading of the job queues yet.</p>')
    else:
        parts += [
            f"<p>Read {age:.0f} s ago.</p>",
            '<table id="queues"><thead><tr><th>Table</th><th>Workers</th>'
            + "".join(f"<th>{s.capitalize()}</th>" for s in QUEUE_STATES)
            + "</tr></thead><tbody>",
            *_queue_rows(fleet),
            "</tbody></table>",
        ]
    parts.append(
        '<p><a href="/metrics">metrics</a> · <a href="/status.json">status.json</a> · '
        '<a href="/progress.json">progress.json</a> · <a href="/errors.json">errors.json</a></p></body></html>'
    )
    return "\n".join(parts) + "\n"
