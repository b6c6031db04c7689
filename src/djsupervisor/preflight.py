"""What the command line checks before it imports a worker target: DataJoint's settings and the database login.

A lab's worker module imports DataJoint and usually connects when imported, so a bad ``DJ_*`` variable or a
refused login used to surface as a failure *of the target* (``cannot import 'lab_workers': OperationalError:
(1045, ...)``) or as pydantic's 30-line traceback. Here each gets one line naming the real cause:

- `import_datajoint` turns DataJoint's settings validation error into `SettingsError` naming the variable,
  the value and what is accepted (``DJ_BACKEND: 'postgres' is not accepted (accepted: 'mysql' or
  'postgresql')``);
- `check_database` opens one session with the settings the targets will use, closes it at once, and turns a
  refusal into `DatabaseError`: ``database: cannot connect as USER@HOST:PORT (backend): REASON; set ...``.

Nothing here runs at import: the parent's entry points import this module without loading DataJoint.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: What each of pydantic's error types accepts, in the user's words.
_ACCEPTED = {
    "int_parsing": "a whole number",
    "int_type": "a whole number",
    "float_parsing": "a number",
    "bool_parsing": "true or false (also 1/0, yes/no, on/off)",
    "bool_type": "true or false (also 1/0, yes/no, on/off)",
}


class SettingsError(Exception):
    """A DataJoint setting (a DJ_* variable or datajoint.json) that DataJoint refuses; one line."""


class DatabaseError(Exception):
    """The database refused the login or did not answer; one line naming account, server and reason."""


def describe_settings_error(error: Any) -> str:
    """One line per refused setting of a pydantic ValidationError, joined by ``; ``."""
    problems = []
    for item in error.errors():
        name = ".".join(str(part) for part in item.get("loc", ())) or "datajoint settings"
        if item.get("type") == "literal_error" and "expected" in item.get("ctx", {}):
            accepted = item["ctx"]["expected"]
        else:
            accepted = _ACCEPTED.get(item.get("type", ""), "")
        value = item.get("input")
        text = f"{name}: {value!r} is not accepted" if isinstance(value, str | int | float) else f"{name}: invalid"
        problems.append(f"{text} (accepted: {accepted})" if accepted else f"{text}: {item.get('msg', '')}")
    return "; ".join(problems) or " ".join(str(error).split())


def import_datajoint():
    """``import datajoint``, with a refused DJ_* setting raised as SettingsError (one line)."""
    try:
        import datajoint
    except ImportError:
        raise
    except Exception as error:  # pydantic's ValidationError, raised while DataJoint reads its settings
        if hasattr(error, "errors") and callable(error.errors):
            raise SettingsError(f"DataJoint setting refused: {describe_settings_error(error)}") from None
        raise
    return datajoint


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


@contextlib.contextmanager
def quiet_datajoint():
    """DataJoint's own warnings stay unsaid in the block (the TLS fallback repeats a refusal's reason).

    A filter, not the logger's level: DataJoint sets that level again whenever its config is assigned to."""
    datajoint_logger = logging.getLogger("datajoint")
    datajoint_logger.addFilter(_errors_only)
    try:
        yield
    finally:
        datajoint_logger.removeFilter(_errors_only)


def _hint(reason: str, where: str) -> str:
    login = ("access denied", "password authentication failed", 'role "', "no password supplied")
    if any(word in reason.lower() for word in login):
        return f"set the user and password ([database] user/password in {where}, or DJ_USER/DJ_PASS)"
    return (
        f"set the server ([database] host/port/backend in {where}, or DJ_HOST/DJ_PORT/DJ_BACKEND)"
        " and check that it runs"
    )


def check_database(source: str | None = None) -> str:
    """Open and close one session with DataJoint's current settings; ``backend at host:port as user``.

    Raises DatabaseError (one line) when the server refuses the login or does not answer. `source` is the
    config file, named in the hint."""
    dj = import_datajoint()
    config = dj.config
    host, user, password = config["database.host"], config["database.user"], config["database.password"]
    port, backend = config["database.port"], config["database.backend"]
    where = source or "the config file"
    if ":" in str(host) and not str(host).startswith("["):
        host, _, port_text = str(host).rpartition(":")
        port = int(port_text) if port_text.isdigit() else port
    account = f"{user}@{host}:{port} ({backend})"
    if not user:
        raise DatabaseError(f"database: no user given: set [database] user in {where}, or DJ_USER")
    try:
        with quiet_datajoint():
            connection = dj.Connection(host, user, password or "", port, config["database.use_tls"])
    except Exception as error:
        reason = " ".join(f"{error.__class__.__name__}: {error}".split())
        raise DatabaseError(f"database: cannot connect as {account}: {reason}; {_hint(reason, where)}") from None
    try:
        return f"{backend} at {host}:{port} as {user}"
    finally:
        with contextlib.suppress(Exception):
            connection.close()


def login_first(source: str | None, load: Callable[[], T]) -> T:
    """`load()` (which imports the worker targets), with the database login checked before it.

    A refused login is raised as DatabaseError, never as the failure of a target that connects when
    imported. A lab's module may set the credentials in ``dj.config`` when imported, though: so when the
    login is refused before, the targets are imported all the same and the login checked again with what
    they set; only if it is still refused (or the import failed) is the refusal raised."""
    try:
        check_database(source)
    except DatabaseError as error:
        refused = error
    else:
        return load()
    try:
        with quiet_datajoint():  # its TLS fallback warning would only repeat the refusal
            loaded = load()
    except Exception:
        raise refused from None
    check_database(source)  # with whatever the targets set; raises DatabaseError if still refused
    return loaded
