"""systemd/djsupervisor@.service under a real systemd: booted as PID 1 of its own namespaces on an overlay of /
(tests/systemd_container.py; never on the machine's own root), with the unit file as it is in the repository,
an EnvironmentFile and a credential for the test's database, and the test pipeline's `standard` worker.

Everything is checked the way an operator would, through `systemctl` and `journalctl` inside: the unit is active
only once the supervisor said READY=1 (its children up and connected), its STATUS= line, `systemctl reload` with a
changed config, `djsupervisor restart` and SIGUSR2 (to the main process) rolling every pool onto fresh interpreters
under the hardening, a SIGKILLed child replaced, the watchdog restarting a supervisor whose loop is SIGSTOPped,
`systemctl stop` with a job in flight (it finishes, inside TimeoutStopSec, and its row lands), exit status 2 on a
bad config and no restart, journald priorities (`journalctl -p warning`), and the hardening options (DynamicUser,
ProtectSystem=strict, ProtectHome, the system-call filter, ...) leaving the workers able to import the pipeline and
reach the database. One change to the unit, for time: the watchdog step gives it WatchdogSec=4 in a drop-in (60 s
in the file). A second test starts systemd/djsupervisor.service (a system user of its own) in a container of its
own.

Marked `systemd` (`./scripts/test -m systemd` runs it alone); skipped, with the reason, where namespaces,
overlayfs or a cgroup2 hierarchy are not available (not root, a container without them). Afterwards the
machine's own database servers must still answer and its /tmp and /run keep their files.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import conftest
import datajoint as dj
import pytest
from helpers import TESTS, wait_until
from pipelines.lab import declare
from systemd_container import Container, unavailable

import djsupervisor

pytestmark = [pytest.mark.systemd, pytest.mark.process, pytest.mark.timeout(300)]

NAME = "lab"
UNIT = f"djsupervisor@{NAME}.service"
SINGLE = "djsupervisor.service"  # the one-config unit: /etc/djsupervisor/djsupervisor.toml, the user djsupervisor
UNITS = TESTS.parent / "systemd"
LIB = "/opt/djsupervisor-lib"  # where the test's interpreter, packages and pipeline appear in the container
CLI = ["/opt/djsupervisor/bin/djsupervisor"]  # the unit's ExecStart
PYTHON = f"python{sys.version_info.major}.{sys.version_info.minor}"
WRAPPER = f"""#!/bin/sh
# The test's install of djsupervisor: the checkout's interpreter, site-packages and source, bound read-only
# under {LIB} (the interpreter may live under /root, which ProtectHome=yes hides, and link libpython by path).
export LD_LIBRARY_PATH={LIB}/python/lib PYTHONPATH={LIB}/src:{LIB}/site
exec {LIB}/python/bin/{PYTHON} -m djsupervisor "$@"
"""


def config(*workers: tuple[str, int], name: str = NAME) -> str:
    """NAME.toml: the test pipeline's workers (name, replicas), imported from the bound tests/ directory."""
    text = f'[supervisor]\nname = "{name}"\npythonpath = ["{LIB}/tests"]\ngraceful_timeout = 20\n'
    for worker, replicas in workers:
        text += f'\n[[worker]]\nname = "{worker}"\ntarget = "pipelines.supervised:{worker}"\nreplicas = {replicas}\n'
    return text


class Transcript:
    """What the test saw, section by section: printed at the end (pytest -s shows it) and kept in tmp_path."""

    def __init__(self, path: Path):
        self.path = path
        self.sections: list[str] = []

    def add(self, title: str, text: str) -> None:
        self.sections.append(f"==== {title}\n{text.rstrip()}\n")
        self.path.write_text("\n".join(self.sections))


