"""examples/fleet/slurm/djsupervisor.sbatch under a real Slurm (22.05, Debian's slurm-wlm and munge): one node,
this machine, with daemons of the test's own (tests/slurm_cluster.py), one cluster for the whole module.

The script is submitted as it is in the repository, with what its header says to set: DJSUPERVISOR_CONFIG (a
config written here, the test pipeline's `standard` worker, graceful_timeout = 10), DJSUPERVISOR_VENV (the
environment running the tests) and DJ_* for the test database in the environment sbatch exports; on the
command line a short `--time`, a `--signal` that fits it, and `--cpus-per-task=1 --mem=200M` (the node has
2 CPUs and 1 GB; the script asks for 8 and 16 GB). Everything is observed from outside, without sacct: the
queue (`squeue`, `scontrol show job`), the job's log, the database (the pipeline, its job table, the fleet
registry through `djsupervisor status --fleet`) and the processes (psutil). Each test checks what the
README promises:

- a timed stop: the script's timer (end of the allocation from `squeue -o "%A %e"`, minus graceful_timeout, minus
  DJSUPERVISOR_STOP_MARGIN) stops the supervisor before the time limit, the job in flight lands, nothing
  stays reserved, the job's log says exit status 0 and Slurm records ExitCode 0:0;
- Slurm's `--signal=B:TERM@N`, when it comes before the timer, the same way;
- `scancel --batch --signal=TERM` the same way;
- an array of 2 on the one node is one fleet: both supervisors (NAME-JOBID, the node's name as host) in
  `status --fleet`, every key computed once, by both;
- a plain `scancel` (SIGTERM to every process of the job, SIGKILL after KillWait) kills the job in flight,
  its reservation stays, and the next allocation's supervisor re-pends and computes it (the orphan rule:
  same host, pid gone, connection gone).

Every process of each job is gone afterwards; after the module the daemons are gone, by pid, and the
machine's database servers still answer. One backend (MariaDB): the point is the scheduler, not the
database (both backends' recovery and fleet paths are tested in tests/fleet and tests/worker), and both
would double the module's time (about 2.5 minutes). Marked `slurm` (`./scripts/test -m slurm`); skipped, with
the reason, where the packages are missing (a failure under CI, whose .ci/run installs them), where the
tests do not run as root, or where the daemons do not start.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import conftest
import psutil
import pytest
from helpers import process_gone, run_cli, wait_until, write_config
from pipelines.lab import declare
from slurm_cluster import SlurmCluster, missing

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.process,
    pytest.mark.timeout(180),
    pytest.mark.parametrize("backend", ["mysql"], indirect=True),
]

SBATCH = Path(__file__).resolve().parents[1] / "examples" / "fleet" / "slurm" / "djsupervisor.sbatch"
GRACEFUL = 10  # graceful_timeout of the test's config (s)
SIZE = ["--cpus-per-task=1", "--mem=200M"]  # one node of 2 CPUs, 1 GB: two allocations fit
STOP_TIMES: dict[str, float] = {}  # measured stop times (s), printed at the end (pytest -s)


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    absent = missing()
    if absent:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(absent)} not installed: .ci/run should have installed slurm-wlm and munge")
        pytest.skip(f"no Slurm here: {', '.join(absent)} not installed (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("no Slurm here: slurmd runs jobs as their user and must run as root")
    cluster = SlurmCluster()
    try:
        cluster.start()
    except RuntimeError as error:
        cluster.close()
        cluster.remove()
        pytest.skip(f"no Slurm here: the daemons did not start: {error}")
    yield cluster
    pids, leftover_steps = cluster.close()
    print("\nstop times under Slurm (s; a 6 s or 3 s job in flight finishes first):", STOP_TIMES)
    assert all(process_gone(pid) for pid in pids) and not leftover_steps and not cluster.steps()
    assert not [p for p in psutil.process_iter() if p.pid in pids]
    cluster.remove()
    for backend in conftest.BACKENDS:  # the machine's own servers still answer
        connection = conftest.configure_datajoint(backend)
        assert connection.query("SELECT 1").fetchone()[0] == 1, backend
        connection.close()


class Recipe:
    """The sbatch script submitted from `submit` (the submit directory: config and job logs) for `db`."""

    def __init__(self, cluster: SlurmCluster, db: conftest.TestDatabase, tmp_path: Path) -> None:
        self.cluster = cluster
        self.db = db
        self.submit_dir = tmp_path / "submit"
        self.submit_dir.mkdir()
        self.tmpdir = tmp_path / "jobtmp"  # the job's TMPDIR: the script's config copy lives there
        self.tmpdir.mkdir()
        self.config = write_config(
            self.submit_dir / "djsupervisor.toml",
            f"""
            [supervisor]
            name = "fleet"
            graceful_timeout = {GRACEFUL}
            fleet_interval = 1

            [[worker]]
            name = "standard"
            target = "pipelines.supervised:standard"
            replicas = 1
            sleep_duration = 0.5
            """,
        )
        self.submitted: list[str] = []

    def submit(self, *options: str, margin: int | None = None) -> str:
        env = dict(self.db.env, TMPDIR=str(self.tmpdir), DJSUPERVISOR_CONFIG=str(self.config))
        if Path(sys.prefix, "bin", "activate").exists():
            env["DJSUPERVISOR_VENV"] = sys.prefix
        else:  # an interpreter outside a virtualenv: its djsupervisor next to it
            env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        if margin is not None:
            env["DJSUPERVISOR_STOP_MARGIN"] = str(margin)
        job = self.cluster.sbatch(*options, *SIZE, str(SBATCH), cwd=self.submit_dir, env=env)
        self.submitted.append(job)
        return job

    def log(self, job: str) -> str:
        """The job's log (the script's #SBATCH --output=djsupervisor-%j.log, in the submit directory)."""
        path = self.submit_dir / f"djsupervisor-{job}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def fleet(self) -> list[dict]:
        """The fleet registry's rows, as `djsupervisor status --fleet --json` shows them."""
        result = run_cli(self.db, self.submit_dir, "status", "--fleet", "--json", "-c", str(self.config))
        assert result.returncode == 0, result.stderr
        (schema,) = json.loads(result.stdout)
        return schema["workers"]

    def registered(self, *jobs: str, timeout: float = 90) -> dict[str, dict]:
        """Wait until the supervisor of each job (fleet-JOBID) has its child live in the registry, under the
        node's name; the rows by supervisor."""

        def live():
            rows = {
                r["supervisor"]: r
                for r in self.fleet()
                if r["state"] not in ("stopped", "exited") and not r["overdue"] and r["pid"]
            }
            wanted = {f"fleet-{job}": rows.get(f"fleet-{job}") for job in jobs}
            return wanted if all(wanted.values()) else None

        try:
            rows = wait_until(live, timeout, interval=0.5, message=f"jobs {jobs} in status --fleet")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.logs()}") from None
        assert {row["host"] for row in rows.values()} == {self.cluster.node}, rows
        return rows

    def processes(self, job: str) -> list[psutil.Process]:
        """Every process of `job` on this machine: those whose environment names the job and this cluster (the
        batch shell, `timeout`), and their descendants (the supervisor and its children, whose process titles
        overwrite what /proc shows of their environment)."""
        found: dict[int, psutil.Process] = {}
        for process in psutil.process_iter():
            try:
                environ = process.environ()
                if environ.get("SLURM_JOB_ID") == job and environ.get("SLURM_CONF") == str(self.cluster.conf):
                    found.update({p.pid: p for p in [process, *process.children(recursive=True)]})
            except psutil.Error:
                continue
        return list(found.values())

    def logs(self) -> str:
        return "\n".join(f"--- job {job}\n{self.log(job)}" for job in self.submitted)

    def close(self) -> None:
        queued = [j for j in self.cluster.jobs() if j.split("_")[0] in self.submitted]
        if queued:
            self.cluster.run("scancel", "--full", *self.submitted, check=False)
            wait_until(lambda: not [j for j in self.cluster.jobs() if j.split("_")[0] in self.submitted], 30)
        print(f"\n{self.logs()}")  # pytest -s: the job logs (the closing note quotes them)


