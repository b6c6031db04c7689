"""The processes a worker runs each cycle: auto-populated tables and plain callables.

What a worker cannot run is refused here, at registration, with one line, rather than failing (or, worse,
seeming to work) every cycle: a table of another tier (a ``dj.Manual`` class is callable, and was once
called as a function each cycle, making every cycle look busy), and ``reserve_jobs=False`` or
``suppress_errors=False`` (a worker always populates with both True). ``notify_on=`` (datajoint-utilities'
per-step notification statuses) is kept on the step as `notify_on` and never passed to ``populate()``, which
would refuse it.

A step knows the worker that runs it only as a `StepHost`: the few questions and reports a step has
(is a stop requested? a job started, ended; a step failed), so this module does not depend on the loop
(`djsupervisor.worker.loop`); `djsupervisor.worker.progress.Progress` decides what a report does (counters,
events, ErrorLog).
"""

from __future__ import annotations

import numbers
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

from loguru import logger

from djsupervisor.worker import compat
from djsupervisor.worker.events import ProcessCounts
from djsupervisor.worker.pending_order import PendingWalk
from djsupervisor.worker.schema import declare_with_retry

compat.preload_populate_imports()  # here, in a supervisor's parent: every forked child has them already

#: Jobs of a table step's first populate() call in a cycle (see `TableStep._populate_batches`).
POPULATE_BATCH = 250
#: New jobs a refresh writes before the first job of its populate() call; the rest are written after that call
#: (None: all before; see `TableStep._populate_batches`). DataJoint's insert spends ~0.1 ms of CPU per row
#: checking it, so 1,000 rows keep the wait short and still give the first call 4 keys to choose from per job.
REFRESH_FIRST_ROWS: int | None = 4 * POPULATE_BATCH
#: Consecutive populate() calls that did nothing but lose a reservation before a step gives up for the cycle
#: (each fetched the queue again; see `djsupervisor.worker.pending_order`).
STALE_CALLS = 3

#: populate() arguments a worker always sets itself (to True): any other value is refused at registration.
FIXED_POPULATE_ARGUMENTS = ("reserve_jobs", "suppress_errors")
#: What a step's ``notify_on`` may name: datajoint-utilities' statuses (see `djsupervisor.worker.notifications`).
NOTIFY_STATUSES = ("start", "success", "error")


class StepHost(Protocol):
    """What a step asks of and reports to the worker that runs it (`djsupervisor.worker.progress.Progress`)."""

    @property
    def stop_requested(self) -> bool:
        """True once the worker was asked to stop: a step starts no new job."""
        ...

    def stop(self, reason: str = "") -> None:
        """Ask the worker to stop at the next job boundary."""
        ...

    def may_refresh(self, table: str) -> bool:
        """Before a cycle's first populate() of `table`: whether it refreshes the job queue (False: another
        worker of the fleet did so within the refresh interval; work the queue as it stands)."""
        ...

    def refresh_done(self, table: str) -> None:
        """The refresh `may_refresh` allowed is over, its new jobs written (or dropped for a stop)."""
        ...

    def may_reserve(self) -> bool:
        """At a job boundary, just before reserving the next job: False when no new job may start."""
        ...

    def job_started(self, table: str, key: dict) -> None:
        """A job of `table` was reserved and its make() is about to run."""
        ...

    def reservation_lost(self, table: str, key: dict) -> None:
        """The database refused to reserve a job of `table`: another worker reserved it first."""
        ...

    def job_ended(self, table: str, key: dict, ok: bool, message: str = "", stack: str | None = None) -> None:
        """A job of `table` completed (`ok`) or failed with `message` and `stack`."""
        ...

    def callable_started(self, name: str) -> None:
        """Callable `name` is about to be called."""
        ...

    def callable_ended(self, name: str, ok: bool) -> None:
        """Callable `name` returned (`ok`) or raised."""
        ...

    def step_failed(self, kind: str, name: str, error: BaseException, stack: str) -> None:
        """Step `name` raised outside a job (`kind`: ``populate`` or ``callable``)."""
        ...


