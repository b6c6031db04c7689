"""README's "Use it with your pipeline", run as written: build the wheel, install it into a fresh virtual
environment, write the worker module and the config from README's blocks, then `check`, `start`, `status
--queues` and `stop` with that environment's `djsupervisor` (issue 19: the README's `pip install
'djsupervisor[postgres]'` failed, the package is not on an index, and nothing showed a lab's own module).

The blocks are found by the ``<!-- use-it: NAME -->`` comment before them; the schema names are swapped for
the test's own. pip's cache makes the install of the dependencies quick after the first run.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wait_until

pytestmark = [pytest.mark.process, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def block(name: str) -> str:
    """The fenced block after ``<!-- use-it: NAME -->`` in README."""
    match = re.search(rf"<!-- use-it: {re.escape(name)} -->\n```\w*\n(.*?)\n```", README.read_text(), re.S)
    assert match, f"README has no use-it block {name!r}"
    return match.group(1)


def shell(command: str, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, shell=True, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, executable="/bin/bash"
    )


def test_readme_install_and_first_pipeline(db, tmp_path):
    venv, lab = tmp_path / "venv", tmp_path / "lab"
    lab.mkdir()
    env = {k: v for k, v in db.env.items() if k not in ("PYTHONPATH", "DJS_TEST_PREFIX", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)

    # the install block: the wheel lines, with this clone and this test's directories
    install = [line for line in block("install").splitlines() if "wheel" in line or "whl" in line]
    assert len(install) == 2, install
    built = shell(
        install[0]
        .replace("cd djsupervisor", f"cd {shlex.quote(str(REPO))}")
        .replace("python3 -m pip", f"{shlex.quote(sys.executable)} -m pip")
        .replace("-w dist", f"-w {shlex.quote(str(tmp_path / 'dist'))}"),
        env,
        tmp_path,
    )
    assert built.returncode == 0, built.stderr
    wheels = list((tmp_path / "dist").glob("djsupervisor-*.whl"))
    assert len(wheels) == 1 and wheels[0].name in install[1], (wheels, install[1])  # README names this wheel
    assert shell(f"{shlex.quote(sys.executable)} -m venv {venv}", env, tmp_path).returncode == 0
    installed = shell(
        install[1].replace("/opt/lab/venv", str(venv)).replace(f"djsupervisor/dist/{wheels[0].name}", str(wheels[0])),
        env,
        tmp_path,
        timeout=400,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    pipeline, workers = db.schema_name("pipeline"), db.schema_name("workers")
    (lab / "lab_workers.py").write_text(
        block("lab_workers.py").replace('"lab_pipeline"', repr(pipeline)).replace('"lab_workers_schema"', repr(workers))
    )
    (lab / "lab.toml").write_text(block("lab.toml"))
    seed = "import lab_workers as w; w.Sample.insert([(1,), (2,), (3,)], skip_duplicates=True)"
    assert shell(f"{venv}/bin/python -c {shlex.quote(seed)}", env, lab).returncode == 0

    commands = {}
    for line in block("commands").splitlines():
        if line.startswith("/opt/lab/venv/bin/djsupervisor "):
            words = line.split("#")[0].split()
            commands[words[1]] = [str(venv / "bin" / "djsupervisor"), *(w for w in words[1:] if w != "&")]
    assert list(commands) == ["check", "start", "status", "stop"], commands

    checked = subprocess.run(commands["check"], capture_output=True, text=True, timeout=120, env=env, cwd=lab)
    assert checked.returncode == 0, checked.stderr
    assert "lab.toml: valid; 1 worker: ingest×2 (lab_workers:ingest)" in checked.stdout
    with open(tmp_path / "supervisor.log", "wb") as log:
        supervisor = subprocess.Popen(
            commands["start"], env=env, cwd=lab, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        count = "import lab_workers as w; print(len(w.Squared()))"
        wait_until(
            lambda: shell(f"{venv}/bin/python -c {shlex.quote(count)}", env, lab).stdout.split()[-1:] == ["3"],
            120,
            interval=1,
            message="the three squares",
        )
        status = subprocess.run(commands["status"], capture_output=True, text=True, timeout=120, env=env, cwd=lab)
        assert status.returncode == 0 and "supervisor lab" in status.stdout and "__squared" in status.stdout, status
        stopped = subprocess.run(commands["stop"], capture_output=True, text=True, timeout=150, env=env, cwd=lab)
        assert stopped.returncode == 0, stopped.stderr
        assert supervisor.wait(30) == 0
        log = (tmp_path / "supervisor.log").read_text()
        assert "Native type" not in log, log  # DataJoint's warning about its own job table: DEBUG, not thrice
    finally:
        if supervisor.poll() is None:  # its process group: the children too
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait(10)
