"""Who the HTTP endpoint answers, in process: the `Host` allow-list (DNS rebinding), the token (bearer or basic),
the token file's checks, the config rule that a network bind needs a token, and the per-peer cap with
eviction of idle clients and the request-head deadline (many source addresses: 127.0.0.0/8 is all loopback).
The real supervisor's side is tests/serve/test_http_security.py."""

from __future__ import annotations

import base64
import os
import socket
import time
import urllib.error
import urllib.request

import pytest
from helpers import serving, wait_until

from djsupervisor.serve import http as http_status
from djsupervisor.serve.http import StatusServer
from djsupervisor.serve.http_access import HttpAccess, host_of, is_loopback, read_token_file
from djsupervisor.supervisor.config import ConfigError, parse_config

pytestmark = pytest.mark.timeout(60)

TOKEN = "0123456789abcdef0123456789abcdef"


def basic(password: str, user: str = "prometheus") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ----- the rules


@pytest.mark.parametrize(
    "value, host",
    [("localhost:9108", "localhost"), ("[::1]:9108", "::1"), ("EVIL.example.:80", "evil.example"), ("::1", "::1")],
)
def test_host_of(value, host):
    assert host_of(value) == host


def test_loopback_binds():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]", "LOCALHOST."))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "node17", "localhost.evil.example"))


def test_a_loopback_bind_answers_loopback_names_only():
    access = HttpAccess.build("127.0.0.1")
    for host in ("localhost:9108", "127.0.0.1:9108", "[::1]:9108", "LocalHost", "127.0.0.1:8080"):
        assert access.host_allowed(host), host  # ports are not compared: an ssh -L forward keeps working
    for host in ("evil.example:9108", "10.0.0.5:9108", "localhost.evil.example", socket.gethostname(), ""):
        assert not access.host_allowed(host), host


def test_a_network_bind_also_answers_addresses_and_this_machines_name():
    access = HttpAccess.build("0.0.0.0", token=TOKEN)
    for host in ("10.0.0.5:9108", "[fd00::5]:9108", f"{socket.gethostname()}:9108", "localhost"):
        assert access.host_allowed(host), host
    assert not access.host_allowed("evil.example:9108")  # what a rebinding page makes the browser send
    extended = HttpAccess.build("0.0.0.0", ["metrics.lab.org:9108", "Scrape.Lab.Org"], TOKEN)
    assert extended.host_allowed("metrics.lab.org") and extended.host_allowed("scrape.lab.org:1")
    assert HttpAccess.build("127.0.0.1", ["*"]).host_allowed("anything.example")


