"""Hostile input: property-based tests over the config loader and the control socket protocol, odd names,
and credentials that must never show (titles, logs, status, the socket)."""

from __future__ import annotations

import json
import subprocess
import uuid

import psutil
import pytest
from helpers import TESTS, djsupervisor_command, raw_exchange, serving, wait_until, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from djsupervisor.serve.control import ControlServer
from djsupervisor.supervisor.config import ConfigError, load_config, parse_config

SUPERVISOR_KEYS = [
    "name",
    "graceful_timeout",
    "control_socket",
    "backoff_initial",
    "backoff_max",
    "stable_after",
    "fatal_after",
    "heartbeat_interval",
    "heartbeat_timeout",
    "hang_timeout",
    "sample_interval",
    "log_level",
    "log_format",
    "bogus",
]
WORKER_KEYS = [
    "name",
    "target",
    "replicas",
    "restart",
    "max_memory_mb",
    "max_jobs",
    "job_timeout",
    "run_duration",
    "sleep_duration",
    "max_idled_cycle",
    "max_sleep_duration",
    "stale_timeout_hours",
    "unknown",
]
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
tables = st.dictionaries(st.sampled_from(SUPERVISOR_KEYS), values, max_size=6)
workers = st.lists(st.dictionaries(st.sampled_from(WORKER_KEYS), values, max_size=8), max_size=3)
documents = st.fixed_dictionaries(
    {},
    optional={
        "supervisor": st.one_of(tables, values),
        "worker": st.one_of(workers, values),
        "database": st.one_of(st.dictionaries(st.text(max_size=8), values, max_size=3), values),
        "extra": values,
    },
)


def one_line_config_error(call) -> None:
    try:
        call()
    except ConfigError as error:
        text = str(error)
        assert text and "\n" not in text and "Traceback" not in text


@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_config_documents_either_load_or_fail_in_one_line(document):
    one_line_config_error(lambda: parse_config(document, "lab.toml", "lab", check_targets=False))


@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=400), st.text(max_size=400)))
def test_config_files_of_any_bytes(tmp_path, raw):
    path = tmp_path / "fuzz.toml"
    path.write_bytes(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass"))
    one_line_config_error(lambda: load_config(path, check_targets=False))


@pytest.fixture(scope="module")
def control_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("ctl") / "run" / "fuzz.sock"
    server = ControlServer(str(path), lambda request: {"ok": True, "cmd": request["cmd"]})
    with serving(server):
        yield server
    server.close()


@pytest.mark.timeout(180)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=2000), st.builds(lambda v: json.dumps(v).encode(), values)), st.booleans())
def test_control_protocol_never_breaks_the_loop(control_server, payload, newline):
    expect_answer = newline and b"\n" not in payload
    answer = raw_exchange(control_server.path, payload + (b"\n" if newline else b""), read=expect_answer)
    if expect_answer:
        response = json.loads(answer)
        assert isinstance(response, dict) and "ok" in response
        if not response["ok"]:
            assert "\n" not in response["error"]
    assert not control_server.loop_errors
    # and it still answers a proper request
    from djsupervisor.serve.control import send_request

    assert send_request(control_server.path, {"cmd": "status"}) == {"ok": True, "cmd": "status"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "target, message",
    [
        ("no_such_module_xyz:worker", "cannot import 'no_such_module_xyz'"),
        ("pipelines.raises_on_import:worker", "RuntimeError: this module refuses to import"),
        ("pipelines.offline:not_a_worker", "not a DataJointWorker"),
    ],
)
def test_bad_targets_exit_2_before_any_child(db, tmp_path, target, message):
    (TESTS / "pipelines" / "raises_on_import.py").exists() or pytest.skip("fixture module missing")
    config = write_config(tmp_path / "bad.toml", f'[[worker]]\nname = "w"\ntarget = "{target}"\n')
    env = dict(db.env, PYTHONPATH=str(TESTS))  # a database that answers: the login is checked before targets
    result = subprocess.run(
        [*djsupervisor_command(), "start", "-c", str(config)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr and str(config) in result.stderr


@pytest.mark.process
@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["mysql"], indirect=True)
def test_credentials_never_show(db, supervise, tmp_path):
    user, password = f"djs_sec_{uuid.uuid4().hex[:6]}", f"Pw-{uuid.uuid4().hex}"
    root = db.connection
    for host in ("%", "localhost", "127.0.0.1"):
        root.query(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY '{password}'".replace("%", "%%"))
        root.query(f"GRANT ALL PRIVILEGES ON `{db.prefix}%`.* TO '{user}'@'{host}'".replace("%", "%%"))
    try:
        from pipelines.lab import declare

        pipe = declare(db.schema_name("pipe"))
        pipe.seed([1, 2])
        odd = "läb%s{x}<ü>"  # odd characters in a name reach titles and logs unharmed
        socket_path = tmp_path / "sec.sock"
        config = write_config(
            tmp_path / "sec.toml",
            f"""
            [supervisor]
            name = "{odd}"
            control_socket = "{socket_path}"
            [database]
            user = "{user}"
            password = "{password}"
            [[worker]]
            name = "standard"
            target = "pipelines.supervised:standard"
        """,
        )
        sup = supervise(["-c", str(config), "--log-level", "DEBUG"])
        pids = sup.wait_children({"standard": 1})
        wait_until(lambda: len(pipe.Square()) == 2, 60, message="work done with the restricted user")
        env = db.env
        status = subprocess.run(
            [*djsupervisor_command(), "status", "--json", "--socket", str(socket_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert status.returncode == 0
        seen = [sup.output, status.stdout, status.stderr]
        for pid in [sup.pid, *pids.values()]:
            process = psutil.Process(pid)
            seen += [" ".join(process.cmdline())]
        assert all(password not in text for text in seen)
        assert json.loads(status.stdout)["supervisor"] == odd
        assert any(title.startswith(f"djsupervisor: {odd} standard[0]") for title in sup.titles().values())
        assert f"{odd} standard[0]" in sup.output
    finally:
        for host in ("%", "localhost", "127.0.0.1"):
            root.query(f"DROP USER IF EXISTS '{user}'@'{host}'".replace("%", "%%"))
