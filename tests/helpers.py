"""Helpers for process tests: wait for conditions with deadlines, run the real `djsupervisor start`, look at
its children from outside (psutil, process titles)."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

TESTS = Path(__file__).resolve().parent
TITLE = re.compile(r"^djsupervisor: (?P<supervisor>\S+) (?P<worker>[^\s\[]+)\[(?P<slot>\d+)\] (?P<state>.+)$")


def wait_until(predicate, timeout: float, interval: float = 0.05, message: str = "condition"):
    """Poll `predicate` until it returns a truthy value (returned) or `timeout` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def run_scripts(env: dict, script: str, argvs: list[list[str]], timeout: float = 90) -> list[str]:
    """Run tests/scripts/`script` once per argv in `argvs`, all at once; each one's stdout, once all exited 0
    (AssertionError with its stderr otherwise)."""
    processes = [
        subprocess.Popen(
            [sys.executable, str(TESTS / "scripts" / script), *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    outputs = [p.communicate(timeout=timeout) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err
    return [out for out, _ in outputs]


@contextlib.contextmanager
def serving(server):
    """Drive a ControlServer with a selector loop in a thread, as the supervisor's loop would; on exit,
    assert that no callback ever raised into the loop."""
    selector = selectors.DefaultSelector()
    server.register(selector)
    running, errors = threading.Event(), []
    running.set()

    def loop():
        while running.is_set():
            try:
                for key, mask in selector.select(0.02):
                    key.data(mask)
            except Exception as error:  # what the supervisor's loop would die of
                errors.append(error)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    server.loop_errors = errors
    try:
        yield server
    finally:
        running.clear()
        thread.join(5)
    assert not errors, errors


def raw_exchange(path, payload: bytes, *, read: bool = True) -> bytes:
    """Send raw bytes to a control socket and read one answer line (b"" if the server hangs up)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(payload)
        if not read:
            return b""
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def djsupervisor_command() -> list[str]:
    """The `djsupervisor` console script of this environment."""
    script = Path(sys.executable).parent / "djsupervisor"
    return [str(script)] if script.exists() else [shutil.which("djsupervisor") or "djsupervisor"]


def run_cli(db, cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `djsupervisor ARGS...` against the test's database and pipelines (in `env`, default `db.env`); its
    output captured as text."""
    return subprocess.run(
        [*djsupervisor_command(), *args], env=env or db.env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def documented_grants(role: str, backend: str) -> list[str]:
    """The statements README's Security section gives for a `role` ("worker", "operator") account on
    `backend`, for account ``djs_<role>``, pipeline schema ``lab_pipe`` and worker schema ``lab_workers``."""
    title = f"-- {role} account, {'PostgreSQL' if backend == 'postgresql' else 'MySQL/MariaDB'}"
    readme = (TESTS.parent / "README.md").read_text()
    start = readme.index("\n## Security\n")
    block = readme[readme.index(title, start) :]
    block = block[: block.index("```")]
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("--")]
    return [statement.strip() for statement in " ".join(lines).split(";") if statement.strip()]


def write_config(path: Path, text: str) -> Path:
    """Write a TOML config (dedented) and return its path."""
    import textwrap

    path.write_text(textwrap.dedent(text).lstrip())
    return path


class Supervised:
    """A running `djsupervisor start`, its output in a file, its children seen through psutil.

    `env` is the supervisor's whole environment: `db.env` (the `supervise` fixture) reaches the test's
    server and puts tests/ on PYTHONPATH, for its targets.
    """

    def __init__(
        self, args: list[str], env: dict, workdir: Path, uts_host: str | None = None, nofile: int | None = None
    ) -> None:
        self.log_path = workdir / (f"supervisor-{uts_host}.log" if uts_host else "supervisor.log")
        self._log = open(self.log_path, "wb")
        env = dict(env, PYTHONUNBUFFERED="1")
        command = [*djsupervisor_command(), "start", *args]
        if uts_host:  # a host of its own name: a UTS namespace (root only), as on another machine
            command = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', uts_host, *command]
        limit = None if nofile is None else functools.partial(resource.setrlimit, resource.RLIMIT_NOFILE, (nofile,) * 2)
        self.process = subprocess.Popen(
            command,
            env=env,
            cwd=workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, like a shell's job
            preexec_fn=limit,  # `nofile`: its RLIMIT_NOFILE (ulimit -n), as LimitNOFILE= would set it
        )
        self.pid = self.process.pid

    @property
    def output(self) -> str:
        """Everything the supervisor and its children wrote so far."""
        return self.log_path.read_text(errors="replace")

    def children(self) -> dict[str, psutil.Process]:
        """The live children by label ("standard[0]"), from their process titles."""
        found: dict[str, psutil.Process] = {}
        try:
            processes = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return found
        for process in processes:
            try:
                match = TITLE.match(" ".join(process.cmdline()).strip())
                if match and process.status() != psutil.STATUS_ZOMBIE:
                    found[f"{match['worker']}[{match['slot']}]"] = process
            except psutil.Error:
                continue
        return found

    def titles(self) -> dict[str, str]:
        """Process titles of the children by label."""
        titles = {}
        for label, process in self.children().items():
            try:
                titles[label] = " ".join(process.cmdline()).strip()
            except psutil.Error:
                pass
        return titles

    def pids(self, worker: str | None = None) -> dict[str, int]:
        """Pids of the children (of one worker) by label."""
        return {
            label: p.pid for label, p in self.children().items() if worker is None or label.startswith(f"{worker}[")
        }

    def wait_children(self, expected: dict[str, int], timeout: float = 60) -> dict[str, int]:
        """Wait until the number of children per worker is exactly `expected`; returns their pids."""

        def counts():
            pids = self.pids()
            got: dict[str, int] = {}
            for label in pids:
                worker = label.split("[")[0]
                got[worker] = got.get(worker, 0) + 1
            return pids if got == {w: n for w, n in expected.items() if n} else None

        return wait_until(counts, timeout, message=f"children {expected}; output:\n{self.output[-3000:]}")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float) -> int:
        """Wait for the supervisor to exit; returns its status."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"supervisor still running after {timeout} s; output:\n{self.output[-3000:]}")

    def close(self) -> None:
        """Make sure nothing of this supervisor is left running."""
        descendants = []
        try:
            descendants = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for process in descendants:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                pass
        self._log.close()


def process_gone(pid: int) -> bool:
    """Whether `pid` no longer runs (gone or a zombie)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def agent_child(**fields):
    """A `protocol.AgentChild` of pool standard in slot 0, populating lab.__t; `fields` replace those."""
    child = dict(
        worker="standard",
        slot=0,
        pid=11,
        state="populating",
        table="lab.__t",
        key={"id": 1},
        jobs_done=0,
        jobs_failed=0,
        cycles=0,
    )
    child.update(fields)
    return child
