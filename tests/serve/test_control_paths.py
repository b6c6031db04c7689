"""Where the control socket may live (issue 18): shared directories keep their mode, a world-writable one that is
not sticky is refused, `..` is refused at config load, and a default directory another user pre-created leads to
a private fallback that `djsupervisor` commands still find."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from helpers import djsupervisor_command, write_config

from djsupervisor.serve.control import ControlError, ControlServer
from djsupervisor.supervisor.config import ConfigError, load_config

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534


def test_a_shared_sticky_directory_keeps_its_mode(tmp_path):
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)  # stands in for /tmp
    srv = ControlServer(str(shared / "lab.sock"), lambda r: {"ok": True})
    assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o600
    srv.close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777


def test_a_world_writable_directory_that_is_not_sticky_is_refused(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(ControlError, match="writable by others and not sticky") as caught:
        ControlServer(str(loose / "lab.sock"), lambda r: {"ok": True})
    assert "\n" not in str(caught.value)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o777
    assert not (loose / "lab.sock").exists()


def test_a_directory_made_for_the_socket_is_private(tmp_path):
    srv = ControlServer(str(tmp_path / "new" / "deeper" / "lab.sock"), lambda r: {"ok": True})
    srv.close()
    assert stat.S_IMODE((tmp_path / "new" / "deeper").stat().st_mode) == 0o700


def test_start_refuses_a_world_writable_socket_directory_in_one_line(tmp_path, db):
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    path = write_config(
        tmp_path / "lab.toml",
        f'[supervisor]\ncontrol_socket = "{loose}/lab.sock"\n'
        '[[worker]]\nname = "w"\ntarget = "pipelines.offline:worker"\n',
    )
    result = subprocess.run(
        [*djsupervisor_command(), "start", "-c", str(path)], env=db.env, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "writable by others and not sticky" in lines[0], result.stderr
    assert stat.S_IMODE(loose.stat().st_mode) == 0o777


@pytest.mark.parametrize("socket", ["../lab.sock", "/run/djsupervisor/../../etc/lab.sock", "run/../lab.sock"])
def test_dot_dot_in_control_socket_is_refused_at_load(tmp_path, socket):
    path = write_config(
        tmp_path / "lab.toml",
        f'[supervisor]\ncontrol_socket = "{socket}"\n[[worker]]\nname = "w"\ntarget = "pipelines.offline:worker"\n',
    )
    with pytest.raises(ConfigError, match=r"supervisor\.control_socket: must not contain '\.\.'") as caught:
        load_config(path, check_targets=False)
    assert "\n" not in str(caught.value)


SERVE = textwrap.dedent(
    """
    import selectors, threading
    from loguru import logger
    from djsupervisor.serve.endpoints import Endpoints

    endpoints, selector = Endpoints(logger), selectors.DefaultSelector()
    endpoints.open(selector, name="lab", control_socket=None, http=None, supervisor=None,
                   answer=lambda request: {"ok": True, "workers": [], "answered": request["cmd"]})
    print("SOCKET", endpoints.control.path, flush=True)
    running = threading.Event()
    running.set()

    def loop():
        while running.is_set():
            for key, mask in selector.select(0.02):
                key.data(mask)

    threading.Thread(target=loop, daemon=True).start()
    from djsupervisor.cli import main  # in this process: nobody may not exec this interpreter again

    print("STATUS", main(["status", "--name", "lab", "--json"]), flush=True)
    running.clear()
    endpoints.close()
    """
)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as two users")
def test_a_hostile_default_directory_leads_to_a_private_fallback_that_status_finds():
    # Another user (root here) pre-created /tmp/djsupervisor-<uid> for the supervisor's user (nobody).
    shared = Path(tempfile.mkdtemp(prefix="djs-shared-"))
    try:
        shared.chmod(0o1777)  # stands in for /tmp, which nobody can reach inside pytest's private tmp_path
        hostile = shared / f"djsupervisor-{NOBODY}"
        hostile.mkdir(mode=0o755)
        script = shared / "serve.py"
        script.write_text(SERVE)
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("XDG_RUNTIME_DIR", "DJSUPERVISOR_RUNTIME_DIR", "HOME")
        }
        env.update(TMPDIR=str(shared), PYTHONPATH=str(Path(__file__).parents[1]))
        result = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, str(script)],
            env=env,
            cwd=shared,
            capture_output=True,
            text=True,
            timeout=45,
        )
        out = result.stdout
        assert result.returncode == 0, out + result.stderr
        socket_line = next(line for line in out.splitlines() if line.startswith("SOCKET"))
        socket_dir = Path(socket_line.split()[1]).parent
        assert socket_dir.parent == shared and socket_dir != hostile and socket_dir.name.startswith("djsupervisor-")
        assert "not ours or not private" in result.stderr  # the fallback is logged
        assert '"answered": "status"' in out and "STATUS 0" in out, out
        info = socket_dir.stat()
        assert info.st_uid == NOBODY and stat.S_IMODE(info.st_mode) == 0o700
        assert stat.S_IMODE(hostile.stat().st_mode) == 0o755 and hostile.stat().st_uid == 0  # left alone
    finally:
        shutil.rmtree(shared)
