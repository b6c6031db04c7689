"""The unit files: they verify with systemd-analyze and say what the supervisor needs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)
UNITS = Path(__file__).resolve().parents[1] / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize(
    "unit, instance",
    [("djsupervisor.service", "djsupervisor.service"), ("djsupervisor@.service", "djsupervisor@lab.service")],
)
def test_unit_files_verify(tmp_path, unit, instance):
    executable = Path(sys.executable).parent / "djsupervisor"
    text = (UNITS / unit).read_text()
    assert "/opt/djsupervisor/bin/djsupervisor" in text
    (tmp_path / instance).write_text(text.replace("/opt/djsupervisor/bin/djsupervisor", str(executable)))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / instance)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize("unit", ["djsupervisor.service", "djsupervisor@.service"])
def test_unit_files_say_what_the_supervisor_needs(unit):
    settings = dict(
        line.split("=", 1)
        for line in (UNITS / unit).read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["KillMode"] == "mixed" and settings["Restart"] == "on-failure"
    assert settings["RestartPreventExitStatus"] == "2" and settings["OOMPolicy"] == "continue"
    assert int(settings["TimeoutStopSec"]) > 30  # above the default graceful_timeout
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert settings["RuntimeDirectoryMode"] == "0700" and settings["RuntimeDirectoryPreserve"] == "yes"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID" and settings["WatchdogSec"]
    assert settings["EnvironmentFile"].startswith("-/etc/djsupervisor/")
    assert "DJSUPERVISOR_RUNTIME_DIR=%t/djsupervisor" in settings["Environment"]


@pytest.mark.parametrize("unit", ["djsupervisor.service", "djsupervisor@.service"])
def test_unit_files_show_where_targets_come_from(unit):
    """Issue 19: under systemd a loose lab_workers.py was not found (the working directory was /, unsaid)."""
    text = (UNITS / unit).read_text()
    assert "\nWorkingDirectory=/etc/djsupervisor\n" in text
    comments = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert "config file's directory" in comments and "[supervisor] pythonpath" in comments
