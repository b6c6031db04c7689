"""A worker schema created by datajoint-utilities: refused by a worker in one line, converted by
`djsupervisor migrate-schema NAME` with its rows kept, on both backends.

The upstream tables are declared here from datajoint-utilities' own definitions
(datajoint_utilities/dj_worker/worker_schema.py: RegisteredWorker with its Process part, WorkerLog as
``~worker_log``, ErrorLog as ``~error_log``), table names and columns unchanged. DataJoint 2.3 does not
declare some of their types on both backends, so those are written as DataJoint 2's equivalents, which store the same:
``longblob``/``mediumblob`` as ``<blob>`` (DataJoint-serialized, as 0.14 wrote them), ``UUID`` as ``uuid``,
``int`` as ``int32`` and ``int unsigned`` as ``int64``. DataJoint 2.3 also names a table after its class
only (upstream's ``_table_name = "~worker_log"`` is not honoured), so the two log tables are declared under
other names and renamed in SQL; and it inserts a ``uuid`` as bytes, which PostgreSQL's ``uuid`` column
refuses, so there the two uuid columns are ``char(36)`` (MySQL's ``binary(16)`` is upstream's own). The rows
are written the way upstream's worker writes them (UTC timestamps, the key as JSON text, blobs serialized).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import uuid

import datajoint as dj
import pytest
from helpers import agent_child, run_cli, wait_until, write_config
from loguru import logger
from pipelines.lab import declare

from djsupervisor import DataJointWorker
from djsupervisor.fleet.agent import FleetAgent
from djsupervisor.supervisor.config import WorkerConfig
from djsupervisor.worker.migrate import BACKUP_PREFIX, MIGRATED_HOST
from djsupervisor.worker.upstream_schema import UpstreamWorkerSchema

pytestmark = pytest.mark.timeout(120)

UTC_REGISTERED = datetime.datetime(2024, 5, 1, 12, 30, 15, 123456)
UTC_LOGGED = datetime.datetime(2024, 5, 2, 8, 0, 0, 500000)


def local(utc: datetime.datetime) -> datetime.datetime:
    value = utc.replace(tzinfo=datetime.UTC).astimezone().replace(tzinfo=None)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def declare_upstream(schema_name: str, connection: dj.Connection) -> dict:
    """datajoint-utilities' worker tables in `schema_name`, with a few rows as its worker writes them."""
    schema = dj.Schema(schema_name, connection=connection)
    uuid_type = "char(36)" if connection.adapter.backend == "postgresql" else "uuid"

    @schema
    class RegisteredWorker(dj.Manual):
        definition = f"""
        worker_name: varchar(64)
        ---
        registration_time: datetime(6) # registration datetime (UTC)
        worker_kwargs: <blob>  # keyword arguments to instantiate a DataJointWorker class
        worker_config_uuid: {uuid_type}
        unique index (worker_name, worker_config_uuid)
        """

        class Process(dj.Part):
            definition = f"""
            -> master
            process_index: int32  # running order for this process from this worker
            ---
            process: varchar(64)
            full_table_name='': varchar(255)  # full table name if this process is a DJ table
            key_source_sql=null  :<blob>  # sql statement for the key_source of the table - from make_sql()
            process_kwargs: <blob>  # keyword arguments to pass when calling the process
            process_config_uuid: {uuid_type} # hash of all attributes defining this process
            """

    @schema
    class UpstreamWorkerLog(dj.Manual):  # renamed ~worker_log below
        definition = """
        # Registration of processing jobs running .populate() jobs or custom function
        process_timestamp : datetime(6)   # timestamp of the processing job (UTC)
        process           : varchar(64)
        ---
        worker_name=''    : varchar(255)  # name of the worker
        host              : varchar(255)  # system hostname
        user=''           : varchar(255)  # database user
        pid=0             : int64         # system process id
        """

    @schema
    class UpstreamErrorLog(dj.Manual):  # renamed ~error_log below
        definition = """
        # Logging of job errors
        process           : varchar(64)
        key_hash          : char(32)      # key hash
        ---
        error_timestamp   : datetime(6)   # timestamp of the processing job (UTC)
        key               : varchar(2047) # structure containing the key
        error_message=""  : varchar(2047) # error message returned if failed
        error_stack=null  : <blob>        # error stack if failed
        host              : varchar(255)  # system hostname
        user=''           : varchar(255)  # database user
        pid=0             : int64         # system process id
        """

    config_uuid = uuid.uuid4()
    kwargs = {"worker_name": "standard_worker", "run_duration": -1, "sleep_duration": 30, "db_prefix": ["lab_"]}
    RegisteredWorker.insert1(
        dict(
            worker_name="standard_worker",
            registration_time=UTC_REGISTERED,
            worker_kwargs=kwargs,
            worker_config_uuid=str(config_uuid) if uuid_type != "uuid" else config_uuid,
        )
    )
    RegisteredWorker.Process.insert(
        dict(
            worker_name="standard_worker",
            process_index=i,
            process=process,
            full_table_name=table,
            key_source_sql=sql,
            process_kwargs=process_kwargs,
            process_config_uuid=str(uuid.uuid4()),
        )
        for i, (process, table, sql, process_kwargs) in enumerate(
            [
                ("ephys.EphysRecording", "`lab_ephys`.`_ephys_recording`", "SELECT 1", {"max_calls": 10}),
                ("auto_generate_entries", "", None, {}),
            ]
        )
    )
    UpstreamWorkerLog.insert(
        dict(process_timestamp=UTC_LOGGED + datetime.timedelta(seconds=i), process=p, worker_name="standard_worker",
             host="node-a", user="lab", pid=4242)
        for i, p in enumerate(["ephys.EphysRecording", "auto_generate_entries", "ephys.EphysRecording"])
    )  # fmt: skip
    UpstreamErrorLog.insert(
        [
            dict(process="auto_generate_entries", key_hash="a" * 32, error_timestamp=UTC_LOGGED,
                 key=json.dumps({"subject": "mouse1", "session": 3}), error_message="FileNotFoundError: x.nwb",
                 error_stack="Traceback (most recent call last): ...", host="node-a", user="lab", pid=4242),
            dict(process="ephys.EphysRecording", key_hash="b" * 32, error_timestamp=UTC_LOGGED,
                 key=json.dumps({"subject": "mouse2"}), error_message="MaxRetryError: s3", error_stack=None,
                 host="node-b", user="", pid=7),
        ]
    )  # fmt: skip
    quote = connection.adapter.quote_identifier
    for table, upstream_name in ((UpstreamWorkerLog, "~worker_log"), (UpstreamErrorLog, "~error_log")):
        if connection.adapter.backend == "postgresql":
            connection.query(f"ALTER TABLE {table.full_table_name} RENAME TO {quote(upstream_name)}")
        else:
            connection.query(f"RENAME TABLE {table.full_table_name} TO {quote(schema_name)}.{quote(upstream_name)}")
    return dict(schema=schema, config_uuid=config_uuid, kwargs=kwargs)


