"""The status page's pipeline sections: a progress bar per table, the grouped errors, and a chart of the jobs
done per minute over the last hour per pool, as inline SVG drawn here (no script, no framework).

Everything comes from the parent's `FleetView` (the fleet agent's readings); every value is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import time
from typing import Any

from djsupervisor.fleet.view import FleetView

STYLE = """
progress { width: 12em; height: 1em; vertical-align: middle; }
svg.chart { display: block; margin: 0.3em 0 1em; background: #fafafa; border: 1px solid #ddd; }
svg.chart rect.bar { fill: #2f81f7; } svg.chart text { font: 11px system-ui, sans-serif; fill: #555; }
td.msg { font-family: ui-monospace, monospace; max-width: 50em; overflow-wrap: anywhere; }
"""

_CHART_W, _CHART_H, _MINUTES = 360, 90, 60  # px, px, minutes shown


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _eta(seconds: Any) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds == 0:
        return "done"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def progress_section(fleet: FleetView) -> list[str]:
    """One row per table: a bar of done over total, the counts, the workers, rate and ETA."""
    if fleet.progress_updated is None:
        return ['<p id="progress-none">No reading of the tables\' progress yet.</p>']
    head = ("Table", "Progress", "Total", "Done", "Remaining", "Reserved", "Error", "Ignore", "Workers", "Rate", "ETA")
    rows = []
    for row in fleet.progress:
        total, done = int(row.get("total") or 0), int(row.get("done") or 0)
        share = 100.0 if total == 0 else 100.0 * done / total
        unfinished = bool(row.get("reserved") or row.get("error"))  # nothing to start, yet not done
        eta = "0 left" if unfinished and not row.get("remaining") else _eta(row.get("eta_seconds"))
        numbers = "".join(
            f'<td class="n">{_e(row.get(k))}</td>'
            for k in ("total", "done", "remaining", "reserved", "error", "ignore")
        )
        rows.append(
            f'<tr data-table="{html.escape(str(row.get("table")), quote=True)}"><td>{_e(row.get("label"))}</td>'
            f'<td><progress max="{max(total, 1)}" value="{done if total else 1}"></progress> {share:.1f}%</td>'
            f"{numbers}<td>{_e(', '.join(row.get('workers') or []))}</td>"
            f'<td class="n">{float(row.get("rate_per_min") or 0):.1f}/min</td>'
            f"<td>{_e(eta)}</td></tr>"
        )
    return [
        '<table id="progress"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>",
        *rows,
        "</tbody></table>",
    ]


def errors_section(fleet: FleetView) -> list[str]:
    """The error groups: table, count, first and last seen, message, one example key."""
    if fleet.progress_updated is None:
        return []
    if not fleet.errors:
        return ['<p id="errors-none">No error jobs.</p>']
    head = ("Table", "Count", "First seen", "Last seen", "Message", "Example key")
    rows = [
        f'<tr><td>{_e(g.get("label"))}</td><td class="n">{_e(g.get("count"))}</td><td>{_e(g.get("first_seen"))}</td>'
        f'<td>{_e(g.get("last_seen"))}</td><td class="msg">{_e(g.get("message"))}</td>'
        f'<td class="msg">{_e(json.dumps(g.get("example_key"), sort_keys=True, default=str))}</td></tr>'
        for g in fleet.errors
    ]
    return [
        '<table id="errors"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>",
        *rows,
        "</tbody></table>",
    ]


def chart(pool: str, buckets: list[list[int]], now: float | None = None) -> str:
    """An SVG bar chart of `buckets` (``[[minute since the epoch, jobs done], ...]``) over the last hour."""
    current = int((time.time() if now is None else now) // 60)
    counts = {int(minute): int(n) for minute, n in buckets if current - _MINUTES < int(minute) <= current}
    top = max(counts.values(), default=0)
    scale = max(top, 1)
    width = (_CHART_W - 40) / _MINUTES
    bars = []
    for minute, n in sorted(counts.items()):
        if n <= 0:
            continue
        height = (_CHART_H - 20) * n / scale
        x = 35 + (minute - (current - _MINUTES + 1)) * width
        bars.append(
            f'<rect class="bar" x="{x:.1f}" y="{_CHART_H - 15 - height:.1f}" width="{max(width - 1, 1):.1f}" '
            f'height="{height:.1f}"><title>{n} jobs at minute -{current - minute}</title></rect>'
        )
    name = html.escape(pool, quote=True)
    return (
        f'<svg class="chart" data-pool="{name}" data-total="{sum(counts.values())}" width="{_CHART_W}" '
        f'height="{_CHART_H}" viewBox="0 0 {_CHART_W} {_CHART_H}" role="img" '
        f'aria-label="jobs done per minute by {name}">'
        + (f'<text x="2" y="12">{top}</text>' if top else "")  # the scale's top, once there is one
        + f'<text x="2" y="{_CHART_H - 17}">0</text>'
        f'<text x="35" y="{_CHART_H - 2}">-60 min</text><text x="{_CHART_W - 30}" y="{_CHART_H - 2}">now</text>'
        f'<line x1="34" y1="{_CHART_H - 15}" x2="{_CHART_W - 5}" y2="{_CHART_H - 15}" stroke="#999"/>'
        + "".join(bars)
        + "</svg>"
    )


def throughput_section(fleet: FleetView, now: float | None = None) -> list[str]:
    """A chart per pool (the fleet agent counts the jobs of the live children)."""
    pools = sorted(set(fleet.tables) | set(fleet.throughput))  # a pool without children gets an empty chart
    if not pools:
        return ['<p id="throughput-none">No jobs counted yet.</p>']
    parts = ['<div id="throughput">']
    for pool in pools:
        buckets = fleet.throughput.get(pool, [])
        total = sum(int(n) for _, n in buckets)
        parts.append(f"<h3>{_e(pool)}: {total} jobs in the last hour</h3>")
        parts.append(chart(pool, buckets, now))
    parts.append("</div>")
    return parts


def pipeline_sections(fleet: FleetView, now: float | None = None) -> list[str]:
    """The three sections, with their headings."""
    age = None if fleet.progress_updated is None else time.monotonic() - fleet.progress_updated
    read = f" <small>(read {age:.0f} s ago)</small>" if age is not None else ""
    return [
        f"<h2>Progress{read}</h2>",
        *progress_section(fleet),
        "<h2>Errors</h2>",
        *errors_section(fleet),
        "<h2>Jobs done per minute</h2>",
        *throughput_section(fleet, now),
    ]
