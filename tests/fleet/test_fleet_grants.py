"""Drain/halt flags under least privilege (issue 18): any worker account could halt every fleet for good,
`set_by` was whatever the client claimed, and on PostgreSQL a flag whose selector held a backslash could
be set but never cleared (`resume` said cleared; the flag stayed).

A supervisor runs with an account that has exactly the worker grants README's Security section gives; that
account cannot set a flag (one line, exit 2), an operator account with the documented grants can, and the
flag names the operator as the database knows it, whatever the client's user name."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli, wait_until, write_config
from pipelines.lab import declare

from djsupervisor.fleet.registry import read_flags
from djsupervisor.worker.schema import WorkerSchema


def current_user(db) -> str:
    """The test connection's account as the database names it."""
    query = "SELECT CURRENT_USER()" if db.backend == "mysql" else "SELECT current_user"
    return db.connection.query(query).fetchone()[0]


@pytest.mark.timeout(120)
def test_a_flag_with_a_backslash_is_changed_and_cleared_and_names_the_database_account(db, tmp_path):
    schema = db.schema_name("workers")
    forged = dict(db.env, USER="mallory", LOGNAME="mallory")  # what the client claims to be
    for mode in ("drain", "halt"):  # the second changes the first's mode
        args = ["drain", "--host", "node\\01", "--worker", "it's_100%", "--schema", schema]
        done = run_cli(db, tmp_path, *args, *(["--halt"] if mode == "halt" else []), env=forged)
        assert done.returncode == 0, done.stderr
    [flag] = read_flags(WorkerSchema(schema, db.connection))
    assert (flag.selector.host, flag.selector.worker_name, flag.mode) == ("node\\01", "it's_100%", "halt")
    assert flag.set_by == current_user(db) and "mallory" not in flag.set_by
    report = json.loads(run_cli(db, tmp_path, "status", "--fleet", "--json", "--schema", schema).stdout)
    assert [f["set_by"] for f in report[0]["flags"]] == [current_user(db)]

    done = run_cli(db, tmp_path, "resume", "--host", "node\\01", "--schema", schema)
    assert done.returncode == 0, done.stderr
    assert "cleared halt: host=node\\01" in done.stdout and "still set" not in done.stdout
    assert read_flags(WorkerSchema(schema, db.connection)) == []


@pytest.mark.process
@pytest.mark.timeout(240)
def test_a_worker_account_runs_but_cannot_set_flags_an_operator_can(db, accounts, supervise, tmp_path):
    # Declared by an account that may (here the test's superuser), then granted as README says.
    pipe = declare(db.schema_name("pipe"))
    workers_schema = WorkerSchema(db.schema_name("workers"), db.connection)
    assert "FleetFlag" in workers_schema.tables  # declared
    worker, operator = accounts("worker"), accounts("operator")
    config = write_config(
        tmp_path / "lab.toml",
        """
        [supervisor]
        name = "least"
        fleet_interval = 0.5

        [[worker]]
        name = "standard"
        target = "pipelines.supervised:standard"
        sleep_duration = 0.3
        """,
    )
    sup = supervise(["-c", str(config)], env=worker.env)
    sup.wait_children({"standard": 1})
    pipe.seed(range(5))
    wait_until(lambda: len(pipe.Square()) == 5, 60, message="the worker account computes every key")
    registered = workers_schema.tables["RegisteredWorker"] & {"supervisor": "least"}
    wait_until(lambda: len(registered & "jobs_done = 5") == 1, 30, message="its heartbeats in the registry")

    # The worker account: one line, exit 2, no flag.
    schema = ["--schema", db.schema_name("workers")]

    def refused(*command: str) -> None:
        done = run_cli(db, tmp_path, *command, *schema, env=worker.env)
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert len(done.stderr.splitlines()) == 1, done.stderr
        assert "permission denied" in done.stderr and "README, Security" in done.stderr

    refused("drain", "--all", "--halt")
    assert read_flags(workers_schema) == []

    # The operator account: sets the flag, named as the database knows it; the worker's pool drains.
    done = run_cli(db, tmp_path, "drain", "--worker", "standard", *schema, env=operator.env)
    assert done.returncode == 0, done.stderr
    [flag] = read_flags(workers_schema)
    assert flag.set_by == operator.current_user
    wait_until(lambda: not sup.pids(), 30, message="the drained pool's child gone")
    assert sup.process.poll() is None

    # Only the operator clears it.
    refused("resume", "--all")
    assert read_flags(workers_schema) == [flag]
    done = run_cli(db, tmp_path, "resume", "--worker", "standard", *schema, env=operator.env)
    assert done.returncode == 0 and "cleared drain" in done.stdout, done.stderr
    sup.wait_children({"standard": 1}, timeout=30)
    assert "denied" not in sup.output and "lineage" not in sup.output, sup.output
