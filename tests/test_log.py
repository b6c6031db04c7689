"""Logging: text and JSON lines carry supervisor, worker and slot; DataJoint's logs arrive; passwords don't."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

SCRIPT = """
import logging, sys, warnings
warnings.filterwarnings("ignore", message="No datajoint.json found")  # as the CLI does
from loguru import logger
from djsupervisor.log import setup_logging, add_secret
setup_logging("INFO", sys.argv[1], supervisor="lab")
add_secret("s3cr3t-pw")
add_secret('p"Zq\\te')
logger.bind(worker="standard", slot=1).info("working on key {}", 7)
logging.getLogger("datajoint").warning("from datajoint")
logger.info("connecting with password s3cr3t-pw")
logger.bind(worker="-", slot="-").info("supervisor line")
try:
    raise RuntimeError("login failed for s3cr3t-pw and env-pw-123")
except RuntimeError:
    logger.exception("boom")
warnings.warn("careful")
try:
    raise RuntimeError('bad p"Zq\\te')
except RuntimeError:
    logger.exception("quoted")
"""


def run(fmt: str, **kwargs) -> list[str]:
    env = dict(os.environ, DJ_PASS="env-pw-123")
    env.pop("JOURNAL_STREAM", None)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, fmt], capture_output=True, text=True, timeout=30, env=env, **kwargs
    )
    assert result.returncode == 0, result.stderr
    return result.stderr.strip().splitlines()


def test_text_lines_carry_the_context():
    lines = run("text")
    assert "[lab standard[1]] working on key 7" in lines[0] and "INFO" in lines[0]
    assert "[lab -] from datajoint" in lines[1] and "WARNING" in lines[1]
    assert "password ***" in lines[2]
    assert lines[3].endswith("[lab -] supervisor line")  # "-" means no slot, not slot "-"
    assert "ERROR" in lines[4] and "boom" in lines[4]
    assert "RuntimeError: login failed for *** and ***" in "\n".join(lines)  # tracebacks are masked too
    assert any("WARNING" in line and "UserWarning: careful" in line for line in lines)
    output = "\n".join(lines)
    assert "RuntimeError: bad ***" in output and "Zq" not in output
    assert "s3cr3t-pw" not in output and "env-pw-123" not in output and "\x1b[" not in output


def test_json_lines_for_log_shippers():
    records = [json.loads(line) for line in run("json")]
    assert records[0]["supervisor"] == "lab" and records[0]["worker"] == "standard" and records[0]["slot"] == 1
    assert records[0]["message"] == "working on key 7" and records[0]["level"] == "INFO"
    assert records[1]["message"] == "from datajoint" and records[1]["level"] == "WARNING"
    assert records[2]["message"] == "connecting with password ***"
    assert records[3]["worker"] is None and records[3]["slot"] is None
    assert "RuntimeError: login failed for *** and ***" in records[4]["exception"]
    assert all(isinstance(r["pid"], int) and r["time"] for r in records)
    assert "RuntimeError: bad ***" in records[-1]["exception"]
    assert "Zq" not in "".join(json.dumps(r) for r in records)  # not even JSON-escaped


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_journald_gets_syslog_priorities(tmp_path, fmt):
    """With stderr on the journal stream (JOURNAL_STREAM names its device:inode), lines start with <N>."""
    lines = journal_output(SCRIPT, fmt)
    if fmt == "json":  # journald strips the prefix; what remains is the JSON object
        assert json.loads(lines[0][3:])["message"] == "working on key 7"
    assert lines[0].startswith("<6>") and "working on key 7" in lines[0]
    assert lines[1].startswith("<4>") and "from datajoint" in lines[1]
    assert lines[4].startswith("<3>") and "boom" in lines[4]


INJECTION = """
import sys, warnings
warnings.filterwarnings("ignore", message="No datajoint.json found")  # as the CLI does
from loguru import logger
from djsupervisor.log import setup_logging
setup_logging("INFO", sys.argv[1], supervisor="lab")
logger.info("key done\\n<0>forged emergency\\r\\x1b[31mred\\x85")
try:
    raise RuntimeError("bad row\\n<0>forged from a traceback")
except RuntimeError:
    logger.exception("failed")
