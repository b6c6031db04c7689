"""`djsupervisor forget --host H` removes exactly that host's RegisteredWorker rows; the fleet agent prunes its
pools' worker schemas, keeping the longest retention of the pools that share one, and skips while another
pruner holds the schema's lock."""

from __future__ import annotations

import dataclasses
import datetime

import datajoint as dj
import pytest
from helpers import run_cli, write_config

from djsupervisor import DataJointWorker
from djsupervisor.fleet.agent import FleetAgent
from djsupervisor.worker import retention
from djsupervisor.worker.events import CycleSummary, ProcessCounts
from djsupervisor.worker.schema import WorkerSchema

pytestmark = pytest.mark.timeout(120)

DAY = datetime.timedelta(days=1)


def register(schema: WorkerSchema, host: str, pid: int, heartbeat: datetime.datetime, state: str = "running") -> None:
    schema.tables["RegisteredWorker"].insert1(
        dict(
            worker_name="standard",
            host=host,
            pid=pid,
            process_start=datetime.datetime(2026, 1, 1),
            settings={},
            connection_id=0,
            state=state,
            last_heartbeat=heartbeat,
        )
    )


def hosts(schema: WorkerSchema) -> list[tuple[str, int]]:
    return sorted((r["host"], r["pid"]) for r in schema.tables["RegisteredWorker"]().to_dicts())


def test_forget_removes_exactly_that_hosts_rows(db, tmp_path):
    schema = WorkerSchema(db.schema_name("workers"), db.connection)
    now = retention.server_now(db.connection)
    for pid in (1, 2, 3):
        register(schema, "node-a", pid, now, "exited" if pid == 3 else "running")
    register(schema, "node-b", 1, now)
    register(schema, "node-ab", 1, now)  # a name that contains the other: not a pattern match

    done = run_cli(db, tmp_path, "forget", "--host", "node-a", "--schema", schema.schema_name)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"forgot 3 worker processes of host node-a in schema {schema.schema_name}"
    assert hosts(schema) == [("node-ab", 1), ("node-b", 1)]

    config = write_config(
        tmp_path / "lab.toml",
        """
        [[worker]]
        name = "standard"
        target = "pipelines.supervised:standard"
        """,
    )
    done = run_cli(db, tmp_path, "forget", "--host", "node-b", "-c", str(config))  # the config's worker schema
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"forgot 1 worker process of host node-b in schema {schema.schema_name}"
    assert hosts(schema) == [("node-ab", 1)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["forget", "--schema", "x"], "forget: the following arguments are required: --host"),
        (["forget", "--host", "*", "--schema", "x"], "forget: --host must name one host, got '*'"),
        (["forget", "--host", "node-a"], "give -c FILE (its workers' schemas) or --schema NAME"),
    ],
)
def test_forget_refuses_bad_input_in_one_line(db, tmp_path, args, message):
    done = run_cli(db, tmp_path, *args)
    assert done.returncode == 2
    assert done.stderr.strip() == f"djsupervisor: error: {message}"


@dataclasses.dataclass(frozen=True)
class Pool:
    """What the fleet agent reads of a worker definition: its name and the worker it builds."""

    name: str
    worker: DataJointWorker

    def build_worker(self) -> DataJointWorker:
        return self.worker


def test_the_fleet_agent_prunes_with_the_longest_retention_and_skips_a_held_lock(db):
    name = db.schema_name("workers")
    pools = [
        Pool("short", DataJointWorker("short", name, log_retention_days=10)),
        Pool("long", DataJointWorker("long", name, log_retention_days=40)),
    ]
    agent = FleetAgent(supervisor="sup", host="node-a", worker_configs=pools, fleet_interval=5)  # type: ignore[arg-type]
    schema = agent.schema("short")
    now = retention.server_now(db.connection)
    me = dict(worker_name="short", host="node-a", pid=1, process_start=now)
    for days in (1, 20, 39, 41, 60):
        summary = CycleSummary(cycle=1, started=(now - days * DAY).timestamp())
        summary.processes["lab.step"] = ProcessCounts("callable", done=1)
        schema.log_cycle(me, summary, {})
    register(schema, "node-z", 9, now - 50 * DAY, "exited")

    settings = db.settings
    other = dj.Connection(
        settings["host"], settings["user"], settings["password"], settings["port"], False, backend=db.backend
    )
    try:
        lock = retention.lock_name(name)
        assert retention.try_lock(other, lock)  # another supervisor's agent is pruning this schema
        agent.apply_retention()
        assert len(schema.tables["WorkerLog"]()) == 5 and len(schema.tables["RegisteredWorker"]()) == 1
        retention.release_lock(other, lock)
    finally:
        other.close()
    agent.apply_retention()
    kept = sorted(round((now - t) / DAY) for t in schema.tables["WorkerLog"]().to_arrays("log_time"))
    assert kept == [1, 20, 39]  # 40 days kept: the longer retention of the two pools on this schema
    assert len(schema.tables["RegisteredWorker"]()) == 0