class Service:
    """The unit inside the container, seen through systemctl and journalctl."""

    def __init__(self, container: Container, transcript: Transcript, unit: str = UNIT):
        self.container = container
        self.transcript = transcript
        self.unit = unit

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        result = self.container.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)
        return result.stdout + result.stderr

    def show(self, *properties: str) -> dict[str, str]:
        text = self.systemctl("show", self.unit, "-p", ",".join(properties))
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def state(self) -> str:
        return self.show("ActiveState")["ActiveState"]

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def children(self) -> dict[int, str]:
        """The supervisor's children: PID (as the container sees it) → process title."""
        pid = self.main_pid()
        if not pid:
            return {}
        out = self.container.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], check=False).stdout
        return {int(line.split(None, 1)[0]): line.split(None, 1)[1] for line in out.splitlines() if line.strip()}

    def workers(self, count: int, worker: str = "standard", timeout: float = 60) -> dict[int, str]:
        """Wait until `count` children of `worker` run (titles "djsupervisor: lab standard[0] ..."); return them."""

        def running():
            found = {pid: title for pid, title in self.children().items() if f" {worker}[" in title}
            return found if len(found) == count else None

        return wait_until(running, timeout, interval=0.2, message=f"{count} {worker} children")

    def journal(self, *args: str) -> str:
        return self.container.run(["journalctl", "--no-pager", "-u", self.unit, *args]).stdout

    def mark(self) -> int:
        """The journal's last sequence number now, for `since`. (Not `journalctl --after-cursor`: with -u and
        -p it skips the first entry that matches after the cursor, systemd 252's journalctl.)"""
        out = self.container.run(["journalctl", "--no-pager", "-n", "1", "-o", "json"]).stdout
        return sequence_number(json.loads(out.splitlines()[-1]))

    def since(self, mark: int, *args: str) -> str:
        """The unit's journal messages after `mark`, one a line (`journalctl -u UNIT ARGS -o cat`)."""
        out = self.container.run(["journalctl", "--no-pager", "-u", self.unit, "-o", "json", *args]).stdout
        entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return "".join(f"{entry['MESSAGE']}\n" for entry in entries if sequence_number(entry) > mark)

    def status(self) -> str:
        return self.systemctl("status", self.unit, "--lines=0", check=False)


def sequence_number(entry: dict) -> int:
    """A journal entry's sequence number (the i= field of its cursor)."""
    return int(dict(field.split("=", 1) for field in entry["__CURSOR"].split(";"))["i"], 16)


def holds(predicate, seconds: float, interval: float = 0.5) -> bool:
    """Whether `predicate` stays true for `seconds` (polled): for what must not happen, such as a restart."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(interval)
    return True


def grep(text: str, *words: str) -> str:
    """The lines of `text` that hold any of `words`."""
    return "\n".join(line for line in text.splitlines() if any(word in line for word in words))


def assert_machine_intact(sentinels: list[Path]) -> None:
    """The machine's database servers answer and its /tmp and /run still hold the files put there before."""
    for backend in conftest.BACKENDS:
        connection = conftest.configure_datajoint(backend)
        assert connection.query("SELECT 1").fetchone()[0] == 1, backend
        connection.close()
    for sentinel in sentinels:
        assert sentinel.exists(), f"{sentinel} is gone: something emptied the machine's {sentinel.parent}"


@pytest.fixture
def db() -> Iterator[conftest.TestDatabase]:
    """The test's database on MariaDB/MySQL only (one backend: the point is systemd, not the database)."""
    connection = conftest.configure_datajoint("mysql")
    prefix = f"djst_{uuid.uuid4().hex[:10]}"
    yield conftest.TestDatabase("mysql", prefix, connection, conftest.BACKENDS["mysql"])
    connection = conftest.configure_datajoint("mysql")
    conftest.drop_schemas(connection, prefix)
    connection.close()


