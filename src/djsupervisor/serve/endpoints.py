"""The supervisor's listening sockets, opened and closed together: the control socket and the HTTP endpoint.

The control socket is always there (`djsupervisor status`, `stop`, `reload`, `scale` talk to it); the HTTP
endpoint (metrics and status page) only when ``[supervisor] http`` is set. Both live on the supervisor's
selector. The control socket is opened first, so that a bad HTTP address stops the start before any child
is forked, with the control socket cleaned up again. The HTTP token file is read before either is opened:
a token file that is not private stops the start with nothing to clean up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
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
        allowed_hosts: Iterable[str] = (),
        token_file: str | None = None,
    ) -> None:
        """Listen: the control socket at `control_socket` (or the default path for supervisor `name`), then
        HTTP at `http` if given, serving `supervisor`'s pages to requests whose `Host` is a name of this server
        or in `allowed_hosts`, and that carry the token in `token_file` if one is given.

        Raises `serve.http.HttpError` (one line) when the token file is unusable or the address cannot be bound.
        """
        access = None
        if http:
            access = _access(http, allowed_hosts, token_file)
        path = control_socket or default_socket_path(name, create=True)
        self.control = ControlServer(str(path), answer)
        self.control.register(selector)
        self.log.info("control socket {}", path)
        if http:
            from djsupervisor.serve.http import StatusServer, supervisor_pages

            self.http = StatusServer(http, supervisor_pages(supervisor), access)
            self.http.register(selector)
            self.log.info("status page on http://{}/ (metrics on /metrics)", self.http.address)
            if access is not None and access.token is not None:
                self.log.info("the HTTP endpoint wants the token of {}", token_file)

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


def _access(http: str, allowed_hosts: Iterable[str], token_file: str | None) -> Any:
    """The `HttpAccess` of the endpoint at `http`; the token is read now, and masked in every log line."""
    from djsupervisor.log import add_secret
    from djsupervisor.serve.http import HttpError
    from djsupervisor.serve.http_access import HttpAccess, read_token_file
    from djsupervisor.supervisor.config import split_host_port

    token = None
    if token_file is not None:
        try:
            token = read_token_file(Path(token_file))
        except ValueError as error:  # the key as a config error names it; the config file is added by the CLI
            raise HttpError(f"supervisor.http_token_file: {error}") from None
        add_secret(token)
    return HttpAccess.build(split_host_port(http)[0], allowed_hosts, token)
