"""Where worker targets are imported from (issue 18): the config file's directory and `[supervisor] pythonpath`,
appended after site-packages; never the working directory first. As root, a directory on that path that group or
others can write to is refused with one line."""

from __future__ import annotations

import os
import sys

import pytest
from helpers import run_cli, write_config

from djsupervisor.supervisor.config import config_from_modules

pytestmark = pytest.mark.timeout(90)

TARGET = 'from djsupervisor import DataJointWorker\n\nworker = DataJointWorker("beside", "beside_workers")\n'


def plant(directory, name, marker):
    """A module that, if ever imported, leaves `marker` behind (what an attacker's code would do as root)."""
    (directory / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")


@pytest.fixture
def attacker(tmp_path):
    """A directory anyone could write to, with planted modules; the working directory of the commands."""
    directory = tmp_path / "shared"
    directory.mkdir()
    return directory


def config_beside(directory, module, extra=""):
    directory.mkdir(exist_ok=True)
    (directory / f"{module}.py").write_text(TARGET)
    return write_config(
        directory / "lab.toml", f'[supervisor]\n{extra}[[worker]]\nname = "w"\ntarget = "{module}:worker"\n'
    )


def test_planted_modules_in_the_working_directory_do_not_run(db, tmp_path, attacker):
    marker = tmp_path / "planted-ran"
    plant(attacker, "json", marker)  # shadows the standard library
    plant(attacker, "labtargets", marker)  # shadows the target's module
    config = config_beside(tmp_path / "conf", "labtargets")
    result = run_cli(db, attacker, "check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "valid; 1 worker" in result.stdout
    assert not marker.exists()


def test_targets_beside_the_config_file_import(db, tmp_path):
    config = config_beside(tmp_path / "conf", "besidetargets")
    result = run_cli(db, tmp_path, "check", "-c", str(config))
    assert result.returncode == 0, result.stderr


def test_targets_in_pythonpath_import_relative_to_the_config_file(db, tmp_path):
    (tmp_path / "libs").mkdir()
    (tmp_path / "libs" / "pathtargets.py").write_text(TARGET)
    (tmp_path / "conf").mkdir()
    config = write_config(
        tmp_path / "conf" / "lab.toml",
        '[supervisor]\npythonpath = ["../libs"]\n[[worker]]\nname = "w"\ntarget = "pathtargets:worker"\n',
    )
    result = run_cli(db, tmp_path, "check", "-c", str(config))
    assert result.returncode == 0, result.stderr


def test_pythonpath_must_be_a_list_of_strings(db, tmp_path):
    config = config_beside(tmp_path / "conf", "besidetargets", 'pythonpath = "libs"\n')
    result = run_cli(db, tmp_path, "check", "-c", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(
        f"{config}: supervisor.pythonpath: must be a list of non-empty strings, got str 'libs'"
    )


def test_module_arguments_find_the_working_directory_after_site_packages(monkeypatch, attacker):
    (attacker / "cwdtargets.py").write_text(TARGET)
    monkeypatch.chdir(attacker)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(attacker))])
    config = config_from_modules(["cwdtargets"])
    assert [w.target for w in config.workers] == ["cwdtargets:worker"]
    site_packages = max(i for i, entry in enumerate(sys.path) if entry.endswith("site-packages"))
    assert sys.path.index(str(attacker)) > site_packages  # appended: nothing there shadows an installed name


def one_refusal(result, directory):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{directory}: writable by group or others" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal applies to root")
def test_root_refuses_a_config_directory_others_can_write(db, tmp_path):
    marker = tmp_path / "planted-ran"
    config = config_beside(tmp_path / "conf", "loosetargets")
    plant(tmp_path / "conf", "loosetargets", marker)  # what someone else could have put there
    os.chmod(tmp_path / "conf", 0o757)  # o+w
    result = run_cli(db, tmp_path, "check", "-c", str(config))
    one_refusal(result, tmp_path / "conf")
    assert not marker.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal applies to root")
def test_root_refuses_a_pythonpath_directory_group_can_write(db, tmp_path):
    libs = tmp_path / "libs"
    libs.mkdir()
    os.chmod(libs, 0o775)  # g+w
    config = config_beside(tmp_path / "conf", "besidetargets", f'pythonpath = ["{libs}"]\n')
    result = run_cli(db, tmp_path, "check", "-c", str(config))
    one_refusal(result, libs)


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal applies to root")
def test_root_refuses_a_working_directory_others_can_write_for_module_arguments(db, tmp_path, attacker):
    marker = tmp_path / "planted-ran"
    plant(attacker, "pipelines", marker)
    os.chmod(attacker, 0o1777)  # /tmp-like: sticky does not make it safe to import from
    result = run_cli(db, attacker, "start", "pipelines.offline")
    one_refusal(result, attacker)
    assert not marker.exists()
