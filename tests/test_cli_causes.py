"""Issue 19, the first hour: errors that name the real cause, and `check` reporting every problem at once.

Each test here failed on the main branch before the issue's fix: DataJoint loaded by every command (a bad
DJ_* variable crashed `--version` with pydantic's traceback), a refused login blamed on the worker target,
an import error without a location, DataJoint's warnings repeated, `check` stopping at the first problem.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import djsupervisor_command, write_config

pytestmark = pytest.mark.timeout(180)


def cli(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*djsupervisor_command(), *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("djsupervisor: error: ")
    return lines[0]


def test_commands_that_need_no_database_load_no_datajoint():
    probe = (
        "import sys\nfrom djsupervisor.cli import main\n"
        "code = main(['status', '--socket', '/nonexistent/x.sock'])\n"
        "print(code, 'datajoint' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["2", "False"], result


@pytest.mark.parametrize(
    "variable, value, accepted",
    [("DJ_BACKEND", "postgres", "'mysql' or 'postgresql'"), ("DJ_PORT", "abc", "a whole number")],
)
def test_a_refused_dj_variable_is_one_line_naming_it(tmp_path, variable, value, accepted):
    env = dict(os.environ, **{variable: value})
    version = cli("--version", env=env, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("djsupervisor "), version
    status = cli("status", "--socket", str(tmp_path / "none.sock"), env=env, cwd=tmp_path)
    assert "no supervisor listening" in one_error_line(status)  # status needs no DataJoint
    config = write_config(tmp_path / "lab.toml", '[[worker]]\nname = "w"\ntarget = "nowhere:w"\n')
    for args in (["check", "-c", str(config)], ["start", "-c", str(config)], ["run", "w", "-c", str(config)]):
        line = one_error_line(cli(*args, env=env, cwd=tmp_path))
        assert f"{variable}: {value!r} is not accepted (accepted: {accepted})" in line, (args, line)


def test_a_refused_login_is_named_not_blamed_on_the_target(db, tmp_path):
    (tmp_path / "lab_workers.py").write_text("import datajoint as dj\n\ndj.conn()  # connects when imported\n")
    config = write_config(tmp_path / "lab.toml", '[[worker]]\nname = "ingest"\ntarget = "lab_workers:ingest"\n')
    host, port = db.settings["host"], db.settings["port"]
    user = "djs_nobody"  # no such account (PostgreSQL trusts any password of a real one here)
    wrong = dict(db.env, DJ_USER=user, DJ_PASS="certainly-wrong")
    del wrong["DJ_USE_TLS"]  # DataJoint tries TLS first: its fallback warning must not precede the one line
    for command in (["check"], ["start"]):
        line = one_error_line(cli(*command, "-c", str(config), env=wrong, cwd=tmp_path))
        assert f"database: cannot connect as {user}@{host}:{port} ({db.backend}): " in line, line
        assert "; set the user and password" in line and "worker[0]" not in line and "lab_workers" not in line
    silent = dict(wrong, DJ_PORT="1")  # nothing listens there
    line = one_error_line(cli("check", "-c", str(config), env=silent, cwd=tmp_path))
    assert f"database: cannot connect as {user}@{host}:1 ({db.backend}): " in line and "; set the server" in line


def test_an_import_error_names_file_and_line_and_a_missing_module_where_it_looked(db, tmp_path):
    (tmp_path / "broken_workers.py").write_text("import os\n\nraise RuntimeError('NAS not mounted')\n")
    config = write_config(
        tmp_path / "lab.toml",
        '[[worker]]\nname = "b"\ntarget = "broken_workers:w"\n[[worker]]\nname = "m"\ntarget = "missing_workers:w"\n',
    )
    result = cli("check", "-c", str(config), env=db.env, cwd=tmp_path)
    assert result.returncode == 2
    assert (
        f"worker[0] (b).target: cannot import 'broken_workers': RuntimeError: NAS not mounted"
        f" (raised at {tmp_path / 'broken_workers.py'}:3)" in result.stderr
    ), result.stderr
    assert f"(looked in {tmp_path.resolve()} and the installed packages" in result.stderr, result.stderr
    debug = cli("start", "-c", str(config), "--log-level", "DEBUG", env=db.env, cwd=tmp_path)
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr and "raise RuntimeError('NAS not mounted')" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("djsupervisor: error: ")


def test_datajoint_warnings_are_one_line_each_and_said_once(db, tmp_path):
    schema = db.schema_name("natives")
    (tmp_path / "native_workers.py").write_text(
        "import datajoint as dj\nfrom djsupervisor import DataJointWorker\n"
        f"schema = dj.Schema({schema!r})\n"
        "@schema\nclass A(dj.Manual):\n    definition = '''\n    a: int\n    ---\n    b: int\n    c: int\n    '''\n"
        f"w = DataJointWorker('w', {schema + '_w'!r})\n"
    )
    config = write_config(tmp_path / "lab.toml", '[[worker]]\nname = "w"\ntarget = "native_workers:w"\n')
    result = cli("check", "-c", str(config), env=db.env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Native type 'int'") == 1, result.stderr
    assert all(" WARNING " in line for line in result.stderr.splitlines() if line.strip()), result.stderr


def test_check_reports_every_problem_with_the_closest_key(db, tmp_path):
    config = write_config(
        tmp_path / "lab.toml",
        """
        [supervisor]
        graceful_timout = 3
        [[worker]]
        name = "standard"
        target = "pipelines.supervised:standard"
        replica = 3
        [[worker]]
        name = "other"
        target = "pipelines.supervised:other"
        max_jobs = -1
        [[worker]]
        name = "third"
        target = "pipelines.nosuch:w"
    """,
    )
    result = cli("check", "-c", str(config), env=db.env, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[-1] == f"djsupervisor: 4 problems in {config}", result.stderr
    errors = lines[:-1]
    assert len(errors) == 4 and all(line.startswith(f"djsupervisor: error: {config}: ") for line in errors)
    assert "supervisor.graceful_timout: unknown key (did you mean 'graceful_timeout'?" in errors[0]
    assert "worker[0] (standard).replica: unknown key (did you mean 'replicas'?" in errors[1]
    assert "worker[1] (other).max_jobs: must be >= 1, got -1" in errors[2]
    assert "worker[2] (third).target: cannot import 'pipelines.nosuch'" in errors[3]
    start = cli("start", "-c", str(config), env=db.env, cwd=tmp_path)  # start: the first, and how many more
    assert one_error_line(start).endswith(f"(and 2 more: djsupervisor check -c {config})")


def test_check_warns_when_a_pool_and_its_worker_are_named_differently(db, tmp_path):
    config = write_config(
        tmp_path / "lab.toml", '[[worker]]\nname = "ingest"\ntarget = "pipelines.supervised:standard"\n'
    )
    result = cli("check", "-c", str(config), env=db.env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (
        f"warning: {config}: worker[0] (ingest).name: the pool is named 'ingest' but its DataJointWorker"
        " (pipelines.supervised:standard) is named 'standard'" in result.stdout
    ), result.stdout


def test_list_settings_of_a_worker_are_settable_per_pool(db, tmp_path, monkeypatch):
    from djsupervisor.supervisor.config import ConfigError, load_config

    monkeypatch.setenv("DJS_TEST_PREFIX", db.prefix)
    config = write_config(
        tmp_path / "lab.toml",
        """
        [[worker]]
        name = "standard"
        target = "pipelines.supervised:standard"
        autoclear_error_patterns = ["%NFS timeout%", "%Lost connection%"]
        db_prefix = ["lab_", "shared_"]
    """,
    )
    worker = load_config(config).workers[0].build_worker()
    assert worker.autoclear_error_patterns == ("%NFS timeout%", "%Lost connection%")
    assert tuple(worker.db_prefix) == ("lab_", "shared_")
    config.write_text(config.read_text().replace('["lab_", "shared_"]', '"lab_"'))
    with pytest.raises(ConfigError, match=r"worker\[0\] \(standard\)\.db_prefix: must be a list of non-empty strings"):
        load_config(config)
