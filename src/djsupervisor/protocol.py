"""The wire protocol between djsupervisor's processes: one JSON-lines codec and the typed messages it carries.

Every pipe and socket between processes carries JSON lines: one compact JSON object per line, ending in ``\\n``.

====================  ==================  ============================================================
channel               direction           message
====================  ==================  ============================================================
report pipe           child -> parent     `ChildReportMessage`, merged by the parent into a `ChildReport`
agent command pipe    parent -> agent     `AgentCommand`
agent report pipe     agent -> parent     `AgentReport`
control socket        client -> parent    `ControlRequest`, answered by one `ControlResponse`
====================  ==================  ============================================================

Why one codec: the framing used to be written out at each end of each channel, with different ideas of what
a bad line is and none of how long a line may get, so a child writing without newlines could grow its
parent's buffer without bound. Here `encode` writes every message and `LineDecoder` reads every channel:
it keeps the partial tail across reads, skips (and counts) lines that are not JSON, and caps a line's length.

Why TypedDicts rather than dataclasses: messages stay plain dicts at run time, so what keeps or passes them on
(a slot's report, the status output, `FleetView.apply`, the supervisor's control handler) needs no conversion
and nothing changes on the wire, while mypy checks their keys where they are built and read. The ``parse_*``
functions check a decoded message's shape once, where it is received, and raise `ProtocolError`.

No DataJoint import and no I/O beyond bytes in and out: every process role imports this module, including the
CLI client, which must answer fast.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any, Generic, Required, TypedDict, TypeVar, cast, overload

#: Default cap on one line's length in bytes (newline excluded). The largest messages are the agent's
#: command and report and the status answer of a big supervisor: about 200 bytes per child or table, so
#: 16 MiB leaves room for tens of thousands while bounding what a misbehaving peer can make a reader keep.
MAX_LINE_BYTES = 16 * 1024 * 1024

#: Cap on one child report line as the parent reads it. A child keeps its lines under PIPE_BUF (4096 bytes)
#: so that they never interleave; anything far longer is a child gone wrong, not a report.
MAX_CHILD_REPORT_BYTES = 64 * 1024


class ProtocolError(ValueError):
    """A decoded message does not have the shape its channel carries; str() is one line."""


def encode(message: Mapping[str, Any]) -> bytes:
    """One message as one line: compact JSON, newline-terminated, ASCII only.

    Values JSON has no type for (dates, decimals, numpy numbers, UUIDs) are written as their ``str()``, as
    they always were. Raises TypeError or ValueError for what cannot be written at all (a circular
    structure, a key that is not a string or a number). JSON never writes a raw newline, so the line is
    always exactly one.
    """
    return json.dumps(message, default=str, separators=(",", ":")).encode("ascii") + b"\n"


@dataclasses.dataclass(frozen=True)
class DecodedLine:
    """One complete line: its `message`, or, for a line that could not be read, the `error` (one line).

    `too_long` marks a line over the decoder's cap: it was dropped unread, the rest of it is skipped up to
    its newline."""

    message: Any = None
    error: str | None = None
    too_long: bool = False

    @property
    def ok(self) -> bool:
        """Whether the line was decoded."""
        return self.error is None


class LineDecoder:
    """Incremental JSON-lines reader: `push` what arrived, take complete lines with `pop` (or iterate),
    or do both at once with `feed`.

    A line longer than `max_line_bytes` is reported once, as soon as it is known to be too long (even
    before its newline arrives: a peer that never sends one must not make the reader wait or buffer), and
    the rest of it is dropped up to its newline. So the reader keeps at most `max_line_bytes` plus one read
    of a peer's data, whatever the peer sends. Lines are decoded only when popped: a reader that takes a
    few lines and then refuses a flood pays for those few only.
    """

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be >= 1, got {max_line_bytes}")
        self.max_line_bytes = max_line_bytes
        self.skipped = 0  # lines dropped so far: not JSON, or too long
        self._tail = bytearray()  # the line in progress
        self._lines: deque[bytes | None] = deque()  # complete lines not yet popped; None: one too long
        self._discarding = False  # inside an over-long line: dropping bytes up to its newline

    @property
    def buffered(self) -> int:
        """Bytes of the line in progress (the partial tail) held now."""
        return len(self._tail)

    def has_line(self) -> bool:
        """Whether a complete line is waiting to be popped."""
        return bool(self._lines)

    def push(self, data: bytes) -> None:
        """Take the bytes that arrived; complete lines wait for `pop`."""
        if self._discarding:
            end = data.find(b"\n")
            if end < 0:
                return
            data = data[end + 1 :]
            self._discarding = False
        if b"\n" in data:
            *lines, tail = (bytes(self._tail) + data).split(b"\n")
            self._lines.extend(line if len(line) <= self.max_line_bytes else None for line in lines)
            self._tail = bytearray(tail)
        else:
            self._tail += data
        if len(self._tail) > self.max_line_bytes:
            self._lines.append(None)
            self._tail = bytearray()
            self._discarding = True

    def end(self) -> None:
        """The peer closed: the partial tail, if any, becomes its last line (a peer may omit the newline)."""
        if self._tail:
            self._lines.append(bytes(self._tail))
            self._tail = bytearray()
        self._discarding = False

    def pop(self) -> DecodedLine | None:
        """The next complete line, decoded (None when none is waiting)."""
        if not self._lines:
            return None
        line = self._lines.popleft()
        if line is None:
            self.skipped += 1
            return DecodedLine(error=f"line longer than {self.max_line_bytes} bytes", too_long=True)
        try:
            return DecodedLine(message=json.loads(line.decode("utf-8")))
        except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError; "[[[[…" recurses
            self.skipped += 1
            return DecodedLine(error=first_line(error))

    def __iter__(self) -> Iterator[DecodedLine]:
        """Pop every complete line waiting."""
        while (line := self.pop()) is not None:
            yield line

    def feed(self, data: bytes) -> list[Any]:
        """Push `data` and return every message completed so far; bad lines are skipped (see `skipped`)."""
        self.push(data)
        return [line.message for line in self if line.ok]

    def clear(self) -> None:
        """Forget everything buffered (lines waiting and the partial tail)."""
        self._lines.clear()
        self._tail = bytearray()
        self._discarding = False


def first_line(error: BaseException | str) -> str:
    """The first line of an error's text: answers and log lines stay one line each."""
    text = str(error)
    return text.splitlines()[0] if text else ""


