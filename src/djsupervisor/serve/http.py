"""A tiny HTTP/1.1 server for the metrics and the status page, inside the supervisor's selector loop.

No threads: the listening socket and every client are registered on the caller's selector, like the
control socket's (`control.ControlServer`). One request per connection (``Connection: close``), GET and
HEAD only, pages rendered in the loop by callables the supervisor gives. A client can cost the loop little:
the request head is capped (431), clients are capped in number and in lifetime (`expire_idle`, from a timer
and on each new connection), writes never block (an outbox, flushed when the socket is writable), and
nothing a client does raises into the loop.

Nor can clients lock a scrape out: 32 silent connections, renewed before the 5 s lifetime ran out, used to
fill every place. Now one peer holds at most `MAX_PER_PEER` connections, a client that has not sent its
request head within `HEAD_TIMEOUT` is dropped, and when a cap is reached the oldest idle client (no request
yet, or its answer all sent and only its close awaited) makes room for the newcomer
(`loop_server.LoopServer._make_room`). Who may read the pages (the `Host` allow-list, the token) is
`http_access.HttpAccess`, checked before any page is rendered.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import selectors
import socket
from collections.abc import Callable, Mapping
from typing import Any

from djsupervisor.serve.http_access import CHALLENGE, HttpAccess
from djsupervisor.serve.loop_server import LoopClient, LoopServer
from djsupervisor.supervisor.config import split_host_port

MAX_HEAD_BYTES = 8 * 1024  # request line and headers
IDLE_TIMEOUT = 5.0  # seconds a connection may live in all (slow or silent clients are dropped)
HEAD_TIMEOUT = 2.0  # seconds to send the request head (a scrape needs milliseconds); checked every second
MAX_CLIENTS = 32  # connections served at once; past it the oldest idle one is dropped, else the new one
MAX_PER_PEER = 4  # connections of one address (IPv6: one /64) at once; two Prometheus replicas and a browser
MAX_DRAIN_BYTES = 64 * 1024  # read and thrown away after the answer before closing (see _finish)
METHODS = ("GET", "HEAD")

#: A page: a callable returning (content type, body).
Page = Callable[[], tuple[str, bytes]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


class HttpError(Exception):
    """The HTTP endpoint could not be set up; str() is one line."""


def _bind(address: str) -> socket.socket:
    host, port = split_host_port(address)
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise HttpError(f"http {address}: cannot resolve {host!r}: {error.strerror or error}") from None
    listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop
        listener.bind(sockaddr)
        listener.listen(64)
        listener.setblocking(False)
    except OSError as error:  # address in use, not ours to bind, ...
        listener.close()
        raise HttpError(f"http {address}: cannot listen: {error.strerror or error}") from None
    return listener


class _Client(LoopClient):
    def __init__(self, sock: socket.socket, peer: str = "") -> None:
        super().__init__(sock, peer)
        self.outbox = memoryview(b"")  # what is left to send of the answer (a view: no copy per write)
        self.answered = False  # a response is queued; whatever arrives now is thrown away
        self.eof = False  # the client sent all it will send
        self.drained = 0


class StatusServer(LoopServer):
    """Serves `pages` (path -> Page) over HTTP on `address` ("host:port"; port 0 picks a free one), to the
    requests `access` lets in (default: `Host` a loopback name, no token)."""

    client_class = _Client

    def __init__(self, address: str, pages: Mapping[str, Page], access: HttpAccess | None = None) -> None:
        super().__init__(_bind(address))
        self.pages = dict(pages)
        self.access = access if access is not None else HttpAccess.build(split_host_port(address)[0])
        host, port = self.listener.getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def max_per_peer(self) -> int:
        return MAX_PER_PEER

    @property
    def head_timeout(self) -> float:
        return HEAD_TIMEOUT

    def peer_of(self, address: object) -> str:
        peer = super().peer_of(address)
        try:
            ip = ipaddress.ip_address(peer)
        except ValueError:
            return peer
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:  # a dual-stack listener: the same IPv4 peer, counted as one
                return str(ip.ipv4_mapped)
            # One IPv6 host usually has a whole /64 to pick source addresses from: count the /64.
            return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
        return peer

    def _idle(self, client: _Client) -> bool:
        # No request yet (a client is answered as soon as its head is complete), or the whole answer is with
        # the kernel and we only wait for the client's EOF (`_finish`): a client that never closes must not
        # hold its place for the full lifetime either.
        return not client.answered or not client.outbox

    @property
    def max_clients(self) -> int:
        return MAX_CLIENTS

    @property
    def idle_timeout(self) -> float:
        return IDLE_TIMEOUT

    def _read(self, client: _Client) -> None:
        chunk = self._recv(client)
        if chunk is None:
            return
        if not chunk:
            if client.outbox:  # the client half-closed after its request: finish the answer, then drop it
                client.eof = True
                self.loop.modify(client.sock, selectors.EVENT_WRITE, data=self._callback(client))
            else:
                self._drop(client)
            return
        if client.answered:
            client.drained += len(chunk)
            if client.drained > MAX_DRAIN_BYTES:
                self._drop(client)
            return
        client.inbox += chunk
        end = _head_end(client.inbox)
        if end is None:
            if len(client.inbox) > MAX_HEAD_BYTES:
                self._error(client, 431, f"request head larger than {MAX_HEAD_BYTES} bytes")
            return
        if end > MAX_HEAD_BYTES:
            self._error(client, 431, f"request head larger than {MAX_HEAD_BYTES} bytes")
            return
        self._handle(client, client.inbox[:end])

    def _handle(self, client: _Client, head: bytes) -> None:
        request_line = head.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
            self._error(client, 400, "malformed request line")
            return
        method, target, _ = parts
        path = target.split("?", 1)[0]
        head_only = method == "HEAD"
        fields = _fields(head)
        if len(fields.get("host", ())) > 1 or len(fields.get("authorization", ())) > 1:
            self._error(client, 400, "more than one Host or Authorization header", head_only=head_only)
            return
        host = fields["host"][0] if "host" in fields else None
        if host is not None and not self.access.host_allowed(host):
            shown = repr(host[:100])  # the client's text, quoted and cut: never markup, never a second line
            why = f"Host {shown} is not a name of this server; add it to [supervisor] http_allowed_hosts"
            self._error(client, 421, why, head_only=head_only)
            return
        if not self.access.authorized(fields["authorization"][0] if "authorization" in fields else None):
            challenges = "".join(f'WWW-Authenticate: {scheme} realm="djsupervisor"\r\n' for scheme in CHALLENGE)
            self._error(client, 401, "a token is required", head_only=head_only, extra=challenges)
            return
        page = self.pages.get(path)
        if page is None:
            self._error(client, 404, f"no page {path}; try {', '.join(sorted(self.pages))}", head_only=head_only)
            return
        if method not in METHODS:
            self._error(client, 405, f"{method} not allowed", allow=True)
            return
        try:
            content_type, body = page()
        except Exception as error:  # a rendering bug answers 500, the loop goes on
            self._error(client, 500, f"{error.__class__.__name__}: {error}".splitlines()[0], head_only=head_only)
            return
        self._respond(client, 200, content_type, body, head_only=head_only)

    def _error(
        self, client: _Client, code: int, message: str, *, head_only: bool = False, allow=False, extra: str = ""
    ) -> None:
        body = f"{code} {_REASONS[code]}: {message}\n".encode("utf-8", "replace")
        extra += f"Allow: {', '.join(METHODS)}\r\n" if allow else ""
        self._respond(client, code, "text/plain; charset=utf-8", body, head_only=head_only, extra=extra)

    def _respond(
        self, client: _Client, code: int, content_type: str, body: bytes, *, head_only: bool, extra: str = ""
    ) -> None:
        head = (
            f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
            "Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\n"
            f"{extra}Connection: close\r\n\r\n"
        )
        client.answered = True
        client.inbox = b""
        client.outbox = memoryview(head.encode("latin-1") + (b"" if head_only else body))
        self._write(client)

    def _write(self, client: _Client) -> None:
        self._send(client)
        if client.outbox:
            events = selectors.EVENT_WRITE | (0 if client.eof else selectors.EVENT_READ)
            self.loop.modify(client.sock, events, data=self._callback(client))
        elif client.eof:
            self._drop(client)
        else:
            self.loop.modify(client.sock, selectors.EVENT_READ, data=self._callback(client))
            self._finish(client)

    def _finish(self, client: _Client) -> None:
        # Half-close and wait for the client's EOF (or the lifetime cap): closing with unread input would
        # send a reset that can destroy the answer before the client has read it.
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_WR)


def _head_end(data: bytes) -> int | None:
    """Where the request head ends (just past its blank line), or None if it has not yet."""
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := data.find(sep)) >= 0]
    return min(ends) if ends else None


def _fields(head: bytes) -> dict[str, list[str]]:
    """The header fields of a request head by lower-case name (every value of a repeated field)."""
    fields: dict[str, list[str]] = {}
    for line in head.decode("latin-1").split("\n")[1:]:
        name, colon, value = line.rstrip("\r").partition(":")
        if colon and name and name == name.strip():  # "Host : x" is malformed (RFC 9112 5.1): ignored
            fields.setdefault(name.lower(), []).append(value.strip())
    return fields


def supervisor_pages(supervisor: Any) -> dict[str, Page]:
    """The pages of a running `Supervisor`: /metrics, / (the status page), /status.json, /progress.json and
    /errors.json."""
    import psutil

    from djsupervisor import __version__
    from djsupervisor.serve.metrics import CONTENT_TYPE, render_metrics
    from djsupervisor.serve.status_page import render_page

    def metrics() -> tuple[str, bytes]:
        rss = psutil.Process().memory_info().rss
        text = render_metrics(
            supervisor.status(), supervisor.pools, supervisor.fleet, version=__version__, parent_rss_bytes=rss
        )
        return CONTENT_TYPE, text.encode()

    def page() -> tuple[str, bytes]:
        text = render_page(supervisor.status(), supervisor.fleet, version=__version__)
        return "text/html; charset=utf-8", text.encode()

    def status_json() -> tuple[str, bytes]:
        return "application/json", json.dumps(supervisor.status(), default=str).encode()

    def fleet_json(report: Callable[[], dict]) -> Page:  # the fleet agent's readings: the parent reads no table
        return lambda: ("application/json", json.dumps(report(), default=str).encode())

    return {
        "/metrics": metrics,
        "/": page,
        "/status.json": status_json,
        "/progress.json": fleet_json(supervisor.fleet.progress_report),
        "/errors.json": fleet_json(supervisor.fleet.errors_report),
    }
