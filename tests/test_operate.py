"""`djsupervisor progress`, `errors` and `retry` against a pipeline in a known state, on both backends.

The state (`known_state`): Square's key source holds 12 keys. A real worker's cycle computed 1 and 2 and
failed 3-8 with three messages (3-5 a missing file, each with its own path; 6-7 a calibration number; 8 a
missing probe); 9-12 came later: 9 and 10 pending, 11 ignored, 12 reserved by a holder that is still alive.
Cube (populated by another worker) computed both Squares there were. ErrorLog also holds two cleared
transient errors of Square and one error of a callable. Every number the commands print is checked.
"""

from __future__ import annotations

import datetime
import json
import re

import pytest
from helpers import run_cli, write_config
from pipelines.lab import declare

from djsupervisor import DataJointWorker
from djsupervisor.worker.attempts import AttemptBook, Failure
from djsupervisor.worker.schema import WorkerSchema

pytestmark = pytest.mark.timeout(240)

MISSING = [3, 4, 5]
CALIBRATION = [6, 7]


def job_states(lab) -> dict[int, str]:
    return {row["source_id"]: row["status"] for row in lab.Square.jobs.proj("status").to_dicts()}


@pytest.fixture
def known_state(db, tmp_path):
    lab = declare(db.schema_name("pipe"))
    workers = db.schema_name("workers")
    lab.seed([1, 2])
    for i in MISSING:
        lab.seed([i], fail=f"missing file /data/raw/session{i}/probe.dat")
    for i in CALIBRATION:
        lab.seed([i], fail=f"calibration {i * 1.5} out of range")
    lab.seed([8], fail="no probe for this session")
    standard = DataJointWorker("standard", workers, sleep_duration=1, db_prefix=db.prefix)
    standard(lab.Square)
    standard.run_once()
    other = DataJointWorker("other", workers, sleep_duration=1, db_prefix=db.prefix)
    other(lab.Cube)
    other.run_once()
    lab.seed([9, 10, 11, 12])
    lab.Square.jobs.refresh()
    lab.Square.jobs.ignore({"source_id": 11})
    assert lab.Square.jobs.reserve({"source_id": 12})  # this test's session holds it: alive, never recovered
    schema = WorkerSchema(workers, db.connection)
    me = dict(worker_name="standard", host="node-a", pid=4242, process_start=datetime.datetime(2026, 1, 1))
    for n in (17, 18):
        schema.log_error(
            me,
            kind="cleared",
            process=lab.Square.full_table_name,
            key={"source_id": 3},
            message=f"Lost connection to MySQL server during query ({n})",
            stack=None,
        )
    schema.log_error(
        me, kind="callable", process="check_sources", key=None, message="source 5 is negative", stack="Traceback"
    )
    config = write_config(
        tmp_path / "lab.toml",
        """
        [supervisor]
        name = "lab"
        [[worker]]
        name = "other"
        target = "pipelines.workers:other"
        [[worker]]
        name = "standard"
        target = "pipelines.workers:standard"
        """,
    )
    assert job_states(lab) == {
        **dict.fromkeys(MISSING + CALIBRATION + [8], "error"),
        9: "pending",
        10: "pending",
        11: "ignore",
        12: "reserved",
    }
    return lab, str(config), standard


