"""The child's reports: the state a throttled event leaves reaches the parent soon, not at the next heartbeat;
an idle child's cycles are carried by its next report, not sent by themselves.

Run in a subprocess: a `Reporter` sets the process title, which the test process must keep."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(60)

SCRIPT = textwrap.dedent(
    """
    import json, os, select, time
    from djsupervisor.supervisor.child import Reporter
    from djsupervisor.worker.events import WorkerEvent

    r, w = os.pipe()
    reporter = Reporter(w, "s", "p[0]", os.getppid(), interval=5.0)  # the default heartbeat interval
    reporter.start()
    began = time.monotonic()
    for kind, fields in EVENTS:
        reporter.on_event(WorkerEvent(kind, **fields))
    lines, data = [], b""
    while time.monotonic() - began < 1.5 and len(lines) < 3:
        if select.select([r], [], [], 0.05)[0]:
            data += os.read(r, 65536)
            *done, data = data.split(b"\\n")
            lines += [dict(json.loads(line), at=round(time.monotonic() - began, 3)) for line in done]
    reporter.close()
    print(json.dumps(lines))
    """
)


def reports(events: list) -> list[dict]:
    """The lines a Reporter writes within 1.5 s of these (kind, fields) events."""
    script = f"EVENTS = {events!r}\n{SCRIPT}"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(result.stdout)


def test_a_job_that_ends_within_the_throttle_is_reported_ended_soon_after():
    job = dict(table="`a`.`b`", key={"k": 1})
    lines = reports([("job_start", job), ("job_end", dict(job, ok=True))])  # a 0 ms job: its end throttled
    assert lines[0]["event"] == "job_start" and lines[0]["job_elapsed"] is not None, lines
    # before: nothing more until the heartbeat 5 s later, and the parent took the child for one still in its job
    assert len(lines) == 2, lines
    assert lines[1]["job_elapsed"] is None and lines[1]["key"] is None and lines[1]["at"] < 1.0, lines


def test_an_idle_childs_cycles_wait_for_its_next_report():
    """cycle_start and cycle_end are carried by the next report (the first cycle_end excepted: the parent's
    "got going"); before, the heartbeat thread sent them 0.1 s later, and 64 idle children with a 1 s sleep
    woke the parent 64 times a second (2.5 % of a core against 0.3 %, bench figure 4)."""
    cycle = [("cycle_start", {}), ("cycle_end", {}), ("sleep", dict(seconds=1.0))]
    lines = reports(cycle + cycle)
    assert [line.get("event") for line in lines] == ["cycle_end"], lines  # the first cycle's end, at once
