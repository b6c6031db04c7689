"""Fleet-scale figures (issue 15): scaling to 32 workers, refreshes per minute, time to the first job.

Three parts, each printing rows of a Markdown table with the load average (``uptime``'s one-minute figure)
taken while it ran:

- ``scaling``: jobs/s of 1, 4, 8, 16, 32 workers on I/O-bound jobs (make() sleeps `--ms`, 50 by default)
  under ``djsupervisor start`` (N replicas) and as N plain ``populate(reserve_jobs=True)`` loops
  (bench/bench_pipeline.py) side by side, against the ideal (N × one djsupervisor worker's rate), with lost
  reservations per job for both (djsupervisor: WorkerLog's ``lost``; plain loops: their ``jobs.reserve``
  counted), and the CPU milliseconds per job in the window (psutil: the N processes, a supervisor included,
  + the database server's processes, whose other clients count too: an upper bound). The queue is seeded and
  refreshed before each run; a run is the warm-up (every process has finished a job) and a `--window` of
  seconds between two counts of Square's rows.
- ``refresh``: refreshes of Square's job queue per minute, and the seconds spent in them per minute, with 4,
  16 and 32 idle workers (sleep_duration 1 s, 10k keys all computed, so that a refresh has a real anti-join
  to do) split over two supervisors, each in a UTS namespace with its own host name (``unshare --uts``,
  root only); "before" is ``refresh_interval = 0`` (every worker every cycle, as DataJoint does), "after"
  the default (the sleep_duration: one refresh per table per second across the fleet). Each refresh is
  timed in the workers (``DJS_BENCH_REFRESH_DIR``, see bench_pipeline.py).
- ``first-job``: a worker's first cycle on `--first-keys` (100k) new keys, in process: seconds from the cycle's
  start to its first job, before (the whole first refresh written before the first job) and after (the
  first `compat.REFRESH_INSERT_BATCH` rows, then the first jobs, then the rest).

    .venv/bin/python bench/fleet_scale.py [--backend mysql|postgresql|both] [--part scaling,refresh,first-job]
        [--workers 1,4,8,16,32] [--window 8] [--refresh-workers 4,16,32] [--refresh-window 20] [--small]

``--small`` is the smoke run tests/test_bench.py makes (1 and 2 workers, 2 s windows, 2 and 4 refresh
workers, 12k first keys).

``--embedded`` runs on a private PostgreSQL of its own (`djsupervisor.embedded`, the ``embedded`` extra)
instead of the local servers: for a machine with more cores and no database server (the 32-worker figure
needs 3-4 cores: ~5.5 ms of CPU per job at ~580 jobs/s; see bench/device_run.sh).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from run import BACKENDS, DB, DJS, PY, env_for, window_rate  # noqa: E402  (bench/ is not a package)


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


class Supervisor:
    """``djsupervisor start`` with `replicas` children of bench_pipeline's worker, under `host` if given."""

    def __init__(self, env: dict, replicas: int, tmp: Path, host: str | None = None) -> None:
        self.tmp, self.replicas = tmp, replicas
        name = f"bench{uuid.uuid4().hex[:6]}"
        config = tmp / f"{name}.toml"
        config.write_text(
            f'[supervisor]\nname = "{name}"\ncontrol_socket = "{tmp}/{name}.sock"\n\n'  # the rest at defaults
            f'[[worker]]\nname = "bench"\ntarget = "bench_pipeline:worker"\nreplicas = {replicas}\n'
            f"sleep_duration = {env['DJS_BENCH_SLEEP']}\n"
        )
        command = [DJS, "start", "-c", str(config), "--log-level", os.environ.get("DJS_BENCH_LOG_LEVEL", "WARNING")]
        if host:  # another host name, as on another machine (a UTS namespace: root only)
            command = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host, *command]
        self.log = open(tmp / f"{name}.log", "w")
        self.proc = subprocess.Popen(
            command,
            env=dict(env, DJSUPERVISOR_RUNTIME_DIR=str(tmp)),
            cwd=BENCH,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Plain:
    """N plain populate loops, their lost reservations counted into `tmp`/lost."""

    def __init__(self, env: dict, n: int, tmp: Path) -> None:
        self.dir = tmp / "lost"
        self.dir.mkdir()
        self.log = open(tmp / "plain.log", "w")
        env = dict(env, DJS_BENCH_LOST_DIR=str(self.dir))
        self.procs = [
            subprocess.Popen(
                [PY, str(BENCH / "bench_pipeline.py")], env=env, cwd=BENCH, stdout=self.log, stderr=self.log
            )
            for _ in range(n)
        ]

    def stop(self) -> tuple[int, int]:
        """Kill them; (jobs reserved, reservations lost) as they last wrote them."""
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.log.close()
        done = lost = 0
        for file in self.dir.glob("[0-9]*[0-9]"):  # not a ".new" the kill left behind
            won, missed = file.read_text().split()
            done, lost = done + int(won), lost + int(missed)
        return done, lost


def seed_queued(db: DB, prefix: str, keys: int, ms: float, computed: bool = False) -> None:
    """`keys` Source rows of `ms` make()s, queued in Square's job table (or, `computed`, all done)."""
    if computed:
        fill = (
            "b.lab.Square.insert(({'source_id': i, 'square': 0.0, 'worker_pid': 0, 'started': 0.0, 'finished': 0.0}"
            f" for i in range({keys})), allow_direct_insert=True)"
        )
    else:
        fill = "with compat.bulk_refresh(b.lab.Square.jobs):\n    b.lab.Square.jobs.refresh()"
    code = f"import bench_pipeline as b\nfrom djsupervisor.worker import compat\nb.seed({keys})\n{fill}\n"
    subprocess.run([PY, "-c", code], env=env_for(db.backend, prefix, ms), check=True, cwd=BENCH, capture_output=True)


def worker_log_lost(db: DB, prefix: str) -> tuple[int, int]:
    """(jobs done, reservations lost) in the run's WorkerLog."""
    table = f"`{prefix}_workers`.`worker_log`" if db.backend == "mysql" else f'"{prefix}_workers"."worker_log"'
    done, lost = db.q(f"SELECT COALESCE(SUM(jobs_done), 0), COALESCE(SUM(lost), 0) FROM {table}")[0]
    return int(done), int(lost)


SERVERS = ("mariadbd", "mysqld", "postgres")  # the database servers' process names


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU seconds of `processes` (those gone meanwhile count 0)."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def scaling_run(db: DB, kind: str, n: int, ms: float, window: float, prefix: str) -> tuple[float, float, str]:
    """(jobs/s over the window, lost reservations per job over the run, CPU ms per job in the window: the
    N processes + the database server) of N processes of `kind`."""
    keys = int(n * 1000 / ms * (window + 30)) + 200  # never dry: the warm-up of 32 processes takes ~20 s here
    seed_queued(db, prefix, keys, ms)
    env = env_for(db.backend, prefix, ms, sleep=0.1)
    tmp = Path(tempfile.mkdtemp(prefix="djsbench"))
    runner: Supervisor | Plain = Supervisor(env, n, tmp) if kind == "djsupervisor" else Plain(env, n, tmp)
    marks: list[tuple[float, float, int]] = []

    def probe(jobs: int) -> None:
        if isinstance(runner, Supervisor):
            own = [psutil.Process(runner.proc.pid), *runner.children()]
        else:
            own = [psutil.Process(p.pid) for p in runner.procs]
        servers = [p for p in psutil.process_iter(["name"]) if p.info["name"] in SERVERS]
        marks.append((cpu_seconds(own), cpu_seconds(servers), jobs))

    try:
        rate = window_rate(db, prefix, n, window, keys, min_rows=n, timeout=180, probe=probe)
    finally:
        counts = runner.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    done, lost = worker_log_lost(db, prefix) if kind == "djsupervisor" else counts  # type: ignore[misc]
    (own0, server0, jobs0), (own1, server1, jobs1) = marks
    jobs = max(jobs1 - jobs0, 1)
    cpu = f"{(own1 - own0) / jobs * 1000:.1f} + {(server1 - server0) / jobs * 1000:.1f}"
    return rate, lost / max(done, 1), cpu


def scaling(db: DB, counts: list[int], ms: float, window: float, prefix) -> list[str]:
    rows, one = [], None
    for n in counts:
        loads, result = [], {}
        for kind in ("plain", "djsupervisor"):
            result[kind] = scaling_run(db, kind, n, ms, window, prefix())
            loads.append(load())
        rate, lost, cpu = result["djsupervisor"]
        plain_rate, plain_lost, plain_cpu = result["plain"]
        one = one or rate  # the first count is 1
        rows.append(
            f"| {db.backend} | {n} | {rate:.1f} | {n * one:.1f} | {rate / (n * one):.2f} | {plain_rate:.1f} | "
            f"{rate / plain_rate:.2f} | {lost:.2f} | {plain_lost:.2f} | {cpu} | {plain_cpu} | {'/'.join(loads)} |"
        )
        print(rows[-1], flush=True)
    return rows


def refresh_run(db: DB, n: int, interval: str | None, window: float, prefix: str) -> tuple[float, float]:
    """(refreshes per minute, seconds refreshing per minute) of `n` idle workers over two host names."""
    seed_queued(db, prefix, 10_000, 0, computed=True)
    tmp = Path(tempfile.mkdtemp(prefix="djsbench"))
    (tmp / "refresh").mkdir()
    env = env_for(db.backend, prefix, 0, sleep=1.0)
    env["DJS_BENCH_REFRESH_DIR"] = str(tmp / "refresh")
    if interval is not None:
        env["DJS_BENCH_REFRESH_INTERVAL"] = interval
    supervisors = [Supervisor(env, n // 2, tmp, host=f"node-{h}") for h in "ab"]
    try:
        end = time.time() + 180
        while len(list((tmp / "refresh").iterdir())) < (n if interval == "0" else 1) and time.time() < end:
            time.sleep(0.1)  # every child has refreshed (before), or one has (after)
        time.sleep(2)
        t0 = time.time()
        time.sleep(window)
        t1 = time.time()
    finally:
        for supervisor in supervisors:
            supervisor.stop()
    stamps = [
        [float(x) for x in line.split()]
        for file in (tmp / "refresh").iterdir()
        for line in file.read_text().splitlines()
        if line.strip()
    ]
    shutil.rmtree(tmp, ignore_errors=True)
    inside = [seconds for at, seconds in stamps if t0 <= at < t1]
    minutes = (t1 - t0) / 60
    return len(inside) / minutes, sum(inside) / minutes


def refreshes(db: DB, counts: list[int], window: float, prefix) -> list[str]:
    rows = []
    for n in counts:
        for label, interval in (("before (refresh_interval 0)", "0"), ("after (default: sleep_duration 1 s)", None)):
            per_minute, busy = refresh_run(db, n, interval, window, prefix())
            rows.append(f"| {db.backend} | {n} | {label} | {per_minute:.0f} | {busy:.2f} | {load()} |")
            print(rows[-1], flush=True)
    return rows


def first_job(db: DB, keys: int, prefix: str) -> list[str]:
    """Seconds to the first job of a first cycle on `keys` new keys, before and after (in this process)."""
    code = BENCH / "first_job.py"
    rows = []
    for label, first in (("before (whole refresh first)", "all"), ("after (first batch, then jobs)", "batch")):
        env = env_for(db.backend, prefix(), 0)
        done = subprocess.run(
            [PY, str(code), str(keys), first], env=env, cwd=BENCH, check=True, capture_output=True, text=True
        )
        to_first, cycle = (float(x) for x in done.stdout.strip().splitlines()[-1].split())
        rows.append(f"| {db.backend} | {keys:,} | {label} | {to_first:.2f} | {cycle:.2f} | {load()} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="both", choices=["mysql", "postgresql", "both"])
    parser.add_argument("--part", default="scaling,refresh,first-job")
    parser.add_argument("--workers", default="1,4,8,16,32")
    parser.add_argument("--window", type=float, default=8.0)
    parser.add_argument("--ms", type=float, default=50.0)
    parser.add_argument("--refresh-workers", default="4,16,32")
    parser.add_argument("--refresh-window", type=float, default=20.0)
    parser.add_argument("--first-keys", type=int, default=100_000)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--embedded", action="store_true", help="a private PostgreSQL (implies --backend postgresql)")
    args = parser.parse_args()
    if args.small:
        args.workers, args.window, args.refresh_workers, args.refresh_window = "1,2", 2.0, "2,4", 4.0
        args.first_keys = 12_000
    parts = set(args.part.split(","))
    print(f"- load average at the start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")
    if args.embedded:
        from djsupervisor.embedded import EmbeddedPostgres

        with EmbeddedPostgres() as server:  # stopped and removed on every way out, SIGTERM included
            BACKENDS["postgresql"].update(
                host=server.host, port=server.port, user=server.user, password=server.password
            )
            print(f"- PostgreSQL (embedded) on {server.host}:{server.port}", flush=True)
            run_backend(DB("postgresql"), args, parts)
        return
    for backend in ["mysql", "postgresql"] if args.backend == "both" else [args.backend]:
        run_backend(DB(backend), args, parts)


def run_backend(db: DB, args: argparse.Namespace, parts: set[str]) -> None:
    base = f"djsbench_{uuid.uuid4().hex[:8]}"
    made: list[str] = []

    def prefix() -> str:
        made.append(f"{base}_{len(made)}")
        return made[-1]

    try:
        if "scaling" in parts:
            print(
                "| backend | workers | djsupervisor jobs/s | ideal | of ideal | plain loops jobs/s | vs plain | "
                "lost per job (djsupervisor) | lost per job (plain) | CPU ms/job, processes + server (djsupervisor) | "
                "CPU ms/job (plain) | load (plain/djs) |\n" + "|" + "---|" * 12
            )
            scaling(db, [int(x) for x in args.workers.split(",")], args.ms, args.window, prefix)
        if "refresh" in parts:
            print(
                "| backend | workers (2 hosts) | refresh_interval | refreshes/min | s refreshing/min | load |\n"
                "|---|---|---|---|---|---|"
            )
            refreshes(db, [int(x) for x in args.refresh_workers.split(",")], args.refresh_window, prefix)
        if "first-job" in parts:
            print("| backend | new keys | first cycle | s to first job | s whole cycle | load |\n" + "|" + "---|" * 6)
            first_job(db, args.first_keys, prefix)
    finally:
        for name in made:
            db.drop_prefix(name)


if __name__ == "__main__":
    main()
