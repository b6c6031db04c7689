"""The metrics and status page: rendering in process (Prometheus text parsed by prometheus_client's parser, the
HTML page's escaping, and the counters that must not go down when a slot's child is replaced), the endpoint's
server in process (routes, hostile clients, bind errors), config validation, and the real `djsupervisor start`
observed over HTTP (Prometheus parser, headless Chromium)."""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from helpers import djsupervisor_command, serving, wait_until, write_config
from pipelines.lab import declare
from prometheus_client.parser import text_string_to_metric_families

from djsupervisor.fleet.view import FleetView, TableDepth
from djsupervisor.serve import http as http_status
from djsupervisor.serve.http import HttpError, StatusServer
from djsupervisor.serve.metrics import render_metrics
from djsupervisor.serve.status_page import render_page
from djsupervisor.supervisor.config import ConfigError, SupervisorConfig, WorkerConfig, parse_config
from djsupervisor.supervisor.slot import Slot, SlotState

pytestmark = pytest.mark.timeout(60)


# ----- rendering, in process


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


# ----- the server, in process


def get(url: str, method: str = "GET", timeout: float = 5) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request; error statuses are returned, not raised."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def raw(address: str, payload: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes, read until the server closes."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


BIG = 16 * 2**20  # more than the socket buffers hold: the answer goes out over many writable events


@pytest.fixture
def server():
    def boom():
        raise RuntimeError("render bug\nsecond line")

    pages = {
        "/": lambda: ("text/html; charset=utf-8", b"<p>hi</p>"),
        "/boom": boom,
        "/big": lambda: ("text/plain", b"x" * BIG),
        "/metrics": lambda: ("text/plain; version=0.0.4; charset=utf-8", b"up 1\n"),
    }
    srv = StatusServer("127.0.0.1:0", pages)
    with serving(srv):
        yield srv
    srv.close()


