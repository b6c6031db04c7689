"""A webhook for notifier tests: a real HTTP server on 127.0.0.1 in a thread of the test, recording every POST.

`mode` says how it answers: ``ok`` (200, and the JSON body is kept), ``fail`` (500), or ``hang`` (it reads
the request and never answers, until the test ends: a webhook that is up but dead). Loopback only: nothing
leaves the machine.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from helpers import wait_until


class Webhook:
    """The server, its URL and what it received (`bodies` and their `times`, in arrival order; `hits` counts
    hanging requests too)."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.bodies: list[dict[str, Any]] = []
        self.times: list[float] = []  # time.monotonic() of each body's arrival
        self.hits = 0
        self.released = threading.Event()  # a hanging request returns once the test is done
        self.lock = threading.Lock()
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                with webhook.lock:
                    webhook.hits += 1
                if webhook.mode == "hang":
                    webhook.released.wait(60)
                    return
                if webhook.mode == "ok":
                    with webhook.lock:
                        webhook.bodies.append(body)
                        webhook.times.append(time.monotonic())
                self.send_response(200 if webhook.mode == "ok" else 500)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows what matters
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/hook/secret-token"

    def wait_for(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Wait until `count` bodies arrived; returns them."""
        wait_until(lambda: len(self.bodies) >= count, timeout, message=f"{count} webhook calls, got {self.bodies}")
        return list(self.bodies)

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def free_port_url() -> str:
    """The URL of a port on 127.0.0.1 where nothing listens (a dead webhook: the connection is refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"