def test_a_worker_refuses_an_upstream_schema_in_one_line(db):
    name = db.schema_name("workerlog")
    declare_upstream(name, db.connection)
    lab = declare(db.schema_name("pipe"))
    lab.seed([1])
    worker = DataJointWorker("standard", name, run_duration=60, sleep_duration=0)
    worker(lab.Square)
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    try:
        with pytest.raises(UpstreamWorkerSchema) as caught:
            worker.run()  # would run for a minute; stops at the first cycle instead
    finally:
        logger.remove(sink)
    expected = (
        f"worker schema {name!r} holds datajoint-utilities' worker tables (registered_worker, "
        "registered_worker__process, ~worker_log, ~error_log): give the worker a new worker_schema_name, or "
        f"convert them, rows kept, with `djsupervisor migrate-schema {name}`"
    )
    assert str(caught.value) == expected
    assert len(lines) == 1 and lines[0].rstrip().endswith(f"worker standard cannot run: {expected}"), lines
    assert "registered_worker" in dj.Schema(name, connection=db.connection, create_schema=False).list_tables()


def test_migrate_schema_converts_the_tables_keeping_their_rows(db, tmp_path):
    name = db.schema_name("workerlog")
    upstream = declare_upstream(name, db.connection)
    result = run_cli(db, tmp_path, "migrate-schema", name)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"{name}: migrated 1 RegisteredWorker, 3 WorkerLog and 2 ErrorLog rows; datajoint-utilities' tables kept "
        f"as {BACKUP_PREFIX}* (drop them when you no longer need them)\n"
    )

    # the schema is djsupervisor's now; a retention longer than the rows' age keeps the migrated rows
    worker = DataJointWorker("standard", name, run_duration=0.001, log_retention_days=36500)
    tables = worker.schema.tables
    [registered] = tables["RegisteredWorker"].to_dicts()
    assert {k: registered[k] for k in ("worker_name", "host", "pid", "state", "process_start")} == {
        "worker_name": "standard_worker",
        "host": MIGRATED_HOST,
        "pid": 0,
        "state": "exited",
        "process_start": local(UTC_REGISTERED),
    }
    settings = registered["settings"]
    assert {k: settings[k] for k in upstream["kwargs"]} == upstream["kwargs"]
    assert settings["worker_config_uuid"] == str(upstream["config_uuid"])
    assert [(p["process_index"], p["process"], p["key_source_sql"], p["kwargs"]) for p in settings["processes"]] == [
        (0, "ephys.EphysRecording", "SELECT 1", {"max_calls": 10}),
        (1, "auto_generate_entries", None, {}),
    ]
    logs = tables["WorkerLog"].to_dicts(order_by="log_time")
    assert [(r["process"], r["worker_name"], r["host"], r["pid"], r["log_time"]) for r in logs] == [
        (p, "standard_worker", "node-a", 4242, local(UTC_LOGGED + datetime.timedelta(seconds=i)))
        for i, p in enumerate(["ephys.EphysRecording", "auto_generate_entries", "ephys.EphysRecording"])
    ]
    errors = {r["process"]: r for r in tables["ErrorLog"].to_dicts()}
    callable_error, table_error = errors["auto_generate_entries"], errors["ephys.EphysRecording"]
    assert callable_error["kind"] == "callable" and table_error["kind"] == "cleared"
    assert callable_error["key"] == {"subject": "mouse1", "session": 3}
    assert callable_error["error_stack"] == "Traceback (most recent call last): ..."
    assert callable_error["error_message"] == "FileNotFoundError: x.nwb" and callable_error["host"] == "node-a"
    assert table_error["error_stack"] is None and table_error["error_time"] == local(UTC_LOGGED)

    remaining = set(dj.Schema(name, connection=db.connection, create_schema=False).list_tables())
    assert not remaining & {"registered_worker__process", "~worker_log", "~error_log"}
    old_rows = {"registered_worker": 1, "registered_worker__process": 2, "~worker_log": 3, "~error_log": 2}
    for table, rows in old_rows.items():  # the old rows, as they were, in the copies
        backup = BACKUP_PREFIX + table
        full = db.connection.adapter.quote_identifier(name) + "." + db.connection.adapter.quote_identifier(backup)
        assert db.connection.query(f"SELECT COUNT(*) FROM {full}").fetchone()[0] == rows

    worker.run()  # registers and logs in the converted schema: no refusal, no warning
    assert len(tables["RegisteredWorker"]()) == 2

    again = run_cli(db, tmp_path, "migrate-schema", name)
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr == (
        f"djsupervisor: error: migrate-schema: schema {name!r} holds no datajoint-utilities worker tables: "
        "nothing to migrate\n"
    )


