"""The control socket: in process (permissions, protocol, and hostile clients that must not hurt the loop), and
through the CLI against a real supervisor (status, the supervisor's view of every slot, scale, reload, stop)."""

from __future__ import annotations

import json
import os
import selectors
import socket
import stat
import time

import pytest
from helpers import raw_exchange, serving, wait_until, write_config
from helpers import run_cli as cli
from pipelines.lab import declare

from djsupervisor.serve import control
from djsupervisor.serve.control import ControlError, ControlServer, format_status, send_request
from djsupervisor.serve.status_format import format_queues

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server(tmp_path):
    """A ControlServer in a private directory, driven by a selector loop in a thread, answering echo."""
    calls = []

    def handler(request):
        calls.append(request)
        if request["cmd"] == "boom":
            raise RuntimeError("handler bug")
        return {"ok": True, "echo": request}

    path = tmp_path / "run" / "lab.sock"
    srv = ControlServer(str(path), handler)
    srv.calls = calls
    with serving(srv):
        yield srv
    srv.close()


def test_socket_is_private(server):
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(server.path)).st_mode) == 0o700


def test_request_and_answer(server):
    assert send_request(server.path, {"cmd": "status"}) == {"ok": True, "echo": {"cmd": "status"}}


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b"not json at all\n", "request is not JSON"),
        (b"\xff\xfe\n", "request is not JSON"),
        (b"[1, 2, 3]\n", 'must be a JSON object with a string "cmd"'),
        (b'{"cmd": 42}\n', 'must be a JSON object with a string "cmd"'),
        (b'{"cmd": "boom"}\n', "RuntimeError: handler bug"),
    ],
)
def test_garbage_gets_a_one_line_error(server, payload, expected):
    answer = json.loads(raw_exchange(server.path, payload))
    assert answer["ok"] is False and expected in answer["error"] and "\n" not in answer["error"]
    assert send_request(server.path, {"cmd": "still-alive"})["ok"]


def test_huge_request_is_refused(server):
    answer = json.loads(raw_exchange(server.path, b"x" * (control.MAX_REQUEST_BYTES + 10)))
    assert answer == {"ok": False, "error": f"request larger than {control.MAX_REQUEST_BYTES} bytes"}
    assert send_request(server.path, {"cmd": "still-alive"})["ok"]


def test_truncated_request_and_hang_up(server):
    raw_exchange(server.path, b'{"cmd": "sta', read=False)
    assert send_request(server.path, {"cmd": "still-alive"})["ok"]
    assert all(call["cmd"] != "sta" for call in server.calls)


def test_silent_clients_are_dropped(server, monkeypatch):
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 0.2)
    silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(5)]
    for sock in silent:
        sock.connect(server.path)
    wait_until(lambda: len(server.clients) == 5, 10, message="five silent clients accepted")
    accepted = time.monotonic()
    wait_until(lambda: time.monotonic() - accepted > 0.3, 5, message="the idle timeout to pass")
    assert send_request(server.path, {"cmd": "status"})["ok"]  # a new client triggers the expiry
    wait_until(lambda: len(server.clients) <= 1, 10, message="silent clients dropped")
    for sock in silent:
        assert sock.recv(10) == b""  # the server hung up on them
        sock.close()


def test_expire_idle_is_callable_from_a_timer(server, monkeypatch):
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(server.path)
    wait_until(lambda: len(server.clients) == 1, 10, message="the client accepted")
    server.expire_idle(time.monotonic())  # not idle long enough yet
    assert len(server.clients) == 1
    server.expire_idle(time.monotonic() + control.IDLE_TIMEOUT + 1)
    assert silent.recv(10) == b""
    silent.close()


def test_several_requests_on_one_connection(server):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(server.path)
        sock.sendall(b'{"cmd": "a"}\n{"cmd": "b"}\n')
        data = b""
        while data.count(b"\n") < 2:
            data += sock.recv(65536)
    assert [json.loads(line)["echo"]["cmd"] for line in data.splitlines()] == ["a", "b"]


def test_a_huge_request_with_a_newline_is_refused_too(server):
    payload = b'{"cmd": "status", "pad": "' + b"x" * (control.MAX_REQUEST_BYTES * 2) + b'"}\n'
    answer = json.loads(raw_exchange(server.path, payload))
    assert answer["ok"] is False and "larger than" in answer["error"]
    assert all("pad" not in call for call in server.calls)