@pytest.fixture
def recipe(cluster: SlurmCluster, db: conftest.TestDatabase, tmp_path: Path) -> Iterator[Recipe]:
    recipe = Recipe(cluster, db, tmp_path)
    yield recipe
    recipe.close()


def log_time(log: str, message: str) -> float:
    """The time (epoch seconds) of the first log line that holds `message` ("2026-01-01 12:00:00.123 ...")."""
    line = next(line for line in log.splitlines() if message in line)
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()


def assert_clean_exit(recipe: Recipe, job: str) -> str:
    """The job's log ends with the supervisor's exit status 0 and Slurm recorded the same; its log."""
    log = recipe.log(job)
    assert "received SIGTERM" in log and f"supervisor fleet-{job} stopped" in log, log
    assert f"djsupervisor.sbatch: job {job}: the supervisor exited with status 0" in log, log
    fields = recipe.cluster.job(job)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), fields
    assert not list(recipe.tmpdir.glob(f"djsupervisor-{job}-*"))  # the config copy (maybe a password) is removed
    return log


def assert_settled(pipe) -> None:
    """Nothing reserved, nothing failed: every job that started landed."""
    assert len(pipe.Square.jobs & "status = 'reserved'") == 0
    assert len(pipe.Square.jobs & "status = 'error'") == 0


