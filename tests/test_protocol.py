"""The wire protocol: the JSON-lines codec (framing, bad and over-long lines) and the typed messages of every
channel, without processes or a database."""

from __future__ import annotations

import datetime
import decimal
import itertools
import json
import os

import pytest
import setproctitle
from helpers import agent_child
from hypothesis import given
from hypothesis import strategies as st

from djsupervisor.fleet.link import agent_children
from djsupervisor.protocol import (
    AgentCommand,
    AgentReport,
    ChildReport,
    ChildReportMessage,
    ControlRequest,
    ControlResponse,
    DecodedLine,
    GoneChild,
    LineDecoder,
    ProtocolError,
    encode,
    parse_agent_command,
    parse_agent_report,
    parse_child_report,
    parse_control_request,
    parse_control_response,
    refusal,
    refused,
)
from djsupervisor.supervisor.child import Reporter
from djsupervisor.supervisor.config import WorkerConfig
from djsupervisor.supervisor.slot import Slot, SlotState

# ----- encode


def test_encode_is_one_compact_ascii_line():
    data = encode({"a": [1, 2], "text": "two\nlines", "name": "Zoë"})
    assert data.endswith(b"\n") and data.count(b"\n") == 1  # the newline in the text is escaped
    assert data == b'{"a":[1,2],"text":"two\\nlines","name":"Zo\\u00eb"}\n'
    assert json.loads(data) == {"a": [1, 2], "text": "two\nlines", "name": "Zoë"}


def test_encode_writes_what_json_has_no_type_for_as_text():
    day = datetime.date(2024, 5, 1)
    assert json.loads(encode({"day": day, "amount": decimal.Decimal("1.50")})) == {
        "day": "2024-05-01",
        "amount": "1.50",
    }


def test_encode_refuses_a_circular_structure():
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ValueError):
        encode(loop)


# ----- LineDecoder


def test_lines_split_across_chunks_are_joined():
    decoder = LineDecoder()
    assert decoder.feed(b'{"a":') == []
    assert decoder.buffered == 5
    assert decoder.feed(b'1}\n{"b"') == [{"a": 1}]
    assert decoder.feed(b":2}\n") == [{"b": 2}]
    assert decoder.buffered == 0


def test_byte_by_byte_and_all_at_once_give_the_same_messages():
    data = b"".join(encode({"n": n, "s": "x" * n}) for n in range(20))
    one = LineDecoder()
    by_byte = [m for i in range(len(data)) for m in one.feed(data[i : i + 1])]
    assert by_byte == LineDecoder().feed(data) == [{"n": n, "s": "x" * n} for n in range(20)]


def test_bad_lines_are_skipped_and_counted():
    decoder = LineDecoder()
    assert decoder.feed(b'not json\n\xff\xfe\n\n{"ok":1}\n[1,\n') == [{"ok": 1}]
    assert decoder.skipped == 4


def test_a_bad_line_says_why_in_one_line():
    decoder = LineDecoder()
    decoder.push(b'{"cmd": \n\xff\n')
    first, second = list(decoder)
    assert not first.ok and "Expecting value" in str(first.error) and "\n" not in str(first.error)
    assert not second.ok and "utf-8" in str(second.error)
    assert not first.too_long


def test_deep_nesting_is_a_bad_line_not_a_crash():
    decoder = LineDecoder()
    assert decoder.feed(b"[" * 100_000 + b"\n" + b"[1]\n") == [[1]]
    assert decoder.skipped == 1


def test_an_over_long_complete_line_is_dropped():
    decoder = LineDecoder(max_line_bytes=10)
    decoder.push(b'"0123456789abc"\n{"a":1}\n')
    lines = list(decoder)
    assert [line.too_long for line in lines] == [True, False]
    assert lines[0].error == "line longer than 10 bytes" and lines[1].message == {"a": 1}


def test_an_over_long_partial_line_is_reported_at_once_and_skipped_to_its_newline():
    decoder = LineDecoder(max_line_bytes=10)
    decoder.push(b"x" * 11)  # no newline yet: a flooding peer must not make the reader buffer or wait
    (line,) = list(decoder)
    assert line.too_long and decoder.buffered == 0
    for _ in range(100):
        decoder.push(b"y" * 1000)  # the rest of the same line: dropped, reported once
    assert decoder.buffered == 0 and not decoder.has_line()
    assert decoder.feed(b'yyy\n{"a":1}\n') == [{"a": 1}]
    assert decoder.skipped == 1


def test_a_line_exactly_at_the_cap_is_kept():
    decoder = LineDecoder(max_line_bytes=7)
    assert decoder.feed(b'"abcde"') == []  # 7 bytes, still partial
    assert decoder.feed(b"\n") == ["abcde"]


