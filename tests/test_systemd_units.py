"""The unit files: they verify with systemd-analyze, say what the supervisor needs, and keep their hardening
(security issue 18: ProtectHome, ProtectProc, LimitNOFILE, the password as a credential, a user and a runtime
directory per template instance). Nothing here starts systemd."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from djsupervisor.credentials import CREDENTIAL

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


def unit_settings(unit: str) -> dict[str, str]:
    """The unit file's settings (the last of a key given twice), comments left out."""
    return dict(
        line.split("=", 1)
        for line in (UNITS / unit).read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )


@pytest.mark.parametrize("unit", ["djsupervisor.service", "djsupervisor@.service"])
def test_unit_files_say_what_the_supervisor_needs(unit):
    settings = unit_settings(unit)
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["KillMode"] == "mixed" and settings["Restart"] == "on-failure"
    assert settings["RestartPreventExitStatus"] == "2" and settings["OOMPolicy"] == "continue"
    assert int(settings["TimeoutStopSec"]) > 30  # above the default graceful_timeout
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert settings["RuntimeDirectoryMode"] == "0700" and "RuntimeDirectoryPreserve" not in settings
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID" and settings["WatchdogSec"]
    assert settings["EnvironmentFile"].startswith("-/etc/djsupervisor/")
    assert "DJSUPERVISOR_RUNTIME_DIR=%t/djsupervisor/" in settings["Environment"]


@pytest.mark.parametrize("unit, instance", [("djsupervisor.service", "djsupervisor"), ("djsupervisor@.service", "%i")])
def test_unit_files_keep_their_hardening(unit, instance):
    text = (UNITS / unit).read_text()
    settings = unit_settings(unit)
    assert settings["ProtectHome"] == "yes" and settings["ProtectProc"] == "invisible"
    assert int(settings["LimitNOFILE"]) >= 65536  # systemd's default soft limit is 1024
    # the password is a credential djsupervisor reads, not DJ_PASS in the environment file
    assert settings["LoadCredential"] == f"{CREDENTIAL}:/etc/djsupervisor/{instance}.dj_pass"
    assert "DJ_PASS" not in settings["Environment"] and "DJ_USER, DJ_PASS" not in text  # not in the env file
    # the control socket's directory is the instance's own, and the supervisor's default path follows it
    assert settings["RuntimeDirectory"] == f"djsupervisor/{instance}"
    environment = dict(item.split("=", 1) for item in settings["Environment"].split())
    assert environment["DJSUPERVISOR_RUNTIME_DIR"] == f"%t/{settings['RuntimeDirectory']}"
    for line in ("NoNewPrivileges=yes", "PrivateTmp=yes", "CapabilityBoundingSet=", "UMask=0077"):
        assert line in text.splitlines()


def test_template_instances_run_as_users_of_their_own():
    """djsupervisor@a cannot signal or read djsupervisor@b: a (dynamic) user per instance, its config readable
    through the djsupervisor group."""
    settings = unit_settings("djsupervisor@.service")
    assert settings["DynamicUser"] == "yes" and settings["User"] == "djsupervisor-%i"
    assert settings["SupplementaryGroups"] == "djsupervisor" and "Group" not in settings
    assert unit_settings("djsupervisor.service")["User"] == "djsupervisor"  # the single unit: one static user


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize(
    "unit, instance",
    [("djsupervisor.service", "djsupervisor.service"), ("djsupervisor@.service", "djsupervisor@lab.service")],
)
def test_unit_files_rate_ok_with_systemd_analyze_security(tmp_path, unit, instance):
    (tmp_path / instance).write_text((UNITS / unit).read_text())
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(tmp_path / instance)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if "--offline" in result.stderr:  # systemd before 250
        pytest.skip("systemd-analyze security has no --offline")
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match and float(match.group(1)) <= 2.0, result.stdout[-2000:] + result.stderr


@pytest.mark.parametrize("unit", ["djsupervisor.service", "djsupervisor@.service"])
def test_unit_files_show_where_targets_come_from(unit):
    """Issue 19: under systemd a loose lab_workers.py was not found (the working directory was /, unsaid)."""
    text = (UNITS / unit).read_text()
    assert "\nWorkingDirectory=/etc/djsupervisor\n" in text
    comments = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert "config file's directory" in comments and "[supervisor] pythonpath" in comments
