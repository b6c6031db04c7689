"""Benchmarks of djsupervisor against plain populate loops and supervisord; writes a markdown table.

Usage: .venv/bin/python bench/run.py [--small] [--backend mysql|postgresql|both] [--out bench/RESULTS.md]
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
PY = sys.executable
# The console script beside this Python (a virtual environment), else the one on PATH (packages installed with
# `pip install --target`, as bench/device_run.sh does on a machine it cannot build a virtual environment on)
DJS = str(Path(PY).with_name("djsupervisor"))
if not Path(DJS).exists():
    DJS = shutil.which("djsupervisor") or DJS
SUPERVISORD_VENV = Path("/tmp/djsbench-supervisord")

BACKENDS = {
    "mysql": dict(host="127.0.0.1", port=3306, user="root", password=""),
    "postgresql": dict(host="127.0.0.1", port=5432, user="postgres", password=""),
}


# ---------------------------------------------------------------- database helpers


class DB:
    def __init__(self, backend: str):
        self.backend = backend
        s = BACKENDS[backend]
        if backend == "mysql":
            import pymysql

            self.conn = pymysql.connect(
                host=s["host"], port=s["port"], user=s["user"], password=s["password"], autocommit=True
            )
        else:
            import psycopg2

            self.conn = psycopg2.connect(
                host=s["host"], port=s["port"], user=s["user"], password=s["password"], dbname="postgres"
            )
            self.conn.autocommit = True

    def q(self, sql: str, args=None):
        cur = self.conn.cursor()
        cur.execute(sql, args)
        try:
            return cur.fetchall()
        except Exception:
            return []

    def table(self, prefix: str, name: str = "__square") -> str:
        return f"`{prefix}_pipe`.`{name}`" if self.backend == "mysql" else f'"{prefix}_pipe"."{name}"'

    def work_rows(self, prefix: str):
        try:
            return self.q(f"SELECT worker_pid, started, finished FROM {self.table(prefix)}")
        except Exception:
            return []

    def count(self, prefix: str) -> int:
        try:
            return self.q(f"SELECT count(*) FROM {self.table(prefix)}")[0][0]
        except Exception:
            return 0

    def seed(self, prefix: str, n: int, ms: float = 0) -> None:
        """`n` keys whose make()s take `ms` milliseconds; importing bench_pipeline declares the job tables."""
        env = env_for(self.backend, prefix, ms)
        code = f"import bench_pipeline as b; b.seed({n})"
        subprocess.run([PY, "-c", code], env=env, check=True, cwd=BENCH, capture_output=True)

    def drop_prefix(self, prefix: str) -> None:
        if self.backend == "mysql":
            names = [r[0] for r in self.q("SHOW DATABASES") if r[0].startswith(prefix)]
            for n in names:
                self.q(f"DROP DATABASE IF EXISTS `{n}`")
        else:
            names = [r[0] for r in self.q("SELECT nspname FROM pg_namespace") if r[0].startswith(prefix)]
            for n in names:
                self.q(f'DROP SCHEMA IF EXISTS "{n}" CASCADE')

    def queries(self) -> int:
        """The server's own statement counter."""
        if self.backend == "mysql":
            return int(self.q("SHOW GLOBAL STATUS LIKE 'Questions'")[0][1])
        r = self.q("SELECT sum(xact_commit + xact_rollback) FROM pg_stat_database")
        return int(r[0][0])


def env_for(backend: str, prefix: str, ms: float, sleep: float = 0.1, max_sleep: float | None = None) -> dict:
    s = BACKENDS[backend]
    env = dict(os.environ)
    env.update(
        DJ_HOST=s["host"],
        DJ_PORT=str(s["port"]),
        DJ_USER=s["user"],
        DJ_PASS=s["password"],
        DJ_BACKEND=backend,
        DJ_USE_TLS="false",
        DJS_BENCH_PREFIX=prefix,
        DJS_BENCH_MS=str(ms),
        DJS_BENCH_SLEEP=str(sleep),
        PYTHONPATH=os.pathsep.join([str(BENCH), *filter(None, [os.environ.get("PYTHONPATH")])]),
        PYTHONWARNINGS="ignore",
    )
    env.pop("DJS_BENCH_MAX_SLEEP", None)
    if max_sleep:
        env["DJS_BENCH_MAX_SLEEP"] = str(max_sleep)
    return env