def wait_processes_gone(recipe: Recipe, job: str, pids: list[int]) -> None:
    wait_until(lambda: all(process_gone(pid) for pid in pids), 15, message=f"job {job}'s processes gone")
    assert not recipe.processes(job)


def stops_by_itself(recipe: Recipe, pipe, job: str, what: str) -> tuple[float, float, int]:
    """Watch `job` run and stop by itself: registered under the node's name, jobs computed, then gone with a
    clean exit, the job in flight at the SIGTERM landed and none started after it. Returns the SIGTERM's
    time after the supervisor started (s), the stop's length (s) and the timer the script set (s)."""
    recipe.cluster.wait_running(job)
    row = recipe.registered(job)[f"fleet-{job}"]
    wait_until(lambda: len(pipe.Square()), 60, message="a job computed")
    pids = [p.pid for p in recipe.processes(job)]
    assert row["pid"] in pids  # the registry's child is a process of this allocation
    assert recipe.cluster.steps()  # (what the module's end checks is gone: found while it runs)

    recipe.cluster.wait_gone(job, 110)
    log = assert_clean_exit(recipe, job)
    term, stopped = log_time(log, "received SIGTERM"), log_time(log, f"supervisor fleet-{job} stopped")
    in_flight = pipe.Square & f"started < {term} AND finished > {term}"
    if not in_flight:  # the SIGTERM fell in the milliseconds between two 6 s jobs: the last one ended just before
        in_flight = pipe.Square & f"finished BETWEEN {term} - 0.5 AND {term}"
    assert len(in_flight) == 1, pipe.Square.to_dicts()
    assert len(pipe.Square & f"started > {term}") == 0
    assert_settled(pipe)
    wait_processes_gone(recipe, job, pids)
    STOP_TIMES[f"{what}: SIGTERM to supervisor stopped"] = round(stopped - term, 1)
    STOP_TIMES[f"{what}: job in flight landed to supervisor stopped"] = round(stopped - in_flight.fetch1("finished"), 2)
    stop_after = int(re.search(r"stop after (\d+)s", log).group(1))
    return term - log_time(log, "starting 1 pools"), stopped - term, stop_after


def test_timed_stop_before_the_time_limit(recipe, db):
    """--time=2 and DJSUPERVISOR_STOP_MARGIN=90: the timer stops the supervisor about 20 s in (120 s - 10 s
    graceful_timeout - 90 s); --signal=B:TERM@5 could come at 55 s at the earliest (Slurm sends it up to a
    minute early), so the timer is what stops it. 6 s jobs: the SIGTERM falls inside one but for the few
    milliseconds between two."""
    pipe = declare(db.schema_name("pipe"))
    pipe.seed(range(40), delay=6)
    job = recipe.submit("--time=2", "--signal=B:TERM@5", margin=90)
    term, _, stop_after = stops_by_itself(recipe, pipe, job, "timer")
    assert 120 - GRACEFUL - 90 - 10 <= stop_after <= 120 - GRACEFUL - 90
    assert term < 120 - 55, "the timer, not Slurm's --signal, must have stopped it"


def test_slurms_signal_stops_it_before_the_timer(recipe, db):
    """--signal=B:TERM@60 on --time=2: slurmctld checks time limits every 30 s and sends the signal at the
    first check that finds less than 60 s + 30 s left, so 30 to 60 s in (after the supervisor is up); the
    timer is set for 120 - 10 - 0 = 110 s (margin 0)."""
    pipe = declare(db.schema_name("pipe"))
    pipe.seed(range(40), delay=6)
    job = recipe.submit("--time=2", "--signal=B:TERM@60", margin=0)
    term, _, stop_after = stops_by_itself(recipe, pipe, job, "--signal=B:TERM")
    assert stop_after >= 100 and term < 90, "Slurm's --signal, not the timer, must have stopped it"


def test_scancel_batch_signal_term_stops_it_the_same_way(recipe, cluster, db):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed(range(40), delay=3)
    job = recipe.submit("--time=10", "--signal=B:TERM@5")  # the timer at 10 min - 70 s: far off
    cluster.wait_running(job)
    child = recipe.registered(job)[f"fleet-{job}"]["pid"]
    pids = [p.pid for p in recipe.processes(job)]

    def reserving():
        rows = (pipe.Square.jobs & "status = 'reserved'" & {"pid": child}).to_dicts()
        return rows[0]["source_id"] + 1 if rows else None  # (+1: key 0 would read as "not yet")

    key = wait_until(reserving, 60, interval=0.05, message="the child in a job") - 1
    cluster.run("scancel", "--batch", "--signal=TERM", job)
    gone = cluster.wait_gone(job, 60)
    STOP_TIMES["scancel --batch --signal=TERM: scancel to job gone from the queue"] = round(gone, 1)
    log = assert_clean_exit(recipe, job)
    term, stopped = log_time(log, "received SIGTERM"), log_time(log, f"supervisor fleet-{job} stopped")
    STOP_TIMES["scancel --batch --signal=TERM: SIGTERM to supervisor stopped"] = round(stopped - term, 1)
    landed = pipe.Square & {"source_id": key, "worker_pid": child}  # the job in flight landed
    STOP_TIMES["scancel --batch --signal=TERM: job in flight landed to supervisor stopped"] = round(
        stopped - landed.fetch1("finished"), 2
    )
    assert_settled(pipe)
    wait_processes_gone(recipe, job, pids)


