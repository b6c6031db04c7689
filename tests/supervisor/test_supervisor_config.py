"""Configuration: TOML and modules to typed settings; every error is one line naming file, key and problem,
and `djsupervisor start` exits 2 with it before any child starts."""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import BACKENDS
from helpers import TESTS, djsupervisor_command, write_config

from djsupervisor.supervisor.config import ConfigError, config_from_modules, load_config

GOOD = """
[supervisor]
name = "lab"
graceful_timeout = 12
backoff_initial = 0.5
log_format = "json"

[database]
host = "db.example.org"
port = 3307
user = "lab"
password = "s3cret"

[[worker]]
name = "standard"
target = "pipelines.offline:worker"
replicas = 3
restart = "on-failure"
max_memory_mb = 512
max_jobs = 100
job_timeout = 3600
sleep_duration = 10
max_sleep_duration = 60
run_duration = -1
"""


def test_a_full_config_is_read_into_typed_settings(tmp_path):
    config = load_config(write_config(tmp_path / "lab.toml", GOOD), check_targets=False)
    assert (config.name, config.graceful_timeout, config.backoff_initial, config.log_format) == (
        "lab",
        12.0,
        0.5,
        "json",
    )
    assert config.database.host == "db.example.org" and config.database.port == 3307
    assert "s3cret" not in repr(config)  # the password never shows
    worker = config.worker_named("standard")
    assert (worker.replicas, worker.restart, worker.max_memory_mb, worker.max_jobs, worker.job_timeout) == (
        3,
        "on-failure",
        512,
        100,
        3600,
    )
    assert dict(worker.overrides) == {"sleep_duration": 10, "max_sleep_duration": 60, "run_duration": -1}
    with pytest.raises(ConfigError, match="no worker named 'nope'"):
        config.worker_named("nope")


def test_defaults_and_the_built_worker(tmp_path):
    path = write_config(
        tmp_path / "mylab.toml", '[[worker]]\nname = "w"\ntarget = "pipelines.offline:worker"\nsleep_duration = 7\n'
    )
    config = load_config(path)
    assert config.name == "mylab" and config.graceful_timeout == 30 and config.control_socket is None
    worker_config = config.workers[0]
    assert (worker_config.replicas, worker_config.restart) == (1, "always")
    worker = worker_config.build_worker()
    assert worker.sleep_duration == 7 and worker.name == "offline"
    assert worker is not worker_config.resolve()  # a configured copy; the definition stays as it was
    assert worker_config.resolve().sleep_duration == 5


def test_modules_give_one_child_per_worker_they_define():
    config = config_from_modules(["pipelines.offline"])
    assert [(w.name, w.target, w.replicas) for w in config.workers] == [("offline", "pipelines.offline:worker", 1)]
    with pytest.raises(ConfigError, match="defines no DataJointWorker"):
        config_from_modules(["pipelines.empty"])
    broken = r"cannot import 'pipelines.broken': RuntimeError: this pipeline is broken \(raised at .*broken\.py:\d+\)"
    with pytest.raises(ConfigError, match=broken):
        config_from_modules(["pipelines.broken"])


W = '[[worker]]\nname = "w"\ntarget = "pipelines.offline:worker"\n'