@pytest.fixture
def service(tmp_path: Path, db: conftest.TestDatabase) -> Iterator[Service]:
    """The booted container with the unit installed; powered off afterwards, and the machine checked."""
    reason = unavailable()
    if reason:
        pytest.skip(f"no real systemd here: {reason}")
    try:
        probe = Container(tmp_path / "probe").probe(["/bin/true"])
    except OSError as error:  # e.g. a read-only cgroup2 hierarchy: no cgroup of its own for the container
        pytest.skip(f"no real systemd here: {error}")
    if probe.returncode != 0:
        pytest.skip(f"no real systemd here: namespaces or overlayfs not allowed: {probe.stdout.strip()[-300:]}")
    sentinels = [Path(d) / f"djsupervisor-systemd-test-{uuid.uuid4().hex[:8]}" for d in ("/tmp", "/run")]
    for sentinel in sentinels:
        sentinel.touch()
    settings = db.settings
    env = (
        f"DJ_HOST={settings['host']}\nDJ_PORT={settings['port']}\nDJ_USER={settings['user']}\nDJ_BACKEND=mysql\n"
        f"DJ_USE_TLS=false\nDJS_TEST_PREFIX={db.prefix}\n"
    )
    files: dict[str, str | tuple[str, int]] = {
        # the units as they are in the repository
        "/etc/systemd/system/djsupervisor@.service": (UNITS / "djsupervisor@.service").read_text(),
        f"/etc/systemd/system/{SINGLE}": (UNITS / SINGLE).read_text(),
        f"/etc/djsupervisor/{NAME}.toml": (config(("standard", 2)), 0o640),
        f"/etc/djsupervisor/{NAME}.env": (env, 0o600),
        f"/etc/djsupervisor/{NAME}.dj_pass": (settings["password"], 0o600),
        "/etc/djsupervisor/djsupervisor.toml": (config(("standard", 2), name="djsupervisor"), 0o640),
        "/etc/djsupervisor/djsupervisor.env": (env, 0o600),
        "/etc/djsupervisor/djsupervisor.dj_pass": (settings["password"], 0o600),
        "/opt/djsupervisor/bin/djsupervisor": (WRAPPER, 0o755),
    }
    binds = {
        Path(sys.base_prefix): f"{LIB}/python",
        Path(djsupervisor.__file__).resolve().parents[1]: f"{LIB}/src",
        Path(dj.__file__).resolve().parents[1]: f"{LIB}/site",
        TESTS / "pipelines": f"{LIB}/tests/pipelines",
    }
    container = Container(tmp_path / "container", files, binds)
    transcript = Transcript(tmp_path / "transcript.txt")
    try:
        started = time.monotonic()
        container.boot(timeout=60)
        transcript.add("boot", f"systemd booted {Path('/lib/systemd/systemd')} in {time.monotonic() - started:.1f} s")
        # README's install steps: the group that reads /etc/djsupervisor, the config 0640, the password 0600
        container.run(["groupadd", "--system", "djsupervisor"])
        container.run(["useradd", "--system", "--gid", "djsupervisor", "--no-create-home", "djsupervisor"])
        container.run(["chown", "-R", "root:djsupervisor", "/etc/djsupervisor"])
        container.run(["chmod", "0750", "/etc/djsupervisor"])
        service = Service(container, transcript)
        yield service
        whole = service.journal("-o", "short-monotonic")
        if whole.strip() and "-- No entries --" not in whole:
            transcript.add(
                "journalctl -u djsupervisor@lab (the whole run; the workers' 'cycle N done' lines left out)",
                "\n".join(line for line in whole.splitlines() if "] cycle " not in line),
            )
    finally:
        started = time.monotonic()
        container.shutdown()
        transcript.add("poweroff", f"the container's systemd exited in {time.monotonic() - started:.1f} s")
        print("\n" + "\n".join(transcript.sections))
    assert_machine_intact(sentinels)
    for sentinel in sentinels:
        sentinel.unlink()


