"""Every use of DataJoint's internals, in one place, and the check that the installed DataJoint is one they fit.

djsupervisor needs a few things DataJoint does not offer as API: the driver connection under a
`Connection` (to abandon a forked child's copy without a byte on the parent's socket, and to read the
server's id of the session in use), the transaction flag a lost connection leaves set, a hook on every
(re)connect, the job table's `reserve`/`complete`/`error` calls, its refresh and its fetch of pending keys
during ``populate()``, the blob decoder for error stacks, the global connection, the SQL adapter, and the
naming and columns of job tables. Each is one function or constant here, so that a new DataJoint release is
checked against this module alone.

Everything here was read from DataJoint 2.3.x (2.3.5 installed: ``datajoint/connection.py``,
``instance.py``, ``autopopulate.py``, ``jobs.py``, ``blob.py``, ``adapters/``). DataJoint 2.x keeps these
within a major version; a different major version changes them (1.x had no ``~~`` job tables and no
adapters), so importing this module on one fails at once with `UnsupportedDataJointVersion`, one line
that names the installed version and the tested one, rather than later, mid-job, with an AttributeError.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import datajoint

#: The DataJoint major version djsupervisor runs on, and the releases it was tested with.
SUPPORTED_MAJOR = 2
TESTED_RANGE = "2.3.x"


class UnsupportedDataJointVersion(ImportError):
    """The installed DataJoint is of a major version djsupervisor was not written for."""


def check_datajoint_version() -> None:
    """Fail with one clear line unless the installed DataJoint is of the supported major version.

    Reads ``datajoint.__version__`` (DataJoint writes ``0.0.0+unknown`` when it cannot tell, in a source
    tree without metadata: that passes, there is nothing to judge).
    """
    version = str(getattr(datajoint, "__version__", ""))
    if version.endswith("+unknown"):
        return
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return
    if major != SUPPORTED_MAJOR:
        raise UnsupportedDataJointVersion(
            f"djsupervisor needs DataJoint {SUPPORTED_MAJOR}.x (tested with {TESTED_RANGE}); "
            f"the installed datajoint is {version}"
        )


check_datajoint_version()

# ----- connections (connection.py, instance.py)


def global_connection() -> datajoint.Connection | None:
    """DataJoint's global connection if one was opened (by ``dj.conn()`` or a ``dj.Schema`` without one),
    else None; opens none. 2.3 keeps it in ``datajoint.instance._singleton_connection`` (``dj.conn.connection``
    before 2.0)."""
    from datajoint import instance

    found = getattr(instance, "_singleton_connection", None)
    return found if found is not None else getattr(datajoint.conn, "connection", None)


def backend(connection: datajoint.Connection) -> str:
    """``"mysql"`` (MySQL and MariaDB) or ``"postgresql"``: ``connection.adapter.backend``."""
    return connection.adapter.backend


def interval_sql(connection: datajoint.Connection, seconds: int) -> str:
    """An SQL interval of `seconds` for the connection's server (the adapter's ``interval_expr``)."""
    return connection.adapter.interval_expr(seconds, "second")


def interval_sql_unit(connection: datajoint.Connection, value: int, unit: str) -> str:
    """An SQL interval of `value` `unit`s (``"microsecond"``, ``"second"``...) for the connection's server."""
    return connection.adapter.interval_expr(value, unit)


def driver_connection(connection: datajoint.Connection) -> Any | None:
    """The pymysql or psycopg2 connection under `connection` (``Connection._conn``), None when closed."""
    return connection._conn


def driver_socket_fd(raw: Any) -> int | None:
    """The file descriptor of a driver connection (psycopg2's ``fileno()``, pymysql's ``_sock``), or None if
    unknown or closed."""
    try:
        if hasattr(raw, "fileno"):  # psycopg2
            return raw.fileno()
        sock = getattr(raw, "_sock", None)  # pymysql
        return sock.fileno() if sock is not None else None
    except Exception:
        return None


def forget_session(connection: datajoint.Connection) -> None:
    """Make `connection` forget its driver connection and any transaction on it, sending nothing; the next
    ``connect()`` opens a new session on the same object."""
    connection._conn = None
    connection._in_transaction = False


