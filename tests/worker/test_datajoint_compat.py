"""The DataJoint version check of `djsupervisor.worker.compat`: an untested major version fails at import, in one
line that names the installed version and the tested one. The version string the check reads is set by hand;
DataJoint itself runs unchanged."""

from __future__ import annotations

import subprocess
import sys

import datajoint
import pytest

from djsupervisor.worker import compat


@pytest.mark.parametrize("version", ["3.0.0", "1.0.2", "0.14.3"])
def test_an_untested_major_version_fails_in_one_line(monkeypatch, version):
    monkeypatch.setattr(datajoint, "__version__", version)
    with pytest.raises(compat.UnsupportedDataJointVersion) as raised:
        compat.check_datajoint_version()
    message = str(raised.value)
    assert isinstance(raised.value, ImportError)
    assert "\n" not in message
    assert f"the installed datajoint is {version}" in message
    assert compat.TESTED_RANGE in message


@pytest.mark.parametrize("version", ["2.3.5", "2.0.0", "2.9.1rc1", "0.0.0+unknown"])
def test_the_supported_major_version_passes(monkeypatch, version):
    monkeypatch.setattr(datajoint, "__version__", version)
    compat.check_datajoint_version()


def test_importing_the_worker_on_an_untested_major_version_fails_at_once():
    code = "import datajoint; datajoint.__version__ = '3.1.0'; from djsupervisor import DataJointWorker"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "djsupervisor.worker.compat.UnsupportedDataJointVersion: djsupervisor needs DataJoint 2.x "
        "(tested with 2.3.x); the installed datajoint is 3.1.0"
    )
