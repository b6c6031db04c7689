"""``djsupervisor demo``: find a database for the example pipeline, or start the embedded PostgreSQL, and run
the demo (`djsupervisor.example.demo`) against it.

The database is the one DataJoint's ``DJ_*`` variables name (default: MySQL/MariaDB on 127.0.0.1:3306 as root
with no password; ``DJ_BACKEND=postgresql``: port 5432 as postgres). If it accepts the login, the demo uses it.
If nothing listens there, the demo starts a private PostgreSQL from the ``embedded`` extra
(`djsupervisor.embedded.EmbeddedPostgres`), says so, and stops and removes it when it ends — Ctrl+C, SIGTERM
and SIGHUP included. If something listens but refuses the login, that is the user's to fix: exit 2.

Exit status: the demo's own (0: every session analysed), 1 when nothing listens and the embedded PostgreSQL is
not installed or does not start, 2 for a login refused, 130 after Ctrl+C.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

#: How long a demo interrupted by Ctrl+C gets to stop its supervisor gracefully before it is killed.
INTERRUPT_GRACE_SECONDS = 90


def settings(env: dict[str, str]) -> dict:
    backend = env.get("DJ_BACKEND", "mysql")
    postgres = backend == "postgresql"
    return dict(
        backend=backend,
        host=env.get("DJ_HOST", "127.0.0.1"),
        port=int(env.get("DJ_PORT") or (5432 if postgres else 3306)),
        user=env.get("DJ_USER") or ("postgres" if postgres else "root"),
        password=env.get("DJ_PASS", ""),
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


def listens(s: dict, timeout: float = 3) -> bool:
    """Whether anything accepts TCP connections at the configured host and port."""
    try:
        socket.create_connection((s["host"], s["port"]), timeout=timeout).close()
        return True
    except OSError:
        return False


def say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def run_demo(env: dict[str, str]) -> int:
    """`djsupervisor.example.demo` in a child process with `env`; after Ctrl+C (which the child gets too,
    from the terminal) it gets time to stop its supervisor gracefully; on any other way out it is stopped."""
    child = subprocess.Popen([sys.executable, "-m", "djsupervisor.example.demo"], env=env)
    try:
        return child.wait()
    except KeyboardInterrupt:
        try:
            child.wait(INTERRUPT_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        return 130
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(INTERRUPT_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def main(env: dict[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    env.setdefault("DJ_USE_TLS", "false")
    s = settings(env)
    if s["backend"] not in ("mysql", "postgresql"):
        say(f"DJ_BACKEND={s['backend']!r}: must be 'mysql' or 'postgresql'")
        return 2
    error = login_error(s)
    if error is None:
        say(f"using {s['backend']} at {s['host']}:{s['port']} as {s['user']}")
        return run_demo(env)
    where = f"{s['backend']} at {s['host']}:{s['port']} as {s['user']}"
    if listens(s):
        say(f"{where}: {error}")
        say("set DJ_HOST, DJ_PORT, DJ_USER, DJ_PASS, DJ_BACKEND (mysql or postgresql) to a database login that works")
        return 2
    from djsupervisor import embedded

    if not embedded.available():
        say(f"no database answers ({where}) and the embedded PostgreSQL is not installed:")
        say("  pip install 'djsupervisor[embedded]'   (Linux x86_64/aarch64, macOS arm64), or start MySQL 8 with")
        say("  docker compose -f examples/docker-compose.yml up -d   and run with DJ_PASS=simple")
        return 1
    try:
        with embedded.EmbeddedPostgres() as server:
            say(
                f"no database answered ({where}); started the embedded PostgreSQL on 127.0.0.1:{server.port} "
                f"in {server.directory} (removed at exit)"
            )
            return run_demo({**env, **server.env})
    except embedded.EmbeddedPostgresError as failure:
        say(f"no database answers ({where}) and the embedded PostgreSQL did not start: {failure}")
        return 1
    except KeyboardInterrupt:
        return 130