def test_routes_methods_and_headers(server):
    base = f"http://{server.address}"
    status, headers, body = get(base + "/metrics?x=1")
    assert (status, body) == (200, b"up 1\n")
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8" and headers["Connection"] == "close"
    status, headers, body = get(base + "/", method="HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", "9")
    assert get(base + "/nope")[0] == 404
    answer = raw(server.address, b"HEAD /nope HTTP/1.1\r\n\r\n")  # headers only, Content-Length of the GET
    assert answer.startswith(b"HTTP/1.1 404 ") and answer.endswith(b"\r\n\r\n") and b"Content-Length: 0" not in answer
    status, headers, _ = get(base + "/metrics", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, _, body = get(base + "/boom")
    assert status == 500 and body == b"500 Internal Server Error: RuntimeError: render bug\n"
    assert raw(server.address, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert get(base + "/")[2] == b"<p>hi</p>"  # the loop is unharmed (serving() checks nothing raised)


def test_a_large_answer_reaches_a_slow_client_that_half_closed(server):
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /big HTTP/1.0\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)  # as `printf ... | nc` does
        time.sleep(0.3)  # the server sees the EOF with most of the answer still to send
        data = b""
        while chunk := sock.recv(2**20):
            data += chunk
    assert data.endswith(b"\r\n\r\n" + b"x" * BIG)


def test_a_huge_head_is_refused_and_the_server_goes_on(server):
    answer = raw(server.address, b"GET / HTTP/1.1\r\nX: " + b"a" * 100 * 1024 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert get(f"http://{server.address}/")[0] == 200


def test_an_address_in_use_is_a_one_line_error():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(HttpError, match=rf"^http 127.0.0.1:{port}: cannot listen: Address already in use$"):
            StatusServer(f"127.0.0.1:{port}", {})


@pytest.mark.parametrize(
    "value, problem",
    [
        ("9108", "must be 'host:port'"),
        (":9108", "must be 'host:port'"),
        ("localhost:http", "port must be a number"),
        ("127.0.0.1:65536", "port must be 0..65535"),
        ("::1:9108", "IPv6 host in brackets"),
        (9108, "must be a non-empty string"),
    ],
)
def test_bad_http_addresses_are_one_line_config_errors(value, problem):
    data = {"supervisor": {"http": value}, "worker": [{"name": "w", "target": "m:w"}]}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "lab.toml", "lab", check_targets=False)
    message = str(caught.value)
    assert message.startswith("lab.toml: supervisor.http: ") and problem in message and "\n" not in message


def test_good_http_addresses():
    for value in ("127.0.0.1:9108", "localhost:0", "[::1]:9108", "0.0.0.0:80"):
        supervisor = {"http": value, "http_token_file": "/t"} if value.startswith("0") else {"http": value}
        data = {"supervisor": supervisor, "worker": [{"name": "w", "target": "m:w"}]}
        assert parse_config(data, "lab.toml", "lab", check_targets=False).http == value


# ----- the real supervisor


CONFIG = """
    [supervisor]
    name = "lab"
    control_socket = "{socket}"
    http = "{http}"
    sample_interval = 0.5
    fleet_interval = 0.5
    graceful_timeout = 5

    [[worker]]
    name = "standard"
    target = "pipelines.supervised:standard"
    replicas = 2

    [[worker]]
    name = "other"                            # no child: its queue (Cube) stays as the test leaves it
    target = "pipelines.supervised:other"
    replicas = 0
"""


def cli(db, tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = db.env
    return subprocess.run(
        [*djsupervisor_command(), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


def metrics(address: str) -> dict[tuple, float]:
    """The supervisor's metrics, parsed by prometheus_client, by (name, sorted labels)."""
    status, headers, body = get(f"http://{address}/metrics")
    assert status == 200 and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return samples(body.decode())


def running(found: dict) -> float:
    return found[("djsupervisor_children", (("state", "running"), ("worker", "standard")))]


def done(found: dict) -> float:
    return found[("djsupervisor_jobs_done_total", (("worker", "standard"),))]


def restarts(found: dict, slot: int) -> float:
    return found[("djsupervisor_restarts_total", (("slot", str(slot)), ("worker", "standard")))]


def chromium_dom(url: str, tmp_path) -> str:
    """The DOM headless Chromium renders for `url` (Debian's chromium; .ci/run installs it)."""
    binary = shutil.which("chromium")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run should have installed Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    command = [
        binary,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--dump-dom",
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.process
@pytest.mark.timeout(150)
def test_metrics_status_page_and_hostile_clients(db, supervise, tmp_path):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed(range(1, 5), delay=0.2)
    config = write_config(tmp_path / "lab.toml", CONFIG.format(socket=tmp_path / "lab.sock", http="127.0.0.1:0"))
    sup = supervise(["-c", str(config)])
    sup.wait_children({"standard": 2})
    result = wait_until(
        lambda: (r := cli(db, tmp_path, "status", "--json", "-c", str(config))).returncode == 0 and r,
        20,
        message="status over the control socket",
    )
    address = json.loads(result.stdout)["http"]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", address) and not address.endswith(":0")
    assert f"status page on http://{address}/" in sup.output

    found = wait_until(
        lambda: (
            (m := metrics(address))
            and running(m) == 2
            and done(m) == 4
            and ("djsupervisor_child_rss_bytes", (("slot", "1"), ("worker", "standard"))) in m
            and m
        ),
        30,
        message="2 running children, 4 jobs done, sampled",
    )
    assert found[("djsupervisor_replicas_desired", (("worker", "standard"),))] == 2
    assert found[("djsupervisor_child_rss_bytes", (("slot", "0"), ("worker", "standard")))] > 10 * 2**20
    assert found[("djsupervisor_parent_rss_bytes", ())] > 10 * 2**20
    assert restarts(found, 0) == 0 and found[("djsupervisor_up", ())] == 1
    status = json.loads(get(f"http://{address}/status.json")[2])
    assert status["supervisor"] == "lab" and status["http"] == address and len(status["slots"]) == 2

    # the fleet agent's reading of the job queues: Cube's 4 pending jobs (nobody populates it)
    pipe.Cube.jobs.refresh()
    cube = pipe.Cube.full_table_name.replace("`", "").replace('"', "")
    pending = ("djsupervisor_queue_jobs", (("state", "pending"), ("table", cube)))
    found = wait_until(lambda: (m := metrics(address)).get(pending) == 4 and m, 20, message="Cube's queue read")
    assert found[("djsupervisor_fleet_reading_age_seconds", ())] < 5
    assert found[("djsupervisor_children", (("state", "running"), ("worker", "other")))] == 0

    # hostile clients: one silent, one sending a 100 KiB head; the loop keeps answering, both are dropped
    host, port = address.rsplit(":", 1)
    silent = socket.create_connection((host, int(port)), timeout=10)
    flood = socket.create_connection((host, int(port)), timeout=10)
    flood.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * 100 * 1024)
    began = time.monotonic()
    assert cli(db, tmp_path, "status", "-c", str(config)).returncode == 0
    assert get(f"http://{address}/metrics")[0] == 200
    assert time.monotonic() - began < 10
    assert flood.recv(65536).startswith(b"HTTP/1.1 431 ")
    began = time.monotonic()
    assert silent.recv(10) == b""  # dropped by the idle timer, not by our timeout
    assert time.monotonic() - began < http_status.IDLE_TIMEOUT + 3
    silent.close()
    flood.close()

    # a killed child: its slot's restart counter goes up, the jobs-done counter does not go down
    os.kill(sup.pids("standard")["standard[0]"], signal.SIGKILL)
    found = wait_until(
        lambda: (m := metrics(address)) and restarts(m, 0) == 1 and running(m) == 2 and m,
        30,
        message="standard[0] restarted",
    )
    assert done(found) == 4
    pipe.seed([5, 6], delay=0)
    wait_until(lambda: done(metrics(address)) == 6, 30, message="6 jobs done")

    pids = sup.wait_children({"standard": 2})
    dom = chromium_dom(f"http://{address}/", tmp_path)
    assert re.search(r'<span id="supervisor">lab</span>', dom)
    assert re.search(rf'<tr><td>{re.escape(cube)}</td><td>other</td><td class="n">4</td>', dom), dom[-3000:]
    rows = re.findall(r'<tr class="(\w+)"><td>standard</td><td class="n">(\d)</td><td class="n">(\d+)</td>', dom)
    assert sorted(rows) == sorted(("running", label[-2], str(pid)) for label, pid in pids.items()), dom[-3000:]

    # a slot removed by scaling down takes its count along into the pool's: the counter stays at 6
    assert cli(db, tmp_path, "scale", "standard", "1", "-c", str(config)).returncode == 0
    slot_1 = ("djsupervisor_restarts_total", (("slot", "1"), ("worker", "standard")))
    found = wait_until(lambda: (m := metrics(address)) and slot_1 not in m and m, 30, message="standard[1] removed")
    assert done(found) == 6 and found[("djsupervisor_replicas_desired", (("worker", "standard"),))] == 1

    assert cli(db, tmp_path, "stop", "-c", str(config)).returncode == 0
    assert sup.wait_exit(30) == 0


@pytest.mark.process
def test_a_taken_http_port_stops_the_start_before_any_child(db, supervise, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        text = CONFIG.format(socket=tmp_path / "lab.sock", http=f"127.0.0.1:{port}")
        config = write_config(tmp_path / "lab.toml", text)
        sup = supervise(["-c", str(config)])
        assert sup.wait_exit(30) == 2
    errors = [line for line in sup.output.splitlines() if "error" in line.lower()]
    assert errors == [f"djsupervisor: error: {config}: http 127.0.0.1:{port}: cannot listen: Address already in use"]
    assert "started standard" not in sup.output and not (tmp_path / "lab.sock").exists()