def test_migrate_schema_drop_old_leaves_no_copies(db, tmp_path):
    name = db.schema_name("workerlog")
    declare_upstream(name, db.connection)
    result = run_cli(db, tmp_path, "migrate-schema", name, "--drop-old")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("datajoint-utilities' tables dropped\n")
    names = dj.Schema(name, connection=db.connection, create_schema=False).list_tables()
    assert not [table for table in names if table.startswith(BACKUP_PREFIX)]


@pytest.mark.parametrize(
    "args, problem",
    [
        (["nosuchschema_zz"], "migrate-schema: schema 'nosuchschema_zz' does not exist"),
        (["a;b"], "migrate-schema: NAME must be a schema name of letters, digits, '_', '-' or '$', got 'a;b'"),
        ([], "migrate-schema: the following arguments are required: NAME"),
    ],
)
def test_migrate_schema_bad_input_is_one_line_and_exit_2(db, tmp_path, args, problem):
    result = run_cli(db, tmp_path, "migrate-schema", *args)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"djsupervisor: error: {problem}\n")


def test_migrate_schema_of_a_schema_without_upstream_tables_changes_nothing(db, tmp_path):
    name = db.schema_name("pipe")
    declare(name)
    result = run_cli(db, tmp_path, "migrate-schema", name)
    assert result.returncode == 2 and "holds no datajoint-utilities worker tables: nothing to migrate" in result.stderr


@pytest.mark.process
def test_a_supervised_worker_on_an_upstream_schema_says_it_once_per_child_and_goes_fatal(db, supervise, tmp_path):
    name = db.schema_name("workers")  # the worker schema of pipelines.workers' standard worker
    declare_upstream(name, db.connection)
    config = write_config(
        tmp_path / "lab.toml",
        """
        [supervisor]
        fatal_after = 3
        backoff_initial = 0.05
        backoff_max = 0.1
        fleet_interval = 0.2

        [[worker]]
        name = "standard"
        target = "pipelines.supervised:standard"
        """,
    )
    sup = supervise(["-c", str(config)])
    wait_until(lambda: "FATAL" in sup.output, 60, message="standard[0] FATAL")
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(30) == 0
    lines = sup.output.splitlines()
    said = [line for line in lines if "holds datajoint-utilities' worker tables" in line]
    children = [line for line in said if "worker standard cannot run:" in line]
    assert len(children) == 3, said  # one line per child, fatal_after children
    assert len([line for line in said if "fleet agent:" in line]) <= 1, said
    assert len(said) == len(children) + len([line for line in said if "fleet agent:" in line])
    assert not [line for line in lines if "Traceback" in line or "registering the worker failed" in line]


def test_the_fleet_agent_says_it_once_whatever_it_tries(db, tmp_path, monkeypatch):
    name = db.schema_name("workers")
    declare_upstream(name, db.connection)
    module = f"upstream_workers_{db.prefix}"
    (tmp_path / f"{module}.py").write_text(
        f"from djsupervisor import DataJointWorker\nw = DataJointWorker('w', {name!r})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    agent = FleetAgent(supervisor="lab", host="", worker_configs=[WorkerConfig("w", f"{module}:w")], fleet_interval=1)
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    try:
        for _ in range(5):  # five fleet intervals' work: prune, stamp a child, read flags and depths
            agent._last_prune = None  # due again
            agent.maybe_prune()
            agent.heartbeat([agent_child(worker="w", pid=os.getpid())], [])
            agent.read()
    finally:
        logger.remove(sink)
    assert len(lines) == 1 and f"fleet agent: worker schema {name!r} holds datajoint-utilities'" in lines[0], lines