def test_the_token_as_bearer_or_as_basic_password():
    access = HttpAccess.build("127.0.0.1", token=TOKEN)
    assert access.authorized(f"Bearer {TOKEN}") and access.authorized(f"bearer  {TOKEN} ")
    assert access.authorized(basic(TOKEN)) and access.authorized(basic(TOKEN, user=""))
    for value in (None, "", "Bearer", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", basic("wrong"), "Basic %%%", TOKEN):
        assert not access.authorized(value), value
    assert HttpAccess.build("127.0.0.1").authorized(None)  # no token configured: no Authorization needed
    assert TOKEN not in repr(access)


def token_file(tmp_path, text: str = TOKEN + "\n", mode: int = 0o600):
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_private_token_file_is_read(tmp_path):
    assert read_token_file(token_file(tmp_path)) == TOKEN


@pytest.mark.parametrize(
    "text, mode, problem",
    [
        (TOKEN, 0o640, "accessible to group or others (mode 640): chmod 600 it"),
        (TOKEN, 0o604, "accessible to group or others (mode 604)"),
        ("short", 0o600, "under 16 characters"),
        ("", 0o600, "under 16 characters"),
        (f"{TOKEN} {TOKEN}", 0o600, "without spaces"),
        (f"{TOKEN}\n{TOKEN}", 0o600, "without spaces"),
    ],
)
def test_unusable_token_files_are_refused(tmp_path, text, mode, problem):
    path = token_file(tmp_path, text, mode)
    if os.geteuid() == 0:
        os.chown(path, 0, os.getegid() + 1)  # not our group: root's exception (root:OUR_GROUP 0440) is not this
    with pytest.raises(ValueError) as caught:
        read_token_file(path)
    assert problem in str(caught.value) and TOKEN not in str(caught.value)
    with pytest.raises(ValueError, match="is not a regular file"):
        read_token_file(tmp_path)
    with pytest.raises(ValueError, match="cannot open"):
        read_token_file(tmp_path / "absent")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to root")
def test_a_file_root_shares_with_our_group_is_read(tmp_path):
    """What Kubernetes makes of a Secret mounted with fsGroup: root:FSGROUP 0440; also root:djsupervisor 0640."""
    path = token_file(tmp_path, mode=0o440)
    os.chown(path, 0, os.getegid())
    assert read_token_file(path) == TOKEN
    path.chmod(0o460)  # group may write: not a file root merely shares for reading
    with pytest.raises(ValueError, match="mode 460"):
        read_token_file(path)


def config(**supervisor):
    data = {"supervisor": supervisor, "worker": [{"name": "w", "target": "m:w"}]}
    return parse_config(data, "/etc/lab/lab.toml", "lab", check_targets=False)


def test_a_network_bind_needs_a_token_or_an_explicit_opt_out():
    for http in ("0.0.0.0:9108", "[::]:9108", "10.0.0.5:9108", "node17:9108"):
        with pytest.raises(ConfigError) as caught:
            config(http=http)
        message = str(caught.value)
        assert message.startswith("/etc/lab/lab.toml: supervisor.http: ") and "http_token_file" in message
        assert "http_allow_anonymous" in message and "\n" not in message
    assert config(http="0.0.0.0:9108", http_token_file="token").http_token_file == "/etc/lab/token"  # relative
    assert config(http="0.0.0.0:9108", http_token_file="/run/secrets/t").http_token_file == "/run/secrets/t"
    assert config(http="0.0.0.0:9108", http_allow_anonymous=True).http_allow_anonymous
    for http in ("127.0.0.1:9108", "localhost:0", "[::1]:0", "127.0.0.2:9108"):
        assert config(http=http).http == http


# ----- the server, in process


@pytest.fixture
def server():
    srv = StatusServer("127.0.0.1:0", {"/metrics": lambda: ("text/plain", b"up 1\n")})
    with serving(srv):
        yield srv
    srv.close()


def connect(server, source: str = "127.0.0.1") -> socket.socket:
    """A connection to `server` from the loopback address `source` (any of 127.0.0.0/8), sending nothing."""
    host, port = server.address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5, source_address=(source, 0))