def session_id(connection: datajoint.Connection) -> int:
    """The server's id of the session `connection` uses now (what DataJoint records on every reservation)."""
    return connection.adapter.get_connection_id(connection._conn)


def session_alive(connection: datajoint.Connection) -> bool:
    """Whether `connection`'s session answers a ping. (DataJoint's `is_connected` cannot tell on PostgreSQL:
    that adapter's ping returns False instead of raising, which `is_connected` takes for success.)"""
    if connection._conn is None:
        return False
    try:
        return connection.adapter.ping(connection._conn) is not False
    except Exception:
        return False


def call_after_every_connect(connection: datajoint.Connection, after: Callable[[], object]) -> None:
    """Call `after()` after every ``connect()`` of `connection`, DataJoint's automatic reconnects included.

    ``Connection.query`` reconnects through ``self.connect()``, so replacing ``connect`` on the instance
    catches every reconnect. A connection is hooked once: a second call leaves the first hook in place.
    """
    if getattr(connection.connect, "_djs_hooked", False):
        return
    original = connection.connect

    @functools.wraps(original)
    def connect_then_call() -> None:
        original()
        after()

    connect_then_call._djs_hooked = True  # type: ignore[attr-defined]
    connection.connect = connect_then_call


def transaction_left_open(connection: datajoint.Connection) -> bool:
    """Whether DataJoint's transaction flag is set, read without the ping of ``in_transaction``.

    A ``make()`` whose connection died mid-transaction and could not reconnect leaves the flag set (the
    server rolled the transaction back when the session ended); ``populate()`` then refuses to run on this
    connection forever after.
    """
    return bool(connection._in_transaction)


def clear_transaction(connection: datajoint.Connection) -> None:
    """Roll back the transaction DataJoint believes open, and clear its flag even if the rollback fails."""
    try:
        connection.cancel_transaction()
    finally:
        connection._in_transaction = False


# ----- populate and its job table (autopopulate.py, jobs.py)

#: The bookkeeping columns of a DataJoint 2.x job table; every other column is the job's key.
JOB_TABLE_COLUMNS = frozenset(
    {
        "status",
        "priority",
        "created_time",
        "scheduled_time",
        "reserved_time",
        "completed_time",
        "duration",
        "error_message",
        "error_stack",
        "user",
        "host",
        "pid",
        "connection_id",
        "version",
    }
)
#: How every job table's name starts.
JOB_TABLE_PREFIX = "~~"


def job_table_name(table_name: str) -> str:
    """The name of the job table of auto-populated table `table_name` (unquoted, without the schema):
    ``~~`` and the name without its tier underscores."""
    return JOB_TABLE_PREFIX + table_name.lstrip("_")


def job_table_targets(job_table: str) -> tuple[str, str]:
    """Possible names of the table that job table `job_table` serves: a computed (``__x``) or an imported
    (``_x``) table."""
    name = job_table[len(JOB_TABLE_PREFIX) :]
    return f"__{name}", f"_{name}"


def is_auto_populated(process: Any) -> bool:
    """Whether `process` is an auto-populated table class or instance."""
    AutoPopulate = datajoint.AutoPopulate
    return (isinstance(process, type) and issubclass(process, AutoPopulate)) or isinstance(process, AutoPopulate)


def is_user_table(process: Any, base: type | None = None) -> bool:
    """Whether `process` is a table class or instance of a user tier (``dj.Manual``, ``dj.Lookup``, ``dj.Part``,
    ``dj.Imported``, ``dj.Computed``: ``datajoint.user_tables.UserTable``), or of `base` when given."""
    from datajoint.user_tables import UserTable

    base = base or UserTable
    return (isinstance(process, type) and issubclass(process, base)) or isinstance(process, base)


#: The metaclass of DataJoint's user tables (``datajoint.user_tables.TableMeta``): it makes ``Table & key`` and
#: ``Table.to_dicts()`` work on the class by instantiating it. `djsupervisor.dj_worker` subclasses it to bind
#: its module-level worker tables to a schema on first use.
TableClassMeta: type = type(datajoint.Manual)


