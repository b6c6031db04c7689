"""Fault injection on real processes: kill storms, a killed pool grandchild, a database outage under the
supervisor, a SIGKILLed parent, two supervisors on one config. The end state is checked in the database:
every key computed exactly once, nothing left reserved or in error, the supervisor up and stopping cleanly.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time

import psutil
import pytest
from helpers import djsupervisor_command, wait_until, write_config
from pipelines.lab import Lab, declare
from tcpproxy import TcpProxy

pytestmark = pytest.mark.process

KEYS = 40


def chain_state(db) -> dict:
    """Rows and job states of the fault pipeline, read through the test's own session."""
    connection = db.connection
    q = connection.adapter.quote_identifier
    schema = q(db.schema_name("pipe"))
    state = {}
    for table in ("__square", "__cube", "__cube__digit"):
        state[table] = connection.query(f"SELECT COUNT(*) FROM {schema}.{q(table)}").fetchone()[0]
    for table in ("~~square", "~~cube"):
        for status, count in connection.query(
            f"SELECT {q('status')}, COUNT(*) FROM {schema}.{q(table)} GROUP BY {q('status')}"
        ).fetchall():
            state[f"{table}.{status}"] = count
    return state


def seed_chain(db, delay: float = 0.2) -> Lab:
    """The pipeline the `chain` and `pooled` workers work, with KEYS keys whose make()s take `delay` s each."""
    connection = db.connection
    q = connection.adapter.quote_identifier
    lab = declare(db.schema_name("pipe"))
    lab.seed(range(1, KEYS + 1), delay=delay)
    assert connection.query(f"SELECT COUNT(*) FROM {q(db.schema_name('pipe'))}.{q('source')}").fetchone()[0] == KEYS
    return lab


def config_for(tmp_path, worker: str, replicas: int, extra: str = "", supervisor: str = "") -> str:
    return str(
        write_config(
            tmp_path / "faults.toml",
            f"""
        [supervisor]
        name = "faults"
        control_socket = "{tmp_path / "faults.sock"}"
        backoff_initial = 0.05
        backoff_max = 0.5
        {supervisor}
        [[worker]]
        name = "{worker}"
        target = "pipelines.workers:{worker}"
        replicas = {replicas}
        {extra}
    """,
        )
    )


def assert_complete(db) -> None:
    state = chain_state(db)
    assert state["__square"] == KEYS and state["__cube"] == KEYS, state
    assert state["__cube__digit"] == 3 * KEYS, state  # no master without all its parts, no orphan part
    leftovers = {k: v for k, v in state.items() if k.startswith("~~")}
    assert not leftovers, state  # no job reserved, pending or in error


@pytest.mark.timeout(300)
def test_kill_storm(db, supervise, tmp_path):
    seed_chain(db, delay=0.5)
    sup = supervise(["-c", config_for(tmp_path, "chain", 3)])
    sup.wait_children({"chain": 3})
    rng = random.Random(7)
    kills, began = 0, time.monotonic()
    while time.monotonic() - began < 15:
        pids = list(sup.pids("chain").values())
        if pids:
            try:
                psutil.Process(rng.choice(pids)).kill()
                kills += 1
            except psutil.NoSuchProcess:
                pass
        time.sleep(1.0)
    wait_until(lambda: chain_state(db)["__cube"] == KEYS, 120, message="the pipeline to finish after the storm")
    wait_until(lambda: not any(k.startswith("~~") for k in chain_state(db)), 30, message="empty job tables")
    assert kills >= 10, kills
    assert_complete(db)
    assert sup.process.poll() is None  # the supervisor rode it out
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(60) == 0
    print(f"kill storm: {kills} SIGKILLs survived, {2 * KEYS} jobs checked")


@pytest.mark.timeout(300)
def test_killed_pool_grandchild(db, supervise, tmp_path):
    seed_chain(db, delay=0.3)
    sup = supervise(["-c", config_for(tmp_path, "pooled", 1, supervisor="hang_timeout = 5")])
    (child,) = sup.wait_children({"pooled": 1}).values()
    grandchildren = wait_until(lambda: psutil.Process(child).children(), 60, message="the populate pool")
    wait_until(lambda: chain_state(db)["__square"] >= 2, 60, message="pool work")
    grandchildren[0].kill()
    wait_until(lambda: chain_state(db)["__cube"] == KEYS, 240, message="the pipeline to finish")
    wait_until(lambda: not any(k.startswith("~~") for k in chain_state(db)), 60, message="empty job tables")
    assert_complete(db)
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(60) == 0


@pytest.fixture
def proxy(db, monkeypatch):
    """A TCP proxy in front of the test's database server, which the supervisors started by the test use."""
    proxy = TcpProxy(db.settings["host"], db.settings["port"])
    monkeypatch.setenv("DJ_PORT", str(proxy.port))
    direct_env = type(db).env.fget
    monkeypatch.setattr(type(db), "env", property(lambda self: {**direct_env(self), "DJ_PORT": str(proxy.port)}))
    yield proxy
    proxy.close()


