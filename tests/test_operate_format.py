"""The pure parts of the operator tools: message folding, the agent's per-minute job counts, the parent's
per-pool summary and the text and HTML they become (no database: these take and give plain values)."""

from __future__ import annotations

import pytest

from djsupervisor.fleet.overview import MINUTES, Overview
from djsupervisor.fleet.view import FleetView
from djsupervisor.operate.errors import normalise
from djsupervisor.serve.overview_page import chart, pipeline_sections
from djsupervisor.serve.status_format import format_status

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    "message, folded",
    [
        ("FileNotFoundError: /data/raw/s12/f0033.dat", "FileNotFoundError: <path>"),
        (r"missing C:\data\s3\probe.bin", "missing <path>"),
        ("calibration 7 out of range", "calibration <n> out of range"),
        ("value -1.5e-3 too small", "value <n> too small"),
        ("no row for 'subject_17' in session", "no row for <str> in session"),
        ("blob 3f2a9c0d11 corrupt", "blob <hex> corrupt"),
        ("id 123e4567-e89b-12d3-a456-426614174000 gone", "id <id> gone"),
        ("  two\n  lines  ", "two lines"),
        ("no probe for this session", "no probe for this session"),
    ],
)
def test_messages_fold_what_varies_per_key(message, folded):
    assert normalise(message) == folded


def child(pool: str, pid: int, done: int) -> dict:
    return {"worker": pool, "pid": pid, "jobs_done": done}


def test_jobs_per_minute_from_the_childrens_counters():
    overview = Overview()
    t = 60 * 1000.0
    overview.note_children([child("a", 1, 5)], now=t)  # the agent's first command: earlier jobs are not this hour's
    overview.note_children([child("a", 1, 7), child("b", 2, 1)], now=t + 10)  # b is new: all its jobs count
    overview.note_children([child("a", 3, 2)], now=t + 70)  # 1 replaced by 3 (a new child counts from 0)
    assert overview.throughput() == {"a": [[1000, 2], [1001, 2]], "b": [[1000, 1]]}
    overview.note_children([child("a", 3, 2)], now=t + 60 * MINUTES + 5)  # an hour on: minute 1000 drops out
    assert overview.throughput()["a"] == [[1001, 2], [1000 + MINUTES, 0]]


def test_the_parent_sums_each_pools_tables():
    view = FleetView()
    view.apply(
        {
            "progress": [
                {"table": "a", "workers": ["std"], "remaining": 3, "error": 1, "total": 10, "done": 6},
                {"table": "b", "workers": ["std", "big"], "remaining": 4, "error": 0, "total": 4, "done": 0},
            ],
            "errors": [{"label": "s.A", "count": 1, "message": "<b>bad</b>", "example_key": {"id": 1}}],
            "throughput": {"std": [[1000, 3]]},
        },
        now=100.0,
    )
    assert view.pool_queues(["big", "std", "idle"], now=102.0) == [
        {"worker": "big", "tables": 1, "remaining": 4, "error": 0, "age": 2.0},
        {"worker": "std", "tables": 2, "remaining": 7, "error": 1, "age": 2.0},
        {"worker": "idle", "tables": 0, "remaining": 0, "error": 0, "age": 2.0},
    ]
    assert view.progress_report(now=103.0)["age"] == 3.0 and view.errors_report(now=103.0)["errors"][0]["count"] == 1
    assert FleetView().pool_queues(["std"]) == []  # nothing read yet: no line rather than zeros

    text = format_status({"supervisor": "lab", "slots": [], "pool_progress": view.pool_queues(["std"], now=102.0)})
    assert "pool std: 7 remaining, 1 in error (2 tables, read 2s ago)" in text.splitlines()

    page = "\n".join(pipeline_sections(view, now=60 * 1000.0 + 30))
    assert "&lt;b&gt;bad&lt;/b&gt;" in page and "<b>bad" not in page  # every value escaped
    assert '<progress max="10" value="6"></progress> 60.0%' in page
    assert page.count("<td>0 left</td>") == 0 and page.count("<td>-</td></tr>") == 2  # rows without an ETA
    assert 'data-pool="std" data-total="3"' in page


def test_the_chart_draws_the_last_hour_only():
    now = 60 * 1000.0 + 30
    svg = chart("p<1>", [[1000 - MINUTES, 9], [990, 2], [1000, 4]], now=now)
    assert svg.count('<rect class="bar"') == 2 and 'data-total="6"' in svg  # the minute an hour ago is out
    assert 'data-pool="p&lt;1&gt;"' in svg
    assert "<title>4 jobs at minute -0</title>" in svg and "<title>2 jobs at minute -10</title>" in svg