def test_an_unserializable_answer_is_an_error_not_a_crash(tmp_path):
    loop = {}
    loop["self"] = loop
    srv = ControlServer(str(tmp_path / "s.sock"), lambda request: {"ok": True, "loop": loop})
    selector = selectors.DefaultSelector()
    srv.register(selector)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(srv.path)
        sock.sendall(b'{"cmd": "status"}\n')
        data = b""
        deadline = time.monotonic() + 10
        while not data.endswith(b"\n") and time.monotonic() < deadline:
            for key, mask in selector.select(0.05):
                key.data(mask)
            try:
                sock.setblocking(False)
                data += sock.recv(65536)
            except BlockingIOError:
                pass
    srv.close()
    answer = json.loads(data)
    assert answer["ok"] is False and "unserializable answer" in answer["error"]


def test_a_live_supervisor_is_not_displaced(server):
    with pytest.raises(ControlError, match="another supervisor is listening"):
        ControlServer(server.path, lambda r: {"ok": True})


def test_a_stale_socket_file_is_replaced(tmp_path):
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens
    srv = ControlServer(str(path), lambda r: {"ok": True})
    srv.close()
    assert not path.exists()


def test_client_errors_are_one_line(tmp_path):
    with pytest.raises(ControlError, match="no supervisor listening on .* \\(no such socket\\)"):
        send_request(str(tmp_path / "absent.sock"), {"cmd": "status"})
    regular = tmp_path / "file.sock"
    regular.write_text("")
    with pytest.raises(ControlError, match="is not a socket"):
        send_request(str(regular), {"cmd": "status"})


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give the socket to another user")
def test_client_refuses_a_socket_owned_by_someone_else(server):
    os.chown(server.path, 65534, 65534)
    with pytest.raises(ControlError, match="owned by uid 65534"):
        send_request(server.path, {"cmd": "status"})
    os.chown(server.path, 0, 0)


def test_default_socket_path_prefers_the_explicit_runtime_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DJSUPERVISOR_RUNTIME_DIR", str(tmp_path))
    assert control.default_socket_path("lab") == str(tmp_path / "lab.sock")


def test_default_socket_path_finds_a_template_instances_directory(monkeypatch, tmp_path):
    """djsupervisor@NAME.service listens in /run/djsupervisor/NAME/ (RuntimeDirectory=djsupervisor/%i, a user
    per instance): `--name NAME` finds it there, as that instance's user."""
    monkeypatch.delenv("DJSUPERVISOR_RUNTIME_DIR")
    monkeypatch.setattr(control, "SYSTEM_RUNTIME_DIR", tmp_path)
    (tmp_path / "lab").mkdir(mode=0o700)
    server = ControlServer(str(tmp_path / "lab" / "lab.sock"), lambda request: {"ok": True})
    try:
        assert control.default_socket_path("lab") == str(tmp_path / "lab" / "lab.sock")
    finally:
        server.close()
    assert control.default_socket_path("l[a]b") != str(tmp_path / "lab" / "lab.sock")  # a name, not a pattern


def test_a_path_that_is_not_a_socket_is_never_replaced(tmp_path):
    path = tmp_path / "lab.sock"
    path.write_text("precious")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        ControlServer(str(path), lambda r: {"ok": True})
    assert path.read_text() == "precious"


def test_bind_problems_are_one_line(tmp_path):
    path = tmp_path / ("x" * 120) / "lab.sock"  # longer than sun_path allows
    with pytest.raises(ControlError, match="control socket .*lab.sock") as caught:
        ControlServer(str(path), lambda r: {"ok": True})
    assert "\n" not in str(caught.value)


def test_a_silent_server_times_out(tmp_path):
    path = tmp_path / "mute.sock"
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(path))
    mute.listen(1)  # accepts (in the backlog) and never answers
    try:
        with pytest.raises(ControlError, match="no answer from the supervisor .* within 0.3 s"):
            send_request(str(path), {"cmd": "status"}, timeout=0.3)
    finally:
        mute.close()