def test_memory_stays_bounded_whatever_a_peer_sends():
    decoder = LineDecoder(max_line_bytes=1000)
    for chunk in (b"z" * 999, b"z" * 999, b"\n" + b"q" * 999, b"q" * 5):
        decoder.push(chunk)
        assert decoder.buffered <= 1000


def test_lines_are_decoded_only_when_popped():
    decoder = LineDecoder()
    decoder.push(b'{"cmd":"a"}\n' * 1000)
    assert decoder.feed(b"") == [{"cmd": "a"}] * 1000
    decoder.push(b'{"cmd":"a"}\n' * 1000)
    assert decoder.pop() == DecodedLine(message={"cmd": "a"})
    assert decoder.has_line()
    decoder.clear()
    assert not decoder.has_line() and decoder.buffered == 0


def test_end_turns_an_unterminated_tail_into_a_last_line():
    decoder = LineDecoder()
    decoder.push(b'{"ok":true}')
    assert not decoder.has_line()
    decoder.end()
    assert decoder.pop() == DecodedLine(message={"ok": True})
    decoder.end()  # nothing left: no empty line appears
    assert decoder.pop() is None


def test_a_cap_below_one_byte_is_refused():
    with pytest.raises(ValueError):
        LineDecoder(max_line_bytes=0)


def fed_in_pieces(decoder: LineDecoder, data: bytes, cuts: list[int]) -> list:
    """What `decoder` returns for `data` fed in pieces cut at `cuts` (taken modulo the length)."""
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [m for start, stop in itertools.pairwise(points) for m in decoder.feed(data[start:stop])]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)


@given(
    messages=st.lists(st.dictionaries(st.text(), json_values, max_size=5), max_size=12),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_any_messages_in_any_chunks_decode_to_themselves(messages, cuts):
    decoder = LineDecoder()
    decoded = fed_in_pieces(decoder, b"".join(encode(message) for message in messages), cuts)
    assert decoded == messages
    assert decoder.skipped == 0 and decoder.buffered == 0


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=10))
def test_garbage_in_any_chunks_never_raises_and_resyncs_at_a_newline(garbage, cuts):
    decoded = fed_in_pieces(LineDecoder(max_line_bytes=100), garbage + b"\n" + encode({"after": "garbage"}), cuts)
    assert decoded[-1] == {"after": "garbage"}


# ----- messages: every type round-trips through the codec and its parser


def round_trip(message, parse):
    decoder = LineDecoder()
    (decoded,) = decoder.feed(encode(message))
    return parse(decoded)


IDLE_REPORT = ChildReportMessage(
    pid=10,
    state="idle",
    table=None,
    key=None,
    jobs_done=0,
    jobs_failed=0,
    cycles_done=0,
    job_elapsed=None,
    stalled=0.0,
    event="forked",
)
CHILD_REPORTS: list[ChildReportMessage] = [
    IDLE_REPORT,
    IDLE_REPORT
    | ChildReportMessage(state="populating", table="lab.__square", key={"id": 3}, jobs_done=4, jobs_failed=1)
    | ChildReportMessage(cycles_done=2, job_elapsed=1.25, stalled=None, event="job_start"),
    {"event": "connected", "connection_ids": [17, 18]},
    {},  # a heartbeat may say nothing new
]


@pytest.mark.parametrize("message", CHILD_REPORTS)
def test_child_reports_round_trip(message):
    assert round_trip(message, parse_child_report) == message


def test_agent_messages_round_trip():
    child = agent_child(jobs_done=2, cycles=5)
    command = AgentCommand(children=[child], gone=[GoneChild(worker="standard", pid=9)])
    assert round_trip(command, parse_agent_command) == command
    report = AgentReport(
        tables={"standard": ["lab.__square"]},
        depths={"lab.__square": {"pending": 4, "reserved": 1}},
        drained={"standard": "drain"},
    )
    assert round_trip(report, parse_agent_report) == report
    assert round_trip(AgentReport(tables={}, depths={}), parse_agent_report) == {"tables": {}, "depths": {}}


@pytest.mark.parametrize(
    "request_",
    [
        ControlRequest(cmd="status"),
        ControlRequest(cmd="stop", fast=True),
        ControlRequest(cmd="reload"),
        ControlRequest(cmd="scale", worker="standard", replicas=3),
    ],
)
def test_control_requests_round_trip(request_):
    assert round_trip(request_, parse_control_request) == request_


def test_control_responses_round_trip():
    ok = ControlResponse(ok=True)
    assert round_trip(ok, parse_control_response) == ok
    assert round_trip(refusal("no worker named 'x'"), parse_control_response) == {
        "ok": False,
        "error": "no worker named 'x'",
    }
    assert refused({"ok": True, "workers": []}) is None
    assert refused({"ok": False, "error": "bad"}) == "bad"
    assert refused({"ok": False}) == "refused"
    assert refusal(RuntimeError("first\nsecond"))["error"] == "first"


