"""The real supervisor speaks sd_notify: READY once its children are up, STATUS, WATCHDOG, RELOADING,
STOPPING, as systemd's Type=notify expects."""

from __future__ import annotations

import signal
import socket

import pytest
from helpers import wait_until, write_config
from pipelines.lab import declare

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]


def test_notifications_over_a_supervisor_life(db, supervise, tmp_path, monkeypatch):
    declare(db.schema_name("pipe"))
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # keep-alive every 0.5 s
    config = write_config(
        tmp_path / "lab.toml",
        f"""
        [supervisor]
        name = "lab"
        control_socket = "{tmp_path / "lab.sock"}"
        [[worker]]
        name = "standard"
        target = "pipelines.supervised:standard"
        replicas = 2
    """,
    )
    messages: list[str] = []

    def drain() -> None:
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                return

    def received(prefix: str) -> bool:
        drain()
        return any(m.startswith(prefix) for m in messages)

    sup = supervise(["-c", str(config)])
    wait_until(lambda: received("READY=1"), 30, message="READY=1")
    assert len(sup.pids("standard")) == 2  # READY came once the children were up
    # the line sent with READY counts children still starting; the next follows within seconds, not 10 s
    wait_until(lambda: received("STATUS=2 running"), 5, message="STATUS=2 running")
    wait_until(lambda: drain() or sum(m == "WATCHDOG=1" for m in messages) >= 2, 10, message="keep-alives")
    sup.signal(signal.SIGHUP)
    wait_until(lambda: received("RELOADING=1"), 10, message="RELOADING=1")
    sup.signal(signal.SIGTERM)
    wait_until(lambda: received("STOPPING=1"), 30, message="STOPPING=1")
    assert sup.wait_exit(60) == 0
    drain()
    status = [m for m in messages if m.startswith("STATUS=")]
    assert status and status[0].startswith("STATUS=2 "), messages  # sent with READY: two children
    sock.close()