def test_status_table():
    data = {
        "supervisor": "lab",
        "pid": 10,
        "started": time.time() - 3700,
        "state": "running",
        "slots": [
            {
                "worker": "standard",
                "slot": 0,
                "pid": 11,
                "state": "running",
                "activity": "populating",
                "uptime": 3650,
                "restarts": 1,
                "rss_mb": 120.4,
                "cpu_percent": 99.5,
                "table": "`lab_pipe`.`__square`",
                "key": {"source_id": 3},
                "jobs_done": 12,
                "jobs_failed": 1,
            },
            {
                "worker": "standard",
                "slot": 1,
                "pid": None,
                "state": "fatal",
                "activity": None,
                "uptime": None,
                "restarts": 5,
                "rss_mb": None,
                "cpu_percent": None,
                "table": None,
                "key": None,
                "jobs_done": 0,
                "jobs_failed": 0,
            },
            {
                "worker": "ingest",
                "slot": 0,
                "pid": 13,
                "state": "running",
                "activity": "sleeping",
                "uptime": 30,
                "restarts": 0,
                "rss_mb": 80.0,
                "cpu_percent": 0.0,
                "table": None,
                "key": None,
                "jobs_done": 0,
                "jobs_failed": 0,
            },
        ],
    }
    lines = format_status(data).splitlines()
    assert lines[0] == "supervisor lab (pid 10) running, up 1h01m: 1 fatal, 2 running; 12 jobs done"
    assert lines[1].split() == [
        "WORKER",
        "SLOT",
        "PID",
        "STATE",
        "UPTIME",
        "RESTARTS",
        "RSS",
        "MB",
        "CPU",
        "%",
        "DONE",
        "FAILED",
        "CURRENT",
    ]
    assert lines[2].split() == [
        "standard",
        "0",
        "11",
        "running",
        "1h00m",
        "1",
        "120",
        "99.5",
        "12",
        "1",
        "`lab_pipe`.`__square`",
        '{"source_id":3}',
    ]
    assert lines[3].split() == ["standard", "1", "-", "fatal", "-", "5", "-", "-", "0", "0", "-"]
    assert lines[4].split()[-1] == "sleeping"
    assert lines[2].index("running") == lines[4].index("running") == lines[1].index("STATE")  # columns align


def test_queue_table():
    lines = format_queues(
        [
            {
                "worker": "standard",
                "table": "`lab`.`__square`",
                "pending": 4,
                "reserved": 2,
                "success": 10,
                "error": 1,
                "ignore": 0,
            },
            {
                "worker": "ingest",
                "table": "`lab`.`_raw`",
                "pending": 0,
                "reserved": 0,
                "success": 0,
                "error": 0,
                "ignore": 3,
            },
        ]
    ).splitlines()
    assert [line.split() for line in lines] == [
        ["TABLE", "WORKER", "PENDING", "RESERVED", "SUCCESS", "ERROR", "IGNORE"],
        ["`lab`.`__square`", "standard", "4", "2", "10", "1", "0"],
        ["`lab`.`_raw`", "ingest", "0", "0", "0", "0", "3"],
    ]
    assert format_queues([]) == "(no tables)"


def test_a_symlinked_socket_directory_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ControlError, match="is a symbolic link"):
        ControlServer(str(tmp_path / "link" / "lab.sock"), lambda r: {"ok": True})


def test_an_existing_socket_directory_keeps_its_mode(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o755)  # not made by the supervisor: never chmod'ed (issue 18: /tmp became drwx------)
    srv = ControlServer(str(loose / "lab.sock"), lambda r: {"ok": True})
    srv.close()
    assert stat.S_IMODE(loose.stat().st_mode) == 0o755


def test_close_leaves_a_newer_socket_alone(tmp_path):
    path = tmp_path / "lab.sock"
    first = ControlServer(str(path), lambda r: {"ok": True})
    os.unlink(path)  # someone removed it, and another supervisor took the path
    second = ControlServer(str(path), lambda r: {"ok": True})
    first.close()
    assert path.exists()
    second.close()
    assert not path.exists()


def test_a_request_flood_is_cut_off(server):
    flood = b'{"cmd": "status"}\n' * 1000
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(server.path)
        sock.sendall(flood)
        data = b""
        while chunk := sock.recv(65536):  # the server answers a few, refuses, and hangs up
            data += chunk
    answers = [json.loads(line) for line in data.splitlines()]
    assert len(answers) <= control.MAX_PIPELINED + 1 and answers[-1]["ok"] is False
    assert "requests at once" in answers[-1]["error"]
    assert len(server.calls) <= control.MAX_PIPELINED
    assert send_request(server.path, {"cmd": "still-alive"})["ok"]


# ----- through the CLI, against a real `djsupervisor start`


SLOT_KEYS = {
    "worker",
    "slot",
    "pid",
    "state",
    "uptime",
    "restarts",
    "rss_mb",
    "cpu_percent",
    "table",
    "key",
    "jobs_done",
    "jobs_failed",
    "last_heartbeat",
}


