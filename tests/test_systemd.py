"""The unit files verify, and sd_notify messages reach a real notification socket."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from djsupervisor.systemd import SystemdNotifier

pytestmark = pytest.mark.timeout(60)
UNITS = Path(__file__).resolve().parents[1] / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit, instance", [("djsupervisor.service", "djsupervisor.service"),
                                            ("djsupervisor@.service", "djsupervisor@lab.service")])  # fmt: skip
def test_unit_files_verify(tmp_path, unit, instance):
    executable = Path(sys.executable).parent / "djsupervisor"
    text = (UNITS / unit).read_text()
    assert "/opt/djsupervisor/bin/djsupervisor" in text
    (tmp_path / instance).write_text(text.replace("/opt/djsupervisor/bin/djsupervisor", str(executable)))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / instance)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize("unit", ["djsupervisor.service", "djsupervisor@.service"])
def test_unit_files_say_what_the_supervisor_needs(unit):
    settings = dict(
        line.split("=", 1) for line in (UNITS / unit).read_text().splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["KillMode"] == "mixed" and settings["Restart"] == "on-failure"
    assert int(settings["TimeoutStopSec"]) > 30  # above the default graceful_timeout
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert settings["RuntimeDirectoryMode"] == "0700"
    assert "DJSUPERVISOR_RUNTIME_DIR=%t/djsupervisor" in settings["Environment"]


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_notifications_reach_the_socket(notify_socket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = SystemdNotifier()
    assert notifier.ready() and notifier.status("2 children\nrunning") and notifier.watchdog()
    assert notifier.reloading() and notifier.stopping()
    messages = [notify_socket.recv(4096).decode() for _ in range(5)]
    assert messages[0] == f"READY=1\nMAINPID={os.getpid()}"
    assert messages[1] == "STATUS=2 children running"
    assert messages[2] == "WATCHDOG=1"
    assert messages[3].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert messages[4] == "STOPPING=1"
    assert notifier.watchdog_interval() == 10.0


def test_no_notify_socket_means_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    notifier = SystemdNotifier()
    assert not notifier.ready() and notifier.watchdog_interval() is None


def test_watchdog_for_another_pid_is_not_ours(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert SystemdNotifier().watchdog_interval() is None


def test_abstract_socket_address(monkeypatch):
    name = f"djs-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert SystemdNotifier().stopping()
        assert sock.recv(100) == b"STOPPING=1"
    finally:
        sock.close()
