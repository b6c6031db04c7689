"""Secrets stay out of logs, the worker tables and make()'s subprocesses: a password a pipeline module sets in
`dj.config` at import is masked in `start -c` output (text and JSON) and in ErrorLog and RegisteredWorker rows;
DJ_PASS is gone from the environment of what a step starts; a config file holding a password that group or
others can read gets one warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from helpers import Supervised, djsupervisor_command, run_cli, wait_until, write_config

from djsupervisor.worker.schema import WorkerSchema

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

MODULE_PASSWORD = "mod-pw-" + uuid.uuid4().hex[:8]
ENV_PASSWORD = "env-pw-" + uuid.uuid4().hex[:8]


@pytest.fixture
def account(db):
    """A database account whose password is MODULE_PASSWORD (PostgreSQL's test server trusts any)."""
    if db.backend != "mysql":
        yield db.settings["user"]
        return
    user = "djst_" + uuid.uuid4().hex[:8]
    db.connection.query(f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{MODULE_PASSWORD}'")
    db.connection.query(f"GRANT ALL PRIVILEGES ON *.* TO '{user}'@'127.0.0.1'")
    try:
        yield user
    finally:
        db.connection.query(f"DROP USER '{user}'@'127.0.0.1'")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_password_set_at_import_is_masked_and_dj_pass_is_not_inherited(db, tmp_path, account, fmt):
    config = write_config(
        tmp_path / "lab.toml",
        f"""
        [supervisor]
        name = "lab"
        log_format = "{fmt}"

        [[worker]]
        name = "secret"
        target = "pipelines.secret_worker:secret"
        """,
    )
    config.chmod(0o600)
    env_out = tmp_path / "env.txt"
    env = dict(
        db.env,
        DJ_USER=account,
        DJ_PASS=ENV_PASSWORD,  # wrong on MySQL: the module's password is the one that logs in
        DJS_TEST_MODULE_PASSWORD=MODULE_PASSWORD,
        DJS_TEST_ENV_OUT=str(env_out),
    )
    supervised = Supervised(["-c", str(config)], env, tmp_path)
    schema = WorkerSchema(db.schema_name("workers"), db.connection)
    try:
        wait_until(
            lambda: env_out.exists() and len(schema.tables["ErrorLog"]()) > 0,
            90,
            message=f"a failed step; output:\n{supervised.output[-3000:]}",
        )
        wait_until(lambda: "cannot log in" in supervised.output, 30, message="the step's failure logged")
    finally:
        supervised.close()
    output = supervised.output
    assert MODULE_PASSWORD not in output and ENV_PASSWORD not in output, output[-3000:]
    assert "cannot log in with ***" in output
    if fmt == "json":
        assert all(json.loads(line) for line in output.splitlines() if line.strip())
    rows = schema.tables["ErrorLog"]().to_dicts() + schema.tables["RegisteredWorker"]().to_dicts()
    stored = json.dumps(rows, default=str)
    assert "cannot log in with ***" in stored and MODULE_PASSWORD not in stored and ENV_PASSWORD not in stored
    inherited = env_out.read_text()
    assert "DJS_TEST_MODULE_PASSWORD=" in inherited  # the subprocess's whole environment was read
    assert "DJ_PASS=" not in inherited and ENV_PASSWORD not in inherited


def test_a_config_password_readable_by_others_is_warned_about_once(db, tmp_path):
    config = write_config(
        tmp_path / "lab.toml",
        """
        [database]
        password = "cfg-secret-pw"

        [[worker]]
        name = "standard"
        target = "pipelines.supervised:standard"
        """,
    )
    config.chmod(0o640)
    done = run_cli(db, tmp_path, "status", "--fleet", "-c", str(config))
    warnings = [line for line in done.stderr.splitlines() if "readable by group or others" in line]
    assert len(warnings) == 1 and str(config) in warnings[0] and "chmod 600" in warnings[0], done.stderr
    assert "cfg-secret-pw" not in done.stderr + done.stdout
    config.chmod(0o600)
    done = run_cli(db, tmp_path, "status", "--fleet", "-c", str(config))
    assert "readable by group or others" not in done.stderr
    os.chmod(config, 0o644)
    config.write_text(config.read_text().replace('password = "cfg-secret-pw"\n', ""))
    done = run_cli(db, tmp_path, "status", "--fleet", "-c", str(config))
    assert "readable by group or others" not in done.stderr


RECONNECT = """
import os, datajoint as dj
from djsupervisor.worker.connection import reconnect_after_fork
first = dj.conn()
os.environ.pop("DJ_PASS")  # as a supervised child does once connected
first.close()
reconnect_after_fork(first)
assert dj.conn(reset=True).query("SELECT 1").fetchone()[0] == 1
print("reconnected")
"""


def test_a_reconnect_needs_no_dj_pass_in_the_environment(db, tmp_path, account):
    """DataJoint keeps the password it read from DJ_PASS in dj.config: dropping DJ_PASS breaks no reconnect."""
    env = dict(db.env, DJ_USER=account, DJ_PASS=MODULE_PASSWORD)
    done = subprocess.run([sys.executable, "-c", RECONNECT], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "reconnected" in done.stdout, done.stderr


UNCAUGHT = """
import os, sys
from djsupervisor.log import add_secret, setup_logging
from djsupervisor.supervisor.fork import run_then_exit
setup_logging("INFO", "text", supervisor="lab")
add_secret("uncaught-pw-123")
pid = os.fork()
if pid == 0:
    def body():
        raise RuntimeError("login with uncaught-pw-123 failed\\n<0>forged")
    run_then_exit(body)
print(os.waitpid(pid, 0)[1] >> 8)
"""


def test_an_uncaught_exception_in_a_child_goes_through_the_logger(tmp_path):
    done = subprocess.run([sys.executable, "-c", UNCAUGHT], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() != "0", done.stderr
    lines = done.stderr.splitlines()
    assert any("ERROR" in line and "ended by an uncaught exception" in line for line in lines), done.stderr
    assert "RuntimeError: login with *** failed" in done.stderr and "uncaught-pw-123" not in done.stderr
    assert "  | <0>forged" in lines


HAND_RUN = """
from pipelines.env_worker import envdump
envdump.run()
"""


@pytest.mark.parametrize("how", ["djsupervisor run", "DataJointWorker.run()"])
def test_dj_pass_is_not_inherited_by_what_a_step_starts_outside_a_supervisor(db, tmp_path, account, how):
    """Security issue 18: as a supervised child does, `djsupervisor run` and a hand-run worker drop DJ_PASS
    once connected; the password works (it logs in) and no subprocess of the worker sees it."""
    env_out = tmp_path / "env.txt"
    env = dict(db.env, DJ_USER=account, DJ_PASS=MODULE_PASSWORD, DJS_TEST_ENV_OUT=str(env_out))
    if how == "djsupervisor run":
        config = write_config(
            tmp_path / "lab.toml", '[[worker]]\nname = "envdump"\ntarget = "pipelines.env_worker:envdump"\n'
        )
        command = [*djsupervisor_command(), "run", "envdump", "-c", str(config)]
    else:
        command = [sys.executable, "-c", HAND_RUN]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    inherited = env_out.read_text()
    assert f"DJ_USER={account}" in inherited  # the subprocess's whole environment was read
    assert "DJ_PASS=" not in inherited and MODULE_PASSWORD not in inherited
    assert MODULE_PASSWORD not in done.stdout + done.stderr


def test_the_password_comes_from_the_systemd_credential(db, supervise, tmp_path, account):
    """Security issue 18: under the units' LoadCredential=dj_pass:..., the password is read from
    $CREDENTIALS_DIRECTORY/dj_pass (a trailing newline is not part of it); it wins over a stale DJ_PASS,
    logs in (the MySQL account has no other password), never shows, and no subprocess of a child sees it."""
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "dj_pass").write_text(MODULE_PASSWORD + "\n")
    env_out = tmp_path / "env.txt"
    config = write_config(
        tmp_path / "lab.toml",
        f"""
        [supervisor]
        name = "lab"
        control_socket = "{tmp_path / "lab.sock"}"

        [[worker]]
        name = "envdump"
        target = "pipelines.env_worker:envdump"
        """,
    )
    env = dict(db.env, DJ_USER=account, DJ_PASS=ENV_PASSWORD, DJS_TEST_ENV_OUT=str(env_out))
    if db.backend == "mysql":  # the stale DJ_PASS alone does not log in
        done = subprocess.run(
            [*djsupervisor_command(), "check", "-c", str(config)], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2 and "cannot connect" in done.stderr, done.stderr
    env["CREDENTIALS_DIRECTORY"] = str(credentials)
    done = subprocess.run(
        [*djsupervisor_command(), "check", "-c", str(config)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and f"as {account}: ok" in done.stdout, done.stderr

    supervised = Supervised(["-c", str(config)], env, tmp_path)
    try:
        wait_until(env_out.exists, 60, message=f"a child's subprocess; output:\n{supervised.output[-3000:]}")
    finally:
        supervised.close()
    inherited = env_out.read_text()
    assert f"DJ_USER={account}" in inherited and "CREDENTIALS_DIRECTORY=" in inherited
    assert "DJ_PASS=" not in inherited and MODULE_PASSWORD not in inherited and ENV_PASSWORD not in inherited
    assert MODULE_PASSWORD not in supervised.output and ENV_PASSWORD not in supervised.output


@pytest.mark.parametrize("backend", ["mysql"])  # nothing connects
def test_an_unreadable_credential_is_one_line(db, tmp_path):
    (tmp_path / "dj_pass").mkdir()  # a directory where the file should be
    config = write_config(tmp_path / "lab.toml", '[[worker]]\nname = "w"\ntarget = "pipelines.offline:worker"\n')
    env = dict(db.env, CREDENTIALS_DIRECTORY=str(tmp_path))
    done = subprocess.run(
        [*djsupervisor_command(), "check", "-c", str(config)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"djsupervisor: error: credential {tmp_path / 'dj_pass'}: cannot read: ")
