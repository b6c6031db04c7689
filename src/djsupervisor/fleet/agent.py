"""The fleet agent: the one child of a supervisor that talks to the database on the parent's behalf.

The parent does no database work, yet the fleet needs it to: its children's heartbeats must reach
RegisteredWorker while their main threads are busy in ``make()`` or asleep, drain flags set from another
host must reach the parent, and autoscaling and the metrics need the queue depth of the pools' tables.
So the parent forks one long-lived agent with a single connection. Every `fleet_interval` seconds the
parent writes it one line (its children's latest reports, and which children are gone); for each line the
agent

1. stamps every live child's RegisteredWorker row (supervisor, slot, state, table, key, counters,
   last_heartbeat by the server's clock, and a heartbeat window: when the next stamp is due),
2. marks the rows of children that are gone as ``exited``,
3. reads the FleetFlag rows of the pools' worker schemas and the job-queue depth of every pool table,

and answers with one line the parent keeps as its `FleetView`. A database outage makes the agent skip
what it cannot do (the parent keeps the last reading, whose age tells it is stale); a crash of the agent
costs the supervisor nothing but a restart of the agent. It exits when the parent closes its pipe.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from loguru import logger

from djsupervisor.supervisor.child import _short_table, worker_connections
from djsupervisor.supervisor.fork import EXIT_OK, isolate, run_then_exit

_RESTART_FIRST = 1.0  # seconds before restarting an agent that died, doubling up to _RESTART_MAX
_RESTART_MAX = 60.0
_STOP_WAIT = 3.0  # seconds the parent waits for the agent's last write at shutdown
_PRUNE_INTERVAL = 600.0  # seconds between deletions of this supervisor's rows of processes that are gone


def heartbeat_window(fleet_interval: float) -> float:
    """Seconds within which a supervised child's next fleet heartbeat is due: three missed periods."""
    return 3 * fleet_interval + 1.0


# ----- in the agent process


