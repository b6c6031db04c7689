"""Out of descriptors (security issue 18): a real supervisor under ``ulimit -n 40`` whose control socket is held
by idle clients until it can open nothing more. Before, the next psutil sample (a timer) raised EMFILE out of
the loop and the teardown SIGKILLed every child. Now every timer, the restart's ``pipe()`` and ``accept`` take
the shortage as transient: the supervisor and its children live through it, say so in one line each, and once
the clients are gone a killed child comes back and `djsupervisor status` answers."""

from __future__ import annotations

import errno
import json
import signal
import socket
import time

import psutil
import pytest
from helpers import Supervised, run_cli, wait_until, write_config
from loguru import logger
from pipelines.lab import declare

from djsupervisor.supervisor.timers import Timers

pytestmark = pytest.mark.timeout(180)

NOFILE = 40  # the issue's `ulimit -n 40`


def hold_until_exhausted(path: str, sup: Supervised) -> list[socket.socket]:
    """Connect to the control socket and say nothing, until the supervisor holds all of its NOFILE descriptors
    (a few more connections wait in the listen backlog), or is gone."""
    held: list[socket.socket] = []

    def full() -> bool:
        if sup.process.poll() is not None:
            return True
        for _ in range(4):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(0.2)  # a full backlog makes connect() wait
            try:
                sock.connect(path)
            except OSError:
                sock.close()
                break
            held.append(sock)
        return psutil.Process(sup.pid).num_fds() >= NOFILE

    wait_until(full, 8, interval=0.02, message="the supervisor's descriptors all taken")
    return held


@pytest.mark.process
def test_held_clients_under_a_low_nofile_limit_do_no_harm(db, supervise, tmp_path):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed([1, 2], delay=0.1)
    socket_path = tmp_path / "fds.sock"
    config = write_config(
        tmp_path / "fds.toml",
        f"""
        [supervisor]
        name = "fds"
        control_socket = "{socket_path}"
        sample_interval = 0.2
        backoff_initial = 0.05
        backoff_max = 0.5

        [[worker]]
        name = "standard"
        target = "pipelines.supervised:standard"
        replicas = 2
        """,
    )
    sup = supervise(["-c", str(config)], nofile=NOFILE)
    before = sup.wait_children({"standard": 2})
    wait_until(lambda: "all children started" in sup.output, 60, message=f"READY; output:\n{sup.output[-3000:]}")
    assert psutil.Process(sup.pid).rlimit(psutil.RLIMIT_NOFILE) == (NOFILE, NOFILE)

    held = hold_until_exhausted(str(socket_path), sup)
    try:
        assert sup.process.poll() is None, sup.output[-3000:]
        # the sampling timer cannot open /proc: logged, the loop goes on (it used to end the supervisor here)
        wait_until(lambda: "timer Supervisor._sample failed" in sup.output, 10, message="the timer's failure")
        wait_until(lambda: "cannot accept a connection" in sup.output, 10, message="accept paused")
        # a child that dies now cannot get a report pipe for its replacement: a failed start, retried
        victim, survivor = before["standard[0]"], before["standard[1]"]
        psutil.Process(victim).send_signal(signal.SIGKILL)
        wait_until(lambda: "could not start (no descriptor for its report pipe" in sup.output, 10, message="start")
        assert sup.process.poll() is None, sup.output[-3000:]
        assert psutil.Process(survivor).status() != psutil.STATUS_ZOMBIE
        assert psutil.Process(sup.pid).cpu_percent(0.5) < 50  # not spinning on the listener it cannot accept on
    finally:
        for sock in held:
            sock.close()

    after = sup.wait_children({"standard": 2}, timeout=30)
    assert after["standard[1]"] == survivor and after["standard[0]"] != victim

    def status() -> dict | None:
        done = run_cli(db, tmp_path, "status", "--json", "-c", str(config))
        return json.loads(done.stdout) if done.returncode == 0 else None

    report = wait_until(status, 30, interval=0.5, message="status answered again")
    assert report["pid"] == sup.pid and len(report["slots"]) == 2
    output = sup.output
    assert output.count("cannot accept a connection") == 1, output[-3000:]  # once a minute, not once a turn
    assert output.count("timer Supervisor._sample failed") == 1, output[-3000:]
    assert "Traceback" not in output and "FATAL" not in output, output[-3000:]
    assert run_cli(db, tmp_path, "stop", "-c", str(config)).returncode == 0
    assert sup.wait_exit(60) == 0


def test_a_timer_that_raises_is_logged_once_and_runs_again():
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), format="{message}")
    timers, runs = Timers(), []

    def sample() -> None:
        runs.append(1)
        raise OSError(errno.EMFILE, "Too many open files")

    def broken() -> None:
        raise KeyError("a bug")

    try:
        timers.every(0.01, sample)
        timers.call_at(time.monotonic(), broken)
        deadline = time.monotonic() + 10
        while len(runs) < 5 and time.monotonic() < deadline:
            time.sleep(timers.timeout(time.monotonic()) or 0)
            timers.run_due(time.monotonic())  # raises nothing
    finally:
        logger.remove(sink)
    assert len(runs) == 5 and timers.failures == 6
    failed = [line for line in lines if "failed" in line]
    assert len(failed) == 2, lines  # each cause once a minute
    assert "timer test_a_timer_that_raises_is_logged_once_and_runs_again.<locals>.sample failed" in failed[1]
    assert "Too many open files; it runs again in 0.01 s" in failed[1] and "Traceback" not in failed[1]
    assert "KeyError('a bug'); the loop goes on" in failed[0] and "Traceback" in failed[0]  # a bug shows its trace