def callable_name(func: Callable) -> str:
    """A readable name for a callable: module.qualname."""
    module = getattr(func, "__module__", None) or ""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    return f"{module}.{name}" if module else name


def notify_statuses(value: Any, step: str) -> tuple[str, ...]:
    """A step's ``notify_on`` (None, one status or a list of them, any case) as a tuple of lower-case
    statuses; ValueError naming the step for anything else (datajoint-utilities ignored a misspelt status
    with a warning, and its notification never came)."""
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple, set, frozenset)):
        raise ValueError(f"{step}: notify_on must be a list of {', '.join(NOTIFY_STATUSES)}, got {value!r}")
    for status in values:
        if not isinstance(status, str) or status.lower() not in NOTIFY_STATUSES:
            raise ValueError(f"{step}: notify_on: unknown status {status!r} (known: {', '.join(NOTIFY_STATUSES)})")
    return tuple(dict.fromkeys(status.lower() for status in values))


def reported_work(result: Any) -> int:
    """How much work a callable's return value reports: a positive integer counts itself, a positive
    float or any other truthy value counts 1, and zero, negatives, None and falsy values count 0."""
    if isinstance(result, bool):
        return int(result)
    if isinstance(result, numbers.Integral):
        return max(int(result), 0)
    if isinstance(result, numbers.Real):
        return 1 if float(result) > 0 else 0
    try:
        return 1 if result else 0
    except Exception:  # objects whose truth is ambiguous (numpy arrays) report work
        return 1


