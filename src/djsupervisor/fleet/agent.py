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
   and, less often, each table's progress and the grouped errors (`djsupervisor.fleet.overview`),
4. sends the supervisor's events the line carries (a slot gone FATAL, a job timed out, ...) to the
   notifiers (`djsupervisor.fleet.notify`), whether the database is reachable or not,
5. every `_RETENTION_INTERVAL` seconds, prunes the pools' worker schemas of rows older than their
   `log_retention_days` (`djsupervisor.worker.retention`: under a database lock, so one agent of the fleet
   prunes a schema at a time; in short batches),

and answers with one line the parent keeps as its `FleetView`. A database outage makes the agent skip
what it cannot do (the parent keeps the last reading, whose age tells it is stale); a crash of the agent
costs the supervisor nothing but a restart of the agent. It exits when the parent closes its pipe.

This module is the agent process's side; `djsupervisor.fleet.link` is the parent's (it forks the agent, feeds
it, restarts it). The two pipes carry `protocol.AgentCommand` and `protocol.AgentReport` lines.
"""

from __future__ import annotations

import dataclasses
import os
import selectors
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from loguru import logger

from djsupervisor.protocol import (
    AgentChild,
    AgentCommand,
    AgentReport,
    GoneChild,
    LineDecoder,
    ProtocolError,
    encode,
    parse_agent_command,
)
from djsupervisor.supervisor.child import _short_table, worker_connections
from djsupervisor.supervisor.fork import EXIT_OK, isolate, run_then_exit

if TYPE_CHECKING:
    from djsupervisor.supervisor.config import WorkerConfig

_PRUNE_INTERVAL = 600.0  # seconds between deletions of this supervisor's rows of processes that are gone
_RETENTION_INTERVAL = 300.0  # seconds between retention passes (each at most 100,000 rows per table)


def heartbeat_window(fleet_interval: float) -> float:
    """Seconds within which a supervised child's next fleet heartbeat is due: three missed periods."""
    return 3 * fleet_interval + 1.0


class FleetAgent:
    """The agent's work, given the worker definitions of the supervisor's pools."""

    def __init__(
        self,
        *,
        supervisor: str,
        host: str,
        worker_configs: list[WorkerConfig],
        fleet_interval: float,
        webhooks: dict[str, Any] | None = None,
    ) -> None:
        import platform

        from djsupervisor.fleet.notify import AgentNotifications
        from djsupervisor.fleet.overview import Overview

        self.supervisor = supervisor
        self.host = host or platform.node()
        self.window = heartbeat_window(fleet_interval)
        self.log = logger.bind(supervisor=supervisor, worker="fleet-agent", slot="-")
        self.workers = {config.name: config.build_worker() for config in worker_configs}
        self.notifications = AgentNotifications(
            supervisor=supervisor, host=self.host, workers=self.workers, webhooks_config=webhooks or {}
        )
        self._schemas: dict[str, Any] = {}
        self._starts: dict[int, Any] = {}  # pid -> process_start
        self._connected = False
        self._last_prune: float | None = None
        self._refusals: set[str] = set()
        self._last_retention: float | None = None
        self.overview = Overview()  # progress, errors and jobs per minute, for the status page

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
        from djsupervisor.worker.upstream_schema import UpstreamWorkerSchema

        try:
            return action()
        except UpstreamWorkerSchema as error:  # no retry will fix it: said once, not every fleet_interval
            if str(error) not in self._refusals:
                self._refusals.add(str(error))
                self.log.error("fleet agent: {}", error)
            return None
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
        if self._last_retention is None or now - self._last_retention >= _RETENTION_INTERVAL:
            self._last_retention = now
            self.apply_retention()

    def apply_retention(self) -> None:
        """Prune each worker schema of the pools, keeping the longest `log_retention_days` of the pools that
        share it (no pool loses rows it asked to keep)."""
        from djsupervisor.worker import retention

        days: dict[str, float] = {}
        pools: dict[str, str] = {}
        for pool, worker in self.workers.items():
            name = worker.worker_schema_name
            days[name] = max(days.get(name, 0.0), worker.log_retention_days)
            pools.setdefault(name, pool)
        for name, pool in pools.items():
            result = self._attempt(f"pruning {name}", partial(retention.prune, self.schema(pool), days[name]))
            if result is not None and result.total:
                self.log.info(
                    "fleet agent: pruned {} rows older than {:g} days from {}", result.total, days[name], name
                )

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

    def heartbeat(self, children: list[AgentChild], gone: list[GoneChild]) -> None:
        """Stamp the live children's rows; mark the gone ones exited."""
        import psutil

        # their job counters, before anything here may fail (a child of a pool this agent lacks is skipped below)
        self.overview.note_children(c for c in children if c["worker"] in self.workers)

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
                    current_table=(child["table"] or "")[:255],
                    current_key=child["key"],
                    cycles=child["cycles"],
                    jobs_done=child["jobs_done"],
                    jobs_failed=child["jobs_failed"],
                    heartbeat_window=self.window,
                )
            )
        for exited in gone:
            start = self._starts.pop(exited["pid"], None)
            if exited["worker"] in self.workers and start is not None:
                by_pool.setdefault(exited["worker"], []).append(
                    dict(
                        self._identity(exited["worker"], exited["pid"], start),
                        state="exited",
                        current_table="",
                        current_key=None,
                        heartbeat_window=0.0,
                    )
                )

        def stamp(schema: Any, rows: list[dict]) -> None:
            update_heartbeats(schema.connection, schema.tables["RegisteredWorker"].full_table_name, rows)

        for pool, rows in by_pool.items():
            self._attempt("heartbeat", partial(stamp, self.schema(pool), rows))

    def read(self) -> AgentReport:
        """The report for the parent: tables per pool, their queue depths, the drain flags that apply."""
        from djsupervisor.fleet.registry import flag_for, read_flags

        report: AgentReport = {}
        tables = self.tables()
        report["tables"] = {pool: [_short_table(t.full_table_name) for t in ts] for pool, ts in tables.items()}
        depths = {}
        for table in {t.full_table_name: t for ts in tables.values() for t in ts}.values():
            progress = self._attempt(f"reading the queue of {table.full_table_name}", table.jobs.progress)
            if progress is not None:
                depths[_short_table(table.full_table_name)] = progress
        report["depths"] = depths
        if self.overview.throughput():
            report["throughput"] = self.overview.throughput()
        if any(tables.values()) and self.overview.due():  # key sources cost more than queues: every READ_INTERVAL
            found = self._attempt("reading progress and errors", partial(self.overview.read, self.workers))
            if found is not None:
                report["progress"], report["errors"] = found["progress"], found["errors"]
        drained: dict[str, str] = {}
        flags_by_schema: dict[str, list | None] = {}
        for pool, worker in self.workers.items():
            name = worker.worker_schema_name
            if name not in flags_by_schema:
                flags_by_schema[name] = self._attempt("reading drain flags", partial(read_flags, self.schema(pool)))
            flags = flags_by_schema[name]
            if flags is None:  # unreadable: the parent keeps what it had
                return report
            mode = flag_for(flags, self.host, self.supervisor, pool)
            if mode:
                drained[pool] = mode
        report["drained"] = drained
        return report