def test_an_array_of_two_on_one_node_is_one_fleet(recipe, cluster, db):
    pipe = declare(db.schema_name("pipe"))
    base = recipe.submit("--time=10", "--signal=B:TERM@5", "--array=1-2")
    jobs = cluster.wait_running(base, count=2)
    rows = recipe.registered(*jobs)
    text = run_cli(db, recipe.submit_dir, "status", "--fleet", "-c", str(recipe.config)).stdout
    assert all(f"fleet-{job}" in text for job in jobs) and cluster.node in text, text
    pids = [p.pid for job in jobs for p in recipe.processes(job)]

    pipe.seed(range(20), delay=1)  # both supervisors are up: they share the queue
    wait_until(lambda: len(pipe.Square()) == 20, 90, message="20 squares")
    assert sorted(pipe.Square.to_arrays("source_id")) == list(range(20))
    by_pid = {row["pid"]: name for name, row in rows.items()}
    computed_by = {by_pid.get(pid, "?") for pid in pipe.Square.to_arrays("worker_pid")}
    assert computed_by == {f"fleet-{job}" for job in jobs}  # both did some, nobody else
    assert_settled(pipe)  # a key computed twice would be an error (duplicate) in the job table

    cluster.run("scancel", "--batch", "--signal=TERM", base)  # every task of the array
    cluster.wait_gone(base, 60)
    for job in jobs:
        assert_clean_exit(recipe, job)
        wait_processes_gone(recipe, job, [])
    wait_processes_gone(recipe, base, pids)


def test_a_plain_scancel_loses_no_job(recipe, cluster, db):
    """A plain scancel: SIGTERM to every process of the job, SIGKILL KillWait (2 s here) later, while the
    child is in a 30 s job. Its reservation stays behind; the next allocation's supervisor re-pends it."""
    pipe = declare(db.schema_name("pipe"))
    pipe.seed(range(6), delay=30)  # far longer than KillWait: the SIGKILL comes mid-job
    job = recipe.submit("--time=10", "--signal=B:TERM@5")
    cluster.wait_running(job)
    child = recipe.registered(job)[f"fleet-{job}"]["pid"]
    pids = [p.pid for p in recipe.processes(job)]
    wait_until(lambda: len(pipe.Square.jobs & "status = 'reserved'" & {"pid": child}), 60, message="a job")

    cluster.run("scancel", job)
    cluster.wait_gone(job, 60)
    wait_processes_gone(recipe, job, pids)
    assert cluster.job(job)["JobState"] == "CANCELLED"
    left = (pipe.Square.jobs & "status = 'reserved'").to_dicts()
    assert [(r["pid"], r["host"]) for r in left] == [(child, cluster.node)], left  # killed mid-job (KillWait)
    assert not pipe.Square & {"source_id": left[0]["source_id"]}
    # SIGKILL reached the batch shell too: its EXIT trap never ran and the config copy stays, 0600 (the
    # script's header says so, and to prefer a per-job TMPDIR)
    (copy,) = recipe.tmpdir.glob(f"djsupervisor-{job}-*")
    assert copy.stat().st_mode & 0o777 == 0o600

    pipe.set_behaviour(delay=0.2)  # the rest quickly
    again = recipe.submit("--time=10", "--signal=B:TERM@5")
    cluster.wait_running(again)
    rows = recipe.registered(again)
    wait_until(lambda: len(pipe.Square()) == 6, 90, message="all 6 squares")
    lost = pipe.Square & {"source_id": left[0]["source_id"]}
    assert lost.fetch1("worker_pid") == rows[f"fleet-{again}"]["pid"]  # re-pended and computed by the next one
    assert_settled(pipe)
    recovered = db.connection.query(  # its WorkerLog counts the re-pended reservation
        f"SELECT SUM(recovered) FROM {db.connection.adapter.quote_identifier(db.prefix + '_workers')}.worker_log"
    ).fetchone()[0]
    assert recovered and int(recovered) >= 1
    cluster.run("scancel", "--batch", "--signal=TERM", again)
    cluster.wait_gone(again, 60)
    assert_clean_exit(recipe, again)
