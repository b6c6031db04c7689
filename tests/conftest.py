"""Shared fixtures: every test runs against a real server, on both backends, in its own schema prefix.

`backend` is parametrized over MariaDB/MySQL and PostgreSQL. `db` configures DataJoint's global config
and connection for that backend and yields a `TestDatabase` with a unique schema prefix; on teardown every
schema with that prefix is dropped. `db.env` gives a subprocess what it needs to reach the same server
(the DJ_* variables) and to import the test pipeline under the test's prefix (tests/ on PYTHONPATH,
DJS_TEST_PREFIX); process tests pass it to the real `djsupervisor` through the `supervise` fixture.
`accounts` makes database accounts of the test's own with the grants README's Security section documents.

Fixtures live here, not in helpers.py, so that tests use them by name without importing them.

Markers from the folder (`pytest_collection_modifyitems`): tests under tests/worker, tests/supervisor, tests/fleet
and tests/serve are marked `worker`, `supervisor`, `fleet` and `serve`; everything under tests/faults is marked
`fault`. Files that start real supervisors still set `process` themselves (`pytestmark` or per test).
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import datajoint as dj
import pytest
from helpers import TESTS, Supervised, documented_grants

BACKENDS = {
    "mysql": dict(
        host=os.environ.get("DJS_TEST_MYSQL_HOST", "127.0.0.1"),
        port=int(os.environ.get("DJS_TEST_MYSQL_PORT", "3306")),
        user=os.environ.get("DJS_TEST_MYSQL_USER", "root"),
        password=os.environ.get("DJS_TEST_MYSQL_PASSWORD", ""),
    ),
    "postgresql": dict(
        host=os.environ.get("DJS_TEST_PG_HOST", "127.0.0.1"),
        port=int(os.environ.get("DJS_TEST_PG_PORT", "5432")),
        user=os.environ.get("DJS_TEST_PG_USER", "postgres"),
        password=os.environ.get("DJS_TEST_PG_PASSWORD", ""),
    ),
}


@dataclasses.dataclass
class TestDatabase:
    """One backend, one unique schema prefix, and the means to reach it from other processes."""

    backend: str
    prefix: str
    connection: dj.Connection
    settings: dict

    def schema_name(self, suffix: str) -> str:
        """A schema name inside this test's prefix."""
        return f"{self.prefix}_{suffix}"

    @property
    def env(self) -> dict:
        """Environment for a subprocess: this process's environment plus the DJ_* settings, DJS_TEST_PREFIX
        (the schema prefix `pipelines.workers` declares its pipeline under) and tests/ first on PYTHONPATH
        (so that targets like "pipelines.supervised:standard" and scripts' `import pipelines` resolve)."""
        env = dict(os.environ)
        env.update(
            DJ_HOST=self.settings["host"],
            DJ_PORT=str(self.settings["port"]),
            DJ_USER=self.settings["user"],
            DJ_PASS=self.settings["password"],
            DJ_BACKEND=self.backend,
            DJ_USE_TLS="false",
            DJS_TEST_PREFIX=self.prefix,
            PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        )
        return env

    def schemas(self) -> list[str]:
        """Names of the schemas on the server that belong to this test."""
        return [s for s in list_schemas(self.connection) if s.startswith(self.prefix)]


def list_schemas(connection: dj.Connection) -> list[str]:
    """Every user schema on the server of `connection`."""
    if connection.adapter.backend == "postgresql":
        rows = connection.query(
            "SELECT schema_name FROM information_schema.schemata "
            "WHERE schema_name NOT IN ('pg_catalog', 'information_schema') AND schema_name NOT LIKE 'pg_%%'"
        ).fetchall()
    else:
        rows = connection.query("SHOW DATABASES").fetchall()
    return [r[0] for r in rows]


def configure_datajoint(backend: str) -> dj.Connection:
    """Point DataJoint's global config at `backend` and return a fresh global connection."""
    settings = BACKENDS[backend]
    dj.config["database.backend"] = backend
    dj.config["database.host"] = settings["host"]
    dj.config["database.port"] = settings["port"]
    dj.config["database.user"] = settings["user"]
    dj.config["database.password"] = settings["password"]
    dj.config["database.use_tls"] = False
    dj.config["safemode"] = False
    return dj.conn(reset=True)


def drop_schemas(connection: dj.Connection, prefix: str) -> None:
    """Drop every schema whose name starts with `prefix`."""
    quote = connection.adapter.quote_identifier
    for name in list_schemas(connection):
        if name.startswith(prefix):
            if connection.adapter.backend == "postgresql":
                connection.query(f"DROP SCHEMA IF EXISTS {quote(name)} CASCADE")
            else:
                connection.query(f"DROP DATABASE IF EXISTS {quote(name)}")


