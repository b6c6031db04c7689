"""The control socket, in process: permissions, protocol, and hostile clients that must not hurt the loop."""

from __future__ import annotations

import json
import os
import selectors
import socket
import stat
import threading
import time

import pytest

from djsupervisor import control
from djsupervisor.control import ControlError, ControlServer, send_request

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
    selector = selectors.DefaultSelector()
    srv.register(selector)
    running = threading.Event()
    running.set()
    errors = []

    def loop():
        while running.is_set():
            try:
                for key, mask in selector.select(0.05):
                    key.data(mask)
            except Exception as error:  # what the supervisor's loop would die of
                errors.append(error)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    srv.calls, srv.loop_errors = calls, errors
    yield srv
    running.clear()
    thread.join(5)
    srv.close()
    assert not errors, errors


def raw_exchange(path, payload: bytes, *, read=True) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(payload)
        if not read:
            return b""
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_socket_is_private(server):
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(server.path)).st_mode) == 0o700


def test_request_and_answer(server):
    assert send_request(server.path, {"cmd": "status"}) == {"ok": True, "echo": {"cmd": "status"}}


@pytest.mark.parametrize("payload, expected", [
    (b"not json at all\n", "request is not JSON"),
    (b"\xff\xfe\n", "request is not JSON"),
    (b'[1, 2, 3]\n', 'must be a JSON object with a string "cmd"'),
    (b'{"cmd": 42}\n', 'must be a JSON object with a string "cmd"'),
    (b'{"cmd": "boom"}\n', "RuntimeError: handler bug"),
])  # fmt: skip
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
    deadline = time.monotonic() + 10
    while len(server.clients) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert send_request(server.path, {"cmd": "status"})["ok"]  # a new client triggers the expiry
    deadline = time.monotonic() + 10
    while len(server.clients) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(server.clients) <= 1
    for sock in silent:
        sock.close()


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
