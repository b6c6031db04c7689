"""The supervisor's listening sockets, opened and closed together: the control socket and the HTTP endpoint.

The control socket is always there (`djsupervisor status`, `stop`, `reload`, `scale` talk to it); the HTTP
endpoint (metrics and status page) only when ``[supervisor] http`` is set. Both live on the supervisor's
selector. The control socket is opened first, so that a bad HTTP address stops the start before any child
is forked, with the control socket cleaned up again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from djsupervisor.protocol import ControlRequest, ControlResponse
from djsupervisor.serve.control import ControlServer, default_socket_path


class Endpoints:
    """The control socket and, if configured, the HTTP server of one supervisor."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.control: ControlServer | None = None
        self.http: Any = None  # serve.http.StatusServer, imported only when configured

    @property
    def http_address(self) -> str | None:
        """``host:port`` the HTTP endpoint listens on (None without one)."""
        return self.http.address if self.http is not None else None

    def open(
        self,
        selector: Any,
        *,
        name: str,
        control_socket: str | None,
        http: str | None,
        answer: Callable[[ControlRequest], ControlResponse],
        supervisor: Any,
    ) -> None:
        """Listen: the control socket at `control_socket` (or the default path for supervisor `name`), then
        HTTP at `http` if given, serving `supervisor`'s pages."""
        path = control_socket or default_socket_path(name, create=True)
        self.control = ControlServer(str(path), answer)
        self.control.register(selector)
        self.log.info("control socket {}", path)
        if http:
            from djsupervisor.serve.http import StatusServer, supervisor_pages

            self.http = StatusServer(http, supervisor_pages(supervisor))
            self.http.register(selector)
            self.log.info("status page on http://{}/ (metrics on /metrics)", self.http.address)

    def expire_idle(self) -> None:
        """Drop clients that connected and never asked (each holds a descriptor)."""
        if self.control is not None:
            self.control.expire_idle()
        if self.http is not None:
            self.http.expire_idle()

    def close(self) -> None:
        """Stop listening and drop every client (the control socket's file is removed)."""
        if self.control is not None:
            try:
                self.control.close()
            except Exception as error:
                self.log.warning("closing the control socket failed: {}", error)
        if self.http is not None:
            self.http.close()
