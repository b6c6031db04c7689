"""The example pipeline, its demo and the demo's throwaway database, on both backends.

In process: the example pipeline imported under this test's schema prefix, seeded, and worked by its
`standard` and `analysis` workers until they go idle computes every key exactly once. Under the supervisor:
`djsupervisor.example.demo` (what `djsupervisor demo` runs once a database answers) ends with every session
analysed.
The throwaway server: `scripts/throwaway_db.py` starts a private MariaDB and PostgreSQL from the installed
binaries, and stops and removes them.
"""

from __future__ import annotations

import collections
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THROWAWAY = ROOT / "scripts" / "throwaway_db.py"


def forget_example_modules() -> None:
    """Drop the example pipeline's modules, so the next import declares its tables under the current prefix."""
    for name in [
        n for n in sys.modules if n == "djsupervisor.example.pipeline" or n.startswith("djsupervisor.example.pipeline.")
    ]:
        del sys.modules[name]


@pytest.fixture
def example(db, monkeypatch):
    """The example pipeline and its workers, imported in this process under the test's schema prefix."""
    monkeypatch.setenv("DJS_EXAMPLE_PREFIX", db.prefix)
    monkeypatch.setenv("DJS_EXAMPLE_SLOW_SECONDS", "0.05")
    monkeypatch.setenv("DJS_EXAMPLE_SLEEP_SECONDS", "0.05")
    monkeypatch.syspath_prepend(str(ROOT))
    forget_example_modules()
    try:
        pipeline = importlib.import_module("djsupervisor.example.pipeline")
        workers = importlib.import_module("djsupervisor.example.pipeline.workers")
        yield pipeline, workers
    finally:
        forget_example_modules()


def key_of(key: dict) -> tuple:
    return key["subject_id"], key["session_id"]


@pytest.mark.timeout(120)
def test_example_workers_compute_every_key_exactly_once_in_process(db, example):
    pipeline, workers = example
    assert pipeline.schema.database == f"{db.prefix}_pipeline"
    sessions = pipeline.seed()
    assert sessions == 12 and pipeline.seed() == 12  # seeding again adds nothing
    finished = collections.Counter()  # (table, key) -> jobs completed
    failed = []

    def count(event):
        if event.kind == "job_end" and event.ok:
            finished[event.table, key_of(event.key)] += 1
        elif event.kind == "job_end":
            failed.append((event.table, key_of(event.key)))

    for definition in (workers.standard, workers.analysis):
        worker = definition.configure(max_idled_cycle=1, sleep_duration=0.05, max_sleep_duration=None)
        worker.add_listener(count)
        started = time.monotonic()
        worker.run()  # ends after two consecutive idle cycles
        assert time.monotonic() - started < 60
        assert worker.jobs_failed == 0

    assert failed == []
    assert set(finished.values()) == {1}, "a key was computed more than once"
    keys = {key_of(k) for k in pipeline.Session.keys()}
    for table in (pipeline.Recording, pipeline.Spikes, pipeline.Summary):
        assert {k for t, k in finished if t == table.full_table_name} == keys, table.__name__
        assert {key_of(k) for k in table.keys()} == keys, table.__name__
        progress = table.jobs.progress()
        assert progress["pending"] == progress["reserved"] == progress["error"] == 0, (table.__name__, progress)
    assert len(pipeline.Spikes.Channel()) == sessions * pipeline.tables.CHANNELS
    assert len(finished) == 3 * sessions

    # worked again, the pipeline has nothing left to do
    for definition in (workers.standard, workers.analysis):
        summary = definition.configure(sleep_duration=0.05, max_sleep_duration=None).run_once()
        assert summary.idle and summary.jobs_done == 0 and summary.jobs_failed == 0


