"""sd_notify: messages reach a real AF_UNIX datagram socket (a path or an abstract name), as systemd's."""

from __future__ import annotations

import os
import socket
import time

import pytest

from djsupervisor.supervisor.systemd import SystemdNotifier

pytestmark = pytest.mark.timeout(60)


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
    assert notifier.status("2 children running") and notifier.status("3 children running")
    assert notify_socket.recv(4096).decode() == "STATUS=3 children running"  # the same line is not sent twice
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


def test_reloading_carries_the_monotonic_clock(notify_socket):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert SystemdNotifier().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = dict(line.split("=", 1) for line in notify_socket.recv(4096).decode().splitlines())
    assert fields["RELOADING"] == "1" and before <= int(fields["MONOTONIC_USEC"]) <= after


@pytest.mark.parametrize("usec", ["", "garbage", "0"])
def test_no_usable_watchdog_setting(monkeypatch, usec):
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert SystemdNotifier().watchdog_interval() is None


def test_watchdog_without_pid_is_ours(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert SystemdNotifier().watchdog_interval() == 1.5


def test_a_vanished_socket_is_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert SystemdNotifier().watchdog() is False  # nothing raised: the supervisor goes on
