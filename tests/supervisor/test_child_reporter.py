"""The child's reports: the state a throttled event leaves reaches the parent soon, not at the next heartbeat.

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
    reporter.on_event(WorkerEvent("job_start", table="`a`.`b`", key={"k": 1}))
    reporter.on_event(WorkerEvent("job_end", table="`a`.`b`", key={"k": 1}, ok=True))  # a 0 ms job: throttled
    lines, data = [], b""
    while time.monotonic() - began < 2.0 and len(lines) < 2:
        if select.select([r], [], [], 0.05)[0]:
            data += os.read(r, 65536)
            *done, data = data.split(b"\\n")
            lines += [dict(json.loads(line), at=round(time.monotonic() - began, 3)) for line in done]
    reporter.close()
    print(json.dumps(lines))
    """
)


def test_a_job_that_ends_within_the_throttle_is_reported_ended_soon_after():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=30, check=True)
    lines = json.loads(result.stdout)
    assert lines[0]["event"] == "job_start" and lines[0]["job_elapsed"] is not None, lines
    # before: nothing more until the heartbeat 5 s later, and the parent took the child for one still in its job
    assert len(lines) == 2, lines
    assert lines[1]["job_elapsed"] is None and lines[1]["key"] is None and lines[1]["at"] < 1.0, lines