def table_tier(process: Any) -> str:
    """The tier of a user table class or instance, as DataJoint names its base class (``Manual``, ``Part``...)."""
    for tier in (datajoint.Part, datajoint.Lookup, datajoint.Manual, datajoint.Imported, datajoint.Computed):
        if is_user_table(process, tier):
            return tier.__name__
    return "non-user"


@contextlib.contextmanager
def observed_jobs(
    jobs: Any,
    *,
    may_reserve: Callable[[], bool],
    reserved: Callable[[dict], None],
    completed: Callable[[dict], None],
    failed: Callable[[dict, str, str | None], None],
    lost: Callable[[dict], None] = lambda key: None,
) -> Iterator[None]:
    """Within the block, observe the job table `jobs` through ``populate(reserve_jobs=True)``.

    ``AutoPopulate._populate1`` calls ``jobs.reserve(key)`` before each job (False: skip it),
    ``jobs.complete(key[, duration])`` after a success or an already populated key, and
    ``jobs.error(key, error_message=, error_stack=)`` after a failure, all on the instance ``table.jobs``
    returns. Here `may_reserve()` is asked before each reservation (False: the job is not reserved, and no
    statement is sent), and `reserved(key)`, `completed(key)` and `failed(key, message, stack)` follow
    DataJoint's own calls; `lost(key)` follows a reservation the database refused (another worker reserved
    the job first). The instance attributes set here are removed on leaving, which uncovers the class's
    methods again.
    """
    original = dict(reserve=jobs.reserve, complete=jobs.complete, error=jobs.error)

    def reserve(key: dict) -> bool:
        if not may_reserve():
            return False
        if not original["reserve"](key):
            lost(key)
            return False
        reserved(key)
        return True

    def complete(key: dict, duration: float | None = None) -> None:
        original["complete"](key, duration=duration)
        completed(key)

    def error(key: dict, error_message: str, error_stack: str | None = None) -> None:
        original["error"](key, error_message=error_message, error_stack=error_stack)
        failed(key, error_message, error_stack)

    jobs.reserve, jobs.complete, jobs.error = reserve, complete, error
    try:
        yield
    finally:
        for name in original:
            delattr(jobs, name)


#: The order in which ``AutoPopulate._populate_distributed`` fetches the pending keys it then walks.
POPULATE_ORDER = "priority ASC, scheduled_time ASC"
#: ``reorder(fetch, limit)``: the keys a populate() call walks, in its order; ``fetch(n)`` returns at most `n`
#: (None: every) pending job as a dict of its key and ``priority``, in DataJoint's order.
Reorder = Callable[[Callable[[int | None], list[dict]], int | None], list[dict]]


@functools.cache
def _reordering_class(job_class: Any) -> type:
    """`job_class` with a ``keys`` that hands populate()'s fetch of pending keys to the instance's reorder."""

    def keys(self: Any, order_by: Any = None, limit: int | None = None, offset: int | None = None) -> list[dict]:
        reorder = self.__dict__.get("_djs_reorder")
        if reorder is None or order_by != POPULATE_ORDER or offset is not None:
            return job_class.keys(self, order_by=order_by, limit=limit, offset=offset)
        return reorder(lambda n: self.proj("priority").to_dicts(order_by=POPULATE_ORDER, limit=n), limit)

    return type(job_class.__name__, (job_class,), {"keys": keys, "__module__": job_class.__module__})


@contextlib.contextmanager
def reordered_pending(jobs: Any, reorder: Reorder) -> Iterator[None]:
    """Within the block, populate() walks the pending keys of job table `jobs` in the order `reorder` gives.

    ``_populate_distributed`` fetches ``(jobs.pending & ...).keys(order_by=POPULATE_ORDER, limit=max_calls)``
    and walks the list. ``pending`` and every restriction of it are copies (``copy.copy``) of the instance
    ``table.jobs`` returns, class and attributes included: so the instance's class is swapped here for a
    subclass whose ``keys`` hands that one fetch to `reorder` (every other ``keys`` call goes through), and
    the class is put back on leaving.
    """
    job_class: Any = type(jobs)
    jobs._djs_reorder = reorder
    jobs.__class__ = _reordering_class(job_class)
    try:
        yield
    finally:
        jobs.__class__ = job_class
        del jobs._djs_reorder