ERRORS = [
    # (file content, key in the message, problem in the message)
    (None, "", "file not found"),
    ('[supervisor]\nname = "lab"\ngraceful_timeout = \n' + W, "", r"TOML syntax error: .*line 3"),
    ("[supervisor]\ngracefull_timeout = 3\n" + W, "supervisor.gracefull_timeout", "unknown key"),
    ("[workers]\n" + W, "workers", "unknown key"),
    (W + "replica = 2\n", r"worker\[0\] \(w\)\.replica", "unknown key"),
    (W + 'replicas = "two"\n', r"worker\[0\] \(w\)\.replicas", "must be an integer, got str 'two'"),
    (W + "replicas = -1\n", r"worker\[0\] \(w\)\.replicas", "must be >= 0, got -1"),
    (W + "replicas = 1025\n", r"worker\[0\] \(w\)\.replicas", r"must be <= 1024 \(children per pool\), got 1025"),
    (W + "max_replicas = 10000000\n", r"worker\[0\] \(w\)\.max_replicas", r"must be <= 1024 \(children per pool\)"),
    ("[supervisor]\ngraceful_timeout = -5\n" + W, "supervisor.graceful_timeout", "must be >= 0"),
    (W + 'restart = "sometimes"\n', r"worker\[0\] \(w\)\.restart", "must be one of 'always', 'on-failure', 'never'"),
    ("[database]\nport = 99999\n" + W, "database.port", "must be <= 65535"),
    (W + W, r"worker\[1\]\.name", "duplicate worker name 'w'"),
    ('[[worker]]\nname = "w"\n', r"worker\[0\] \(w\)\.target", r"missing \(required\)"),
    (
        '[[worker]]\nname = "w"\ntarget = "pipelines.offline"\n',
        r"worker\[0\] \(w\)\.target",
        "must be 'module:attribute'",
    ),
    (
        '[[worker]]\nname = "w"\ntarget = "pipelines.nosuch:worker"\n',
        r"worker\[0\] \(w\)\.target",
        "cannot import 'pipelines.nosuch'",
    ),
    (
        '[[worker]]\nname = "w"\ntarget = "pipelines.broken:worker"\n',
        r"worker\[0\] \(w\)\.target",
        "RuntimeError: this pipeline is broken",
    ),
    (
        '[[worker]]\nname = "w"\ntarget = "pipelines.offline:nosuch"\n',
        r"worker\[0\] \(w\)\.target",
        "has no attribute 'nosuch'",
    ),
    (
        '[[worker]]\nname = "w"\ntarget = "pipelines.offline:not_a_worker"\n',
        r"worker\[0\] \(w\)\.target",
        "is a int, not a DataJointWorker",
    ),
    (
        W + "sleep_duration = 10\nmax_sleep_duration = 5\n",
        r"worker\[0\] \(w\)",
        "invalid worker setting: max_sleep_duration",
    ),
    ('[supervisor]\nname = "x"\n', "worker", r"no \[\[worker\]\] defined"),
]


@pytest.mark.parametrize("content, key, problem", ERRORS)
def test_every_config_error_is_one_line_naming_file_key_and_problem(tmp_path, content, key, problem):
    path = tmp_path / "lab.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert re.match(rf"{re.escape(str(path))}: {key}{': ' if key else ''}.*{problem}", message), message


#: DJ_* settings of a server that answers (`start` checks the login before it imports a target).
REACHABLE = {
    "DJ_HOST": BACKENDS["mysql"]["host"],
    "DJ_PORT": str(BACKENDS["mysql"]["port"]),
    "DJ_USER": BACKENDS["mysql"]["user"],
    "DJ_PASS": BACKENDS["mysql"]["password"],
    "DJ_BACKEND": "mysql",
    "DJ_USE_TLS": "false",
}


def error_lines(stderr: str) -> list[str]:
    """stderr without Python warnings (a DataJoint import may warn about a missing datajoint.json)."""
    lines, skip_next = [], False
    for line in stderr.splitlines():
        if skip_next:
            skip_next = False
            continue
        if re.match(r"^\S+\.py:\d+: \w*Warning: ", line):
            skip_next = True
            continue
        if line.strip():
            lines.append(line)
    return lines


@pytest.mark.timeout(120)
@pytest.mark.parametrize("content, key, problem", [ERRORS[i] for i in (0, 1, 2, 6, 10, 13, 16)])
def test_start_exits_2_with_the_one_line(tmp_path, content, key, problem):
    path = tmp_path / "lab.toml"
    if content is not None:
        path.write_text(content)
    env_path = f"{TESTS}"
    result = subprocess.run(
        [*djsupervisor_command(), "start", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": env_path, **REACHABLE},  # the login is checked first
    )
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert re.search(rf"{re.escape(str(path))}: {key}{': ' if key else ''}.*{problem}", lines[0]), lines[0]