class TableStep:
    """An auto-populated table, populated with ``populate(reserve_jobs=True)`` once per cycle.

    Keeps one table instance (and so one job-table object) for the worker's life: building them per call
    reloads headings and dependencies. During the populate call the job table's `reserve`, `complete`
    and `error` are observed so the worker knows the job in flight, and `reserve` refuses new jobs once a
    stop is requested: the stop lands between two jobs, with no job started and none aborted.
    """

    def __init__(self, table: Any, populate_kwargs: dict, notify_on: tuple[str, ...] = ()) -> None:
        self.table = table() if isinstance(table, type) else table
        if not self.table.database:
            raise ValueError(f"cannot register {table_label(table)}: its class is not bound to a schema (decorate it)")
        self.name = self.table.full_table_name
        for argument in FIXED_POPULATE_ARGUMENTS:
            value = populate_kwargs.pop(argument, True)
            if value is not True:
                raise ValueError(
                    f"cannot register {self.name} with {argument}={value!r}: a worker always populates with "
                    "reserve_jobs=True and suppress_errors=True (failed jobs are recorded in ErrorLog)"
                )
        restrictions = populate_kwargs.pop("restrictions", ())
        if not isinstance(restrictions, (list, tuple)):
            restrictions = (restrictions,)
        self.restrictions = tuple(restrictions)
        self.populate_kwargs = populate_kwargs
        self.notify_on = notify_on  # read by notifications, never passed to populate()
        self._job_table_ready = False
        self._walk = PendingWalk()  # this worker's own order of the pending keys
        self._leased = False  # this cycle took the refresh lease and has not handed it back

    def describe(self) -> dict:
        """A JSON-ready description for the worker's registration: the key source's SQL too, which
        `djsupervisor.dj_worker`'s progress overview counts (None when it cannot be built)."""
        return dict(
            kind="table",
            name=self.name,
            populate_kwargs={k: repr(v) for k, v in self.populate_kwargs.items()},
            key_source_sql=self._key_source_sql(),
            notify_on=list(self.notify_on),
        )

    def _key_source_sql(self) -> str | None:
        try:
            return self.table.key_source.proj().make_sql()
        except Exception as error:  # a registration never fails for the sake of a dashboard
            logger.debug("no key source SQL for {}: {}: {}", self.name, error.__class__.__name__, error)
            return None

    @property
    def job_table_key(self) -> tuple[str, str]:
        """(schema, name) of the table's job queue, declared or not (DataJoint names it ``~~`` and the
        table's name without its tier underscores)."""
        return self.table.database, compat.job_table_name(self.table.table_name)

    @property
    def job_table_id(self) -> tuple[str, str] | None:
        """(schema, name) of the table's job queue once this step has declared or found it, else None."""
        if not self._job_table_ready:
            return None
        return self.table.database, self.table.jobs.table_name

    def run(self, host: StepHost) -> ProcessCounts:
        """Populate the table's pending jobs until none is left or the worker is asked to stop."""
        lost_before = self._walk.lost
        try:
            result = self._populate(host)
        except SystemExit as error:  # DataJoint's SIGTERM handler, outside our own SIGTERM handling
            host.stop(f"populate of {self.name} interrupted: {error}")
            counts = ProcessCounts("table", errors=1)
        except Exception as error:  # the populate machinery itself failed (key source, connection, ...)
            host.step_failed("populate", self.name, error, traceback.format_exc())
            counts = ProcessCounts("table", errors=1)
        else:
            counts = ProcessCounts("table", done=result["success_count"], failed=len(result["error_list"]))
        counts.lost = self._walk.lost - lost_before
        return counts

    def _job_table(self) -> Any:
        """The table's job queue, declared (by whichever worker gets there first) on first use."""
        if not self._job_table_ready:

            def declare() -> None:
                jobs = self.table.jobs  # DataJoint builds and declares it on first access
                if not jobs.is_declared:
                    jobs.declare()

            declare_with_retry(declare, f"the job table of {self.name}")
            self._job_table_ready = True
        return self.table.jobs

    def _populate(self, host: StepHost) -> dict:
        connection = self.table.connection
        if compat.transaction_left_open(connection):  # populate would refuse this connection forever after
            logger.warning("clearing a transaction left open by a lost connection before populating {}", self.name)
            compat.clear_transaction(connection)
        jobs = self._job_table()
        walk = self._walk

        def lost(key: dict) -> None:
            walk.lost_one()
            host.reservation_lost(self.name, key)

        one_call = "max_calls" in self.populate_kwargs or (self.populate_kwargs.get("processes") or 1) > 1

        def order(fetch: Callable[[int | None], list[dict]], limit: int | None) -> list[dict]:
            # New jobs a refresh left unwritten: one job, then they are written. After a whole first call (250
            # jobs) a child killed or recycled sooner left them to the next refresh's anti-join of every key,
            # again and again (bench figure 2, a kill a second: 250 -> 500 ms to a replacement's first job).
            if not backlog.rows:  # the refresh's new jobs are all written (by now, or after the first job of the
                self._end_refresh(host)  # call before): its lease is not held through the jobs, which may take hours
            return walk.order(fetch, 1 if backlog.rows and not one_call else limit)

        try:
            with (
                compat.bulk_refresh(jobs, first=REFRESH_FIRST_ROWS) as backlog,
                compat.reordered_pending(jobs, order),
                compat.observed_jobs(
                    jobs,
                    may_reserve=lambda: host.may_reserve() and walk.may_try(),
                    reserved=lambda key: host.job_started(self.name, key),
                    completed=lambda key: host.job_ended(self.name, key, ok=True),
                    failed=lambda key, message, stack: host.job_ended(
                        self.name, key, ok=False, message=message, stack=stack
                    ),
                    lost=lost,
                ),
            ):
                return self._populate_batches(host, backlog)
        finally:  # (one call: its last new jobs were written on leaving bulk_refresh)
            self._end_refresh(host)

    def _end_refresh(self, host: StepHost) -> None:
        """Hand back the refresh lease this cycle took, if it took one and has not handed it back yet."""
        if self._leased:
            self._leased = False
            host.refresh_done(self.name)

    def _populate_batches(self, host: StepHost, backlog: compat.RefreshBacklog) -> dict:
        """populate() first for at most `POPULATE_BATCH` jobs, then for the rest, until a call does nothing;
        only the first call refreshes the queue. One plain call fetches every pending key before its first
        job (100k keys: a third of a second), which a replacement child's first job would wait for.
        (Batches all the way cost throughput with several workers on PostgreSQL: 0.83 against 0.96 of
        plain loops in one A/B, cause not established.) With `max_calls` or `processes` given, one call.

        The first job does not wait for a big refresh either: the refresh writes its first
        `REFRESH_FIRST_ROWS` new jobs, the first call works from them, and the rest (100k new keys: about 8 s)
        is written after it, while the fleet's other workers already work the queue. A call that
        ended on a lost reservation (its list had gone stale, see `djsupervisor.worker.pending_order`) is
        followed by another, limited to `POPULATE_BATCH` jobs drawn from the head of the queue (a fetch of 2,000
        keys, not of all: at 32 workers a list goes stale every few dozen jobs), up to `STALE_CALLS` in a row
        that did nothing else."""
        kwargs = dict(self.populate_kwargs)
        if "refresh" not in kwargs:
            kwargs["refresh"] = self._leased = host.may_refresh(self.name)
        if "max_calls" in kwargs or (kwargs.get("processes") or 1) > 1:
            return self.table.populate(*self.restrictions, reserve_jobs=True, suppress_errors=True, **kwargs)
        total: dict = {"success_count": 0, "error_list": []}
        batch = {"max_calls": POPULATE_BATCH}
        stale_calls = 0
        while True:
            result = self.table.populate(*self.restrictions, reserve_jobs=True, suppress_errors=True, **batch, **kwargs)
            kwargs["refresh"] = False
            batch = {"max_calls": POPULATE_BATCH} if self._walk.stale else {}  # a cheap fetch after a lost race
            if host.stop_requested:  # the rest of a big first refresh (9,000 rows: ~1 s here) would delay the stop
                backlog.drop()
            backlog.write()
            total["success_count"] += result["success_count"]
            total["error_list"] += result["error_list"]
            worked = bool(result["success_count"] or result["error_list"])
            stale_calls = 0 if worked else stale_calls + 1
            if host.stop_requested or not (worked or (self._walk.stale and stale_calls <= STALE_CALLS)):
                return total