def closed(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (without sending anything)."""
    return sock.recv(10) == b""


def fetch(server, headers=None, source: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    sock = connect(server, source)
    lines = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    with sock:
        sock.sendall(f"GET /metrics HTTP/1.1\r\n{lines}\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *fields = head.decode().split("\r\n")
    pairs = [field.split(": ", 1) for field in fields]
    return int(status_line.split()[1]), {name: [v for n, v in pairs if n == name] for name, _ in pairs}, body


def test_a_peers_idle_connections_make_room_for_its_next_one(server):
    silent = [connect(server) for _ in range(10)]
    wait_until(lambda: len(server.clients) == http_status.MAX_PER_PEER, 5, message="one peer's cap")
    assert all(closed(sock) for sock in silent[: 10 - http_status.MAX_PER_PEER])  # the oldest went first
    status, _, body = fetch(server)  # one more from the same peer: the oldest idle one makes room
    assert (status, body) == (200, b"up 1\n")
    for sock in silent:
        sock.close()


def test_many_peers_fill_the_server_and_a_newcomer_still_gets_in(server):
    peers = [f"127.0.0.{n}" for n in range(2, 2 + http_status.MAX_CLIENTS // http_status.MAX_PER_PEER)]
    silent = [connect(server, peer) for peer in peers for _ in range(http_status.MAX_PER_PEER)]
    wait_until(lambda: len(server.clients) == http_status.MAX_CLIENTS, 5, message="every place taken")
    began = time.monotonic()
    assert fetch(server, source="127.0.0.200")[0] == 200  # the oldest idle client overall made room
    assert time.monotonic() - began < 2
    assert closed(silent[0])
    for sock in silent:
        sock.close()


def test_clients_that_have_their_answer_but_never_close_make_room_too(server):
    lingering = [connect(server) for _ in range(http_status.MAX_PER_PEER)]
    for sock in lingering:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        data = b""
        while not data.endswith(b"up 1\n"):  # the answer read, the connection kept open
            data += sock.recv(65536)
    wait_until(lambda: all(c.answered and not c.outbox for c in server.clients.values()), 5, message="all answered")
    assert len(server.clients) == http_status.MAX_PER_PEER
    assert fetch(server)[0] == 200  # the peer's cap is full of lingerers: the oldest makes room
    for sock in lingering:
        sock.close()


def test_a_client_without_a_request_head_is_dropped_after_the_head_deadline(server):
    slow = connect(server)
    slow.sendall(b"GET /metrics HTTP/1.1\r\n")  # a head that never ends
    # accepted and its partial head read (closing a socket with unread bytes would send a reset instead)
    wait_until(lambda: [c.inbox for c in server.clients.values()] == [b"GET /metrics HTTP/1.1\r\n"], 5)
    (client,) = server.clients.values()
    # what the supervisor's 1 s timer does (serving() has none), at chosen clock readings instead of a sleep
    server.expire_idle(client.since + http_status.HEAD_TIMEOUT - 0.1)
    assert len(server.clients) == 1  # within the deadline: kept
    server.expire_idle(client.since + http_status.HEAD_TIMEOUT + 0.1)
    assert closed(slow)
    slow.close()


def test_wrong_hosts_and_missing_tokens_are_refused(server):
    assert fetch(server, {"Host": f"localhost:{server.address.rsplit(':', 1)[1]}"})[0] == 200
    status, _, body = fetch(server, {"Host": "evil.example:9108"})
    assert status == 421 and body.startswith(b"421 Misdirected Request: Host 'evil.example:9108' is not a name")
    assert b"http_allowed_hosts" in body
    assert fetch(server, {"Host": "localhost", "host": "evil.example"})[0] == 400

    server.access = HttpAccess.build("127.0.0.1", token=TOKEN)
    status, headers, body = fetch(server)
    assert status == 401 and body == b"401 Unauthorized: a token is required\n"
    assert headers["WWW-Authenticate"] == ['Bearer realm="djsupervisor"', 'Basic realm="djsupervisor"']
    assert fetch(server, {"Authorization": "Bearer nope"})[0] == 401
    assert fetch(server, {"Authorization": f"Bearer {TOKEN}", "Host": "evil.example"})[0] == 421  # Host first
    assert fetch(server, {"Authorization": f"Bearer {TOKEN}"})[:3:2] == (200, b"up 1\n")
    assert fetch(server, {"Authorization": basic(TOKEN)})[0] == 200
    request = urllib.request.Request(f"http://{server.address}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as response:  # what a client library sends: Host ip:port
        assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://{server.address}/metrics", timeout=5)
    assert caught.value.code == 401


def test_a_reload_keeps_the_endpoints_settings_until_the_next_start():
    from djsupervisor.supervisor.config import kept_at_reload

    warnings: list[str] = []

    class Log:
        def warning(self, text, *args):
            warnings.append(text.format(*args))

    running = config(http="0.0.0.0:9108", http_token_file="/run/a", http_allowed_hosts=["a.lab.org"])
    new = config(http="0.0.0.0:9108", http_allow_anonymous=True)
    kept = kept_at_reload(running, new, None, Log())
    assert (kept.http_token_file, kept.http_allowed_hosts) == ("/run/a", ("a.lab.org",))
    assert not kept.http_allow_anonymous
    assert len(warnings) == 3 and all("applies at the next start" in text for text in warnings)
