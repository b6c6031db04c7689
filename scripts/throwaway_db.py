"""Find a database server for the demo, or start a private throwaway one.

`python scripts/throwaway_db.py check` exits 0 if the server DJ_* describes accepts the login, 1 if nothing
listens there, 2 (with the reason on stderr) if something listens but the login fails.
`python scripts/throwaway_db.py start DIR` starts a throwaway MariaDB (preferred) or PostgreSQL from the
installed server binaries with its data in DIR, on a free loopback port, and prints shell `export` lines
for DJ_HOST/DJ_PORT/DJ_USER/DJ_PASS/DJ_BACKEND; exit 3 when no server binaries are installed, 4 (the reasons
on stderr) when they are but none started.
`python scripts/throwaway_db.py stop DIR` stops it. This is what pytest-mysql and pytest-postgresql do.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def settings() -> dict:
    backend = os.environ.get("DJ_BACKEND", "mysql")
    default_port = "5432" if backend == "postgresql" else "3306"
    default_user = "postgres" if backend == "postgresql" else "root"
    return dict(
        backend=backend,
        host=os.environ.get("DJ_HOST", "127.0.0.1"),
        port=int(os.environ.get("DJ_PORT", default_port)),
        user=os.environ.get("DJ_USER", default_user),
        password=os.environ.get("DJ_PASS", ""),
    )


def login_error(s: dict, timeout: float = 3) -> str | None:
    """None if a server of the configured backend accepts the configured login, else why not."""
    try:
        if s["backend"] == "postgresql":
            import psycopg2

            psycopg2.connect(
                host=s["host"],
                port=s["port"],
                user=s["user"],
                password=s["password"],
                dbname="postgres",
                connect_timeout=max(1, int(timeout)),
            ).close()
        else:
            import pymysql

            pymysql.connect(
                host=s["host"], port=s["port"], user=s["user"], password=s["password"], connect_timeout=timeout
            ).close()
        return None
    except Exception as error:
        return " ".join(str(error).split()) or type(error).__name__


def answers(s: dict, timeout: float = 3) -> bool:
    """Whether a server of the configured backend accepts the configured login."""
    return login_error(s, timeout) is None


def listens(s: dict, timeout: float = 3) -> bool:
    """Whether anything accepts TCP connections at the configured host and port."""
    try:
        socket.create_connection((s["host"], s["port"]), timeout=timeout).close()
        return True
    except OSError:
        return False


def check() -> int:
    s = settings()
    if s["backend"] not in ("mysql", "postgresql"):
        print(f"demo: DJ_BACKEND={s['backend']!r}: must be 'mysql' or 'postgresql'", file=sys.stderr)
        return 2
    error = login_error(s)
    if error is None:
        return 0
    if not listens(s):
        return 1
    print(f"demo: {s['backend']} at {s['host']}:{s['port']} as {s['user']}: {error}", file=sys.stderr)
    return 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


class StartFailed(Exception):
    """A throwaway server could not be set up; the message says why."""


def run(command: list[str], log: Path) -> None:
    """Run a setup command with its output in `log`; StartFailed with the output's tail if it fails."""
    with open(log, "a") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        program = command[command.index("--") + 1] if "--" in command else command[0]  # past runuser -u ... --
        raise StartFailed(f"{Path(program).name} failed (exit {result.returncode}):\n{tail(log)}")


def tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join("    " + line for line in log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_mariadb(directory: Path) -> dict | None:
    mariadbd = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/usr/local/sbin")
    install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    if not (mariadbd and install):
        return None
    data, port, log = directory / "mariadb", free_port(), directory / "mariadb.log"
    user = pwd.getpwuid(os.getuid()).pw_name  # mariadbd refuses to run as root unless told --user=root
    run(
        [
            install,
            "--no-defaults",
            f"--datadir={data}",
            f"--user={user}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ],
        log,
    )
    with open(log, "a") as out:
        process = subprocess.Popen(
            [
                mariadbd,
                "--no-defaults",
                f"--datadir={data}",
                f"--socket={directory / 'mariadb.sock'}",
                f"--port={port}",
                "--bind-address=127.0.0.1",
                f"--pid-file={directory / 'mariadb.pid'}",
                f"--user={user}",
                "--skip-name-resolve",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (directory / "server.pid").write_text(str(process.pid))
    s = dict(backend="mysql", host="127.0.0.1", port=port, user="root", password="")
    if not wait_for(lambda: process.poll() is not None or answers(s, 1), 60) or process.poll() is not None:
        stop_mariadb(directory)
        raise StartFailed(f"mariadbd did not start:\n{tail(log)}")
    return s


def start_postgres(directory: Path) -> dict | None:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = shutil.which("initdb") or (bins[-1] if bins else None)
    if not initdb:
        return None
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    data, port, log = directory / "postgres", free_port(), directory / "postgres.log"
    run_as: list[str] = []
    if os.getuid() == 0:  # initdb refuses to run as root
        try:
            shutil.chown(directory, "postgres")
        except LookupError:
            raise StartFailed("initdb refuses to run as root and there is no 'postgres' user to run it as")
        run_as = ["runuser", "-u", "postgres", "--"]
    log.touch()
    if run_as:
        shutil.chown(log, "postgres")
    run([*run_as, initdb, "-D", str(data), "-U", "postgres", "--auth=trust"], log)
    (directory / "pg_ctl").write_text(" ".join([*run_as, pg_ctl, "-D", str(data)]))
    run(
        [
            *run_as,
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(log),
            "-w",
            "-t",
            "60",
            "start",
            "-o",
            f"-p {port} -k {directory} -c listen_addresses=127.0.0.1",
        ],
        log,
    )
    return dict(backend="postgresql", host="127.0.0.1", port=port, user="postgres", password="")


def stop_mariadb(directory: Path) -> None:
    if not (directory / "server.pid").exists():
        return
    pid = int((directory / "server.pid").read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_for(lambda: not alive(pid), 30):
        os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop(directory: Path) -> None:
    """Stop whichever throwaway server runs in `directory` and remove it."""
    stop_mariadb(directory)
    if (directory / "pg_ctl").exists():
        subprocess.run(
            [*(directory / "pg_ctl").read_text().split(), "-m", "fast", "stop"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    command = sys.argv[1]
    if command == "check":
        sys.exit(check())
    directory = Path(sys.argv[2])
    if command == "stop":
        stop(directory)
        return
    directory.mkdir(parents=True, exist_ok=True)
    starters = [start_mariadb, start_postgres]
    if settings()["backend"] == "postgresql":
        starters.reverse()
    s, failures = None, []
    for start in starters:
        try:
            s = start(directory)
        except StartFailed as failure:
            failures.append(str(failure))
            print(f"demo: throwaway database: {failure}", file=sys.stderr)
            continue
        if s:
            break
    if s is None:
        sys.exit(4 if failures else 3)
    print(f"export DJ_BACKEND={s['backend']} DJ_HOST={s['host']} DJ_PORT={s['port']} DJ_USER={s['user']} DJ_PASS=''")


if __name__ == "__main__":
    main()
