"""`status --fleet` prints database strings: a RegisteredWorker row whose fields hold ESC sequences and
newlines (any worker account can write them) reaches the terminal escaped, one table row per worker."""

from __future__ import annotations

import datetime

import pytest
from helpers import run_cli, write_config

from djsupervisor.worker import retention
from djsupervisor.worker.schema import WorkerSchema

pytestmark = pytest.mark.timeout(120)


def test_status_fleet_escapes_control_characters(db, tmp_path):
    schema = WorkerSchema(db.schema_name("workers"), db.connection)
    schema.tables["RegisteredWorker"].insert1(
        dict(
            worker_name="standard",
            host="node\x1b]0;owned\x07",
            pid=1,
            process_start=datetime.datetime(2026, 1, 1),
            settings={},
            connection_id=0,
            state="running",
            last_heartbeat=retention.server_now(db.connection),
            current_table="`lab`.`x`\x1b[31m\nforged row\r\x9b2J",
        )
    )
    config = write_config(
        tmp_path / "lab.toml",
        """
        [[worker]]
        name = "standard"
        target = "pipelines.supervised:standard"
        """,
    )
    done = run_cli(db, tmp_path, "status", "--fleet", "-c", str(config))
    assert done.returncode == 0, done.stderr
    assert not any(char in done.stdout for char in "\x1b\r\x07\x9b"), repr(done.stdout)
    lines = done.stdout.splitlines()
    assert len(lines) == 3, lines  # the schema line, the header, one row
    assert r"node\x1b]0;owned\x07" in lines[2]
    assert r"`lab`.`x`\x1b[31m\nforged row\r\x9b2J" in lines[2]
