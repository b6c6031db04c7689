"""Logging: text and JSON lines carry supervisor, worker and slot; DataJoint's logs arrive; passwords don't."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

SCRIPT = """
import logging, sys
from loguru import logger
from djsupervisor.log import setup_logging, add_secret
setup_logging("INFO", sys.argv[1], supervisor="lab")
add_secret("s3cr3t-pw")
logger.bind(worker="standard", slot=1).info("working on key {}", 7)
logging.getLogger("datajoint").warning("from datajoint")
logger.info("connecting with password s3cr3t-pw")
"""


def run(fmt: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", SCRIPT, fmt], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stderr.strip().splitlines()


def test_text_lines_carry_the_context():
    lines = run("text")
    assert len(lines) == 3
    assert "[lab standard[1]] working on key 7" in lines[0] and "INFO" in lines[0]
    assert "[lab -] from datajoint" in lines[1] and "WARNING" in lines[1]
    assert "s3cr3t-pw" not in "\n".join(lines) and "password ***" in lines[2]


def test_json_lines_for_log_shippers():
    records = [json.loads(line) for line in run("json")]
    assert records[0]["supervisor"] == "lab" and records[0]["worker"] == "standard" and records[0]["slot"] == 1
    assert records[0]["message"] == "working on key 7" and records[0]["level"] == "INFO"
    assert records[1]["message"] == "from datajoint"
    assert records[2]["message"] == "connecting with password ***"