#: The marker each folder of tests/ gives the tests under it (the cross-cutting tests at the top level get none).
FOLDER_MARKERS = {"worker": "worker", "supervisor": "supervisor", "fleet": "fleet", "serve": "serve", "faults": "fault"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects: `-m worker` and `-m fault` see the folder's marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its folder's marker (FOLDER_MARKERS)."""
    for item in items:
        path = item.path.resolve()  # TESTS is resolved
        if path.is_relative_to(TESTS):
            marker = FOLDER_MARKERS.get(path.relative_to(TESTS).parts[0])
            if marker is not None:
                item.add_marker(marker)


@pytest.fixture(params=["mysql", "postgresql"])
def backend(request) -> str:
    """The database backend under test (both, parametrized)."""
    return request.param


@pytest.fixture
def db(backend: str) -> Iterator[TestDatabase]:
    """A configured DataJoint connection and a schema prefix of this test's own, dropped afterwards."""
    connection = configure_datajoint(backend)
    prefix = f"djst_{uuid.uuid4().hex[:10]}"
    database = TestDatabase(backend, prefix, connection, BACKENDS[backend])
    yield database
    connection = configure_datajoint(backend)
    drop_schemas(connection, prefix)
    connection.close()


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path_factory, monkeypatch):
    """Each test's supervisors keep their default control sockets in a directory of the test's own, so that
    tests (and concurrent test runs) never find each other's supervisors."""
    directory = tmp_path_factory.mktemp("run")
    monkeypatch.setenv("DJSUPERVISOR_RUNTIME_DIR", str(directory))
    return directory


@pytest.fixture
def supervise(db: TestDatabase, tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    """Start the real `djsupervisor start ARGS...` for this test's database; everything is killed afterwards.

    Usage: ``sup = supervise(["-c", str(config)])``. The test pipelines see the test's prefix through
    DJS_TEST_PREFIX (in `db.env`). ``supervise(args, uts_host="node-b")`` runs it under that host name (its
    own UTS namespace), so that DataJoint's job reservations name that host, as on another machine;
    ``env=account.env`` runs it with another environment (another database account, `accounts`);
    ``nofile=40`` starts it under that RLIMIT_NOFILE (``ulimit -n 40``).
    """
    started: list[Supervised] = []

    def start(
        args: list[str], uts_host: str | None = None, env: dict | None = None, nofile: int | None = None
    ) -> Supervised:
        supervised = Supervised(args, env or db.env, tmp_path, uts_host, nofile)
        started.append(supervised)
        return supervised

    yield start
    for supervised in started:
        supervised.close()


@dataclasses.dataclass
class Account:
    """A database account of the test's own, with the grants README documents for its role."""

    role: str
    user: str
    password: str
    current_user: str  # as the database names it (CURRENT_USER)
    env: dict  # db.env logged in as this account


@pytest.fixture
def accounts(db: TestDatabase) -> Iterator[Callable[[str], Account]]:
    """Make accounts with exactly the grants README's Security section gives a worker or an operator, on
    the test's ``<prefix>_pipe`` and ``<prefix>_workers`` schemas: ``worker = accounts("worker")``, once
    those schemas are declared (PostgreSQL's ``ON ALL TABLES`` covers the tables there are). Every account
    is dropped afterwards. Ask for it before `supervise`, so that the supervisors are gone first."""
    made: list[str] = []
    mysql = db.backend == "mysql"

    def make(role: str) -> Account:
        user, password = f"{db.prefix}_{role[0]}", uuid.uuid4().hex
        names = {"djs_" + role: user, "'change-me'": f"'{password}'"}
        if mysql:
            escaped = db.prefix.replace("_", "\\_")
            names.update({"lab\\_pipe": escaped + "\\_pipe", "lab\\_workers": escaped + "\\_workers"})
        names.update({"lab_pipe": db.schema_name("pipe"), "lab_workers": db.schema_name("workers")})
        made.append(user)
        for statement in documented_grants(role, db.backend):
            for old, new in names.items():
                statement = statement.replace(old, new)
            db.connection.query(statement.replace("%", "%%"))
        current = f"{user}@%" if mysql else user
        return Account(role, user, password, current, dict(db.env, DJ_USER=user, DJ_PASS=password))

    yield make
    connection = configure_datajoint(db.backend)
    for user in made:
        if mysql:
            connection.query(f"DROP USER IF EXISTS '{user}'@'%%'")
        else:
            connection.query(f"DROP OWNED BY {user}")
            connection.query(f"DROP ROLE IF EXISTS {user}")