@pytest.mark.timeout(300)
def test_database_outage_under_the_supervisor(db, supervise, tmp_path, proxy):
    seed_chain(db, delay=0.1)
    sup = supervise(["-c", config_for(tmp_path, "chain", 2)])
    pids_before = sup.wait_children({"chain": 2})
    wait_until(lambda: chain_state(db)["__square"] >= 3, 60, message="work to begin")
    proxy.cut()
    cut_at = time.monotonic()
    time.sleep(20)  # the outage
    restarts_during = sum(1 for pid in pids_before.values() if not psutil.pid_exists(pid))
    proxy.restore()
    wait_until(lambda: chain_state(db)["__cube"] == KEYS, 180, message="work to finish after the outage")
    wait_until(lambda: not any(k.startswith("~~") for k in chain_state(db)), 60, message="empty job tables")
    recovered_in = time.monotonic() - cut_at - 20
    assert_complete(db)
    assert "FATAL" not in sup.output.upper().replace("FATAL_AFTER", "")
    assert restarts_during <= 2  # neither crash-looping nor spinning: the children waited it out
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(60) == 0
    print(f"outage: 20 s cut, pipeline finished {recovered_in:.1f} s after the restore")


@pytest.mark.timeout(300)
def test_a_child_replaced_during_an_outage_waits_for_the_database(db, supervise, tmp_path, proxy):
    seed_chain(db, delay=0.05)
    # backoff_initial 0.05 and fatal_after 3: a child that exited at once would be FATAL within a second
    sup = supervise(["-c", config_for(tmp_path, "chain", 1, supervisor="fatal_after = 3")])
    (first,) = sup.wait_children({"chain": 1}).values()
    wait_until(lambda: chain_state(db)["__square"] >= 2, 60, message="work to begin")
    proxy.cut()
    psutil.Process(first).kill()
    replacement = wait_until(
        lambda: (p := sup.pids("chain")) and first not in p.values() and p, 30, message="a replacement child"
    )["chain[0]"]
    wait_until(
        lambda: sup.output.count("database unreachable at start") >= 3,
        60,
        message="the replacement retrying to connect",
    )
    assert sup.pids("chain") == {"chain[0]": replacement}  # the same child, waiting: no restart loop
    assert "FATAL" not in sup.output.upper().replace("FATAL_AFTER", "")
    proxy.restore()
    wait_until(lambda: chain_state(db)["__cube"] == KEYS, 180, message="work to finish after the outage")
    wait_until(lambda: not any(k.startswith("~~") for k in chain_state(db)), 60, message="empty job tables")
    assert_complete(db)
    assert sup.pids("chain") == {"chain[0]": replacement}
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(60) == 0


@pytest.mark.timeout(180)
def test_parent_sigkill_then_a_new_supervisor_recovers(db, supervise, tmp_path):
    lab = seed_chain(db, delay=2)
    config = config_for(tmp_path, "chain", 2)
    first = supervise(["-c", config])
    children = first.wait_children({"chain": 2})
    wait_until(lambda: chain_state(db).get("~~square.reserved", 0) == 2, 60, message="jobs in flight")
    first.process.kill()
    first.process.wait(10)
    wait_until(
        lambda: (
            not any(
                psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in children.values()
            )
        ),
        10,
        message="the children to die with the parent",
    )
    assert chain_state(db).get("~~square.reserved", 0) == 2  # their jobs are still reserved...
    lab.set_behaviour(delay=0.05)
    second = supervise(["-c", config])
    second.wait_children({"chain": 2})
    # ...until the new supervisor's children recover them as orphans (no 24 h stale timeout)
    wait_until(lambda: chain_state(db)["__cube"] == KEYS, 120, message="the pipeline to finish")
    wait_until(lambda: not any(k.startswith("~~") for k in chain_state(db)), 30, message="empty job tables")
    assert_complete(db)
    second.signal(signal.SIGTERM)
    assert second.wait_exit(60) == 0


@pytest.mark.timeout(120)
def test_second_supervisor_on_the_same_config_refuses(db, supervise, tmp_path):
    seed_chain(db)
    config = config_for(tmp_path, "chain", 1)
    first = supervise(["-c", config])
    children = first.wait_children({"chain": 1})
    env = db.env
    second = subprocess.run(
        [*djsupervisor_command(), "start", "-c", config],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2, second.stderr
    assert second.stderr.count("\n") == 1 and "another supervisor is listening" in second.stderr
    assert first.process.poll() is None and first.pids("chain") == children  # untouched
    first.signal(signal.SIGTERM)
    assert first.wait_exit(60) == 0
