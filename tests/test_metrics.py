"""Metrics and status page rendering, in process: Prometheus text parsed by prometheus_client's parser,
the HTML page's escaping, and the counters that must not go down when a slot's child is replaced."""

from __future__ import annotations

import dataclasses
import html
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from djsupervisor.fleet.view import FleetView, TableDepth
from djsupervisor.serve.metrics import render_metrics
from djsupervisor.serve.status_page import render_page
from djsupervisor.supervisor.config import SupervisorConfig, WorkerConfig
from djsupervisor.supervisor.slot import Slot, SlotState

pytestmark = pytest.mark.timeout(30)

NASTY = 'ev"il\\name\n<b>'  # a quote, a backslash, a newline and markup


@dataclasses.dataclass
class FakePool:
    replicas: int
    config: object = "defined"
    jobs_done_retired: int = 0
    jobs_failed_retired: int = 0


def slot_status(worker, index, state="running", pid=100, done=0, failed=0, restarts=0, rss_mb=50.0, cpu=12.5, **extra):
    return {
        "worker": worker,
        "slot": index,
        "pid": pid,
        "state": state,
        "activity": "populating",
        "uptime": 3.0,
        "restarts": restarts,
        "rss_mb": rss_mb,
        "cpu_percent": cpu,
        "table": None,
        "key": None,
        "jobs_done": done,
        "jobs_failed": failed,
        "jobs_done_total": done,
        "jobs_failed_total": failed,
        "last_heartbeat": None,
        **extra,
    }


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict, name: str, **labels) -> float:
    return found[(name, tuple(sorted((k, str(v)) for k, v in labels.items())))]


def status_of(*slots) -> dict:
    return {
        "supervisor": "lab",
        "pid": 1,
        "started": time.time() - 90,
        "state": "running",
        "http": None,
        "slots": list(slots),
    }


def test_children_replicas_counters_and_resources():
    status = status_of(
        slot_status("standard", 0, done=5, failed=1, restarts=2, pid=11),
        slot_status("standard", 1, state="backoff", pid=None, done=3, rss_mb=None, cpu=None),
        slot_status("other", 0, state="starting", pid=13),
    )
    pools = {"standard": FakePool(2, jobs_done_retired=10, jobs_failed_retired=4), "other": FakePool(1)}
    found = samples(render_metrics(status, pools, FleetView(), version="9.9", parent_rss_bytes=123456789))
    assert value(found, "djsupervisor_up") == 1
    assert value(found, "djsupervisor_info", supervisor="lab", version="9.9") == 1
    assert value(found, "djsupervisor_state", state="running") == 1
    assert value(found, "djsupervisor_state", state="stopping") == 0
    for state in SlotState:  # every state is listed, 0 included
        expected = {"running": 1, "backoff": 1}.get(state.value, 0)
        assert value(found, "djsupervisor_children", worker="standard", state=state.value) == expected
    assert value(found, "djsupervisor_children", worker="other", state="starting") == 1
    assert value(found, "djsupervisor_replicas_desired", worker="standard") == 2
    assert value(found, "djsupervisor_restarts_total", worker="standard", slot=0) == 2
    assert value(found, "djsupervisor_jobs_done_total", worker="standard") == 10 + 5 + 3
    assert value(found, "djsupervisor_jobs_failed_total", worker="standard") == 4 + 1
    assert value(found, "djsupervisor_jobs_done_total", worker="other") == 0
    assert value(found, "djsupervisor_child_rss_bytes", worker="standard", slot=0) == 50 * 2**20
    assert value(found, "djsupervisor_child_cpu_percent", worker="standard", slot=0) == 12.5
    assert ("djsupervisor_child_rss_bytes", (("slot", "1"), ("worker", "standard"))) not in found  # no child
    assert value(found, "djsupervisor_parent_rss_bytes") == 123456789
    assert not [k for k in found if k[0] in ("djsupervisor_queue_jobs", "djsupervisor_fleet_reading_age_seconds")]
    text = render_metrics(status, pools, FleetView(), version="9.9")
    assert "# TYPE djsupervisor_restarts_total counter\n" in text  # 0.0.4: the TYPE line names the samples
    assert "# TYPE djsupervisor_children gauge\n" in text


def test_queue_depths_from_the_fleet_view_and_escaped_labels():
    now = time.monotonic()
    fleet = FleetView(
        tables={"standard": ["`s`.`square`", NASTY]},
        depths={"`s`.`square`": TableDepth(pending=7, reserved=2, success=40, error=1), NASTY: TableDepth(ignore=3)},
        updated=now - 4.5,
    )
    text = render_metrics(status_of(), {"standard": FakePool(1)}, fleet, version="1", now=now)
    found = samples(text)
    assert value(found, "djsupervisor_queue_jobs", table="`s`.`square`", state="pending") == 7
    assert value(found, "djsupervisor_queue_jobs", table="`s`.`square`", state="reserved") == 2
    assert value(found, "djsupervisor_queue_jobs", table="`s`.`square`", state="error") == 1
    assert value(found, "djsupervisor_queue_jobs", table=NASTY, state="ignore") == 3  # escaped and read back
    assert value(found, "djsupervisor_fleet_reading_age_seconds") == pytest.approx(4.5, abs=0.01)
    assert "\n<b>" not in text  # the newline in a label value is escaped


def test_a_slots_job_counts_carry_over_to_its_next_child():
    slot = Slot("standard", 0, WorkerConfig("standard", "m:w"))
    slot.spawned(pid=1, pipe_fd=5, now=time.monotonic())
    slot.report.update(jobs_done=4, jobs_failed=1)
    slot.exited(0, SupervisorConfig("lab", ()), time.monotonic(), stopping=False)
    slot.spawned(pid=2, pipe_fd=6, now=time.monotonic())  # the new child starts counting at 0
    slot.report.update(jobs_done=2)
    status = slot.status(time.monotonic())
    assert (status["jobs_done"], status["jobs_done_total"], status["jobs_failed_total"]) == (2, 6, 1)
    assert status["restarts"] == 1


def test_status_page_escapes_everything():
    status = status_of(slot_status("standard", 0, pid=4242, table=NASTY, key={"id": "<script>alert(1)</script>"}))
    status["supervisor"] = "<i>lab</i>"
    fleet = FleetView(tables={"standard": [NASTY]}, depths={NASTY: TableDepth(pending=9)}, updated=time.monotonic())
    page = render_page(status, fleet, version="1")
    assert "<script>" not in page and "<i>lab</i>" not in page and "<b>" not in page
    assert html.escape("<i>lab</i>") in page and "4242" in page
    assert 'http-equiv="refresh"' in page and '<td class="n">9</td>' in page
    assert 'id="drained"' not in page
    empty = render_page(dict(status_of(), drained={"standard": "halt", NASTY: "drain"}), FleetView(), version="1")
    assert "No reading of the job queues yet" in empty
    assert f"Drained: {html.escape(NASTY)} (drain), standard (halt)</p>" in empty


def test_a_status_from_an_older_supervisor_reads_the_same():
    """Before "slots", a status listed the slots under "workers" (`djsupervisor status` may ask an older one)."""
    from djsupervisor.serve.status_format import format_status

    status = status_of(slot_status("standard", 0, pid=4242, done=3))
    old = {("workers" if key == "slots" else key): value for key, value in status.items()}
    pools = {"standard": FakePool(1)}
    assert render_metrics(old, pools, FleetView(), version="1", now=0) == render_metrics(
        status, pools, FleetView(), version="1", now=0
    )
    assert "4242" in render_page(old, FleetView(), version="1") and "4242" in format_status(old)
