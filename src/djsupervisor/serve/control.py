"""The control socket: a Unix stream socket, mode 0600 in a private (or sticky) directory, JSON lines.

Request ``{"cmd": "status" | "stop" | "reload" | "scale", ...}`` (`ControlRequest`), one per line; response
``{"ok": true, ...}`` or ``{"ok": false, "error": "one line"}`` (`ControlResponse`). The server lives in the
supervisor's selector loop: it never blocks and never lets a client's garbage, size, silence or hang-up reach
the loop as an exception.
"""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from djsupervisor.protocol import (
    ControlRequest,
    ControlResponse,
    DecodedLine,
    LineDecoder,
    ProtocolError,
    encode,
    parse_control_request,
    parse_control_response,
    refusal,
)
from djsupervisor.serve.loop_server import LoopClient, LoopServer
from djsupervisor.serve.status_format import format_status  # noqa: F401  (the status table belongs to this interface)

MAX_REQUEST_BYTES = 64 * 1024
IDLE_TIMEOUT = 10.0  # seconds a client may stay connected without completing a request
MAX_CLIENTS = 64  # connections served at once; more are closed right away
MAX_PIPELINED = 8  # requests answered from one read; a client sending more is cut off


#: The system's runtime directory for supervisors; the systemd units give each instance a directory in it.
SYSTEM_RUNTIME_DIR = Path("/run/djsupervisor")


class ControlError(Exception):
    """A control request could not be made; str() is one line."""


def default_socket_path(name: str, *, create: bool = False) -> str:
    """Where a supervisor called `name` listens unless its config says otherwise.

    In order: ``$DJSUPERVISOR_RUNTIME_DIR`` (the systemd units set it to ``/run/djsupervisor/INSTANCE``);
    an existing ``/run/djsupervisor/*/NAME.sock`` we can see (the units' directory per instance, each of its
    own user); ``/run/djsupervisor`` when it is ours (or we are root); ``$XDG_RUNTIME_DIR/djsupervisor``;
    ``/tmp/djsupervisor-<uid>``, unless another user made it (or it is not 0700): then a private
    ``/tmp/djsupervisor-XXXXXXXX`` (`fallback_directory`; made if `create`, the supervisor's side).
    """
    explicit = os.environ.get("DJSUPERVISOR_RUNTIME_DIR")
    if explicit:
        return str(Path(explicit) / f"{name}.sock")
    system = SYSTEM_RUNTIME_DIR
    for instance in sorted(system.glob(f"*/{glob.escape(name)}.sock")):  # only those our user may enter
        return str(instance)
    try:
        if os.getuid() == 0 or system.stat().st_uid == os.getuid():
            return str(system / f"{name}.sock")
    except OSError:
        pass
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return str(Path(runtime) / "djsupervisor" / f"{name}.sock")
    directory = Path(tempfile.gettempdir()) / f"djsupervisor-{os.getuid()}"
    if _usable_default(directory):
        return str(directory / f"{name}.sock")
    return str(fallback_directory(name, create=create) / f"{name}.sock")


def _usable_default(directory: Path) -> bool:
    """Whether `directory` is absent (we make it) or ours, a real directory and 0700."""
    return not os.path.lexists(directory) or _private(directory)