class FleetAgent:
    """The agent's work, given the worker definitions of the supervisor's pools."""

    def __init__(self, *, supervisor: str, host: str, worker_configs: list, fleet_interval: float) -> None:
        import platform

        self.supervisor = supervisor
        self.host = host or platform.node()
        self.window = heartbeat_window(fleet_interval)
        self.log = logger.bind(supervisor=supervisor, worker="fleet-agent", slot="-")
        self.workers = {config.name: config.build_worker() for config in worker_configs}
        self._schemas: dict[str, Any] = {}
        self._starts: dict[int, Any] = {}  # pid -> process_start
        self._connected = False
        self._last_prune: float | None = None

    def connect(self) -> None:
        """Reconnect every connection the worker definitions use (the parent's sessions stay untouched)."""
        from djsupervisor.worker.connection import reconnect_after_fork

        seen: set[int] = set()
        for worker in self.workers.values():
            for connection in worker_connections(worker):
                if id(connection) not in seen:
                    seen.add(id(connection))
                    reconnect_after_fork(connection)
        self._connected = True

    def schema(self, pool: str):
        """The WorkerSchema of pool `pool` (one per distinct schema name)."""
        from djsupervisor.worker.schema import WorkerSchema

        worker = self.workers[pool]
        if worker.worker_schema_name not in self._schemas:
            self._schemas[worker.worker_schema_name] = WorkerSchema(worker.worker_schema_name, worker.connection)
        return self._schemas[worker.worker_schema_name]

    def tables(self) -> dict[str, list[Any]]:
        from djsupervisor.fleet.queues import worker_tables

        return {pool: worker_tables(worker) for pool, worker in self.workers.items()}

    def _attempt(self, what: str, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except Exception as error:
            self.log.warning("fleet agent: {} failed: {}: {}", what, error.__class__.__name__, error)
            return None

    def _process_start(self, pid: int):
        from djsupervisor.worker.schema import process_start

        if pid not in self._starts:
            self._starts[pid] = process_start(pid)
        return self._starts[pid]

    def maybe_prune(self) -> None:
        """Prune at the start and then every `_PRUNE_INTERVAL` seconds (children come and go: max_jobs)."""
        now = time.monotonic()
        if self._last_prune is None or now - self._last_prune >= _PRUNE_INTERVAL:
            self._last_prune = now
            self._attempt("pruning RegisteredWorker", self.prune)

    def prune(self) -> None:
        """Delete this supervisor's rows on this host whose process is gone (earlier runs' children)."""
        import psutil

        from djsupervisor.worker.schema import process_start

        for pool in self.workers:
            table = self.schema(pool).tables["RegisteredWorker"]
            rows = (table & {"host": self.host, "supervisor": self.supervisor}).to_dicts()
            for row in rows:
                try:
                    alive = process_start(row["pid"]) == row["process_start"]
                except psutil.Error:
                    alive = False
                if not alive:
                    (table & {k: row[k] for k in ("worker_name", "host", "pid", "process_start")}).delete_quick()

    def _identity(self, pool: str, pid: int, start) -> dict:
        """The RegisteredWorker key of the child `pid` of pool `pool`, started at `start`."""
        return {"worker_name": self.workers[pool].name, "host": self.host, "pid": pid, "process_start": start}

    def heartbeat(self, children: list[dict], gone: list[dict]) -> None:
        """Stamp the live children's rows; mark the gone ones exited."""
        import psutil

        from djsupervisor.worker.schema import update_heartbeats

        by_pool: dict[str, list[dict]] = {}
        for child in children:
            if child["worker"] not in self.workers:
                continue
            try:
                start = self._process_start(child["pid"])
            except psutil.Error:  # gone since the parent wrote the line
                continue
            by_pool.setdefault(child["worker"], []).append(
                dict(
                    self._identity(child["worker"], child["pid"], start),
                    supervisor=self.supervisor,
                    slot=child["slot"],
                    state=child["state"],
                    current_table=(child.get("table") or "")[:255],
                    current_key=child.get("key"),
                    cycles=child.get("cycles", 0),
                    jobs_done=child.get("jobs_done", 0),
                    jobs_failed=child.get("jobs_failed", 0),
                    heartbeat_window=self.window,
                )
            )
        for child in gone:
            start = self._starts.pop(child["pid"], None)
            if child["worker"] in self.workers and start is not None:
                by_pool.setdefault(child["worker"], []).append(
                    dict(
                        self._identity(child["worker"], child["pid"], start),
                        state="exited",
                        current_table="",
                        current_key=None,
                        heartbeat_window=0.0,
                    )
                )
        for pool, rows in by_pool.items():
            schema = self.schema(pool)
            table = schema.tables["RegisteredWorker"].full_table_name
            self._attempt("heartbeat", partial(update_heartbeats, schema.connection, table, rows))

    def read(self) -> dict:
        """The report for the parent: tables per pool, their queue depths, the drain flags that apply."""
        from djsupervisor.fleet.registry import flag_for, read_flags

        report: dict[str, Any] = {}
        tables = self.tables()
        report["tables"] = {pool: [_short_table(t.full_table_name) for t in ts] for pool, ts in tables.items()}
        depths = {}
        for table in {t.full_table_name: t for ts in tables.values() for t in ts}.values():
            progress = self._attempt(f"reading the queue of {table.full_table_name}", table.jobs.progress)
            if progress is not None:
                depths[_short_table(table.full_table_name)] = progress
        report["depths"] = depths
        drained: dict[str, str] = {}
        flags_by_schema: dict[str, list | None] = {}
        for pool, worker in self.workers.items():
            name = worker.worker_schema_name
            if name not in flags_by_schema:
                flags_by_schema[name] = self._attempt("reading drain flags", partial(read_flags, self.schema(pool)))
            flags = flags_by_schema[name]
            if flags is None:  # unreadable: the parent keeps what it had
                return {k: v for k, v in report.items() if k != "drained"}
            mode = flag_for(flags, self.host, self.supervisor, pool)
            if mode:
                drained[pool] = mode
        report["drained"] = drained
        return report


def run_agent(
    *,
    supervisor: str,
    host: str,
    worker_configs: list,
    fleet_interval: float,
    parent_pid: int,
    command_fd: int,
    report_fd: int,
    close_fds: list[int],
) -> None:
    """The body of the fleet agent child; never returns."""

    def body() -> int:
        import setproctitle

        isolate(parent_pid, close_fds)
        setproctitle.setproctitle(f"djsupervisor: {supervisor} fleet agent")
        agent = FleetAgent(
            supervisor=supervisor, host=host, worker_configs=worker_configs, fleet_interval=fleet_interval
        )
        lines = _LineReader(command_fd)
        closed = False
        while not closed:  # once the parent closed the pipe: one last round for its last line, then exit
            messages, closed = lines.wait()
            if not messages:
                continue
            children = messages[-1].get("children", [])
            gone = [g for m in messages for g in m.get("gone", ())]
            if not agent._connected:
                agent._attempt("connecting", agent.connect)
                if not agent._connected:
                    continue
            agent.maybe_prune()
            agent.heartbeat(children, gone)
            if not closed:
                _write_line(report_fd, agent.read())
        return EXIT_OK

    run_then_exit(body)


class _LineReader:
    """Newline-delimited JSON from a pipe: waits for data, returns every complete message so far."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.selector = selectors.DefaultSelector()
        self.selector.register(fd, selectors.EVENT_READ)
        os.set_blocking(fd, False)

    def wait(self) -> tuple[list[dict], bool]:
        """Wait for data; returns the messages that arrived and whether the pipe is now closed."""
        messages: list[dict] = []
        closed = False
        self.selector.select()
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not data:
                closed = True
                break
            self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            try:
                messages.append(json.loads(line))
            except ValueError:
                continue
        return messages, closed


def _write_line(fd: int, message: dict) -> None:
    """Write one JSON line, blocking (the agent has nothing better to do; the parent reads promptly)."""
    data = json.dumps(message, default=str, separators=(",", ":")).encode() + b"\n"
    os.set_blocking(fd, True)
    while data:
        data = data[os.write(fd, data) :]


# ----- in the parent process


class FleetAgentLink:
    """The parent's side: forks the agent, feeds it the children's reports, takes in its readings, restarts
    it (with a doubling delay) when it dies, and closes it last at shutdown."""

    def __init__(self, supervisor) -> None:
        self.supervisor = supervisor
        self.pid: int | None = None
        self.command_w = -1
        self.report_r = -1
        self.buffer = b""
        self.gone: list[dict] = []
        self.restart_at = 0.0
        self.delay = _RESTART_FIRST
        self.started = 0.0

    @property
    def log(self):
        return self.supervisor.log

    def fds(self) -> list[int]:
        """The parent's ends of the agent's pipes (every other forked child must close them)."""
        return [fd for fd in (self.command_w, self.report_r) if fd >= 0]

    def start(self) -> None:
        sup = self.supervisor
        command_r, self.command_w = os.pipe()
        self.report_r, report_w = os.pipe()
        configs = [pool.config for pool in sup.pools.values() if pool.config is not None]

        def child(close_fds: list[int]) -> None:
            run_agent(
                supervisor=sup.config.name,
                host=sup.config.host,
                worker_configs=configs,
                fleet_interval=sup.config.fleet_interval,
                parent_pid=sup.pid,
                command_fd=command_r,
                report_fd=report_w,
                close_fds=[*close_fds, self.command_w, self.report_r],
            )

        pid = sup._fork(child)
        os.close(command_r)
        os.close(report_w)
        if pid is None:
            self._close()
            self.restart_at = time.monotonic() + self.delay
            return
        self.pid = pid
        self.started = time.monotonic()
        os.set_blocking(self.command_w, False)
        os.set_blocking(self.report_r, False)
        sup.selector.register(self.report_r, selectors.EVENT_READ, data=self._on_report)
        self.log.info("fleet agent started (pid {})", pid)
        self.tick()

    def _close(self) -> None:
        if self.report_r >= 0:
            try:
                self.supervisor.selector.unregister(self.report_r)
            except (KeyError, ValueError):
                pass
        for fd in self.fds():
            os.close(fd)
        self.command_w = self.report_r = -1

    def _on_report(self, mask: int) -> None:
        try:
            data = os.read(self.report_r, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close()
            return
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        for line in lines:
            try:
                self.supervisor.fleet.apply(json.loads(line))
            except (ValueError, TypeError, AttributeError) as error:
                self.log.warning("fleet agent: unreadable report: {}", error)
        if time.monotonic() - self.started > 60:
            self.delay = _RESTART_FIRST

    def tick(self) -> None:
        """Send the agent the children's latest state (or restart the agent if it is due)."""
        if self.pid is None:
            if self.command_w < 0 and time.monotonic() >= self.restart_at:
                self.start()
            return
        if self.command_w < 0:
            return
        children = []
        for pool in self.supervisor.pools.values():
            for slot in pool.slots.values():
                if slot.pid is None or "connection_ids" not in slot.report:
                    continue  # not connected yet: its row does not exist before its first cycle anyway
                report = slot.report
                state = "stopping" if slot.state.value == "stopping" else (report.get("state") or slot.state.value)
                children.append(
                    dict(
                        worker=slot.worker,
                        slot=slot.index,
                        pid=slot.pid,
                        state=state,
                        table=report.get("table"),
                        key=report.get("key"),
                        jobs_done=report.get("jobs_done", 0),
                        jobs_failed=report.get("jobs_failed", 0),
                        cycles=report.get("cycles_done", 0),
                    )
                )
        message = {"children": children, "gone": self.gone}
        line = json.dumps(message, default=str, separators=(",", ":")).encode() + b"\n"
        try:
            os.write(self.command_w, line)
        except BlockingIOError:  # the agent is behind (database slow): it gets the next one
            return
        except OSError:
            return
        self.gone = []

    def child_gone(self, worker: str, pid: int) -> None:
        """A child was reaped: its row is marked exited at the next tick."""
        self.gone.append({"worker": worker, "pid": pid})

    def exited(self, status: int) -> None:
        """The agent was reaped."""
        self.log.warning(
            "fleet agent (pid {}) exited ({}); restarting it in {:.0f} s",
            self.pid,
            os.waitstatus_to_exitcode(status),
            self.delay,
        )
        self.pid = None
        self._close()
        self.restart_at = time.monotonic() + self.delay
        self.delay = min(self.delay * 2, _RESTART_MAX)

    def restart(self) -> None:
        """Replace the agent now (after a reload: the pools changed)."""
        self.stop(fast=True)
        self.delay = _RESTART_FIRST
        self.start()

    def stop(self, fast: bool = False) -> None:
        """At shutdown: a last tick, close the pipe (the agent writes and exits), wait briefly, then kill."""
        if self.pid is None:
            return
        if not fast:
            self.tick()
        if self.command_w >= 0:
            os.close(self.command_w)
            self.command_w = -1
        deadline = time.monotonic() + (0 if fast else _STOP_WAIT)
        while True:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped already
                break
            if pid:
                break
            if time.monotonic() >= deadline:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except OSError:
                    pass
                try:
                    os.waitpid(self.pid, 0)
                except ChildProcessError:
                    pass
                break
            time.sleep(0.05)
        self.pid = None
        self._close()