@pytest.mark.process
@pytest.mark.timeout(120)
def test_status_scale_reload_and_stop_through_the_control_socket(db, supervise, tmp_path):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed([1, 2], delay=1)
    socket_path = tmp_path / "lab.sock"
    head = f'[supervisor]\nname = "lab"\ncontrol_socket = "{socket_path}"\nsample_interval = 0.5\n'
    standard = '[[worker]]\nname = "standard"\ntarget = "pipelines.supervised:standard"\n'
    config = write_config(tmp_path / "lab.toml", head + standard)
    sup = supervise(["-c", str(config)])
    pids = sup.wait_children({"standard": 1})
    wait_until(socket_path.exists, 10, message="the control socket")
    assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600

    wait_until(lambda: len(pipe.Square()) == 2, 30, message="the jobs")

    def status() -> dict:
        result = cli(db, tmp_path, "status", "--json", "-c", str(config))
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    report = wait_until(
        lambda: (s := status())["slots"] and s["slots"][0]["rss_mb"] and s, 15, message="a sampled status"
    )
    assert report["supervisor"] == "lab" and report["pid"] == sup.pid and report["state"] == "running"
    (slot,) = report["slots"]
    assert report["workers"] == report["slots"]  # the old key, kept for one release
    assert set(slot) >= SLOT_KEYS
    assert (slot["worker"], slot["slot"], slot["pid"], slot["state"]) == ("standard", 0, pids["standard[0]"], "running")
    assert slot["jobs_done"] == 2 and slot["restarts"] == 0 and slot["rss_mb"] > 10

    assert cli(db, tmp_path, "scale", "standard", "2", "-c", str(config)).returncode == 0
    sup.wait_children({"standard": 2}, timeout=30)

    write_config(config, head + standard + '[[worker]]\nname = "other"\ntarget = "pipelines.supervised:other"\n')
    assert cli(db, tmp_path, "reload", "-c", str(config)).returncode == 0
    sup.wait_children({"standard": 2, "other": 1}, timeout=30)  # the runtime scale survives an unchanged entry

    assert cli(db, tmp_path, "stop", "-c", str(config)).returncode == 0
    assert sup.wait_exit(30) == 0
    assert not socket_path.exists()


@pytest.mark.process
@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["mysql"])  # the socket does not depend on the database
def test_a_silent_control_client_is_dropped_without_any_other_connection(db, supervise, tmp_path):
    declare(db.schema_name("pipe"))
    socket_path = tmp_path / "lab.sock"
    config = write_config(
        tmp_path / "lab.toml",
        f'[supervisor]\nname = "lab"\ncontrol_socket = "{socket_path}"\n'
        '[[worker]]\nname = "standard"\ntarget = "pipelines.supervised:standard"\n',
    )
    sup = supervise(["-c", str(config)])
    sup.wait_children({"standard": 1})
    wait_until(socket_path.exists, 10, message="the control socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(str(socket_path))
        connected = time.monotonic()
        silent.settimeout(control.IDLE_TIMEOUT + 15)
        assert silent.recv(1) == b""  # closed by the supervisor's timer, not by a later client
        assert control.IDLE_TIMEOUT <= time.monotonic() - connected < control.IDLE_TIMEOUT + 10


@pytest.mark.process
@pytest.mark.timeout(120)
def test_scale_and_config_beyond_the_replicas_limit_are_refused_in_one_line(db, supervise, tmp_path):
    declare(db.schema_name("pipe"))
    socket_path = tmp_path / "lab.sock"
    head = f'[supervisor]\nname = "lab"\ncontrol_socket = "{socket_path}"\n'
    config = write_config(
        tmp_path / "lab.toml", head + '[[worker]]\nname = "standard"\ntarget = "pipelines.supervised:standard"\n'
    )
    sup = supervise(["-c", str(config)])
    pids = sup.wait_children({"standard": 1})
    wait_until(socket_path.exists, 10, message="the control socket")
    refused = cli(db, tmp_path, "scale", "standard", "1025", "-c", str(config))
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == "djsupervisor: error: scale: replicas must be <= 1024 (children per pool), got 1025\n"
    answer = json.loads(raw_exchange(socket_path, b'{"cmd": "scale", "worker": "standard", "replicas": 1000000000}\n'))
    assert answer == {"ok": False, "error": "replicas must be <= 1024 (children per pool), got 1000000000"}
    status = json.loads(cli(db, tmp_path, "status", "--json", "-c", str(config)).stdout)
    assert status["pools"][0]["replicas"] == 1 and sup.pids() == pids  # nothing forked

    too_big = write_config(
        tmp_path / "big.toml",
        f'[supervisor]\nname = "big"\ncontrol_socket = "{tmp_path / "big.sock"}"\n'
        '[[worker]]\nname = "standard"\ntarget = "pipelines.supervised:standard"\nreplicas = 5000\n',
    )
    done = cli(db, tmp_path, "start", "-c", str(too_big))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "worker[0] (standard).replicas: must be <= 1024 (children per pool), got 5000" in done.stderr
    assert not (tmp_path / "big.sock").exists()
