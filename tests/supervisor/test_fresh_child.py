"""The fresh interpreter a restart starts (`djsupervisor.supervisor.fresh_child`), run as the supervisor runs it:
``python -P -m djsupervisor.supervisor.fresh_child [--probe] FD``, its payload in an inherited descriptor."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from djsupervisor.supervisor.config import WorkerConfig
from djsupervisor.supervisor.fresh_child import PROBE_FAILED, _interpreter, _payload_file

pytestmark = pytest.mark.timeout(60)


def run_fresh(payload: dict, *flags: str, cwd=None) -> subprocess.CompletedProcess:
    fd = _payload_file(payload)
    try:
        argv = _interpreter(fd, *flags)
        return subprocess.run(argv, pass_fds=(fd,), capture_output=True, text=True, timeout=50, cwd=cwd)
    finally:
        os.close(fd)


def test_the_probe_names_the_file_and_line_a_target_raised_at(tmp_path):
    (tmp_path / "broken_deploy.py").write_text('import os\n\nraise RuntimeError("NAS not mounted")\n')
    (tmp_path / "fine_deploy.py").write_text("from djsupervisor import DataJointWorker\nw = 3\n")
    targets = {
        "a": WorkerConfig("a", "broken_deploy:w"),
        "b": WorkerConfig("b", "fine_deploy:w"),
        "c": WorkerConfig("c", "fine_deploy:missing"),
    }
    payload = {"sys_path": [*sys.path, str(tmp_path)], "logging": {"level": "WARNING"}, "probe": targets}
    done = run_fresh(payload, "--probe")
    assert done.returncode == PROBE_FAILED, done.stderr
    problems = json.loads(done.stdout.splitlines()[-1])["problems"]
    assert "NAS not mounted" in problems["a"] and f"(raised at {tmp_path}/broken_deploy.py:3)" in problems["a"]
    assert problems["b"] == "fine_deploy:w: 'fine_deploy:w' is a int, not a DataJointWorker"
    assert "has no attribute 'missing'" in problems["c"]


def test_the_parent_path_replaces_the_working_directory_and_its_secrets_are_masked(tmp_path):
    (tmp_path / "djsupervisor").mkdir()  # a planted package in the working directory shadows nothing (-P)
    (tmp_path / "djsupervisor" / "__init__.py").write_text("raise SystemExit('planted')\n")
    payload = {
        "sys_path": list(sys.path),
        "logging": {"level": "INFO"},
        "secrets": ["s3cret-value"],
        "probe": {},
    }
    done = run_fresh(payload, "--probe", cwd=tmp_path)
    assert done.returncode == 0 and json.loads(done.stdout) == {"problems": {}}, done.stderr
    code = (
        "import sys; from djsupervisor.supervisor.fresh_child import _prepare; from loguru import logger;"
        "_prepare({'sys_path': sys.path, 'logging': {'level': 'INFO'}, 'secrets': ['s3cret-value']}, {});"
        "logger.info('the password is s3cret-value')"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert "the password is ***" in shown.stderr and "s3cret-value" not in shown.stderr, shown.stderr
