"""The real `djsupervisor start`, watched from outside: titles, connections, crashes, stops, parent death."""

from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest
from helpers import process_gone, wait_until, write_config
from pipelines.lab import declare

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

CONFIG = """
    [supervisor]
    name = "lab"
    graceful_timeout = 20

    [[worker]]
    name = "standard"
    target = "pipelines.supervised:standard"
    replicas = {standard}

    [[worker]]
    name = "other"
    target = "pipelines.supervised:other"
    replicas = {other}
"""


def start(supervise, tmp_path, standard=1, other=0, extra=""):
    config = write_config(tmp_path / "lab.toml", CONFIG.format(standard=standard, other=other) + extra)
    return supervise(["-c", str(config)])


def server_sessions(db) -> dict[int, int]:
    """Live sessions on the server: client port -> session (connection) id."""
    if db.backend == "postgresql":
        rows = db.connection.query("SELECT client_port, pid FROM pg_stat_activity WHERE client_port > 0").fetchall()
        return {int(port): int(pid) for port, pid in rows}
    rows = db.connection.query("SELECT HOST, ID FROM information_schema.PROCESSLIST").fetchall()
    return {int(host.rsplit(":", 1)[1]): int(id_) for host, id_ in rows if ":" in (host or "")}


def db_ports(pid: int, server_port: int) -> set[int]:
    """Local ports of the TCP connections `pid` holds to the database server."""
    return {
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == server_port and c.status == psutil.CONN_ESTABLISHED
    }


def reserved(pipe) -> list[dict]:
    return (pipe.Square.jobs & "status='reserved'").to_dicts()


def test_children_have_titles_and_their_own_connections(db, supervise, tmp_path):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed(range(1, 5), delay=4)
    sup = start(supervise, tmp_path, standard=2, other=1)
    sup.wait_children({"standard": 2, "other": 1})
    pids = sup.pids()

    # two standard children each work a job, under their own session
    jobs = wait_until(lambda: len(r := reserved(pipe)) == 2 and r, 30, message="two jobs in flight")
    assert {job["pid"] for job in jobs} == {pids["standard[0]"], pids["standard[1]"]}
    sessions = server_sessions(db)
    port = db.settings["port"]
    child_sessions = {label: {sessions[p] for p in db_ports(pid, port) if p in sessions} for label, pid in pids.items()}
    assert all(len(ids) == 1 for ids in child_sessions.values()), child_sessions
    all_ids = [i for ids in child_sessions.values() for i in ids]
    assert len(set(all_ids)) == 3  # one session each, none shared
    for job in jobs:  # DataJoint recorded each child's own, live connection id
        label = next(label for label, pid in pids.items() if pid == job["pid"])
        assert child_sessions[label] == {job["connection_id"]}
    parent_ports = db_ports(sup.pid, port)  # the parent's session (its imports connected) is unharmed
    assert parent_ports and all(p in sessions for p in parent_ports)
    assert not {sessions[p] for p in parent_ports} & set(all_ids)

    titles = wait_until(
        lambda: (t := sup.titles()) and sum("__square" in v for v in t.values()) == 2 and t,
        20,
        message="titles naming the table",
    )
    schema = db.schema_name("pipe")
    for label, title in titles.items():
        worker, slot = re.match(r"(\w+)\[(\d)\]", label).groups()
        assert re.fullmatch(rf"djsupervisor: lab {worker}\[{slot}\] (idle|sleeping|{schema}\.__\w+)", title), title
        assert db.settings["user"] + ":" not in title and "password" not in title.lower()
    assert titles["standard[0]"] == f"djsupervisor: lab standard[0] {schema}.__square"


