"""Who may read the HTTP endpoint: the `Host` allow-list, the optional token, and the rule that a
non-loopback bind needs a token.

The endpoint shows pids, tables, keys and host names. Two ways in had to be closed:

* **DNS rebinding.** A web page on ``evil.example`` whose name is made to resolve to 127.0.0.1 can have any
  browser on the supervisor's host read ``http://evil.example:9108/status.json`` as same-origin. The
  browser still sends ``Host: evil.example:9108``, so a request is answered only when its `Host` names this
  server: by default a loopback name or address for a loopback bind; for any other bind also an IP address
  (a rebinding page can only make the browser send a *name*) and this machine's host name. More names go in
  ``[supervisor] http_allowed_hosts`` (``"*"``: any). Ports are not compared: an ``ssh -L 8080:...`` forward
  keeps working, and a port proves nothing the name does not. A request without `Host` (HTTP/1.0 health
  checks) is served: browsers always send one.
* **Anyone on the network.** A bind other than loopback needs ``http_token_file`` (or the explicit
  ``http_allow_anonymous = true``); `exposure_problem` is checked at config load. With a token every page
  wants ``Authorization: Bearer TOKEN`` or HTTP basic auth with the token as password (any user name, so
  that a browser's login prompt works); anything else gets 401 with ``WWW-Authenticate``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import ipaddress
import os
import socket
import stat
from collections.abc import Iterable
from pathlib import Path

MIN_TOKEN_LENGTH = 16  # a guessable token is no token; `openssl rand -hex 32` gives 64
MAX_TOKEN_FILE_BYTES = 4096
CHALLENGE = ("Bearer", "Basic")  # one WWW-Authenticate header each: Prometheus sends either, browsers prompt


def host_of(value: str) -> str:
    """The host part of a `Host` header or ``host:port`` text, lower case, without brackets or a final dot."""
    value = value.strip().lower()
    if value.startswith("["):  # [v6] or [v6]:port
        return value[1 : value.find("]")] if "]" in value else value
    name, colon, port = value.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        value = name
    return value.rstrip(".")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """Whether binding `host` (an address or ``localhost``) listens on loopback only."""
    host = host_of(host) if host.startswith("[") else host.lower().rstrip(".")
    address = _ip(host)
    return host == "localhost" if address is None else address.is_loopback


def exposure_problem(http: str | None, token_file: str | None, allow_anonymous: bool) -> str | None:
    """Why a config may not serve `http` as it stands (a non-loopback bind without a token), else None."""
    if http is None or token_file is not None or allow_anonymous:
        return None
    host = http.rpartition(":")[0]
    if is_loopback(host):
        return None
    return (
        f"{host} is not a loopback address and the endpoint has no token: set http_token_file, "
        "or http_allow_anonymous = true on a network you trust"
    )


def default_hosts(bound_host: str) -> frozenset[str]:
    """The `Host` names served without `http_allowed_hosts`: loopback names; for any other bind also this
    machine's host name and the bound name (IP addresses are allowed by `HttpAccess.host_allowed`)."""
    names = {"localhost", "127.0.0.1", "::1"}
    if not is_loopback(bound_host):
        names.update({socket.gethostname().lower(), host_of(bound_host)})
    return frozenset(names)


def read_token_file(path: Path) -> str:
    """The token in the file at `path`; ValueError (the problem, never the token) when the file is not
    private or holds no usable token.

    Private means: a regular file owned by this user or by root, with no permission for others and none for
    its group, except read for our own group on a file root owns (what Kubernetes makes of a Secret mounted
    with ``fsGroup``, and of ``root:djsupervisor 0640`` on a host: root chose to share it with the service).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not hang the start
    except OSError as error:
        raise ValueError(f"cannot open {str(path)!r}: {error.strerror or error}") from None
    try:
        info = os.fstat(fd)  # of the file we read, not of whatever the path names a moment later
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{str(path)!r} is not a regular file")
        if info.st_uid not in (os.geteuid(), 0):
            raise ValueError(f"{str(path)!r} is owned by uid {info.st_uid}, neither this user nor root")
        shared_by_root = info.st_uid == 0 and info.st_gid == os.getegid() and mode & 0o070 == 0o040
        if mode & 0o007 or (mode & 0o070 and not shared_by_root):
            raise ValueError(f"{str(path)!r} is accessible to group or others (mode {mode:o}): chmod 600 it")
        data = os.read(fd, MAX_TOKEN_FILE_BYTES + 1)  # a regular file: one read returns all there is, to the cap
    finally:
        os.close(fd)
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise ValueError(f"{str(path)!r} is larger than {MAX_TOKEN_FILE_BYTES} bytes")
    token = data.decode("ascii", "replace").strip()
    if not token.isprintable() or any(ch.isspace() or ord(ch) > 126 for ch in token):
        raise ValueError(f"{str(path)!r} must hold one token of printable ASCII without spaces")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"{str(path)!r} holds a token under {MIN_TOKEN_LENGTH} characters (openssl rand -hex 32)")
    return token


@dataclasses.dataclass(frozen=True)
class HttpAccess:
    """What a request needs to be answered: a `Host` in `hosts` (None: any), and the token if one is set.

    The default (no arguments) serves loopback names only, without a token."""

    hosts: frozenset[str] | None = default_hosts("127.0.0.1")
    allow_ip_hosts: bool = False
    token: str | None = dataclasses.field(default=None, repr=False)  # never in a repr, a log, an error

    @classmethod
    def build(cls, bound_host: str, allowed: Iterable[str] = (), token: str | None = None) -> HttpAccess:
        """The access rules of an endpoint bound to `bound_host` with `http_allowed_hosts` = `allowed`."""
        allowed = tuple(allowed)
        hosts = None if "*" in allowed else default_hosts(bound_host) | {host_of(name) for name in allowed}
        return cls(hosts, allow_ip_hosts=not is_loopback(bound_host), token=token)

    def host_allowed(self, value: str | None) -> bool:
        """Whether a request with this `Host` header (None: absent) is for this server."""
        if value is None or self.hosts is None:
            return True
        host = host_of(value)
        address = _ip(host)
        if address is not None and (self.allow_ip_hosts or address.is_loopback):
            return True
        return host in self.hosts

    def authorized(self, value: str | None) -> bool:
        """Whether the `Authorization` header (None: absent) carries the token (always, without one)."""
        if self.token is None:
            return True
        scheme, _, credentials = (value or "").strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "bearer":
            given = credentials.encode("latin-1", "replace")
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(credentials, validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
        else:
            return False
        # Digests of equal length: compare_digest then leaks neither the token's content nor its length.
        expected = hashlib.sha256(self.token.encode("ascii")).digest()
        return hmac.compare_digest(hashlib.sha256(given).digest(), expected)