@pytest.mark.parametrize(
    "parse, message, wording",
    [
        (parse_child_report, [1, 2], "not a JSON object"),
        (parse_child_report, None, "not a JSON object"),  # what a bad line decodes to
        (parse_child_report, {"jobs_done": "4"}, "jobs_done is a str"),
        (parse_child_report, {"key": [1]}, "key is a list"),
        (parse_agent_command, {"children": []}, "lacks 'gone'"),
        (parse_agent_command, {"children": [{"worker": "w"}], "gone": []}, "lacks 'slot'"),
        (parse_agent_command, {"children": [], "gone": [{"worker": "w", "pid": "9"}]}, "pid is a str"),
        (parse_agent_command, {"children": {}, "gone": []}, "children is a dict"),
        (parse_agent_report, {"depths": []}, "depths is a list"),
        (parse_control_request, {"cmd": 42}, 'a string "cmd"'),
        (parse_control_request, [], 'a string "cmd"'),
        (parse_control_response, "ok", "not a JSON object"),
    ],
)
def test_messages_of_the_wrong_shape_are_refused(parse, message, wording):
    with pytest.raises(ProtocolError, match=wording):
        parse(message)


# ----- the parent's view of a child's reports


def test_child_report_names_what_the_reports_say():
    report = ChildReport()
    assert not report.connected and not report.got_going
    assert (report.jobs_done, report.jobs_failed, report.cycles_done) == (0, 0, 0)
    assert report.activity is None and report.table is None and report.connection_ids is None
    assert ChildReport.activity.key == "state" and "slot's state" in str(ChildReport.activity.__doc__)
    report.merge({"event": "connected", "connection_ids": [5], "state": "idle"})
    assert report.connected and report.connection_ids == [5] and not report.got_going
    report.merge({"state": "populating", "table": "lab.__t", "key": {"id": 1}, "job_elapsed": 0.5})
    assert (report.activity, report.table, report.key, report.job_elapsed) == ("populating", "lab.__t", {"id": 1}, 0.5)
    report.merge({"jobs_failed": 1, "stalled": None})
    assert report.got_going and report.jobs_failed == 1 and report.stalled is None
    assert report.connected  # keys a later report lacks keep their values
    report.update(jobs_done=None)  # read as 0, as the slot's totals always did
    assert report.jobs_done == 0


def test_agent_children_are_the_live_connected_slots():
    config = WorkerConfig(name="standard", target="m:w")
    idle, working, stopping, unconnected, empty = (Slot("standard", i, config) for i in range(5))
    for pid, slot in enumerate((idle, working, stopping, unconnected), start=100):
        slot.spawned(pid, -1, now=0.0)
    for slot in (idle, working, stopping):
        slot.report.merge({"connection_ids": [1], "state": "idle"})
    working.report.merge({"state": "populating", "table": "lab.__t", "key": {"id": 1}, "jobs_done": 3})
    working.report.merge({"cycles_done": 2})
    stopping.change(SlotState.STOPPING)
    children = agent_children([idle, working, stopping, unconnected, empty])
    assert [c["slot"] for c in children] == [0, 1, 2]
    assert [c["state"] for c in children] == ["idle", "populating", "stopping"]
    assert children[1] == agent_child(slot=1, pid=101, jobs_done=3, cycles=2)
    assert parse_agent_command(json.loads(encode(AgentCommand(children=children, gone=[]))))


# ----- the child's Reporter writes what the parent reads


@pytest.fixture
def report_pipe():
    """A pipe for a Reporter; the process title it sets is put back afterwards."""
    title = setproctitle.getproctitle()
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    os.close(read_fd)
    os.close(write_fd)
    setproctitle.setproctitle(title)


def test_reporter_lines_are_child_reports(report_pipe):
    read_fd, write_fd = report_pipe
    reporter = Reporter(write_fd, "lab", "standard[0]", os.getppid(), interval=5.0)
    reporter.send({"event": "forked"})
    reporter.send({"event": "connected", "connection_ids": [7]})
    decoder = LineDecoder()
    messages = [parse_child_report(m) for m in decoder.feed(os.read(read_fd, 65536))]
    report = ChildReport()
    for message in messages:
        report.merge(message)
    assert [m["event"] for m in messages] == ["forked", "connected"]
    assert report.connected and report.pid == os.getpid() and report.activity == "idle"


def test_reporter_drops_a_key_too_long_for_an_atomic_write(report_pipe):
    read_fd, write_fd = report_pipe
    reporter = Reporter(write_fd, "lab", "standard[0]", os.getppid(), interval=5.0)
    reporter.state, reporter.table, reporter.key = "populating", "`lab`.`__t`", {"blob": "x" * 5000}
    reporter.send({"event": "job_start"})
    data = os.read(read_fd, 65536)
    assert len(data) < 4096 and data.endswith(b"\n")
    (message,) = LineDecoder().feed(data)
    assert message["key"] is None and message["table"] == "lab.__t"