def test_the_unit_under_a_real_systemd(service: Service, db: conftest.TestDatabase):
    lab = declare(db.schema_name("pipe"), db.connection)
    lab.seed([1, 2, 3])
    record = service.transcript.add

    # start: activating while the supervisor brings its children up, active once it sent READY=1
    service.systemctl("start", "--no-block", UNIT)
    seen: list[str] = []

    def active() -> bool:
        state = service.show("ActiveState", "SubState", "MainPID")
        if not seen or seen[-1] != f"{state['ActiveState']}/{state['SubState']}":
            seen.append(f"{state['ActiveState']}/{state['SubState']}")
        assert state["ActiveState"] != "failed", service.journal("-o", "cat")
        return state["ActiveState"] == "active"

    wait_until(active, 90, interval=0.05, message="the unit active")
    assert "activating/start" in seen and seen[-1] == "active/running", seen
    children = service.workers(2)  # READY=1 came once both were up and connected
    record("start: the states systemctl show went through", " -> ".join(seen))
    record("systemctl status (at once after start)", service.status())
    wait_until(lambda: len(lab.Square()) == 3, 60, message="the workers to compute Square")

    # STATUS=: the one-line summary systemd shows, sent with READY=1 and when it changes, at most once a second
    first = service.show("StatusText")["StatusText"]
    assert first.startswith("2 ") and first.endswith("jobs done by the current children"), first
    wait_until(
        lambda: service.show("StatusText")["StatusText"].startswith("2 running; 3 jobs"), 25, interval=0.5,
        message="STATUS= to say 2 running, 3 jobs done",
    )  # fmt: skip
    record("systemctl status (after the next STATUS=)", service.status())

    # hardening: the workers run as the instance's dynamic user, imported the pipeline and reached the database
    user = service.container.run(["ps", "-o", "user=", "-p", str(next(iter(children)))]).stdout.strip()
    assert user == f"djsupervisor-{NAME}", user
    pids = {row["worker_pid"] for row in lab.Square.to_dicts()}
    assert pids <= set(children), (pids, children)  # the PIDs are the container's: its own PID namespace
    runtime = f"/run/djsupervisor/{NAME}"
    listing = service.container.run(["stat", "-c", "%A %U %n", runtime, f"{runtime}/{NAME}.sock"]).stdout
    assert listing.split("\n")[:2] == [
        f"drwx------ djsupervisor-{NAME} {runtime}",
        f"srw------- djsupervisor-{NAME} {runtime}/{NAME}.sock",
    ]
    record("the runtime directory and the control socket", listing)
    control = service.container.run(["runuser", "-u", f"djsupervisor-{NAME}", "--", *CLI, "status", "--name", NAME])
    assert "standard" in control.stdout, control.stdout  # README: the control commands run as the instance's user
    record(f"runuser -u djsupervisor-{NAME} -- djsupervisor status --name {NAME}", control.stdout)

    # the hardening in force in a worker: no new privileges, the system-call filter, no capabilities, a read-only
    # file system with /home and /root out of sight and a /tmp of its own
    child = next(iter(children))
    proc = service.container.run(["cat", f"/proc/{child}/status"]).stdout
    fields = dict(line.split(":\t", 1) for line in proc.splitlines() if ":\t" in line)
    assert (fields["NoNewPrivs"], fields["Seccomp"], fields["CapEff"]) == ("1", "2", "0000000000000000"), fields
    table = service.container.run(["nsenter", "-t", str(child), "-m", "findmnt", "-rn", "-o", "TARGET,OPTIONS"]).stdout
    mounts = dict(line.split(" ", 1) for line in table.splitlines())
    assert mounts["/"].startswith("ro,") and {"/home", "/root", "/tmp"} <= set(mounts), mounts
    record(
        f"the worker {child}: /proc status and mounts",
        f"NoNewPrivs {fields['NoNewPrivs']}, Seccomp {fields['Seccomp']}, CapEff {fields['CapEff']}\n"
        + "\n".join(f"{target} {mounts[target]}" for target in ("/", "/home", "/root", "/tmp")),
    )

    # a SIGKILLed child is replaced by the supervisor; systemd sees nothing of it
    main_pid = service.main_pid()
    victim = next(iter(children))
    service.container.run(["kill", "-KILL", str(victim)])
    replaced = wait_until(
        lambda: (lambda now: now if len(now) == 2 and victim not in now else None)(service.workers(2)),
        60, interval=0.2, message="the killed child replaced",
    )  # fmt: skip
    assert service.show("MainPID", "NRestarts") == {"MainPID": str(main_pid), "NRestarts": "0"}
    record("SIGKILL to a child", f"killed {victim}; children now {sorted(replaced)}")

    # reload: a changed config (a second worker), read on SIGHUP, by the same main process
    service.container.run(
        ["sh", "-c", f"cat > /etc/djsupervisor/{NAME}.toml"], input=config(("standard", 2), ("other", 1))
    )
    service.systemctl("reload", UNIT)
    service.workers(1, "other")
    wait_until(lambda: len(lab.Cube()) == 3, 60, message="the new worker to compute Cube")
    assert service.main_pid() == main_pid and service.state() == "active"
    record("systemctl reload (config with a second worker)", service.status())

    # restart: every pool onto freshly imported code, one child at a time, under the unit's hardening (the new
    # children exec a fresh interpreter under NoNewPrivs and the seccomp filter); then SIGUSR2 to the main
    # process, the same roll without the command line. The main process stays, systemd sees no restart.
    before = {**service.workers(2), **service.workers(1, "other")}
    rolled = service.container.run(
        ["runuser", "-u", f"djsupervisor-{NAME}", "--", *CLI, "restart", "--name", NAME], check=False, timeout=150
    )
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr + service.journal("-o", "cat")[-3000:]
    assert rolled.stdout.count("restarted: ") == 3 and "restart done in" in rolled.stdout, rolled.stdout
    after = {**service.workers(2), **service.workers(1, "other")}
    assert not set(after) & set(before), (before, after)
    record(f"runuser -u djsupervisor-{NAME} -- djsupervisor restart --name {NAME}", rolled.stdout)
    service.systemctl("kill", "--kill-whom=main", "-s", "SIGUSR2", UNIT)
    wait_until(lambda: "restart 2 done" in service.journal("-o", "cat"), 150, interval=0.5, message="USR2's restart")
    assert not set(service.workers(2)) & set(after)
    assert service.show("MainPID", "NRestarts") == {"MainPID": str(main_pid), "NRestarts": "0"}
    record("systemctl kill --kill-whom=main -s SIGUSR2", service.status())

    # journald priorities: the killed child is a warning or worse; a start or reload line is not
    warnings = service.journal("-p", "warning", "-o", "cat")
    everything = service.journal("-o", "cat")
    assert "exited (killed by SIGKILL" in warnings, warnings
    assert "all children started" in everything and "all children started" not in warnings
    record("journalctl -u djsupervisor@lab -p warning", warnings)

    # stop with a job in flight: it finishes, inside TimeoutStopSec, and its row lands
    lab.seed([10], delay=6)
    wait_until(lambda: len(lab.Square.jobs & "status = 'reserved'") == 1, 30, message="job 10 in flight")
    started = time.monotonic()
    service.systemctl("stop", UNIT, timeout=60)
    took = time.monotonic() - started
    assert len(lab.Square() & "source_id = 10") == 1, "the job in flight did not land"
    result = service.show("ActiveState", "Result", "ExecMainStatus", "TimeoutStopUSec")
    assert result["ActiveState"] == "inactive" and result["Result"] == "success", result
    assert took < 45, took
    record("systemctl stop with a job in flight", f"stopped in {took:.1f} s; {result}\n{service.status()}")

    # the watchdog: a supervisor whose loop stops is killed and restarted (WatchdogSec=4 here, 60 s in the file)
    service.container.run(["mkdir", "-p", f"/etc/systemd/system/{UNIT}.d"])
    service.container.run(
        ["sh", "-c", f"cat > /etc/systemd/system/{UNIT}.d/watchdog.conf"], input="[Service]\nWatchdogSec=4\n"
    )
    service.systemctl("daemon-reload")
    service.systemctl("start", UNIT, timeout=90)
    mark = service.mark()
    stopped, restarts = service.main_pid(), int(service.show("NRestarts")["NRestarts"])
    service.container.run(["kill", "-STOP", str(stopped)])
    wait_until(
        lambda: service.show("NRestarts")["NRestarts"] == str(restarts + 1) and service.state() == "active",
        60,
        interval=0.5,
        message="the watchdog to restart the stopped supervisor",
    )  # fmt: skip
    assert service.main_pid() != stopped
    service.workers(2)
    journal = service.since(mark)
    assert "Watchdog timeout" in journal, journal
    record(
        f"the watchdog (SIGSTOP to the supervisor, pid {stopped})",
        grep(journal, "Watchdog", "SIGABRT", "Main process", "Failed with", "Scheduled restart", "Started"),
    )
    service.container.run(["rm", "-r", f"/etc/systemd/system/{UNIT}.d"])
    service.systemctl("daemon-reload")
    service.systemctl("stop", UNIT, timeout=60)

    # a bad config: exit status 2, the unit failed, and not restarted (RestartPreventExitStatus=2)
    mark = service.mark()
    service.container.run(["sh", "-c", f"cat > /etc/djsupervisor/{NAME}.toml"], input="[supervisor\n")
    failed = service.container.run(["systemctl", "start", UNIT], check=False, timeout=60)
    assert failed.returncode != 0
    bad = service.show("ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert bad == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "2", "NRestarts": "0"}, bad
    restart_sec = 5  # the unit's RestartSec: a restart would have come by now
    assert holds(
        lambda: service.show("ActiveState", "NRestarts") == {"ActiveState": "failed", "NRestarts": "0"}, restart_sec + 3
    )
    errors = service.since(mark, "-p", "err")
    assert "djsupervisor: error: /etc/djsupervisor/lab.toml: TOML syntax error" in errors, errors
    record("a bad config", f"{bad}\n{service.status()}")
    record("journalctl -u djsupervisor@lab -p err (the bad config)", errors)


def test_the_single_unit_under_a_real_systemd(service: Service, db: conftest.TestDatabase):
    """systemd/djsupervisor.service, the one-config unit: it runs as the system user djsupervisor, its workers
    compute on the database, its control socket is /run/djsupervisor/djsupervisor/djsupervisor.sock, and it
    stops cleanly."""
    lab = declare(db.schema_name("pipe"), db.connection)
    lab.seed([1, 2])
    single = Service(service.container, service.transcript, SINGLE)
    single.systemctl("start", SINGLE, timeout=90)  # Type=notify: returns once READY=1 came
    assert single.show("ActiveState", "SubState") == {"ActiveState": "active", "SubState": "running"}
    children = single.workers(2)
    wait_until(lambda: len(lab.Square()) == 2, 60, message="the workers to compute Square")
    assert {row["worker_pid"] for row in lab.Square.to_dicts()} <= set(children)
    user = service.container.run(["ps", "-o", "user=", "-p", str(next(iter(children)))]).stdout.strip()
    assert user == "djsupervisor", user
    runtime = "/run/djsupervisor/djsupervisor"
    listing = service.container.run(["stat", "-c", "%A %U %n", runtime, f"{runtime}/djsupervisor.sock"]).stdout
    assert listing.splitlines() == [
        f"drwx------ djsupervisor {runtime}",
        f"srw------- djsupervisor {runtime}/djsupervisor.sock",
    ]
    service.transcript.add(f"systemctl status {SINGLE}", single.status())
    single.systemctl("stop", SINGLE, timeout=60)
    result = single.show("ActiveState", "Result")
    assert result == {"ActiveState": "inactive", "Result": "success"}, result
    service.transcript.add(f"journalctl -u {SINGLE} -o cat", single.journal("-o", "cat"))
