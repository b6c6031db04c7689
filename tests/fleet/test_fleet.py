"""Many hosts, one database: supervisors with different host names share a pipeline; the fleet registry,
drain/resume/halt and stale recovery are observed from a separate process (the `djsupervisor` command)."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import psutil
import pytest
from helpers import process_gone, run_cli, wait_until, write_config
from pipelines.lab import declare

pytestmark = pytest.mark.process

FLEET_INTERVAL = 0.5


def fleet_config(tmp_path, name: str, host: str, replicas: int = 1, stale_hours: float | None = None):
    stale = f"stale_timeout_hours = {stale_hours}\n" if stale_hours is not None else ""
    return write_config(
        tmp_path / f"{name}.toml",
        f"""
        [supervisor]
        name = "{name}"
        host = "{host}"
        fleet_interval = {FLEET_INTERVAL}
        graceful_timeout = 20

        [[worker]]
        name = "standard"
        target = "pipelines.supervised:standard"
        replicas = {replicas}
        sleep_duration = 0.3
        {stale}""",
    )


def cli(db, tmp_path, *args, check=True) -> subprocess.CompletedProcess:
    """Run `djsupervisor ARGS...` as a separate process (the fourth host, so to speak)."""
    result = run_cli(db, tmp_path, *args)
    if check:
        assert result.returncode == 0, f"{args}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def fleet(db, tmp_path, config) -> list[dict]:
    """The RegisteredWorker rows `status --fleet --json` shows."""
    report = json.loads(cli(db, tmp_path, "status", "--fleet", "--json", "-c", str(config)).stdout)
    assert [entry["schema"] for entry in report] == [f"{db.prefix}_workers"]
    return report[0]["workers"]


def live_rows(rows: list[dict], host: str) -> list[dict]:
    return [r for r in rows if r["host"] == host and r["state"] not in ("stopped", "exited")]


@pytest.mark.timeout(240)
def test_fleet_status_drain_resume_and_halt_across_supervisors(db, tmp_path, supervise):
    pipe = declare(db.schema_name("pipe"))
    config_a = fleet_config(tmp_path, "sup-a", "host-a", replicas=2)
    config_b = fleet_config(tmp_path, "sup-b", "host-b", replicas=1)
    sup_a = supervise(["-c", str(config_a)])
    sup_b = supervise(["-c", str(config_b)])
    sup_a.wait_children({"standard": 2})
    sup_b.wait_children({"standard": 1})

    # The registry: every child of both hosts, with its supervisor and slot, heartbeating.
    def registered():
        rows = fleet(db, tmp_path, config_a)
        a, b = live_rows(rows, "host-a"), live_rows(rows, "host-b")
        if len(a) == 2 and len(b) == 1 and all(r["supervisor"] for r in a + b):
            return rows
        return None

    rows = wait_until(registered, 60, interval=0.3, message="both hosts' children in status --fleet")
    assert {(r["supervisor"], r["slot"], r["pid"]) for r in live_rows(rows, "host-a")} == {
        ("sup-a", slot, pid) for slot, pid in ((0, sup_a.pids()["standard[0]"]), (1, sup_a.pids()["standard[1]"]))
    }
    assert [(r["supervisor"], r["slot"]) for r in live_rows(rows, "host-b")] == [("sup-b", 0)]
    assert not any(r["overdue"] for r in rows)
    text = cli(db, tmp_path, "status", "--fleet", "-c", str(config_a)).stdout
    assert "host-a" in text and "host-b" in text and "OVERDUE" not in text

    # Work flows and the registry counts it.
    pipe.seed(range(20))
    wait_until(lambda: len(pipe.Square()) == 20, 60, message="20 squares")

    def registry_jobs_done() -> int:
        rows = fleet(db, tmp_path, config_a)
        return sum(r["jobs_done"] for r in live_rows(rows, "host-a") + live_rows(rows, "host-b"))

    wait_until(lambda: registry_jobs_done() == 20, 30, interval=0.3, message="jobs_done in the registry")

    # Drain host-b from outside while its child is in a job: the job lands, the child leaves; host-a goes on.
    a_pids = sup_a.pids()
    b_pid = sup_b.pids()["standard[0]"]
    pipe.seed(range(100, 106), delay=1.5)

    def b_reserved():
        rows = (pipe.Square.jobs & "status = 'reserved'" & {"pid": b_pid}).to_dicts()
        return rows[0]["source_id"] + 1 if rows else None  # (+1: key 0 would read as "not yet")

    in_flight = wait_until(b_reserved, 60, interval=0.02, message="host-b's child in a job") - 1
    cli(db, tmp_path, "drain", "--host", "host-b", "-c", str(config_a))
    wait_until(lambda: not sup_b.pids(), 30, message="host-b's child gone")
    assert len(pipe.Square & {"source_id": in_flight, "worker_pid": b_pid}) == 1  # its job landed
    assert len(pipe.Square.jobs & "status = 'error'") == 0
    assert sup_a.pids() == a_pids
    assert sup_b.process.poll() is None  # drained, not halted
    status_b = json.loads(cli(db, tmp_path, "status", "--json", "-c", str(config_b)).stdout)
    assert status_b["drained"] == {"standard": "drain"}
    pipe.seed(range(20, 30))
    wait_until(lambda: len(pipe.Square()) == 36, 60, message="host-a alone computes the new keys")
    assert set((pipe.Square & "source_id >= 20 AND source_id < 30").to_arrays("worker_pid")) <= set(a_pids.values())

    # Resume: host-b's pool comes back.
    out = cli(db, tmp_path, "resume", "--host", "host-b", "-c", str(config_a)).stdout
    assert "cleared drain: host=host-b" in out
    sup_b.wait_children({"standard": 1}, timeout=30)

    # Halt every pool everywhere: both supervisors stop gracefully and exit 0.
    cli(db, tmp_path, "drain", "--all", "--halt", "-c", str(config_a))
    assert sup_a.wait_exit(60) == 0
    assert sup_b.wait_exit(60) == 0
    rows = fleet(db, tmp_path, config_a)
    assert not live_rows(rows, "host-a") and not live_rows(rows, "host-b"), rows
    cli(db, tmp_path, "resume", "--all", "-c", str(config_a))


def can_unshare_uts() -> bool:
    try:
        return subprocess.run(["unshare", "--uts", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.timeout(240)
@pytest.mark.skipif(not can_unshare_uts(), reason="needs unshare --uts (root): a host name per supervisor")
def test_three_hosts_one_killed_whole_exactly_once(db, tmp_path, supervise):
    pipe = declare(db.schema_name("pipe"))
    configs = {
        host: fleet_config(tmp_path, f"sup-{host}", host, replicas=1, stale_hours=0.001)
        for host in ("host-a", "host-b", "host-c")
    }
    # Each supervisor in a UTS namespace of its own: its reservations name its host, so the survivors cannot
    # tell by pid that host-c's child is dead; only the stale rule (reservation older than the
    # stale_timeout, 3.6 s here, and its connection gone) brings its job back.
    sups = {host: supervise(["-c", str(config)], uts_host=host) for host, config in configs.items()}
    for sup in sups.values():
        sup.wait_children({"standard": 1})
    pipe.seed(range(40), delay=0.3)

    # SIGKILL host-c's whole process tree while its child holds a reservation.
    victim = sups["host-c"]
    child = psutil.Process(victim.pids()["standard[0]"])

    def reserving():
        reserved = pipe.Square.jobs & "status = 'reserved'"
        return child.pid in set(reserved.to_arrays("pid")) if len(reserved) else False

    wait_until(reserving, 60, interval=0.02, message="host-c's child holding a reservation")
    tree = [psutil.Process(victim.pid), *psutil.Process(victim.pid).children(recursive=True)]
    for process in tree:
        process.send_signal(signal.SIGKILL)
    for process in tree:
        wait_until(lambda p=process: process_gone(p.pid), 10, message=f"pid {process.pid} gone")

    # The other two hosts recover its reservation and finish everything, each key computed exactly once.
    lost = (pipe.Square.jobs & "status = 'reserved'" & {"pid": child.pid}).to_dicts()
    assert lost and all(job["host"] == "host-c" for job in lost)
    wait_until(lambda: len(pipe.Square()) == 40, 120, message="all 40 squares despite host-c's death")
    assert len(pipe.Square.jobs & "status = 'error'") == 0
    assert len(pipe.Square.jobs & "status = 'reserved'") == 0
    assert sorted(pipe.Square.to_arrays("source_id")) == list(range(40))
    logs = db.connection.query(  # the survivors' WorkerLog says the stale rule re-pended it
        f"SELECT SUM(recovered) FROM {db.connection.adapter.quote_identifier(db.prefix + '_workers')}.worker_log"
    ).fetchone()[0]
    assert logs and int(logs) >= len(lost)

    # Seen from a fourth process: host-c's row is overdue, the others are not.
    def overdue_c():
        rows = fleet(db, tmp_path, configs["host-a"])
        c = [r for r in rows if r["host"] == "host-c"]
        return rows if c and all(r["overdue"] for r in c) else None

    rows = wait_until(overdue_c, 30, interval=0.5, message="host-c overdue in status --fleet")
    assert not any(r["overdue"] for r in rows if r["host"] != "host-c")
    assert "OVERDUE" in cli(db, tmp_path, "status", "--fleet", "-c", str(configs["host-a"])).stdout

    # And drain reaches the two survivors.
    cli(db, tmp_path, "drain", "--supervisor", "sup-host-b", "-c", str(configs["host-a"]))
    wait_until(lambda: not sups["host-b"].pids(), 30, message="host-b's child gone")
    assert len(sups["host-a"].pids()) == 1


@pytest.mark.timeout(60)
def test_drain_needs_a_selector_and_a_schema(db, tmp_path):
    config = fleet_config(tmp_path, "sup-a", "host-a")
    result = cli(db, tmp_path, "drain", "-c", str(config), check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "djsupervisor: error: drain: say which pools: --host, --supervisor, --worker, or --all"
    )
    result = cli(db, tmp_path, "resume", "--all", check=False)
    assert result.returncode == 2
    assert "give -c FILE" in result.stderr and "Traceback" not in result.stderr


def agent_pid(sup) -> int | None:
    """The pid of the supervisor's fleet agent, from its process title."""
    for process in psutil.Process(sup.pid).children():
        try:
            if " ".join(process.cmdline()).strip().endswith("fleet agent"):
                return process.pid
        except psutil.Error:
            continue
    return None


@pytest.mark.timeout(120)
def test_a_killed_fleet_agent_is_restarted_and_heartbeats_resume(db, tmp_path, supervise):
    declare(db.schema_name("pipe"))
    config = fleet_config(tmp_path, "sup-a", "host-a")
    sup = supervise(["-c", str(config)])
    child = sup.wait_children({"standard": 1})["standard[0]"]
    first = wait_until(lambda: agent_pid(sup), 30, message="the fleet agent")
    wait_until(
        lambda: any(r["pid"] == child and r["supervisor"] == "sup-a" for r in fleet(db, tmp_path, config)),
        30,
        interval=0.3,
        message="the child's row",
    )
    os.kill(first, signal.SIGKILL)
    second = wait_until(lambda: agent_pid(sup) not in (None, first) and agent_pid(sup), 30, message="a new agent")
    assert second != first
    assert sup.pids() == {"standard[0]": child}  # the children are not touched

    def stamped_again():
        row = next(r for r in fleet(db, tmp_path, config) if r["pid"] == child)
        return row["age"] < 1.0 and not row["overdue"]

    wait_until(stamped_again, 30, interval=0.3, message="fresh heartbeats from the new agent")