@dataclasses.dataclass(frozen=True)
class AgentSpec:
    """What a fleet agent is started with; the parent reads it afresh at each start (a reload changes it)."""

    supervisor: str  # the supervisor's name
    host: str  # the host name its rows carry ("" for this machine's)
    fleet_interval: float  # seconds between the parent's commands
    parent_pid: int
    worker_configs: list[WorkerConfig]  # the definitions of the supervisor's pools
    webhooks: dict[str, Any] = dataclasses.field(default_factory=dict)  # SupervisorConfig.webhooks


def run_agent(spec: AgentSpec, *, command_fd: int, report_fd: int, close_fds: list[int]) -> None:
    """The body of the fleet agent child; never returns."""

    def body() -> int:
        import setproctitle

        isolate(spec.parent_pid, close_fds)
        setproctitle.setproctitle(f"djsupervisor: {spec.supervisor} fleet agent")
        agent = FleetAgent(
            supervisor=spec.supervisor,
            host=spec.host,
            worker_configs=spec.worker_configs,
            fleet_interval=spec.fleet_interval,
            webhooks=spec.webhooks,
        )
        commands = _CommandReader(command_fd, agent.log)
        closed = False
        while not closed:  # once the parent closed the pipe: one last round for its last line, then exit
            received, closed = commands.wait()
            agent.notifications.send(event for command in received for event in command.get("events", []))
            if not received:
                continue
            children = received[-1]["children"]
            gone = [g for command in received for g in command["gone"]]
            if not agent._connected:
                agent._attempt("connecting", agent.connect)
                if not agent._connected:
                    continue
            agent.maybe_prune()
            agent.heartbeat(children, gone)
            if not closed:
                _write_all(report_fd, encode(agent.read()))
        agent.notifications.close()
        return EXIT_OK

    run_then_exit(body)


class _CommandReader:
    """The agent's end of the command pipe: waits for data, returns every command complete so far."""

    def __init__(self, fd: int, log: Any) -> None:
        self.fd = fd
        self.log = log
        self.decoder = LineDecoder()
        self.selector = selectors.DefaultSelector()
        self.selector.register(fd, selectors.EVENT_READ)
        os.set_blocking(fd, False)

    def wait(self) -> tuple[list[AgentCommand], bool]:
        """Wait for data; returns the commands that arrived and whether the pipe is now closed."""
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
            self.decoder.push(data)
        commands: list[AgentCommand] = []
        for line in self.decoder:
            try:
                if line.ok:  # an undecodable line is skipped, as a torn one always was
                    commands.append(parse_agent_command(line.message))
            except ProtocolError as error:
                self.log.warning("fleet agent: unreadable command: {}", error)
        return commands, closed


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data`, blocking (the agent has nothing better to do; the parent reads promptly)."""
    os.set_blocking(fd, True)
    while data:
        data = data[os.write(fd, data) :]