# ----- shape checks: a message's TypedDict says which fields it must have and what each holds


@functools.cache
def _field_types(shape: Any) -> dict[str, tuple[type, ...]]:
    """What each field of the TypedDict `shape` may hold at run time, from its annotations: ``str | None``
    gives (str, NoneType), ``list[int]`` gives (list,) (items are not looked into), a float takes an int."""
    fields = {}
    for name, annotation in typing.get_type_hints(shape).items():
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        accepted = tuple(typing.get_origin(a) or a for a in (typing.get_args(annotation) if union else [annotation]))
        fields[name] = (*accepted, int) if float in accepted else accepted
    return fields


def _checked(message: Any, what: str, shape: Any) -> Any:
    """`message` if it is a JSON object with the required fields of the TypedDict `shape`, and each of its
    fields, where present, holds what `shape` says; else ProtocolError. Other keys pass unchecked."""
    if not isinstance(message, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    for name, accepted in _field_types(shape).items():
        if name not in message:
            if name in shape.__required_keys__:
                raise ProtocolError(f"{what} lacks {name!r}")
        elif not isinstance(message[name], accepted):
            raise ProtocolError(f"{what}: {name} is a {type(message[name]).__name__}")
    return message


# ----- child -> parent: the report pipe


class ChildReportMessage(TypedDict, total=False):
    """One snapshot a child sends its parent (`supervisor.child.Reporter`): on worker events (throttled),
    on ``forked``, ``connecting`` and ``connected``, and every `heartbeat_interval` seconds (no `event`)."""

    pid: int
    state: str  # what the worker does: idle, running, populating, sleeping, stopped
    table: str | None  # the table of the job in flight, quotes dropped: schema.__table
    key: dict[str, Any] | None  # its key (None when it would make the line too long)
    jobs_done: int  # by this child
    jobs_failed: int
    cycles_done: int
    job_elapsed: float | None  # seconds the job in flight has run; None outside a job
    stalled: float | None  # seconds without a worker event outside a job, net of the announced sleep
    event: str  # what prompted it: a worker event kind, "forked", "connecting" or "connected"
    connection_ids: list[int]  # the database sessions, once connected (the "connected" message)


def parse_child_report(message: Any) -> ChildReportMessage:
    """A decoded child report line, checked (ProtocolError if it is not one)."""
    return cast(ChildReportMessage, _checked(message, "child report", ChildReportMessage))


T = TypeVar("T")


class _Reported(Generic[T]):
    """A named accessor of one `ChildReport` key: its latest value, or `default` while there is none (not sent
    yet, or sent as null). The key is the attribute's name unless given."""

    def __init__(self, default: T, *, key: str = "", doc: str = "") -> None:
        self.default = default
        self.key = key
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = self.key or name

    @overload
    def __get__(self, report: None, owner: type) -> _Reported[T]: ...
    @overload
    def __get__(self, report: ChildReport, owner: type) -> T: ...
    def __get__(self, report: ChildReport | None, owner: type) -> T | _Reported[T]:
        if report is None:
            return self
        value = report.get(self.key)
        return self.default if value is None else value


class ChildReport(dict[str, Any]):
    """What the parent knows of its current child: every key of `ChildReportMessage` at its latest value.

    A dict, so that the status, the monitor and tests read and set keys as they always did; the named
    properties are how new code asks what the reports say."""

    def merge(self, message: ChildReportMessage) -> None:
        """Take in one report (its keys replace the older values; keys it lacks keep theirs)."""
        self.update(message)

    @property
    def connected(self) -> bool:
        """Whether the child has connected to the database (its "connected" report arrived)."""
        return "connection_ids" in self

    @property
    def got_going(self) -> bool:
        """Whether the child completed a cycle or a job (it is working normally)."""
        return bool(self.cycles_done or self.jobs_done or self.jobs_failed)

    pid: _Reported[int | None] = _Reported(None)
    activity: _Reported[str | None] = _Reported(None, key="state", doc="What the worker does (not the slot's state).")
    table: _Reported[str | None] = _Reported(None, doc="The table of the job in flight.")
    key: _Reported[dict[str, Any] | None] = _Reported(None, doc="The key of the job in flight.")
    jobs_done: _Reported[int] = _Reported(0)
    jobs_failed: _Reported[int] = _Reported(0)
    cycles_done: _Reported[int] = _Reported(0)
    job_elapsed: _Reported[float | None] = _Reported(None, doc="Seconds the job in flight had run; None outside one.")
    stalled: _Reported[float | None] = _Reported(None, doc="Seconds without progress outside a job; None in one.")
    connection_ids: _Reported[list[int] | None] = _Reported(None, doc="The database sessions, once connected.")


# ----- parent <-> fleet agent: the agent's two pipes


class AgentChild(TypedDict):
    """One live, connected child, as the agent stamps it into RegisteredWorker."""

    worker: str  # the pool (worker definition name)
    slot: int
    pid: int
    state: str  # "stopping" while the supervisor stops it, else what the worker does
    table: str | None
    key: dict[str, Any] | None
    jobs_done: int
    jobs_failed: int
    cycles: int


class GoneChild(TypedDict):
    """A child reaped since the last command: its row is marked exited."""

    worker: str
    pid: int


class SupervisorEvent(TypedDict):
    """Something the supervisor did that its notifiers are told of (the agent sends it: the parent does no
    network I/O). `kind`: ``fatal`` (a slot gave up), ``job_timeout`` and ``hung`` (a child killed),
    ``memory`` (a child recycled above max_memory_mb or max_gpu_memory_mb), ``drain`` and ``halt`` (a pool
    stopped by a fleet flag)."""

    kind: str
    pool: str
    slot: int | None
    message: str  # one line, as the supervisor logged it
    time: float  # wall clock, when it happened


class _AgentCommandBase(TypedDict):
    children: list[AgentChild]
    gone: list[GoneChild]


class AgentCommand(_AgentCommandBase, total=False):
    """Parent -> agent, every `fleet_interval` seconds: the live children, those gone and, when there are
    some, the supervisor's events (a base class holds the required keys: ``NotRequired`` is not seen
    through this module's postponed annotations)."""

    events: list[SupervisorEvent]


class AgentReport(TypedDict, total=False):
    """Agent -> parent, in answer to each command; a part it could not read is left out (the parent keeps
    what it had). `depths` maps a table to its ``{job state: count}``."""

    tables: dict[str, list[str]]  # pool -> the tables it populates
    depths: dict[str, dict[str, int]]
    drained: dict[str, str]  # pool -> "drain" or "halt"
    progress: list[dict[str, Any]]  # `djsupervisor progress --json`'s rows (fleet.overview), every 30 s
    errors: list[dict[str, Any]]  # `djsupervisor errors --json`'s groups, the most frequent 50
    throughput: dict[str, list[list[int]]]  # pool -> [[minute since the epoch, jobs done], ...], the last hour


def parse_agent_command(message: Any) -> AgentCommand:
    """A decoded command line, checked (ProtocolError if it is not one)."""
    command = cast(AgentCommand, _checked(message, "agent command", AgentCommand))
    for child in command["children"]:
        _checked(child, "agent command child", AgentChild)
    for gone in command["gone"]:
        _checked(gone, "agent command gone child", GoneChild)
    for event in command.get("events", []):
        _checked(event, "agent command event", SupervisorEvent)
    return command


def parse_agent_report(message: Any) -> AgentReport:
    """A decoded agent report line, checked (ProtocolError if it is not one)."""
    return cast(AgentReport, _checked(message, "agent report", AgentReport))


# ----- control socket: client -> supervisor -> client


class ControlRequest(TypedDict, total=False):
    """One request on the control socket."""

    cmd: Required[str]  # "status", "stop", "reload", "scale", "restart" or "roll"
    fast: bool  # stop: without waiting for the jobs in flight
    worker: str  # scale: the pool; restart: the pool (absent: every pool)
    roll: int  # roll: the restart to report on (the id restart answered)
    replicas: int  # scale: its new size (of an autoscaled pool: its minimum)


class ControlResponse(TypedDict, total=False):
    """The answer to one request: ``{"ok": true, ...}`` (status and scale add their fields) or
    ``{"ok": false, "error": "one line"}``."""

    ok: Required[bool]
    error: str


def parse_control_request(message: Any) -> ControlRequest:
    """A decoded request line, checked (ProtocolError, with the answer's wording, if it is not one)."""
    if not isinstance(message, dict) or not isinstance(message.get("cmd"), str):
        raise ProtocolError('request must be a JSON object with a string "cmd"')
    return message  # type: ignore[return-value]


def parse_control_response(message: Any) -> ControlResponse:
    """A decoded answer line, checked (ProtocolError if it is not a JSON object)."""
    return cast(ControlResponse, _checked(message, "control response", ControlResponse))


def refusal(error: BaseException | str) -> ControlResponse:
    """The answer that refuses a request: ``{"ok": false, "error": ...}``, the error on one line."""
    return {"ok": False, "error": first_line(error)}


def refused(response: Mapping[str, Any]) -> str | None:
    """Why `response` refuses its request (None if it is ``ok``)."""
    if response.get("ok"):
        return None
    return str(response.get("error", "refused"))
