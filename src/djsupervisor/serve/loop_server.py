"""What the supervisor's socket servers (control socket, HTTP status) share: a non-blocking listener and its
clients on the caller's selector loop, accepted in batches, capped in number, dropped when idle too long;
out of descriptors (EMFILE), accepting pauses for a second instead of the loop spinning on the listener.

A server open to a network (HTTP) must not let a few silent connections lock everyone else out: it caps
connections per peer (`max_per_peer`) and, when a cap is reached, makes room by dropping the oldest *idle*
client (one `_idle` says is not being answered) instead of refusing the newcomer; it also drops an idle
client after `head_timeout`, sooner than `idle_timeout`. The control socket (a private Unix socket)
keeps the plain rule: refuse when full."""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from loguru import logger

from djsupervisor.supervisor.shortage import Throttle, is_shortage

#: Seconds the listener is not watched after accept() ran out of descriptors (the idle sweep, every second,
#: watches it again): the pending connection keeps it readable, and the loop must not spin on it.
ACCEPT_PAUSE = 1.0


class LoopClient:
    """One connection: its socket, what it sent so far, and when it connected (monotonic)."""

    def __init__(self, sock: socket.socket, peer: str = "") -> None:
        self.sock = sock
        self.peer = peer  # what the per-peer cap counts by (`LoopServer.peer_of`); "" on a Unix socket
        self.inbox = b""
        self.outbox: bytes | memoryview = b""  # what is left to send
        self.since = time.monotonic()


ClientT = TypeVar("ClientT", bound=LoopClient)


