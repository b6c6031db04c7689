"""reconnect_after_fork with a real os.fork(): separate sessions, the parent's unharmed, ids right."""

from __future__ import annotations

import gc
import json
import os

import pytest
from jobtools import wait_until
from pipelines.lab import declare

from djsupervisor.worker import connection as djs_connection
from djsupervisor.worker.connection import live_connection_ids, reconnect_after_fork

pytestmark = pytest.mark.timeout(60)


def server_side_id(connection) -> int:
    return connection.adapter.get_connection_id(connection._conn)


def run_in_child(body) -> dict:
    """Fork; the child runs body() and sends back its JSON result; the parent waits for its exit."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        status = 0
        try:
            os.close(read_end)
            result = body()
        except BaseException as error:  # report, never return into pytest in the child
            result, status = {"error": repr(error)}, 1
        with os.fdopen(write_end, "w") as out:
            json.dump(result, out)
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as incoming:
        result = json.loads(incoming.read() or "{}")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result


def test_child_gets_its_own_session_and_parent_survives(db):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed(range(1, 4))
    pipe.Square.jobs.refresh()
    connection = db.connection
    parent_id = connection.connection_id

    def child():
        reconnect_after_fork(connection)
        child_id = connection.connection_id
        reserved = pipe.Square.jobs.reserve(dict(source_id=1))
        row = (pipe.Square.jobs & dict(source_id=1)).to_dicts()[0]
        count = len(pipe.Source())
        # the worst an abandoned driver connection can do: close, which says goodbye on the socket
        for raw in djs_connection._abandoned:
            raw.close()
        djs_connection._abandoned.clear()
        gc.collect()
        return dict(
            child_id=child_id,
            server_id=server_side_id(connection),
            reserved=reserved,
            reservation_id=row["connection_id"],
            reservation_pid=row["pid"],
            pid=os.getpid(),
            count=count,
        )

    result = run_in_child(child)
    assert result["child_id"] != parent_id
    assert result["child_id"] == result["server_id"]
    assert result["reserved"] is True
    assert result["reservation_id"] == result["child_id"] and result["reservation_pid"] == result["pid"]
    assert result["count"] == 3
    # the parent's own session survived the child's reconnect, work and exit, without reconnecting
    assert connection.query("SELECT 1", reconnect=False).fetchone()[0] == 1
    assert server_side_id(connection) == parent_id == connection.connection_id
    assert parent_id in live_connection_ids(connection)
    wait_until(lambda: result["child_id"] not in live_connection_ids(connection), 10, message="child session gone")
    assert len(pipe.Source()) == 3


def test_later_reconnects_refresh_the_connection_id(db):
    connection = db.connection

    def child():
        reconnect_after_fork(connection)
        first = connection.connection_id
        connection.connect()  # what DataJoint does on its own after a lost connection
        return dict(first=first, second=connection.connection_id, server=server_side_id(connection))

    result = run_in_child(child)
    assert result["first"] != result["second"] == result["server"]