# ---------------------------------------------------------------- process launchers


class Supervisor:
    def __init__(self, env: dict, replicas: int, tmp: Path, graceful_timeout: float = 30):
        self.tmp = tmp
        self.config = tmp / "bench.toml"
        self.config.write_text(
            f'[supervisor]\nname = "bench{uuid.uuid4().hex[:6]}"\ncontrol_socket = "{tmp}/ctl.sock"\n'
            f"graceful_timeout = {graceful_timeout}\n\n"  # every other setting at its default
            f'[[worker]]\nname = "bench"\ntarget = "bench_pipeline:worker"\nreplicas = {replicas}\n'
            f"sleep_duration = {env['DJS_BENCH_SLEEP']}\n"
            + (f"max_sleep_duration = {env['DJS_BENCH_MAX_SLEEP']}\n" if env.get("DJS_BENCH_MAX_SLEEP") else "")
        )
        env = dict(env, DJSUPERVISOR_RUNTIME_DIR=str(tmp))
        self.log = open(tmp / "supervisor.log", "w")
        self.proc = subprocess.Popen(
            [DJS, "start", "-c", str(self.config), "--log-level", os.environ.get("DJS_BENCH_LOG_LEVEL", "WARNING")],
            env=env,
            cwd=BENCH,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.replicas = replicas

    def children(self):
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []

    def wait_children(self, timeout=60):
        end = time.time() + timeout
        while time.time() < end:
            if len(self.children()) >= self.replicas:
                return
            time.sleep(0.005)
        raise RuntimeError("children did not start: " + (self.tmp / "supervisor.log").read_text()[-2000:])

    def stop(self, timeout=60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Plain:
    def __init__(self, env: dict, n: int, tmp: Path):
        self.log_path = tmp / "plain.log"
        self.log = open(self.log_path, "w")
        self.procs = [
            subprocess.Popen(
                [PY, str(BENCH / "bench_pipeline.py")], env=env, cwd=BENCH, stdout=self.log, stderr=subprocess.STDOUT
            )
            for _ in range(n)
        ]

    def output(self) -> str:
        return self.log_path.read_text()[-2000:]

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.log.close()


# ---------------------------------------------------------------- benchmarks


def throughput(db: DB, kind: str, replicas: int, ms: float, window: float, keys: int, prefix: str) -> float:
    """Jobs/s completed between two timestamps once every process has finished a job."""
    db.seed(prefix, keys, ms)
    env = env_for(db.backend, prefix, ms)
    tmp = Path(tempfile.mkdtemp(prefix="djsbench"))
    runner = Supervisor(env, replicas, tmp) if kind == "djsupervisor" else Plain(env, replicas, tmp)
    try:
        return window_rate(db, prefix, replicas, window, keys, min_rows=3 * replicas, timeout=120)
    except RuntimeError as error:
        output = runner.output() if isinstance(runner, Plain) else (tmp / "supervisor.log").read_text()[-2000:]
        raise RuntimeError(f"{kind}: {error}:\n{output}") from None
    finally:
        runner.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def window_rate(
    db: DB, prefix: str, processes: int, window: float, keys: int, min_rows: int, timeout: float, probe=None
) -> float:
    """Jobs/s over `window` seconds, counted once every one of `processes` has finished a job (and `min_rows`
    are done): start-up and imports are not counted. RuntimeError if that never happens or the `keys` ran out.
    `probe(jobs)`, if given, is called with Square's count at the window's start and end."""
    end = time.time() + timeout
    while time.time() < end:  # warm-up: every process has finished at least one job
        rows = db.work_rows(prefix)
        if len({r[0] for r in rows}) >= processes and len(rows) >= min_rows:
            break
        time.sleep(0.05)
    else:
        raise RuntimeError("never got going")
    t0, c0 = time.time(), db.count(prefix)
    if probe:
        probe(c0)
    time.sleep(window)
    t1, c1 = time.time(), db.count(prefix)
    if probe:
        probe(c1)
    if c1 >= keys:
        raise RuntimeError(f"queue ran dry during the window ({keys} keys): seed more")
    return (c1 - c0) / (t1 - t0)


def restart_latency(db: DB, kind: str, prefix: str, ms: float, supervisord_ok: bool, kills: int = 6) -> list[float]:
    """SIGKILL of a busy child every ~1 s, `kills` times -> first job finished by each replacement (seconds).

    Default settings on both sides (djsupervisor: backoff_initial 0.25 s, fatal_after 5; supervisord:
    autorestart, startsecs=0). A kill every second is what a bad node or an OOM-killing neighbour does: each
    kill lands on a child that is in a job, so djsupervisor counts it to the job (its max_attempts) and
    replaces the child at once; a restart delay that grew with each kill, or a FATAL slot, shows here.
    """
    db.seed(prefix, 20000, ms)
    env = env_for(db.backend, prefix, ms)
    tmp = Path(tempfile.mkdtemp(prefix="djsbench"))
    if kind == "djsupervisor":
        runner = Supervisor(env, 1, tmp)
        runner.wait_children()
        parent = runner.proc.pid
    else:
        conf = tmp / "supervisord.conf"
        envline = ",".join(f'{k}="{v}"' for k, v in env.items() if k.startswith(("DJ", "PYTHON")))
        conf.write_text(
            f"[supervisord]\nnodaemon=true\nlogfile={tmp}/sd.log\npidfile={tmp}/sd.pid\n"
            f"[unix_http_server]\nfile={tmp}/sd.sock\n"
            f"[program:plain]\ncommand={PY} {BENCH / 'bench_pipeline.py'}\ndirectory={BENCH}\n"
            f"autorestart=true\nstartsecs=0\nenvironment={envline}\nstdout_logfile={tmp}/plain.log\n"
            f"redirect_stderr=true\n"
        )
        proc = subprocess.Popen(
            [str(SUPERVISORD_VENV / "bin" / "supervisord"), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        parent = proc.pid
    latencies = []
    try:
        end = time.time() + 60
        while time.time() < end and db.count(prefix) < 5:
            time.sleep(0.02)
        for _ in range(kills):
            # the worker child (djsupervisor's parent also has its fleet agent; supervisord has only the worker)
            workers = [c for c in psutil.Process(parent).children() if "agent" not in " ".join(c.cmdline())]
            victim = workers[0]
            old = victim.pid
            killed = time.time()
            victim.kill()
            end = time.time() + 60
            while time.time() < end:
                r = db.q(
                    f"SELECT min(finished) FROM {db.table(prefix)} WHERE worker_pid <> %s AND finished > %s",
                    (old, killed),
                )
                if r and r[0][0] is not None:
                    latencies.append(r[0][0] - killed)
                    break
                time.sleep(0.005)
            else:
                raise RuntimeError(f"{kind}: no replacement job within 60 s")
            time.sleep(max(0.0, killed + 1.0 - time.time()))  # the next kill a second after this one
        return latencies
    finally:
        if kind == "djsupervisor":
            runner.stop()
        else:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


def stop_latency(db: DB, prefix: str, ms: float, replicas: int) -> float:
    """SIGTERM with jobs in flight -> exit, minus the in-flight jobs' remaining time (seconds)."""
    db.seed(prefix, 10000, ms)
    env = env_for(db.backend, prefix, ms)
    tmp = Path(tempfile.mkdtemp(prefix="djsbench"))
    runner = Supervisor(env, replicas, tmp)
    try:
        end = time.time() + 60
        while time.time() < end and len({r[0] for r in db.work_rows(prefix)}) < replicas:
            time.sleep(0.02)
        time.sleep(ms / 2000)  # mid-job
        term = time.time()
        runner.proc.send_signal(signal.SIGTERM)
        runner.proc.wait(120)
        exited = time.time()
        rows = db.work_rows(prefix)
        late = [r for r in rows if r[1] > term + 0.01]
        if late:
            raise RuntimeError(f"{len(late)} jobs started after SIGTERM")
        last = max(r[2] for r in rows)
        return exited - max(last, term)
    finally:
        runner.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def footprint(
    db: DB, prefix: str, children: int, sample: float, settle: float = 3, sleep: float = 1
) -> tuple[float, float, float]:
    """(seconds from launch to the supervisor's READY=1, parent CPU % while idle, parent RSS MiB).

    READY=1 is what systemd waits for (sd_notify on NOTIFY_SOCKET, here a socket of the benchmark's own):
    the supervisor sends it once every child has forked, reconnected and reported its session.
    """
    import socket

    db.seed(prefix, 0)
    env = env_for(db.backend, prefix, 0, sleep=sleep)
    tmp = Path(tempfile.mkdtemp(prefix="djsbench"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify.sock"))
    notify.settimeout(120)
    env["NOTIFY_SOCKET"] = str(tmp / "notify.sock")
    started = time.time()
    runner = Supervisor(env, children, tmp)
    try:
        while b"READY=1" not in notify.recv(4096):
            pass
        ready = time.time() - started
        time.sleep(settle)  # the children's first cycles (declarations) are start-up, not idling
        p = psutil.Process(runner.proc.pid)
        p.cpu_percent(None)
        time.sleep(sample)
        cpu = p.cpu_percent(None)
        rss = p.memory_info().rss / 2**20
        return ready, cpu, rss
    finally:
        runner.stop()
        notify.close()
        shutil.rmtree(tmp, ignore_errors=True)


def idle_queries(
    db: DB, prefix: str, workers: int, window: float, max_sleep: float | None, settle: float = 3
) -> tuple[float, float]:
    """Statements per idle worker per minute: (counted by the workers themselves, the server's counter).

    Each child counts what it sends through its DataJoint connection and logs (time, count) whenever it
    goes to sleep; its rate is taken between its first and last log line inside the window. The server's
    counter (MySQL `Questions`, PostgreSQL transactions) is server-wide: other clients add to it.
    """
    db.seed(prefix, 0)
    env = env_for(db.backend, prefix, 0, sleep=1, max_sleep=max_sleep)
    tmp = Path(tempfile.mkdtemp(prefix="djsbench"))
    counts = tmp / "counts"
    counts.mkdir()
    env["DJS_BENCH_COUNT_DIR"] = str(counts)
    runner = Supervisor(env, workers, tmp)
    try:
        runner.wait_children()
        time.sleep(settle)
        q0, t0 = db.queries(), time.time()
        time.sleep(window)
        q1, t1 = db.queries(), time.time()
        rates = []
        for path in counts.iterdir():
            samples = [tuple(map(float, line.split())) for line in path.read_text().splitlines()]
            inside = [s for s in samples if t0 - 1 <= s[0] <= t1]
            if len(inside) >= 2 and inside[-1][0] > inside[0][0]:
                rates.append((inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]) * 60)
        if len(rates) < workers:
            raise RuntimeError(f"idle load: {len(rates)} of {workers} workers logged two sleeps in the window")
        return statistics.mean(rates), (q1 - q0 - 2) / workers / (t1 - t0) * 60
    finally:
        runner.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- driver


def fmt(values: list[float], digits=1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def run_backend(
    backend: str, small: bool, rows: list[str], notes: list[str], growth: dict, only: set[int] = frozenset(range(1, 7))
) -> None:
    db = DB(backend)
    base = f"djsbench_{uuid.uuid4().hex[:8]}"
    counter = iter(range(10**6))

    def prefix() -> str:
        return f"{base}_{next(counter)}"

    rounds = 1 if small else 3
    window = 1.0 if small else 4.0
    try:
        if 1 in only:
            # 1. throughput
            replica_list = [1] if small else [1, 2, 4]
            for ms in (5,) if small else (5, 50):
                for n in replica_list:
                    keys = int(window * n * 1000 / ms * 1.5) + 200
                    res = {"plain": [], "djsupervisor": []}
                    for _ in range(rounds):
                        for kind in ("plain", "djsupervisor"):
                            p = prefix()
                            try:
                                res[kind].append(throughput(db, kind, n, ms, window, keys, p))
                            finally:
                                db.drop_prefix(p)
                    ratio = statistics.median(res["djsupervisor"]) / statistics.median(res["plain"])
                    rows.append(
                        f"| {backend} | 1. throughput, {n} replica(s), {ms} ms make (jobs/s) | "
                        f"{fmt(res['djsupervisor'])} | {fmt(res['plain'])} (plain populate loops) | "
                        f"{ratio:.3f} | ≥ 0.97: {'met' if ratio >= 0.97 else 'MISSED'} |"
                    )
        if 2 in only:
            # 2. restart latency
            sd_ok = (SUPERVISORD_VENV / "bin" / "supervisord").exists()
            res = {"djsupervisor": [], "supervisord": []}
            for _ in range(rounds if small else 4):
                for kind in ("supervisord", "djsupervisor"):
                    if kind == "supervisord" and not sd_ok:
                        continue
                    p = prefix()
                    try:
                        res[kind] += restart_latency(db, kind, p, 5, sd_ok)
                    finally:
                        db.drop_prefix(p)
            d = [v * 1000 for v in res["djsupervisor"]]
            if res["supervisord"]:
                s = [v * 1000 for v in res["supervisord"]]
                speedup = statistics.median(s) / statistics.median(d)
                rows.append(
                    f"| {backend} | 2. restart: SIGKILL of a busy child every 1 s → first job by its replacement, "
                    f"default settings (ms) | {fmt(d)} | "
                    f"{fmt(s)} (supervisord 4.3.0) | {speedup:.1f}× faster | ≥ 10×: "
                    f"{'met' if speedup >= 10 else 'MISSED'} |"
                )
            else:
                rows.append(f"| {backend} | 2. restart (ms) | {fmt(d)} | supervisord not installed | – | – |")
        if 3 in only:
            # 3. graceful stop
            res3 = []
            for _ in range(rounds if small else 3):
                p = prefix()
                try:
                    res3.append(stop_latency(db, p, 1000, 2) * 1000)
                finally:
                    db.drop_prefix(p)
            med = statistics.median(res3)
            rows.append(
                f"| {backend} | 3. graceful stop: SIGTERM → exit minus in-flight jobs' remaining time, "
                f"2 children (ms) | {fmt(res3)} | – | – | < 500 ms: {'met' if med < 500 else 'MISSED'} |"
            )
        if 4 in only:
            # 4. footprint
            for n in [4] if small else [8, 32, 64]:
                ready, cpu, rss = [], [], []
                for _ in range(1 if small or n < 64 else 2):
                    p = prefix()
                    try:
                        r, c, m = footprint(db, p, n, 2 if small else 10, settle=1 if small else 3)
                    finally:
                        db.drop_prefix(p)
                    ready.append(r * 1000), cpu.append(c), rss.append(m)
                goal = "–"
                if n == 64:
                    goal = f"< 5 s: {'met' if statistics.median(ready) < 5000 else 'MISSED'}"
                rows.append(
                    f"| {backend} | 4. footprint, {n} idle children: launch → READY=1 (ms) | {fmt(ready, 0)} "
                    f"| – | – | {goal} |"
                )
                rows.append(
                    f"| {backend} | 4. footprint, {n} idle children: parent CPU % of a core / RSS MiB | "
                    f"{fmt(cpu, 2)} / {fmt(rss, 1)} | – | – | CPU < 0.5 %: "
                    f"{'met' if statistics.median(cpu) < 0.5 else 'MISSED'} |"
                )
        if 5 in only:
            # 5. idle load
            n = 2 if small else 4
            res5 = {"fixed": [], "adaptive": []}
            server = {}
            for kind, mx in (("fixed", None), ("adaptive", 8.0)):
                p = prefix()
                try:
                    counted, server[kind] = idle_queries(db, p, n, 3 if small else 30, mx, settle=1.5 if small else 3)
                    res5[kind].append(counted)
                finally:
                    db.drop_prefix(p)
            counter_name = "Questions" if backend == "mysql" else "pg_stat_database xact_commit+rollback"
            rows.append(
                f"| {backend} | 5. idle load, {n} workers, sleep_duration 1 s (statements/worker/min, counted "
                f"by the workers) | {fmt(res5['adaptive'])} with max_sleep_duration 8 | "
                f"{fmt(res5['fixed'])} without | "
                f"{statistics.median(res5['adaptive']) / statistics.median(res5['fixed']):.2f} | – |"
            )
            notes.append(
                f"- {backend} idle load by the server's own counter ({counter_name}, server-wide, other "
                f"clients included): {server['fixed']:.0f} without, {server['adaptive']:.0f} with adaptive "
                "sleep (per worker per minute)."
            )
    finally:
        db.drop_prefix(base)
    if 6 not in only:
        return
    # 6. cost growth (in this process: every step of a real worker's cycle timed)
    import cost_growth
    from loguru import logger

    logger.remove()
    sizes = [1000, 10000] if small else [1000, 10000, 100000]
    growth_rows, growth_notes = cost_growth.run_backend(backend, sizes, rounds=1 if small else 3)
    growth.setdefault(tuple(sizes), []).extend(growth_rows)
    notes.extend(growth_notes)


def machine() -> list[str]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    from importlib.metadata import version

    return [
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
        f"- machine: {os.cpu_count()} CPUs, {model}, {platform.platform()}",
        f"- Python {platform.python_version()}, DataJoint {version('datajoint')}, "
        f"djsupervisor {version('djsupervisor')}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny version of each benchmark (CI smoke run)")
    parser.add_argument("--backend", default="both", choices=["mysql", "postgresql", "both"])
    parser.add_argument("--out", default=str(BENCH / "RESULTS.md"))
    parser.add_argument("--only", default="1,2,3,4,5,6", help="figures to run, e.g. 3,4 (default: all)")
    args = parser.parse_args()
    rows: list[str] = []
    notes: list[str] = []
    growth: dict = {}
    started = time.time()
    args.load_at_start = os.getloadavg()
    for backend in ["mysql", "postgresql"] if args.backend == "both" else [args.backend]:
        run_backend(backend, args.small, rows, notes, growth, {int(f) for f in args.only.split(",")})
        write(args, rows, notes, growth, started)


def write(args, rows, notes, growth, started) -> None:
    import cost_growth

    tables = []
    for sizes, growth_rows in growth.items():
        tables += [
            "",
            f"6. Cost growth: one worker cycle ({cost_growth.JOBS_PER_CYCLE} jobs) as pending jobs grow; "
            "median (min–max) ms and statements per step:",
            "",
            *cost_growth.header(list(sizes)),
            *growth_rows,
        ]
    text = "\n".join(
        [
            "# djsupervisor benchmark results",
            "",
            f"Command: `.venv/bin/python bench/run.py{' --small' if args.small else ''} --backend {args.backend}` "
            f"({time.time() - started:.0f} s)",
            "",
            *machine(),
            "- load average (1/5/15 min) at the start: {:.2f} / {:.2f} / {:.2f}; "
            "when written: {:.2f} / {:.2f} / {:.2f} "
            "(other engineers' tests share the machine and the servers)".format(*args.load_at_start, *os.getloadavg()),
            "",
            "Each cell: median (min–max) over the runs; A and B alternate within one invocation.",
            "",
            "| backend | figure | djsupervisor | baseline | ratio | goal |",
            "|---|---|---|---|---|---|",
            *rows,
            *tables,
            "",
            *notes,
            "",
        ]
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
