"""Issue 19, the first hour, under a real supervisor: what `status`, `reload`, `scale` and a second `start`
say, dead control sockets, `status --queues` without a supervisor, and the one rule for a runtime size."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
from helpers import djsupervisor_command, write_config
from pipelines.lab import declare

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]


def cli(db, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*djsupervisor_command(), *args], capture_output=True, text=True, timeout=120, env=db.env, cwd=cwd
    )


def config_text(replicas: int) -> str:
    return (
        '[supervisor]\nname = "lab"\ngraceful_timeout = 20\n'
        f'[[worker]]\nname = "standard"\ntarget = "pipelines.supervised:standard"\nreplicas = {replicas}\n'
    )


def dead_socket(path: Path) -> None:
    """A socket file nobody answers on: what a SIGKILLed supervisor leaves behind."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))


def test_status_skips_dead_sockets_and_removes_its_own(db, tmp_path, private_runtime_dir):
    dead_socket(private_runtime_dir / "barops.sock")
    dead_socket(private_runtime_dir / "barpoison.sock")
    result = cli(db, tmp_path, "status")
    assert result.returncode == 2
    assert result.stderr == "djsupervisor: error: no supervisor found: give -c FILE, --name NAME or --socket PATH\n"
    assert not list(private_runtime_dir.glob("*.sock"))  # ours, and nobody answered: removed


def test_queues_from_the_config_alone_when_no_supervisor_runs(db, tmp_path):
    declare(db.schema_name("pipe"))
    config = write_config(tmp_path / "lab.toml", config_text(1))
    result = cli(db, tmp_path, "status", "-c", str(config), "--queues", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["supervisor"] is None
    square = [q for q in answer["queues"] if "square" in q["table"]]
    assert square and square[0]["worker"] == "standard", answer["queues"]  # counts: DataJoint's job table
    text = cli(db, tmp_path, "status", "-c", str(config), "--queues")
    assert text.returncode == 0 and f"no supervisor runs for {config}" in text.stdout, text


def test_reload_and_scale_say_what_changed_and_a_runtime_size_outlives_a_reload(
    db, supervise, tmp_path, private_runtime_dir
):
    declare(db.schema_name("pipe"))
    config = write_config(tmp_path / "lab.toml", config_text(3))
    sup = supervise(["-c", str(config)])
    sup.wait_children({"standard": 3})
    dead_socket(private_runtime_dir / "barpoison.sock")  # a dead one beside it

    scaled = cli(db, tmp_path, "scale", "standard", "1")  # found without -c: the one that answers
    assert scaled.returncode == 0 and scaled.stdout == "standard: 3 -> 1 children\n", scaled
    sup.wait_children({"standard": 1})

    reloaded = cli(db, tmp_path, "reload", "-c", str(config))  # the file still says 3
    assert reloaded.returncode == 0, reloaded
    assert "reloaded: worker standard stays at 1 (set by scale; the file's replicas, 3, did not change)" in (
        reloaded.stdout
    )
    assert "to deploy changed worker code, run `djsupervisor restart`" in reloaded.stdout
    sup.wait_children({"standard": 1})

    write_config(config, config_text(2))  # the file changed replicas: it wins
    reloaded = cli(db, tmp_path, "reload", "-c", str(config))
    assert "reloaded: worker standard resized from 1 to 2 (the file's replicas)" in reloaded.stdout, reloaded
    sup.wait_children({"standard": 2})
    unchanged = cli(db, tmp_path, "reload", "-c", str(config))
    assert unchanged.stdout.startswith("reloaded: no pool changed\n"), unchanged

    second = subprocess.run(
        [*djsupervisor_command(), "start", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=db.env,
        cwd=tmp_path,
    )
    assert second.returncode == 2
    assert f"another supervisor is listening on {private_runtime_dir / 'lab.sock'} (pid {sup.pid})" in second.stderr
    assert f"stop it with `djsupervisor stop -c {config}`" in second.stderr
    assert cli(db, tmp_path, "stop", "-c", str(config), "--wait", "60").returncode == 0
    assert sup.wait_exit(30) == 0