def _private(path: Path) -> bool:
    """Whether `path` is a real directory (not a link), ours and 0700."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700


def fallback_directory(name: str, *, create: bool = False) -> Path:
    """The private runtime directory used when another user holds ``/tmp/djsupervisor-<uid>``.

    No file records it: the supervisor and the command line both look for ``djsupervisor-*`` directories in
    the temporary directory that are ours, real directories and 0700 (another user cannot make one that
    passes), preferring one that holds ``NAME.sock``, then the oldest name in sorted order. With `create`
    and none found, `tempfile.mkdtemp` makes one (0700, a random name nobody could have pre-created).
    """
    candidates = sorted(path for path in Path(tempfile.gettempdir()).glob("djsupervisor-*") if _private(path))
    for path in candidates:
        if (path / f"{name}.sock").exists():
            return path
    if candidates:
        return candidates[0]
    if create:
        made = Path(tempfile.mkdtemp(prefix="djsupervisor-"))
        _log_fallback(made)
        return made
    return Path(tempfile.gettempdir()) / f"djsupervisor-{os.getuid()}"  # nothing listens; the answer says so


def _log_fallback(made: Path) -> None:
    from loguru import logger

    logger.warning(
        "{} is not ours or not private (another user made it?): the control socket goes to {} instead",
        Path(tempfile.gettempdir()) / f"djsupervisor-{os.getuid()}",
        made,
    )


def supervisor_listening(path: str) -> bool:
    """Whether a live process accepts connections on the control socket `path`."""
    return os.path.exists(path) and _answers(path)


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
            return True
        except OSError:
            return False


def _private_directory(directory: Path) -> None:
    """Make `directory` 0700 if it is not there; use an existing one as it is, never changing its mode.

    Only a directory made here is ours to chmod: ``control_socket = "/tmp/lab.sock"`` run as root once made
    /tmp ``drwx------``. An existing directory that others can write to is refused unless it is sticky
    (like /tmp: others can then not remove or replace our socket)."""
    created = False
    try:
        directory.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            directory.mkdir(mode=0o700)
            created = True
        except FileExistsError:
            pass
        info = directory.lstat()
    except OSError as error:
        raise ControlError(f"control socket directory {directory}: {error.strerror or error}") from None
    if stat.S_ISLNK(info.st_mode):  # e.g. a link planted in /tmp: follow nothing someone else set up
        raise ControlError(f"control socket directory {directory} is a symbolic link; refusing it")
    mode = stat.S_IMODE(info.st_mode)
    if created:
        if mode != 0o700:
            os.chmod(directory, 0o700)
        return
    if info.st_uid not in (os.getuid(), 0):
        raise ControlError(f"control socket directory {directory} belongs to uid {info.st_uid}, not to us")
    if mode & 0o002 and not mode & stat.S_ISVTX:
        raise ControlError(
            f"control socket directory {directory} is writable by others and not sticky (mode {mode:04o}); refusing it"
        )


#: Answers one request; a response that is not a dict is answered as "no answer".
Handler = Callable[[ControlRequest], Mapping[str, Any]]


class _Client(LoopClient):
    def __init__(self, sock: socket.socket, peer: str = "") -> None:
        super().__init__(sock, peer)
        self.requests = LineDecoder(MAX_REQUEST_BYTES)
        self.closing = False


class ControlServer(LoopServer[_Client]):
    """Serves control requests with `handler(request) -> response` inside the caller's selector loop."""

    client_class = _Client

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = str(path)
        self.handler = handler
        _private_directory(Path(self.path).parent)
        self._remove_stale()
        super().__init__(self._bind())
        info = os.stat(self.path)
        self._identity = (info.st_dev, info.st_ino)

    @property
    def max_clients(self) -> int:
        return MAX_CLIENTS

    @property
    def idle_timeout(self) -> float:
        return IDLE_TIMEOUT

    def _remove_stale(self) -> None:
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as error:
            raise ControlError(f"control socket {self.path}: {error.strerror or error}") from None
        if not stat.S_ISSOCK(info.st_mode):
            raise ControlError(f"control socket {self.path} exists and is not a socket; not replacing it")
        if _answers(self.path):
            raise ControlError(f"another supervisor is listening on {self.path}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left behind by a supervisor that died

    def _bind(self) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # the socket is never, even for a moment, open to others
        try:
            listener.bind(self.path)
            os.chmod(self.path, 0o600)
            listener.listen(16)
            listener.setblocking(False)
        except OSError as error:  # e.g. "AF_UNIX path too long", permission denied
            listener.close()
            raise ControlError(f"control socket {self.path}: {error.strerror or error}") from None
        finally:
            os.umask(old_umask)
        return listener

    def _reading(self, client: _Client) -> bool:
        return not client.closing  # whatever else it sent is not read

    def _read(self, client: _Client) -> None:
        chunk = self._recv(client)
        if chunk is None:
            return
        if not chunk:
            self._drop(client)
            return
        client.requests.push(chunk)
        for _ in range(MAX_PIPELINED):  # several requests may arrive in one read
            line = client.requests.pop()
            if line is None:
                return
            if line.too_long:
                self._refuse(client, f"request larger than {MAX_REQUEST_BYTES} bytes")
                return
            self._respond(client, self._answer(line))
        if client.requests.has_line():  # a flood: each answer costs the loop time that children's reports need
            self._refuse(client, f"more than {MAX_PIPELINED} requests at once")

    def _refuse(self, client: _Client, error: str) -> None:
        client.closing = True  # whatever else it sent is not read
        client.requests.clear()
        self._respond(client, refusal(error))

    def _answer(self, line: DecodedLine) -> Mapping[str, Any]:
        if not line.ok:
            return refusal(f"request is not JSON: {line.error}")
        try:
            request = parse_control_request(line.message)
        except ProtocolError as error:
            return refusal(error)
        try:
            response = self.handler(request)
        except Exception as error:  # a handler bug must not take the supervisor down
            return refusal(f"{error.__class__.__name__}: {error}")
        return response if isinstance(response, dict) else refusal("no answer")

    def _respond(self, client: _Client, response: Mapping[str, Any]) -> None:
        try:
            data = encode(response)
        except (TypeError, ValueError) as error:  # e.g. a circular structure from the handler
            data = encode(refusal(f"unserializable answer: {error}"))
        client.outbox = bytes(client.outbox) + data
        client.since = time.monotonic()
        self._write(client)

    def _write(self, client: _Client) -> None:
        self._send(client)
        if client.outbox or not client.closing:
            self._watch(client, writing=bool(client.outbox))
        else:
            self._drop(client)

    def close(self) -> None:
        """Stop serving and remove the socket file."""
        super().close()
        try:
            info = os.stat(self.path)
        except OSError:
            return
        if (info.st_dev, info.st_ino) == self._identity:  # not a socket someone else has bound there since
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def send_request(path: str, request: ControlRequest, timeout: float = 5.0) -> ControlResponse:
    """Send one request to the supervisor listening on `path` and return its response.

    Raises ControlError (one line) when nobody listens, the socket belongs to another user, or no complete
    answer arrives within `timeout` seconds in all.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ControlError(f"no supervisor listening on {path} (no such socket)") from None
    except OSError as error:
        raise ControlError(f"control socket {path}: {error.strerror or error}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlError(f"{path} is not a socket")
    if info.st_uid != os.getuid():
        raise ControlError(
            f"refusing {path}: owned by uid {info.st_uid}, not by us (uid {os.getuid()}); "
            "run the command as the supervisor's user"
        )
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(encode(request))
            answer = LineDecoder()
            while not answer.has_line():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)  # a trickling answer must not stretch the timeout
                chunk = sock.recv(65536)
                if not chunk:
                    answer.end()
                    break
                answer.push(chunk)
        except (ConnectionRefusedError, FileNotFoundError):
            raise ControlError(f"no supervisor listening on {path}") from None
        except TimeoutError:
            raise ControlError(f"no answer from the supervisor on {path} within {timeout:g} s") from None
        except OSError as error:
            raise ControlError(f"control socket {path}: {error.strerror or error}") from None
    line = answer.pop()
    try:
        return parse_control_response(line.message if line is not None else None)
    except ProtocolError:  # not JSON, not an object, or the connection closed before a whole line
        raise ControlError(f"garbled answer from the supervisor on {path}") from None
