"""The database goes away mid-run: the worker backs off instead of spinning, reconnects, finishes the work."""

from __future__ import annotations

import threading
import time

import datajoint as dj
import pytest
from jobtools import wait_until
from loguru import logger
from pipelines.lab import declare
from tcpproxy import TcpProxy

from djsupervisor import DataJointWorker

pytestmark = pytest.mark.timeout(120)


def test_worker_survives_a_database_outage(db):
    proxy = TcpProxy(db.settings["host"], db.settings["port"])
    connection = dj.Connection(
        f"127.0.0.1:{proxy.port}", db.settings["user"], db.settings["password"], use_tls=False, backend=db.backend
    )
    pipe = declare(db.schema_name("pipe"), connection=connection)
    pipe.seed(range(1, 21), delay=0.1)
    worker = DataJointWorker(
        "outage", db.schema_name("workers"), db_prefix=db.prefix, sleep_duration=0, connection=connection
    )
    worker(pipe.Square)
    worker(pipe.Cube)
    cycles_at = {}
    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")

    direct = db.connection  # the saboteur watches through its own session, never the worker's
    q = direct.adapter.quote_identifier
    schema = q(db.schema_name("pipe"))

    def count(table: str) -> int:
        return direct.query(f"SELECT COUNT(*) FROM {schema}.{q(table)}").fetchone()[0]

    def saboteur():
        wait_until(lambda: count("__square") >= 3, 30, message="work to begin")
        proxy.cut()
        cycles_at["cut"] = worker.cycles
        time.sleep(6)  # the outage
        cycles_at["restore"] = worker.cycles
        proxy.restore()
        wait_until(lambda: count("__cube") == 20, 60, message="work to finish after the outage")
        worker.stop("done")

    thread = threading.Thread(target=saboteur, daemon=True)
    thread.start()
    try:
        worker.run()
    finally:
        logger.remove(sink)
        proxy.close()
    thread.join(5)
    assert count("__square") == 20 and count("__cube") == 20
    assert count("~~square") == 0 and count("~~cube") == 0  # nothing left reserved or in error
    # backed off during the 6 s outage (1 s, 2 s, 4 s...), not thousands of cycles
    assert cycles_at["restore"] - cycles_at["cut"] <= 5, cycles_at
    assert any("database unreachable" in line for line in lines)
