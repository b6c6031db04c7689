"""The control socket, through the CLI: status (the supervisor's view of every slot), scale, reload, stop."""

from __future__ import annotations

import json
import os
import stat

import pytest
from helpers import run_cli as cli
from helpers import wait_until, write_config
from pipelines.lab import declare

pytest.importorskip("djsupervisor.cli")
pytest.importorskip("djsupervisor.serve.control")

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

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


@pytest.mark.parametrize("backend", ["mysql"])  # the socket does not depend on the database
def test_a_silent_control_client_is_dropped_without_any_other_connection(db, supervise, tmp_path):
    import socket
    import time

    from djsupervisor.serve.control import IDLE_TIMEOUT

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
        silent.settimeout(IDLE_TIMEOUT + 15)
        assert silent.recv(1) == b""  # closed by the supervisor's timer, not by a later client
        assert IDLE_TIMEOUT <= time.monotonic() - connected < IDLE_TIMEOUT + 10