class LoopServer(Generic[ClientT]):
    """Base of a server driven by the caller's selector loop; subclasses implement `_read(client)` (the socket
    is readable) and `_write(client)` (send some of `client.outbox`), and may stop reading with `_reading`.

    `max_clients` and `idle_timeout` are read at each use (subclasses return their module's settings)."""

    client_class: type[ClientT]

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.selector: selectors.BaseSelector | None = None
        self.clients: dict[int, ClientT] = {}
        self.paused_until: float | None = None  # out of descriptors: not accepting until then (monotonic)
        self._throttle = Throttle()

    @property
    def max_clients(self) -> int:
        """Connections served at once; more are closed right away."""
        return 64

    @property
    def idle_timeout(self) -> float:
        """Seconds a client may stay connected without completing a request."""
        return 10.0

    @property
    def max_per_peer(self) -> int | None:
        """Connections one peer may hold at once (None: no cap of its own)."""
        return None

    @property
    def head_timeout(self) -> float | None:
        """Seconds an idle client (`_idle`) may stay connected; None: only `idle_timeout` applies."""
        return None

    def peer_of(self, address: object) -> str:
        """The key the per-peer cap counts connections by, from `accept()`'s address."""
        return str(address[0]) if isinstance(address, tuple) and address else ""

    def _idle(self, client: ClientT) -> bool:
        """Whether `client` is not being answered: it may be dropped to make room (default: never)."""
        return False

    @property
    def loop(self) -> selectors.BaseSelector:
        """The selector this server was registered with."""
        if self.selector is None:
            raise RuntimeError(f"{type(self).__name__} is not registered with a selector")
        return self.selector

    def register(self, selector: selectors.BaseSelector) -> None:
        """Add the listening socket to `selector` (its data is the callback the loop calls with the mask)."""
        self.selector = selector
        selector.register(self.listener, selectors.EVENT_READ, data=self._accept)

    def _serve(self, client: ClientT, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ and self._reading(client):
                self._read(client)
            if client.outbox and client.sock.fileno() in self.clients:
                self._write(client)
        except Exception:  # whatever a client does costs at most its own connection
            self._drop(client)

    def _reading(self, client: ClientT) -> bool:
        return True

    def _read(self, client: ClientT) -> None:
        raise NotImplementedError

    def _write(self, client: ClientT) -> None:
        raise NotImplementedError

    def _recv(self, client: ClientT) -> bytes | None:
        """What the client sent that can be read now: None if nothing yet, b"" once it has closed."""
        try:
            return client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return None

    def _send(self, client: ClientT) -> None:
        """Send what the socket takes now of `client.outbox` (never blocks)."""
        try:
            sent = client.sock.send(client.outbox)
        except (BlockingIOError, InterruptedError):
            sent = 0
        client.outbox = client.outbox[sent:]

    def _callback(self, client: ClientT) -> Callable[[int], None]:
        return lambda mask: self._serve(client, mask)

    def _watch(self, client: ClientT, *, writing: bool) -> None:
        """Have the loop call back when the client's socket is readable, and writable too if `writing`."""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
        self.loop.modify(client.sock, events, data=self._callback(client))

    def _accept(self, mask: int) -> None:
        self.expire_idle()  # a client that connects and never asks must not pile up descriptors
        for _ in range(16):
            try:
                sock, address = self.listener.accept()
            except OSError as error:  # nothing pending (again on the next event), or out of descriptors
                if is_shortage(error):
                    self._pause(error)
                return
            peer = self.peer_of(address)
            if not self._make_room(peer):
                sock.close()
                continue
            sock.setblocking(False)
            client = self.client_class(sock, peer)
            self.clients[sock.fileno()] = client
            self.loop.register(sock, selectors.EVENT_READ, data=self._callback(client))

    def _make_room(self, peer: str) -> bool:
        """Whether a new client of `peer` may be served, once the oldest idle client of that peer (at its
        cap) or of all (at the total cap) is dropped; False when every client in the way is being answered."""
        cap = self.max_per_peer
        if cap is not None:
            same = [client for client in self.clients.values() if client.peer == peer]
            if len(same) >= cap and not self._evict(same):
                return False
        return len(self.clients) < self.max_clients or self._evict(list(self.clients.values()))

    def _evict(self, clients: list[ClientT]) -> bool:
        # The oldest idle one: a scrape sends its head within milliseconds of connecting, so whoever has
        # sat longest without asking is the likeliest to be holding the place on purpose.
        idle = [client for client in clients if self._idle(client)]
        if not idle:
            return False
        self._drop(min(idle, key=lambda client: client.since))
        return True

    def _pause(self, error: OSError) -> None:
        """Out of descriptors (EMFILE): stop watching the listener for `ACCEPT_PAUSE` seconds. It stays
        readable while the connection waits, so the loop would otherwise spin on it; `expire_idle` (a timer)
        watches it again. Said in one line, at most once a minute."""
        self.paused_until = time.monotonic() + ACCEPT_PAUSE
        with contextlib.suppress(Exception):
            self.loop.unregister(self.listener)
        if self._throttle.allow("accept"):
            again = self._throttle.suppressed("accept")
            logger.error(
                "{}: cannot accept a connection: {}; not accepting for {:g} s ({} clients held){}",
                type(self).__name__,
                error.strerror or error,
                ACCEPT_PAUSE,
                len(self.clients),
                f"; {again} more times since the last such line" if again else "",
            )

    def _resume(self, now: float) -> None:
        if self.paused_until is not None and now >= self.paused_until and self.selector is not None:
            self.paused_until = None
            with contextlib.suppress(KeyError, ValueError):  # still registered, or closed meanwhile
                self.selector.register(self.listener, selectors.EVENT_READ, data=self._accept)

    def _drop(self, client: ClientT) -> None:
        if self.clients.get(client.sock.fileno()) is client:
            del self.clients[client.sock.fileno()]
        with contextlib.suppress(Exception):
            self.loop.unregister(client.sock)
        with contextlib.suppress(OSError):
            client.sock.close()

    def expire_idle(self, now: float | None = None) -> None:
        """Drop clients connected for longer than `idle_timeout`, and idle ones for longer than `head_timeout`;
        runs on every new connection, and the supervisor's loop calls it from a timer."""
        now = time.monotonic() if now is None else now
        head_timeout = self.head_timeout
        for client in list(self.clients.values()):
            age = now - client.since
            if age > self.idle_timeout or (head_timeout is not None and age > head_timeout and self._idle(client)):
                self._drop(client)
        self._resume(now)

    def close(self) -> None:
        """Stop serving: close every connection and the listening socket."""
        self.paused_until = None
        for client in list(self.clients.values()):
            self._drop(client)
        if self.selector is not None:
            with contextlib.suppress(Exception):
                self.selector.unregister(self.listener)
        self.listener.close()