def cli(db, tmp_path, *args):
    result = run_cli(db, tmp_path, *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_progress_counts_every_table(db, tmp_path, known_state):
    lab, config, _ = known_state
    result = cli(db, tmp_path, "progress", "-c", config, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["window_minutes"] == 10
    square, cube = report["tables"]  # pipeline order (Cube depends on Square), not the config's (other first)
    assert square == {
        "table": lab.Square.full_table_name,
        "label": f"{db.schema_name('pipe')}.Square",
        "workers": ["standard"],
        "total": 12,
        "done": 2,
        "remaining": 2,
        "pending": 2,
        "reserved": 1,
        "error": 6,
        "ignore": 1,
        "done_in_window": 2,  # the worker's cycle, in WorkerLog
        "rate_per_min": 0.2,
        "eta_seconds": 600.0,
    }
    assert cube == {
        "table": lab.Cube.full_table_name,
        "label": f"{db.schema_name('pipe')}.Cube",
        "workers": ["other"],
        "total": 2,
        "done": 2,
        "remaining": 0,
        "pending": 0,
        "reserved": 0,
        "error": 0,
        "ignore": 0,
        "done_in_window": 2,
        "rate_per_min": 0.2,
        "eta_seconds": 0.0,
    }
    assert report["statements"] <= 8  # catalog 2, WorkerLog 1, then 2 per table

    result = cli(db, tmp_path, "progress", "-c", config)
    assert result.returncode == 0, result.stderr
    header, row_square, row_cube, note = result.stdout.splitlines()
    columns = "TABLE TOTAL DONE REMAINING RESERVED ERROR IGNORE WORKER RATE ETA"
    assert header.split() == columns.split()
    pipe = db.schema_name("pipe")
    assert row_square.split() == [f"{pipe}.Square", "12", "2", "2", "1", "6", "1", "standard", "0.2/min", "10", "min"]
    assert row_cube.split() == [f"{pipe}.Cube", "2", "2", "0", "0", "0", "0", "other", "0.2/min", "done"]
    assert note == "(rate: jobs done in the last 10 min)"

    result = cli(db, tmp_path, "progress", "pipelines.supervised", "--json", "--window", "5")  # MODULE... form
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["tables"]
    assert [(r["label"].split(".")[1], r["total"], r["done"], r["error"], r["rate_per_min"]) for r in rows] == [
        ("Square", 12, 2, 6, 0.4),  # 2 jobs in the last 5 min
        ("Cube", 2, 2, 0, 0.4),
    ]


def test_errors_are_grouped_by_table_and_message(db, tmp_path, known_state):
    lab, config, _ = known_state
    result = cli(db, tmp_path, "errors", "-c", config, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    groups = {g["message"]: g for g in report["errors"]}
    assert [(g["message"], g["count"]) for g in report["errors"]] == [
        ("ValueError: missing file <path>", 3),
        ("ValueError: calibration <n> out of range", 2),
        ("ValueError: no probe for this session", 1),
    ]
    for message, ids, text in (
        ("missing file <path>", MISSING, "missing file /data/raw/session{}/probe.dat"),
        ("calibration <n> out of range", CALIBRATION, "calibration {} out of range"),
        ("no probe for this session", [8], "no probe for this session"),
    ):
        group = groups["ValueError: " + message]
        assert group["table"] == lab.Square.full_table_name and group["kind"] == "job"
        (key_id,) = group["example_key"].values()
        assert key_id in ids
        assert group["example_message"] == "ValueError: " + text.format(
            key_id * 1.5 if "calibration" in text else key_id
        )
        assert group["first_seen"] <= group["last_seen"]
        assert "stack" not in group
    history = [(g["kind"], g["label"], g["message"], g["count"]) for g in report["history"]]
    pipe = db.schema_name("pipe")
    assert history == [
        ("callable", "check_sources", "source <n> is negative", 1),
        ("cleared", f"{pipe}.Square", "Lost connection to MySQL server during query (<n>)", 2),
    ]
    assert report["history"][1]["example_key"] == {"source_id": 3}

    result = cli(db, tmp_path, "errors", "-c", config, "--table", "Square", "--match", "%calibration%", "--show-stack")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "errors in the job tables: 2 in 1 group"
    assert lines[1].split()[:3] == ["TABLE", "KIND", "COUNT"]
    cells = re.split(r"\s{2,}", lines[2])
    assert (
        cells[0] == f"{pipe}.Square"
        and cells[1:3] == ["job", "2"]
        and cells[-1] == "ValueError: calibration <n> out of range"
    )
    assert re.fullmatch(
        r'    e\.g\. \{"source_id": [67]\}: ValueError: calibration (9\.0|10\.5) out of range', lines[3]
    )
    assert any(line.startswith("    | ") and "ValueError" in line for line in lines)  # the stack, on request
    assert "ErrorLog history (cleared, callables): 0 in 0 groups" in result.stdout  # nothing cleared matches

    result = cli(db, tmp_path, "errors", "-c", config, "--json", "--table", "Square", "--show-stack")
    report = json.loads(result.stdout)
    assert all("ValueError" in g["stack"] and "Traceback" in g["stack"] for g in report["errors"])
    assert [(g["kind"], g["count"]) for g in report["history"]] == [("cleared", 2)]  # a callable is no table's

    result = cli(db, tmp_path, "errors", "-c", config)
    assert result.stdout.splitlines()[0] == "errors in the job tables: 6 in 3 groups"
    assert "ErrorLog history (cleared, callables): 3 in 2 groups" in result.stdout


def test_retry_repends_exactly_the_matching_jobs(db, tmp_path, known_state):
    lab, config, standard = known_state
    pipe = db.schema_name("pipe")
    before = job_states(lab)
    book = AttemptBook(
        db.connection,
        lambda: WorkerSchema(db.schema_name("workers"), db.connection).tables["JobAttempt"].full_table_name,
    )
    book.count(lab.Square.full_table_name, [Failure({"source_id": 3}, "x", "died", "killed")])
    book.count(lab.Square.full_table_name, [Failure({"source_id": 8}, "x", "died", "killed")])

    result = cli(db, tmp_path, "retry", "-c", config, "--match", "%missing file%", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"would re-pend 3 error jobs of {pipe}.Square", "dry run: nothing changed"]
    assert job_states(lab) == before
    assert book.last(lab.Square.full_table_name, {"source_id": 3}) is not None

    lab.set_behaviour([{"source_id": i} for i in MISSING], fail="")  # the operator fixed the cause
    result = cli(db, tmp_path, "retry", "-c", config, "--match", "%missing file%")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"re-pended 3 error jobs of {pipe}.Square (their attempt counts reset)"]
    assert job_states(lab) == {**before, **dict.fromkeys(MISSING, "pending")}  # reserved 12, ignored 11 untouched
    assert book.last(lab.Square.full_table_name, {"source_id": 3}) is None  # fresh attempts
    assert book.last(lab.Square.full_table_name, {"source_id": 8}) is not None  # not selected: kept

    standard.run_once()  # a later worker computes them (and the pending 9 and 10)
    assert set(lab.Square.to_arrays("source_id")) == {1, 2, 3, 4, 5, 9, 10}

    result = cli(
        db, tmp_path, "retry", "-c", config, "--table", f"{pipe}.Square", "--match", "%calibration%", "--ignore"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"ignored 2 error jobs of {pipe}.Square"]
    assert {k for k, s in job_states(lab).items() if s == "ignore"} == {6, 7, 11}

    result = cli(db, tmp_path, "retry", "-c", config, "--all", "--dry-run")  # what is left: 8's missing probe
    assert result.stdout.splitlines() == [f"would re-pend 1 error job of {pipe}.Square", "dry run: nothing changed"]

    square_line = cli(db, tmp_path, "progress", "-c", config).stdout.splitlines()[1]
    assert square_line.endswith("0 left")  # nothing to start, but one reserved and one in error: not "done"
    result = cli(db, tmp_path, "progress", "-c", config, "--json")
    square = json.loads(result.stdout)["tables"][0]
    assert (square["done"], square["error"], square["ignore"], square["reserved"], square["remaining"]) == (
        7,
        1,
        3,
        1,
        0,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--table", "Cube"], "retry: no error job matches table Cube; nothing to do"),
        (["--match", "%nothing like it%"], "retry: no error job matches message LIKE '%nothing like it%'"),
        (["--all", "--table", "Square"], "retry: --all selects every error job; give it alone"),
        ([], "retry: say which error jobs: --table T, --match PATTERN, or --all"),
        (["--table", "Nope"], "--table 'Nope': not a table the workers populate"),
    ],
)
def test_retry_refuses_an_empty_or_unclear_selection(db, tmp_path, known_state, args, message):
    lab, config, _ = known_state
    before = job_states(lab)
    result = cli(db, tmp_path, "retry", "-c", config, *args)
    assert result.returncode == 2, result
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("djsupervisor: error: ") and message in result.stderr
    assert job_states(lab) == before


def _read_until(fd: int, predicate, timeout: float) -> bytes:
    """Read a pseudo-terminal's output until `predicate(output)` holds (or the deadline passes)."""
    import os
    import select
    import time

    output = b""
    deadline = time.monotonic() + timeout
    while not predicate(output) and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                output += os.read(fd, 65536)
            except OSError:  # the child closed its side
                break
    return output


def test_watch_redraws_in_place_under_a_terminal(db, tmp_path, known_state):
    import os
    import pty
    import signal
    import subprocess

    from helpers import djsupervisor_command

    lab, config, standard = known_state
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [*djsupervisor_command(), "progress", "-c", config, "--watch", "--interval", "0.3"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=db.env,
        cwd=tmp_path,
    )
    os.close(slave)
    try:
        clear = b"\x1b[H\x1b[2J"
        output = _read_until(master, lambda out: out.count(clear) >= 2, timeout=60)
        assert output.count(clear) >= 2, output  # drawn, then redrawn in place
        frame = output.split(clear)[1].decode()
        pipe = db.schema_name("pipe")
        square = next(line for line in frame.splitlines() if line.startswith(f"{pipe}.Square"))
        assert "[###......" in square and " 16.7%" in square  # 2 of 12 done
        lab.set_behaviour([{"source_id": i} for i in MISSING], fail="")
        lab.Square.jobs.update1({"source_id": 3, "status": "pending", "error_message": ""})
        standard.run_once()  # 3, 9 and 10 done: the next frame shows 5 of 12
        output = _read_until(master, lambda out: b" 41.7%" in out, timeout=60)
        assert b" 41.7%" in output
        process.send_signal(signal.SIGINT)  # Ctrl+C ends the watch quietly
        assert process.wait(timeout=30) == 0
        rest = _read_until(master, lambda out: False, timeout=0.5)
        assert b"Traceback" not in output + rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        os.close(master)


def test_watch_writes_plain_blocks_when_not_a_terminal(db, tmp_path, known_state):
    import io

    from djsupervisor.operate.pipeline import Pipeline
    from djsupervisor.operate.progress import watch

    lab, _, standard = known_state
    other = DataJointWorker("other", db.schema_name("workers"), sleep_duration=1, db_prefix=db.prefix)
    other(lab.Cube)
    out = io.StringIO()
    watch(Pipeline.load([("standard", standard), ("other", other)]), 10.0, 0.1, out=out, rounds=2)
    blocks = out.getvalue().split("\n\n")
    assert len(blocks) == 3 and blocks[2] == ""  # two frames, each a plain block
    assert "\x1b" not in out.getvalue()
    assert all("PROGRESS" in block.splitlines()[1] for block in blocks[:2])