def preload_populate_imports() -> None:
    """Import what ``populate()`` imports on its first job (deepdiff, tqdm: ~20 ms). Done in a supervisor's
    parent, every forked child has them already and a replacement's first job starts that much sooner."""
    try:
        import deepdiff  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError:  # a later DataJoint may not need them: then there is nothing to preload
        pass


# ----- blobs (blob.py)


def unpack_blob(data: bytes) -> Any:
    """Decode a DataJoint ``<blob>`` (how a job table stores `error_stack`)."""
    from datajoint.blob import unpack

    return unpack(data)


#: Rows per INSERT when `bulk_refresh` writes the new jobs of a refresh.
REFRESH_INSERT_BATCH = 5000


class RefreshBacklog:
    """The new jobs of a refresh that `bulk_refresh` has not written yet (`write` writes them)."""

    def __init__(self, jobs: Any) -> None:
        self._jobs = jobs
        self.rows: list[dict] = []

    def write(self, limit: int | None = None) -> int:
        """Write `limit` (None: every) waiting rows, `REFRESH_INSERT_BATCH` per INSERT; the number written."""
        written = 0
        while self.rows and (limit is None or written < limit):
            size = REFRESH_INSERT_BATCH if limit is None else min(REFRESH_INSERT_BATCH, limit - written)
            rows, self.rows = self.rows[:size], self.rows[size:]
            self._jobs.insert(rows, skip_duplicates=True, ignore_extra_fields=True)
            written += len(rows)
        return written

    def drop(self) -> int:
        """Forget the waiting rows (a stop must not wait for them); the number dropped. Nothing is lost: their
        keys are still in the key source and not in the job table, so the next refresh queues them."""
        dropped, self.rows = len(self.rows), []
        return dropped


@contextlib.contextmanager
def bulk_refresh(jobs: Any, first: int | None = None) -> Iterator[RefreshBacklog]:
    """Within the block, ``jobs.refresh()`` writes its new jobs `REFRESH_INSERT_BATCH` rows per INSERT.

    DataJoint 2.3's ``Job.refresh`` inserts each new key with its own ``insert1`` (100k new keys: about 40 s,
    every worker's first cycle held up meanwhile). Here the ``insert1`` calls it makes are collected and
    written once it returns, with ``insert(..., skip_duplicates=True)`` (another worker may have inserted a
    key meanwhile: DataJoint's own loop skipped such a duplicate too). The steps after the insert loop
    (re-pend, removal of vanished and stale jobs) do not read the new rows, so writing them last changes
    nothing; the count of added jobs DataJoint returns is the number of new keys it found.

    With `first`, a refresh writes only its first `first` rows and leaves the rest in the backlog the block
    gets, for the caller to write (``backlog.write()``) once its first jobs have run; whatever is left is
    written on leaving the block.
    """
    original = jobs.refresh
    backlog = RefreshBacklog(jobs)

    def refresh(*args: Any, **kwargs: Any) -> dict:
        rows: list[dict] = []
        jobs.insert1 = lambda row, **_: rows.append(dict(row))
        try:
            result = original(*args, **kwargs)
        finally:
            del jobs.insert1
        backlog.rows += rows
        backlog.write(first)
        return result

    jobs.refresh = refresh
    try:
        yield backlog
        backlog.write()
    finally:
        del jobs.refresh


def declaring_job_table() -> bool:
    """Whether the caller runs inside DataJoint declaring a table's job table (`Table.jobs` on first use).

    DataJoint copies the primary key into the job table with its native SQL types and then warns, in every
    process, that a native type is used (``Native type 'int' is used in attribute 'sample'``): a warning
    about DataJoint's own table that the lab cannot act on, which `djsupervisor.log` keeps at DEBUG."""
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "__get__" and frame.f_code.co_filename.endswith("datajoint/autopopulate.py"):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def decode_stack(value: Any) -> str:
    """An error stack of a job row as text (DataJoint stores it as a `<blob>`)."""
    if value is None:
        return ""
    if isinstance(value, memoryview):
        value = value.tobytes()
    if isinstance(value, (bytes, bytearray)):
        try:
            return str(unpack_blob(bytes(value)))
        except Exception:
            return bytes(value).decode("utf-8", "replace")
    return str(value)
