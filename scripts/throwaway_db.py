"""Find a database server for the demo, or start a private throwaway one.

`python scripts/throwaway_db.py check` exits 0 if the server DJ_* describes accepts the login, 1 if nothing
listens there, 2 (with the reason on stderr) if something listens but the login fails.
`python scripts/throwaway_db.py start DIR` starts a throwaway MariaDB (preferred) or PostgreSQL from the
installed server binaries with its data in DIR, on a free loopback port, and prints shell `export` lines
for DJ_HOST/DJ_PORT/DJ_USER/DJ_PASS/DJ_BACKEND (also written to DIR/demo.env, mode 0600); exit 3 when no
server binaries are installed, 4 (the reasons on stderr) when they are but none started.
`python scripts/throwaway_db.py stop DIR` stops it. This is what pytest-mysql and pytest-postgresql do.

The server is no gift to other local users (issue 18: it used to run MariaDB as root with a passwordless
root account and no `secure_file_priv`, so anyone on the host could write root-owned files anywhere with
``SELECT ... INTO OUTFILE``; PostgreSQL trusted every TCP login). Now: DIR is the caller's private (0700)
directory and the server's files sit in a 0700 directory of the server user's inside it; the superuser has a
random password (`secrets.token_urlsafe`), on TCP and the Unix socket alike; MariaDB's `secure_file_priv`
is an empty directory of its own, so ``INTO OUTFILE`` and ``LOAD_FILE`` reach nothing else; and run as
root, the server runs as an unprivileged user: ``mysql`` (else ``nobody``) for MariaDB, ``postgres`` for
PostgreSQL (initdb refuses root).
"""

from __future__ import annotations

import glob
import grp
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from djsupervisor.example.command import login_error  # the same login check as `djsupervisor demo`


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


def server_directory(directory: Path, name: str, candidates: tuple[str, ...]) -> tuple[Path, str]:
    """DIR/`name`, mode 0700, owned by the user the server runs as: ourselves, or as root the first of
    `candidates` that exists (DIR then admits that user's group to pass through it, mode 0710)."""
    server = directory / name
    server.mkdir(mode=0o700)
    if os.getuid() != 0:
        return server, pwd.getpwuid(os.getuid()).pw_name
    for user in candidates:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            continue
        if entry.pw_uid == 0:
            continue
        os.chown(server, entry.pw_uid, entry.pw_gid)
        os.chown(directory, 0, entry.pw_gid)
        os.chmod(directory, 0o710)
        return server, user
    raise StartFailed(f"running as root and none of the users {', '.join(candidates)} exists to run the server as")


def private_file(path: Path, text: str, owner: str | None = None) -> None:
    """Write `text` to a new file only its owner (we, or `owner`) can read."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text)
    if owner and os.getuid() == 0:
        shutil.chown(path, owner, grp.getgrgid(pwd.getpwnam(owner).pw_gid).gr_name)


def start_mariadb(directory: Path) -> dict | None:
    mariadbd = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/usr/local/sbin")
    install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    if not (mariadbd and install):
        return None
    server, user = server_directory(directory, "mariadb", ("mysql", "nobody"))
    data, files, port, log = server / "data", server / "files", free_port(), directory / "mariadb.log"
    files.mkdir(mode=0o700)
    if os.getuid() == 0:
        shutil.chown(files, user)
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
    # mariadb-install-db makes root@localhost, @127.0.0.1, @::1 and @<host name>, all without a password.
    # The init file gives each the random one before the server accepts a connection, and is then removed.
    password = secrets.token_urlsafe(24)
    hosts = ("localhost", "127.0.0.1", "::1", socket.gethostname())
    init = server / "init.sql"
    private_file(init, "".join(f"ALTER USER IF EXISTS 'root'@'{h}' IDENTIFIED BY '{password}';\n" for h in hosts), user)
    with open(log, "a") as out:
        process = subprocess.Popen(
            [
                mariadbd,
                "--no-defaults",
                f"--datadir={data}",
                f"--socket={server / 'mariadb.sock'}",
                f"--port={port}",
                "--bind-address=127.0.0.1",
                f"--pid-file={server / 'mariadb.pid'}",
                f"--user={user}",
                f"--init-file={init}",
                f"--secure-file-priv={files}",
                "--skip-name-resolve",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (directory / "server.pid").write_text(str(process.pid))
    s = dict(backend="mysql", host="127.0.0.1", port=port, user="root", password=password)
    started = wait_for(lambda: process.poll() is not None or answers(s, 1), 60) and process.poll() is None
    init.unlink(missing_ok=True)
    if not started:
        stop_mariadb(directory)
        raise StartFailed(f"mariadbd did not start:\n{tail(log)}")
    return s


def start_postgres(directory: Path) -> dict | None:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = shutil.which("initdb") or (bins[-1] if bins else None)
    if not initdb:
        return None
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    server, user = server_directory(directory, "postgres", ("postgres",))
    data, port, log = server / "data", free_port(), server / "postgres.log"
    run_as = ["runuser", "-u", user, "--"] if os.getuid() == 0 else []  # initdb refuses to run as root
    password = secrets.token_urlsafe(24)
    pwfile = server / "password"
    private_file(pwfile, password + "\n", user if run_as else None)
    try:
        run(
            [
                *run_as,
                initdb,
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=scram-sha-256",  # TCP and the Unix socket alike: no trust
                f"--pwfile={pwfile}",
            ],
            directory / "initdb.log",
        )
    finally:
        pwfile.unlink(missing_ok=True)
    (directory / "pg_ctl").write_text(" ".join([*run_as, pg_ctl, "-D", str(data)]))
    try:
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
                f"-p {port} -k {server} -c listen_addresses=127.0.0.1",
            ],
            directory / "initdb.log",
        )
    except StartFailed as failure:
        raise StartFailed(f"{failure}\n{tail(log)}") from None
    return dict(backend="postgresql", host="127.0.0.1", port=port, user="postgres", password=password)


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
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if directory.stat().st_uid != os.getuid() or directory.stat().st_mode & 0o077:
        print(f"demo: throwaway database: {directory} must be ours and private (mode 0700)", file=sys.stderr)
        sys.exit(4)
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
    exports = " ".join(
        f"{name}={shlex.quote(str(s[key]))}"
        for name, key in (
            ("DJ_BACKEND", "backend"),
            ("DJ_HOST", "host"),
            ("DJ_PORT", "port"),
            ("DJ_USER", "user"),
            ("DJ_PASS", "password"),
        )
    )
    private_file(directory / "demo.env", f"export {exports}\n")
    print(f"export {exports}")  # to the caller's pipe, never on a command line


if __name__ == "__main__":
    main()