logger.warning("after")
"""


def journal_output(script: str, fmt: str) -> list[str]:
    """The lines `script` (run with `fmt`) writes to a stderr that is the journal stream."""
    left, right = socket.socketpair()
    try:
        info = os.fstat(right.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}")
        process = subprocess.Popen(
            [sys.executable, "-c", script, fmt], stderr=right, stdout=subprocess.DEVNULL, env=env
        )
        right.close()
        left.settimeout(30)
        data = b""
        while chunk := left.recv(65536):
            data += chunk
        assert process.wait(30) == 0
    finally:
        left.close()
    return data.decode().split("\n")[:-1]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_message_cannot_forge_a_journal_record(fmt):
    """A newline and a "<0>" in a message stay inside its one line, which keeps the record's own priority;
    a traceback's lines carry the record's priority and cannot pass for a record."""
    lines = journal_output(INJECTION, fmt)
    assert not any(line.startswith("<0>") for line in lines)
    assert all(line[:3] in ("<6>", "<3>", "<4>") for line in lines)
    assert "\x1b" not in "".join(lines) and "\r" not in "".join(lines) and "\x85" not in "".join(lines)
    if fmt == "json":
        assert json.loads(lines[0][3:])["message"] == "key done\n<0>forged emergency\r\x1b[31mred\x85"
        assert len(lines) == 3 and "forged from a traceback" in json.loads(lines[1][3:])["exception"]
        return
    assert lines[0].startswith("<6>") and lines[0].endswith(r"key done\n<0>forged emergency\r\x1b[31mred\x85")
    assert lines[1].startswith("<3>") and lines[1].endswith("failed")
    trace = lines[2:-1]
    assert trace[0] == "<3>  | Traceback (most recent call last):"
    assert all(line.startswith("<3>  | ") for line in trace)
    assert trace[-2:] == ["<3>  | RuntimeError: bad row", "<3>  | <0>forged from a traceback"]
    assert lines[-1].startswith("<4>") and lines[-1].endswith("after")


def test_text_lines_escape_control_characters_without_journald():
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    result = subprocess.run(
        [sys.executable, "-c", INJECTION, "text"], capture_output=True, text=True, timeout=30, env=env
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.split("\n")[:-1]
    assert "INFO" in lines[0] and lines[0].endswith(r"key done\n<0>forged emergency\r\x1b[31mred\x85")
    assert all(line.startswith("  | ") for line in lines[2:-1]) and "WARNING" in lines[-1]
    assert "\x1b" not in result.stderr and "\r" not in result.stderr


DATAJOINT_WARNINGS = """
import logging, sys, warnings
warnings.filterwarnings("ignore", message="No datajoint.json found")
from djsupervisor.log import setup_logging
setup_logging("INFO", sys.argv[1], supervisor="lab")
datajoint = logging.getLogger("datajoint")
for _ in range(3):  # as a pipeline's modules, its children and its job tables would say them
    datajoint.warning("SSL connection failed (connection to server failed: received invalid response\\n)."
                      " Falling back to non-SSL connection.")
    datajoint.warning("Native type 'int' is used in attribute 'sample'. Consider using a core DataJoint type.")
datajoint.warning("Native type 'int' is used in attribute 'session'. Consider using a core DataJoint type.")
datajoint.warning("Native type 'float' is used in attribute 'value'. Consider using a core DataJoint type.")
for _ in range(2):
    warnings.warn("careful\\nover two lines")
"""


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_datajoint_warnings_are_one_line_each_and_said_once(fmt):
    """Issue 19: the TLS fallback warning spread over two lines; "Native type 'int'" came three times."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    result = subprocess.run(
        [sys.executable, "-c", DATAJOINT_WARNINGS, fmt], capture_output=True, text=True, timeout=30, env=env
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    messages = [json.loads(line)["message"] for line in lines] if fmt == "json" else lines
    assert len(messages) == 4, result.stderr  # TLS, 'int' (once, whichever attribute), 'float', the Python warning
    assert sum("Falling back to non-SSL" in m for m in messages) == 1
    assert any("received invalid response ). Falling back" in m for m in messages)  # the driver's newline: a space
    assert sum("Native type 'int'" in m for m in messages) == 1 and sum("'float'" in m for m in messages) == 1
    assert sum("careful over two lines" in m for m in messages) == 1
