"""The real `djsupervisor start` with its HTTP endpoint under attack: idle connections from one peer that used to
lock every scrape out, a DNS-rebinding `Host`, missing and wrong tokens; and the starts refused with one line
and exit status 2 (a network bind without a token, a token file others can read)."""

from __future__ import annotations

import base64
import json
import socket
import time

import pytest
from helpers import run_cli, wait_until, write_config

from djsupervisor.serve import http as http_status

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

TOKEN = "f00dfeedf00dfeedf00dfeedf00dfeed"

CONFIG = """
    [supervisor]
    name = "lab"
    control_socket = "{socket}"
    http = "{http}"
    {extra}
    graceful_timeout = 5

    [[worker]]
    name = "standard"
    target = "pipelines.supervised:standard"
    replicas = 1
"""


def config_file(tmp_path, http: str, extra: str = ""):
    return write_config(tmp_path / "lab.toml", CONFIG.format(socket=tmp_path / "lab.sock", http=http, extra=extra))


def token_file(tmp_path, mode: int):
    path = tmp_path / "http-token"
    path.write_text(TOKEN + "\n")
    path.chmod(mode)
    return path


def ask(address: str, headers: dict[str, str], timeout: float = 5) -> tuple[int, str, bytes]:
    """(status, head, body) of GET /metrics sent raw, with exactly these header fields."""
    host, port = address.rsplit(":", 1)
    fields = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(f"GET /metrics HTTP/1.1\r\n{fields}\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode(), body


def test_scrapes_get_through_idle_floods_and_strangers_do_not(db, supervise, tmp_path):
    token = token_file(tmp_path, 0o600)
    config = config_file(tmp_path, "127.0.0.1:0", f'http_token_file = "{token.name}"')  # relative to the config
    sup = supervise(["-c", str(config)])
    sup.wait_children({"standard": 1})
    result = wait_until(
        lambda: (r := run_cli(db, tmp_path, "status", "--json", "-c", str(config))).returncode == 0 and r,
        20,
        message="status over the control socket",
    )
    address = json.loads(result.stdout)["http"]
    host, port = address.rsplit(":", 1)
    scrape = {"Host": address, "Authorization": f"Bearer {TOKEN}"}  # what Prometheus sends
    assert ask(address, scrape)[0] == 200
    assert TOKEN not in sup.output  # the token is masked wherever the supervisor logs

    # 40 silent connections from this one address, then more every 0.3 s: each scrape still gets in, at once
    silent = [socket.create_connection((host, int(port)), timeout=10) for _ in range(40)]
    for _ in range(5):
        began = time.monotonic()
        status, _, body = ask(address, scrape)
        assert status == 200 and b"djsupervisor_up 1" in body
        assert time.monotonic() - began < 2
        silent += [socket.create_connection((host, int(port)), timeout=10) for _ in range(8)]
        time.sleep(0.3)  # the attacker's renewal pace; the scrape's promptness is what is checked
    began = time.monotonic()
    assert silent[-1].recv(10) == b""  # the newest idle one too: dropped by the head deadline, not our timeout
    assert time.monotonic() - began < http_status.HEAD_TIMEOUT + 2
    assert all(sock.recv(10) == b"" for sock in silent)  # every idle connection was dropped or evicted
    for sock in silent:
        sock.close()

    # DNS rebinding: evil.example resolved to 127.0.0.1, the browser sends its name; the token does not help
    status, _, body = ask(address, {**scrape, "Host": f"evil.example:{port}"})
    assert status == 421 and b"Host 'evil.example:" in body and b"http_allowed_hosts" in body
    assert ask(address, {**scrape, "Host": f"localhost:{port}"})[0] == 200

    # the token: missing or wrong -> 401 with the challenges; as bearer or as basic password -> 200
    status, head, body = ask(address, {"Host": address})
    assert status == 401 and body == b"401 Unauthorized: a token is required\n"
    assert 'WWW-Authenticate: Bearer realm="djsupervisor"' in head
    assert 'WWW-Authenticate: Basic realm="djsupervisor"' in head
    assert ask(address, {"Host": address, "Authorization": f"Bearer {TOKEN[:-1]}x"})[0] == 401
    basic = base64.b64encode(f"me:{TOKEN}".encode()).decode()
    assert ask(address, {"Host": address, "Authorization": f"Basic {basic}"})[0] == 200

    assert run_cli(db, tmp_path, "stop", "-c", str(config)).returncode == 0
    assert sup.wait_exit(30) == 0


def refused(sup, tmp_path) -> str:
    """The one error line of a start that must stop with exit 2 before the control socket or any child."""
    assert sup.wait_exit(30) == 2
    errors = [line for line in sup.output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, sup.output[-2000:]
    assert "started standard" not in sup.output and not (tmp_path / "lab.sock").exists()
    return errors[0]


def test_a_network_bind_without_a_token_and_a_readable_token_file_stop_the_start(db, supervise, tmp_path):
    config = config_file(tmp_path, "0.0.0.0:0")
    line = refused(supervise(["-c", str(config)]), tmp_path)
    assert line.startswith(f"djsupervisor: error: {config}: supervisor.http: 0.0.0.0 is not a loopback address")
    assert "http_token_file" in line and "http_allow_anonymous = true" in line

    token = token_file(tmp_path, 0o644)
    config = config_file(tmp_path, "0.0.0.0:0", f'http_token_file = "{token}"')
    line = refused(supervise(["-c", str(config)]), tmp_path)
    assert line == (
        f"djsupervisor: error: {config}: supervisor.http_token_file: "
        f"{str(token)!r} is accessible to group or others (mode 644): chmod 600 it"
    )
    assert TOKEN not in line
    check = run_cli(db, tmp_path, "check", "-c", str(config))  # `check` reads the token file as `start` would
    assert check.returncode == 2 and check.stderr == line + "\n"