def test_sigkilled_child_is_replaced_within_a_second_and_its_job_finished(db, supervise, tmp_path):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed([1], delay=3)
    sup = start(supervise, tmp_path, standard=1)
    old = sup.wait_children({"standard": 1})["standard[0]"]
    wait_until(lambda: [j["pid"] for j in reserved(pipe)] == [old], 30, message="the job in flight")

    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()
    new = wait_until(
        lambda: (p := sup.pids("standard").get("standard[0]")) not in (None, old) and p,
        5,
        interval=0.01,
        message="a replacement",
    )
    latency = time.monotonic() - killed
    print(f"replacement after SIGKILL: {latency:.3f} s")
    assert latency < 1.0

    # the job the dead child held went back to pending and was finished, by the replacement
    wait_until(lambda: len(pipe.Square & {"source_id": 1}) == 1, 30, message="the killed child's job to land")
    assert (pipe.Square & {"source_id": 1}).fetch1("worker_pid") == new
    progress = pipe.Square.jobs.progress()
    assert progress["reserved"] == 0 and progress["error"] == 0, progress
    assert "standard[0] died in a job (killed by SIGKILL" in sup.output  # the job's failure, replaced at once


def test_sigterm_lets_jobs_in_flight_land_and_exits_0(db, supervise, tmp_path):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed(range(1, 7), delay=3)
    sup = start(supervise, tmp_path, standard=2)
    pids = sup.wait_children({"standard": 2})
    in_flight = wait_until(lambda: len(r := reserved(pipe)) == 2 and r, 30, message="two jobs in flight")

    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(30) == 0
    assert all(process_gone(pid) for pid in pids.values())
    progress = pipe.Square.jobs.progress()
    assert progress["reserved"] == 0 and progress["error"] == 0, progress
    landed = {row["source_id"] for row in pipe.Square.to_dicts()}
    assert {job["source_id"] for job in in_flight} <= landed
    assert len(landed) + progress["pending"] == 6


def test_ctrl_c_reaches_only_the_parent(db, supervise, tmp_path):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed(range(1, 5), delay=3)
    sup = start(supervise, tmp_path, standard=2)
    sup.wait_children({"standard": 2})
    wait_until(lambda: len(reserved(pipe)) == 2, 30, message="two jobs in flight")

    os.killpg(sup.pid, signal.SIGINT)  # what a terminal does on Ctrl+C: the whole foreground group
    assert sup.wait_exit(30) == 0
    progress = pipe.Square.jobs.progress()  # no child saw SIGINT: no KeyboardInterrupt in a make()
    assert progress["reserved"] == 0 and progress["error"] == 0, progress
    assert len(pipe.Square()) >= 2


def test_quit_stops_fast(db, supervise, tmp_path):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed([1, 2], delay=60)
    sup = start(supervise, tmp_path, standard=2)
    pids = sup.wait_children({"standard": 2})
    wait_until(lambda: len(reserved(pipe)) == 2, 30, message="two jobs in flight")

    sup.signal(signal.SIGQUIT)
    began = time.monotonic()
    assert sup.wait_exit(10) == 0
    assert time.monotonic() - began < 5  # far from the 60 s jobs and the 20 s graceful timeout
    assert all(process_gone(pid) for pid in pids.values())
    assert len(pipe.Square()) == 0
    progress = pipe.Square.jobs.progress()  # a recovery child put the killed children's jobs back
    assert progress["reserved"] == 0 and progress["pending"] == 2 and progress["error"] == 0, progress


def test_start_with_modules_runs_every_worker_they_define(db, supervise, tmp_path):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed([1, 2])
    sup = supervise(["pipelines.supervised"])  # standard, other and crasher
    pids = sup.wait_children({"standard": 1, "other": 1})
    assert sup.titles()["standard[0]"].startswith("djsupervisor: supervised standard[0] ")
    wait_until(lambda: len(pipe.Square()) == 2 and len(pipe.Cube()) == 2, 30, message="both pools' work")
    wait_until(lambda: "crasher[0] exited" in sup.output and "FATAL" in sup.output, 60, message="crasher FATAL")
    assert sup.pids() == pids
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(30) == 0


def test_sigkilled_parent_leaves_no_child(db, supervise, tmp_path):
    declare(db.schema_name("pipe"))
    sup = start(supervise, tmp_path, standard=2, other=1)
    pids = sup.wait_children({"standard": 2, "other": 1})

    sup.signal(signal.SIGKILL)
    sup.wait_exit(5)
    wait_until(lambda: all(process_gone(pid) for pid in pids.values()), 5, message="children to die with the parent")