@pytest.mark.timeout(180)
def test_demo_works_the_example_pipeline_under_the_supervisor(db, tmp_path):
    env = dict(
        db.env,
        DJS_EXAMPLE_PREFIX=db.prefix,
        DJS_EXAMPLE_SLOW_SECONDS="0.05",
        PYTHONPATH=str(ROOT),
        DJS_DEMO_LOG=str(tmp_path / "supervisor.log"),
        DJSUPERVISOR_RUNTIME_DIR=str(tmp_path / "run"),
    )
    result = subprocess.run(
        [sys.executable, "-m", "djsupervisor.example.demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every session analysed" in result.stdout
    assert "the supervisor exited with status 0" in result.stdout
    assert "WORKER    SLOT  PID" in result.stdout  # djsupervisor status was shown
    connection = db.connection
    q = connection.adapter.quote_identifier
    schema = q(f"{db.prefix}_pipeline")
    counts = {}
    for table in ("session", "_recording", "__spikes", "__spikes__channel", "__summary"):
        counts[table] = connection.query(f"SELECT COUNT(*) FROM {schema}.{q(table)}").fetchone()[0]
    assert counts == {"session": 12, "_recording": 12, "__spikes": 12, "__spikes__channel": 48, "__summary": 12}
    for job_table in ("~~recording", "~~spikes", "~~summary"):
        assert connection.query(f"SELECT COUNT(*) FROM {schema}.{q(job_table)}").fetchone()[0] == 0


@pytest.mark.timeout(120)
def test_the_example_config_finds_its_targets_from_anywhere(db):
    """examples/djsupervisor.toml's targets ship in the package: checked from / with no PYTHONPATH, as systemd
    would run it (the demo broke once when the working directory stopped counting)."""
    env = {k: v for k, v in db.env.items() if k != "PYTHONPATH"}
    env["DJS_EXAMPLE_PREFIX"] = db.prefix
    djsupervisor = str(Path(sys.executable).with_name("djsupervisor"))
    result = subprocess.run(
        [djsupervisor, "check", "-c", str(ROOT / "examples" / "djsupervisor.toml")],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "standard" in result.stdout and "analysis" in result.stdout, result.stdout


def throwaway(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(THROWAWAY), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def server_binaries(backend: str) -> bool:
    if backend == "mysql":
        return bool(shutil.which("mariadbd", path="/usr/sbin:/usr/local/sbin:" + os.environ["PATH"]))
    return bool(shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb")))


@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend_name", ["mysql", "postgresql"])
def test_throwaway_database_starts_answers_and_is_removed(backend_name):
    if not server_binaries(backend_name):
        pytest.skip(f"no {backend_name} server binaries installed")
    # as ./scripts/demo does: in the system's temp dir (PostgreSQL runs as user postgres when we are root,
    # and pytest's own tmp_path is private to root)
    directory = Path(tempfile.mkdtemp(prefix="djs-test-db."))
    env = dict(os.environ, DJ_BACKEND=backend_name)
    started = throwaway("start", str(directory), env=env)
    try:
        assert started.returncode == 0, started.stderr
        exports = dict(item.split("=", 1) for item in started.stdout.split()[1:])
        assert exports["DJ_BACKEND"] == backend_name and exports["DJ_HOST"] == "127.0.0.1"
        reach = dict(os.environ, **{k: v.strip("'") for k, v in exports.items()})
        assert throwaway("check", env=reach).returncode == 0
        server = dict(reach, DJ_USER="djs_nobody", DJ_PASS="wrong")
        refused = throwaway("check", env=server)
        assert refused.returncode == 2, refused.stderr  # it listens, but refuses that login
        assert "djs_nobody" in refused.stderr
    finally:
        throwaway("stop", str(directory))
    assert not directory.exists()
    if started.returncode == 0:
        assert throwaway("check", env=reach).returncode == 1  # nothing listens there any more


@pytest.mark.timeout(30)
def test_throwaway_check_tells_nothing_listening_from_a_refused_login():
    import socket

    with socket.socket() as sock:  # a port nobody listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        nothing = throwaway("check", env=dict(os.environ, DJ_BACKEND="mysql", DJ_HOST="127.0.0.1", DJ_PORT=str(port)))
    assert nothing.returncode == 1 and nothing.stderr == ""
    bad_backend = throwaway("check", env=dict(os.environ, DJ_BACKEND="postgres"))
    assert bad_backend.returncode == 2 and "must be 'mysql' or 'postgresql'" in bad_backend.stderr


def server_pid(directory: Path, backend: str) -> int:
    """The throwaway server's main process."""
    if backend == "mysql":
        return int((directory / "server.pid").read_text())
    return int((directory / "postgres" / "data" / "postmaster.pid").read_text().split()[0])


def connect(backend: str, password: str, **where):
    """A DB-API connection to the throwaway server as its superuser."""
    if backend == "mysql":
        import pymysql

        return pymysql.connect(user="root", password=password, connect_timeout=5, **where)
    import psycopg2

    return psycopg2.connect(user="postgres", password=password, dbname="postgres", connect_timeout=5, **where)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend_name", ["mysql", "postgresql"])
def test_throwaway_database_is_no_gift_to_other_local_users(backend_name, tmp_path):
    """Issue 18: the demo's server ran as root with a passwordless root (MariaDB: no secure_file_priv, so
    any local user wrote root-owned files anywhere with INTO OUTFILE; PostgreSQL: trust over TCP)."""
    if not server_binaries(backend_name):
        pytest.skip(f"no {backend_name} server binaries installed")
    directory = Path(tempfile.mkdtemp(prefix="djs-test-db."))
    started = throwaway("start", str(directory), env=dict(os.environ, DJ_BACKEND=backend_name))
    try:
        assert started.returncode == 0, started.stderr
        exports = dict(item.split("=", 1) for item in started.stdout.split()[1:])
        password, port = exports["DJ_PASS"], int(exports["DJ_PORT"])
        assert len(password) >= 24
        assert (directory / "demo.env").read_text().split() == started.stdout.split()
        assert (directory / "demo.env").stat().st_mode & 0o777 == 0o600
        assert directory.stat().st_mode & 0o007 == 0  # others cannot even pass through
        assert not list(directory.rglob("init.sql")) and not list(directory.rglob("password"))
        # no password, no login: over TCP or over the Unix socket
        tcp = dict(os.environ, DJ_BACKEND=backend_name, DJ_HOST="127.0.0.1", DJ_PORT=str(port))
        refused = throwaway("check", env=dict(tcp, DJ_PASS=""))
        assert refused.returncode == 2, refused.stderr
        socket_dir = directory / ("mariadb" if backend_name == "mysql" else "postgres")
        local = (
            dict(unix_socket=str(socket_dir / "mariadb.sock"))
            if backend_name == "mysql"
            else dict(host=str(socket_dir), port=port)
        )
        for where in (dict(host="127.0.0.1", port=port), local):
            with pytest.raises(Exception, match="(?i)denied|password"):
                connect(backend_name, "", **where).close()
        # run as root, the server is not root
        if os.getuid() == 0:
            import psutil

            assert psutil.Process(server_pid(directory, backend_name)).uids().real != 0
        # with the password, the server still writes no file outside its own directories
        target = tmp_path / "root-only"
        target.mkdir(mode=0o700)
        outfile = target / "planted"
        connection = connect(backend_name, password, host="127.0.0.1", port=port)
        try:
            cursor = connection.cursor()
            statement = (
                f"SELECT 'owned' INTO OUTFILE '{outfile}'"
                if backend_name == "mysql"
                else f"COPY (SELECT 'owned') TO '{outfile}'"
            )
            if backend_name == "mysql" or os.getuid() == 0:  # (an unprivileged PostgreSQL runs as ourselves)
                with pytest.raises(Exception, match="(?i)secure-file-priv|permission denied"):
                    cursor.execute(statement)
            if backend_name == "mysql":
                cursor.execute("SELECT LOAD_FILE('/etc/passwd')")
                assert cursor.fetchone()[0] is None
        finally:
            connection.close()
        assert not outfile.exists()
    finally:
        throwaway("stop", str(directory))
    assert not directory.exists()


def test_the_repository_config_is_the_one_the_package_ships():
    """examples/djsupervisor.toml is what a checkout's README commands use; the wheel carries the same file
    (`python -m djsupervisor.example` prints its path)."""
    from djsupervisor.example import CONFIG

    assert (ROOT / "examples" / "djsupervisor.toml").read_text() == CONFIG.read_text()
