"""Find a database server for the demo, or start a private throwaway one.

`python scripts/throwaway_db.py check` exits 0 if the server DJ_* describes answers.
`python scripts/throwaway_db.py start DIR` starts a throwaway MariaDB (preferred) or PostgreSQL from the
installed server binaries with its data in DIR, on a free loopback port, and prints shell `export` lines
for DJ_HOST/DJ_PORT/DJ_USER/DJ_PASS/DJ_BACKEND; exit 3 when no server binaries are installed.
`python scripts/throwaway_db.py stop DIR` stops it. This is what pytest-mysql and pytest-postgresql do.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def settings() -> dict:
    backend = os.environ.get("DJ_BACKEND", "mysql")
    default_port = "5432" if backend == "postgresql" else "3306"
    default_user = "postgres" if backend == "postgresql" else "root"
    return dict(backend=backend, host=os.environ.get("DJ_HOST", "127.0.0.1"),
                port=int(os.environ.get("DJ_PORT", default_port)), user=os.environ.get("DJ_USER", default_user),
                password=os.environ.get("DJ_PASS", ""))  # fmt: skip


def answers(s: dict, timeout: float = 3) -> bool:
    """Whether a server of the configured backend accepts the configured login."""
    try:
        if s["backend"] == "postgresql":
            import psycopg2

            psycopg2.connect(host=s["host"], port=s["port"], user=s["user"], password=s["password"],
                             dbname="postgres", connect_timeout=int(timeout)).close()  # fmt: skip
        else:
            import pymysql

            pymysql.connect(host=s["host"], port=s["port"], user=s["user"], password=s["password"],
                            connect_timeout=timeout).close()  # fmt: skip
        return True
    except Exception:
        return False


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


def start_mariadb(directory: Path) -> dict | None:
    mariadbd = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/usr/local/sbin")
    install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    if not (mariadbd and install):
        return None
    data, port = directory / "mariadb", free_port()
    user = pwd.getpwuid(os.getuid()).pw_name
    subprocess.run([install, "--no-defaults", f"--datadir={data}", f"--user={user}",
                    "--auth-root-authentication-method=normal", "--skip-test-db"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    log = open(directory / "mariadb.log", "w")
    process = subprocess.Popen(
        [mariadbd, "--no-defaults", f"--datadir={data}", f"--socket={directory / 'mariadb.sock'}",
         f"--port={port}", "--bind-address=127.0.0.1", f"--pid-file={directory / 'mariadb.pid'}",
         f"--user={user}", "--skip-name-resolve"],
        stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    (directory / "server.pid").write_text(str(process.pid))
    s = dict(backend="mysql", host="127.0.0.1", port=port, user="root", password="")
    if not wait_for(lambda: answers(s, 1), 60):
        raise SystemExit(f"throwaway MariaDB did not start; see {directory / 'mariadb.log'}")
    return s


def start_postgres(directory: Path) -> dict | None:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = shutil.which("initdb") or (bins[-1] if bins else None)
    if not initdb:
        return None
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    data, port = directory / "postgres", free_port()
    run_as: list[str] = []
    if os.getuid() == 0:  # initdb refuses to run as root
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(directory, "postgres")
    subprocess.run([*run_as, initdb, "-D", str(data), "-U", "postgres", "--auth=trust"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-l", str(directory / "postgres.log"), "-w", "start",
                    "-o", f"-p {port} -k {directory} -c listen_addresses=127.0.0.1"],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    (directory / "pg_ctl").write_text(" ".join([*run_as, pg_ctl, "-D", str(data)]))
    return dict(backend="postgresql", host="127.0.0.1", port=port, user="postgres", password="")


def stop(directory: Path) -> None:
    if (directory / "server.pid").exists():
        pid = int((directory / "server.pid").read_text())
        try:
            os.kill(pid, 15)
            wait_for(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", 30)
        except ProcessLookupError:
            pass
    if (directory / "pg_ctl").exists():
        subprocess.run([*(directory / "pg_ctl").read_text().split(), "-m", "fast", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    command = sys.argv[1]
    if command == "check":
        sys.exit(0 if answers(settings()) else 1)
    directory = Path(sys.argv[2])
    if command == "stop":
        stop(directory)
        return
    directory.mkdir(parents=True, exist_ok=True)
    starters = [start_mariadb, start_postgres]
    if settings()["backend"] == "postgresql":
        starters.reverse()
    s = next((found for found in (start(directory) for start in starters) if found), None)
    if s is None:
        sys.exit(3)
    print(f"export DJ_BACKEND={s['backend']} DJ_HOST={s['host']} DJ_PORT={s['port']} DJ_USER={s['user']} DJ_PASS=''")


if __name__ == "__main__":
    main()
