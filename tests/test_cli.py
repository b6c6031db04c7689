"""The `djsupervisor` command from outside: one-line errors with exit 2, check, run, version."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import djsupervisor_command, wait_until, write_config

pytestmark = pytest.mark.timeout(120)


def cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*djsupervisor_command(), *args], capture_output=True, text=True, timeout=90, env=env, cwd=cwd
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [],
            "no command given (start, status, stop, reload, restart, scale, check, run, drain, resume, forget, "
            "progress, errors, retry; --help for more)",
        ),
        (["bogus"], "invalid choice: 'bogus'"),
        (["restart", "--worker", "w", "--name", "nobody"], "no supervisor listening on"),
        (["scale", "standard", "-1", "--name", "x"], "argument N: must be a whole number >= 0, got '-1'"),
        (["start", "-c", "a.toml", "some.module"], "give either -c FILE or MODULE..., not both"),
        (["start", "--log-format", "xml", "some.module"], "invalid choice: 'xml'"),
        (["status", "--queues", "--name", "x"], "status --queues needs -c FILE"),
        (["stop", "--wait", "soon", "--name", "x"], "argument --wait: must be a number of seconds > 0, got 'soon'"),
        (["start"], "no configuration: give -c FILE or MODULE..."),
        (["start", "-c", "/nonexistent/lab.toml"], "/nonexistent/lab.toml: file not found"),
        (["scale", "standard", "many", "--name", "x"], "argument N: must be a whole number >= 0, got 'many'"),
        (["status", "--socket", "/nonexistent/lab.sock"], "no supervisor listening on /nonexistent/lab.sock"),
        (["check"], "the following arguments are required: -c/--config"),
        (["progress", "--window", "0", "x.mod"], "argument --window: must be a number of minutes > 0 and <= 1440"),
        (["progress", "--watch", "--interval", "soon", "x.mod"], "argument --interval: must be a number of seconds"),
        (["errors", "--match", " ", "x.mod"], "argument --match: must be an SQL LIKE pattern"),
        (["errors", "-c", "a.toml", "x.mod"], "give either -c FILE or MODULE..., not both"),
        (["retry", "--all"], "no configuration: give -c FILE or MODULE..."),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = cli(*args)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("djsupervisor: error: "), result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_an_error_under_journald_carries_its_priority(tmp_path):
    """With stderr connected to journald (JOURNAL_STREAM names it), the one-line error starts with ``<3>``, so
    `journalctl -p err` shows why a unit failed to start; anywhere else the line is as above."""
    stderr = tmp_path / "stderr"
    with stderr.open("w") as file:
        info = os.fstat(file.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}")
        result = subprocess.run(
            [*djsupervisor_command(), "start", "-c", "/nonexistent/lab.toml"], stderr=file, env=env, timeout=90
        )
    assert result.returncode == 2
    assert stderr.read_text() == "<3>djsupervisor: error: /nonexistent/lab.toml: file not found\n"


def test_version():
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("djsupervisor ")
    module = subprocess.run(
        [sys.executable, "-m", "djsupervisor", "--version"], capture_output=True, text=True, timeout=60
    )
    assert module.returncode == 0 and module.stdout == result.stdout


def test_check_validates_imports_and_connects(db, tmp_path):
    env = db.env
    config = write_config(
        tmp_path / "lab.toml",
        """
        [supervisor]
        name = "lab"
        [[worker]]
        name = "standard"
        target = "pipelines.supervised:standard"
        replicas = 2
        [[worker]]
        name = "other"
        target = "pipelines.supervised:other"
        max_replicas = 4
    """,
    )
    result = cli("check", "-c", str(config), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (
        "valid; 2 workers: standard×2 (pipelines.supervised:standard), other×1..4 (pipelines.supervised:other)"
        in result.stdout
    )
    assert f"database: {db.backend} at" in result.stdout and ": ok" in result.stdout

    unreachable = dict(env, DJ_PORT="1")
    result = cli("check", "-c", str(config), env=unreachable, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert str(config) in result.stderr and "Traceback" not in result.stderr


def test_run_one_worker_in_the_foreground(db, tmp_path):
    from pipelines.lab import declare

    pipe = declare(db.schema_name("pipe"))
    pipe.seed([1, 2, 3])
    env = db.env
    config = write_config(
        tmp_path / "lab.toml",
        """
        [[worker]]
        name = "standard"
        target = "pipelines.supervised:standard"
        max_idled_cycle = 1
        sleep_duration = 0
    """,
    )
    result = cli("run", "standard", "-c", str(config), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(pipe.Square()) == 3
    assert "[lab standard]" in result.stderr  # log lines name supervisor and worker

    result = cli("run", "nosuch", "-c", str(config), env=env, cwd=tmp_path)
    assert result.returncode == 2 and "nosuch" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.process
def test_status_table_name_lookup_scale_errors_and_fast_stop(db, supervise, tmp_path, monkeypatch):
    """Against a real supervisor found by --name in $DJSUPERVISOR_RUNTIME_DIR: the status table a person
    reads, --queues, a closed stdout, a refused scale as one line, then `stop --fast --wait`."""
    from pipelines.lab import declare

    pipe = declare(db.schema_name("pipe"))
    pipe.seed([1, 2, 3])
    runtime = tmp_path / "rt"
    config = write_config(
        tmp_path / "tablelab.toml",
        """
        [supervisor]
        sample_interval = 0.5
        [[worker]]
        name = "standard"
        target = "pipelines.supervised:standard"
        replicas = 2
    """,
    )
    monkeypatch.setenv("DJSUPERVISOR_RUNTIME_DIR", str(runtime))  # db.env, so the supervisor too, has it
    env = db.env
    sup = supervise(["-c", str(config)])
    pids = sup.wait_children({"standard": 2})
    wait_until((runtime / "tablelab.sock").exists, 20, message="the control socket in the runtime dir")
    wait_until(lambda: len(pipe.Square()) == 3, 30, message="the jobs")

    def table(pools: bool = False) -> list[str]:
        result = cli("status", "--name", "tablelab", env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return [line for line in result.stdout.splitlines() if pools or not line.startswith("pool ")]

    lines = wait_until(
        lambda: (t := table()) and "3 jobs done" in t[0] and " - " not in t[2] and t,
        20,
        message="a sampled status with every job counted",
    )
    assert lines[0].startswith(f"supervisor tablelab (pid {sup.pid}) running, up ") and "2 running" in lines[0]
    assert lines[1].split()[:4] == ["WORKER", "SLOT", "PID", "STATE"]
    # the fleet agent reads progress every 30 s: before or after the 3 jobs were done
    pool = wait_until(lambda: (t := table(pools=True))[1].startswith("pool ") and t[1], 60, message="a pool line")
    assert re.fullmatch(r"pool standard: [0-3] remaining, 0 in error \(1 table, read \w+ ago\)", pool), pool
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[1], int(r[2]), r[3]) for r in rows] == [
        ("standard", "0", pids["standard[0]"], "running"),
        ("standard", "1", pids["standard[1]"], "running"),
    ]
    assert sum(int(r[8]) for r in rows) == 3  # DONE column

    result = cli("status", "--queues", "-c", str(config), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    queue = result.stdout.split("\n\n")[1].splitlines()
    assert queue[0].split() == ["TABLE", "WORKER", "PENDING", "RESERVED", "SUCCESS", "ERROR", "IGNORE"]
    succeeded = len(pipe.Square.jobs & "status='success'")  # DataJoint may or may not keep success rows
    assert queue[1].split()[:5] == [pipe.Square.full_table_name, "standard", "0", "0", str(succeeded)]
    result = cli("status", "--queues", "--json", "-c", str(config), env=env, cwd=tmp_path)
    (queue,) = json.loads(result.stdout)["queues"]
    assert queue["table"] == pipe.Square.full_table_name and queue["pending"] == 0 and queue["error"] == 0

    read_end, write_end = os.pipe()
    os.close(read_end)  # `djsupervisor status | head -0`: the reader is gone before the table is written
    try:
        closed = subprocess.run(
            [*djsupervisor_command(), "status", "--name", "tablelab"],
            env=env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert closed.returncode == 0 and "Traceback" not in closed.stderr, closed.stderr

    result = cli("status", env=env, cwd=tmp_path)  # the only supervisor in the runtime dir: found without a name
    assert result.returncode == 0 and result.stdout.startswith("supervisor tablelab "), result.stderr

    result = cli("scale", "nosuch", "3", "--name", "tablelab", env=env, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == "djsupervisor: error: scale: no worker named 'nosuch'\n"

    result = cli("stop", "--fast", "--wait", "30", "--name", "tablelab", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (runtime / "tablelab.sock").exists()  # --wait returned once the supervisor was done
    assert sup.wait_exit(10) == 0
    assert "fast stop of 2 children" in sup.output
    result = cli("status", "--name", "tablelab", env=env, cwd=tmp_path)
    assert result.returncode == 2 and "no supervisor listening on" in result.stderr