class CallableStep:
    """A plain callable, called with its registered keyword arguments once per cycle."""

    def __init__(self, func: Callable, kwargs: dict, notify_on: tuple[str, ...] = ()) -> None:
        self.func = func
        self.kwargs = kwargs
        self.notify_on = notify_on  # read by notifications, never passed to the callable
        self.name = callable_name(func)

    def describe(self) -> dict:
        """A JSON-ready description for the worker's registration."""
        return dict(
            kind="callable",
            name=self.name,
            kwargs={k: repr(v) for k, v in self.kwargs.items()},
            notify_on=list(self.notify_on),
        )

    def run(self, host: StepHost) -> ProcessCounts:
        """Call it; a raised exception is logged and recorded, never propagated."""
        host.callable_started(self.name)
        started = time.monotonic()
        try:
            result = self.func(**self.kwargs)
        except Exception as error:
            host.step_failed("callable", self.name, error, traceback.format_exc())
            host.callable_ended(self.name, ok=False)
            return ProcessCounts("callable", errors=1)
        logger.debug("{} returned {!r} in {:.3f} s", self.name, result, time.monotonic() - started)
        host.callable_ended(self.name, ok=True)
        return ProcessCounts("callable", done=reported_work(result))


def table_label(table: Any) -> str:
    """A table class's or instance's class name, as a registration error names it."""
    return table.__name__ if isinstance(table, type) else type(table).__name__


def make_step(process: Any, kwargs: dict) -> TableStep | CallableStep:
    """The step for a registered process: an auto-populated table class or instance, or any other callable.

    A table of another tier is refused (TypeError), and so are populate arguments a worker cannot honour
    (ValueError, see `TableStep`); `notify_on` goes to the step, not to the call."""
    kwargs = dict(kwargs)
    notify_on = kwargs.pop("notify_on", None)
    if compat.is_auto_populated(process):
        return TableStep(process, kwargs, notify_statuses(notify_on, table_label(process)))
    if compat.is_user_table(process):
        raise TypeError(
            f"cannot register {table_label(process)}: a {compat.table_tier(process)} table is not auto-populated "
            "(a worker populates dj.Imported and dj.Computed tables)"
        )
    if callable(process):
        return CallableStep(process, kwargs, notify_statuses(notify_on, callable_name(process)))
    raise TypeError(f"cannot register {process!r}: expected an auto-populated table or a callable")
