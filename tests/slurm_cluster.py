"""A real single-node Slurm cluster of the test's own, for tests/test_slurm_real.py.

Debian's `slurm-wlm` and `munge` (Slurm 22.05): `munged`, `slurmctld` and `slurmd` run as plain foreground
processes of this test (never through systemctl or init scripts), each with its own files in one temporary
directory: the munge key and socket, `slurm.conf`, the controller's state and the node's spool, pid and log
files. Nothing system-wide is read or written: client commands (`sbatch`, `squeue`, `scancel`, `scontrol`)
find the cluster through SLURM_CONF, the daemons through their `-f` option and AuthInfo's socket, and the
two ports are free ones chosen at start, so a Slurm or munge already running on the machine is not touched.

The one node is the machine under its short host name, as the sbatch recipe sees it (SLURMD_NODENAME), with
CPUs=2 and RealMemory=1024 (MB): select/cons_tres counts memory (CR_Core_Memory), so a job must ask for
less. proctrack/linuxproc and task/none: no cgroups needed. KillWait=2: a plain `scancel` SIGKILLs what
its SIGTERM left running 2 s later (30 s by default), for time.

`munged` needs execute permission for all on its socket's directory and every parent, which pytest's 0700
temporary directories do not give: the cluster's directory is a `mkdtemp` of its own, opened to 0755, with
the key in a 0700 subdirectory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
from helpers import process_gone, wait_until

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "squeue", "scancel", "scontrol")
KILL_WAIT = 2  # seconds between a plain scancel's SIGTERM and its SIGKILL


def missing() -> list[str]:
    """The Slurm and munge programs this machine lacks."""
    return [name for name in (*DAEMONS, *COMMANDS) if shutil.which(name) is None]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SLURM_CONF = """\
ClusterName=djstest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait={kill_wait}
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 RealMemory=1024 State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munged, slurmctld and slurmd of this test's own, in `root`; `start()`, then `close()`."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="djsupervisor-slurm-"))
        self.root.chmod(0o755)  # munged: its socket's directory and every parent must be searchable by all
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.daemons: dict[str, subprocess.Popen] = {}
        self.started = time.time()

    def start(self) -> None:
        """Start the three daemons; raise RuntimeError (with their output) when the node does not come up."""
        key_dir, socket_dir = self.root / "munge-key", self.munge_socket.parent
        key_dir.mkdir(mode=0o700)
        socket_dir.mkdir(mode=0o755)
        key = key_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for directory in ("state", "spool"):
            (self.root / directory).mkdir()
        self.conf.write_text(
            SLURM_CONF.format(
                node=self.node,
                ctld_port=free_port(),
                slurmd_port=free_port(),
                munge_socket=self.munge_socket,
                root=self.root,
                kill_wait=KILL_WAIT,
            )
        )
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={key_dir / 'munged.pid'}",
                f"--seed-file={key_dir / 'munged.seed'}",
                f"--log-file={key_dir / 'munged.log'}",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), "munged's socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(lambda: self.node_state() == "idle", "the node idle in sinfo")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.out", "wb")
        # a session of its own: a Ctrl+C to the test's terminal does not reach it; close() stops it by pid. In
        # `root`: slurmd's job steps (slurmstepd, a daemon of its own) keep its working directory, which is how
        # steps() tells ours from any other Slurm's
        self.daemons[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root, start_new_session=True
        )
        log.close()

    def _wait(self, predicate, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            dead = [name for name, process in self.daemons.items() if process.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"waiting for {what}: {', '.join(dead) or 'timed out'}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        """The tail of every daemon's output and log file (for a failure's message)."""
        parts = []
        for path in sorted(self.root.glob("*.out")) + sorted(self.root.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def run(self, *argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        kwargs.setdefault("env", self.env)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"{argv}: exit {result.returncode}\n{result.stdout}{result.stderr}\n{self.logs()}")
        return result

    def node_state(self) -> str:
        result = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return result.stdout.strip() if result.returncode == 0 else ""

    def sbatch(self, *args: str, cwd: Path, env: dict) -> str:
        """Submit; returns the job id (an array's base id)."""
        result = self.run("sbatch", "--parsable", *args, cwd=cwd, env=dict(env, SLURM_CONF=str(self.conf)))
        return result.stdout.strip().split(";")[0]

    def jobs(self) -> dict[str, str]:
        """Jobs in the queue: id (array tasks as BASE_TASK) → state (PENDING, RUNNING, COMPLETING, ...)."""
        out = self.run("squeue", "-h", "-o", "%i %T").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job`'s fields (finished jobs stay MinJobAge = 600 s): JobState, ExitCode, ..."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait_running(self, job_id: str, count: int = 1, timeout: float = 60) -> list[str]:
        """Wait until `count` jobs of `job_id` (an id, or an array's base id) run; their job ids."""

        def running():
            mine = [j for j, state in self.jobs().items() if j.split("_")[0] == job_id and state == "RUNNING"]
            return mine if len(mine) == count else None

        found = wait_until(running, timeout, interval=0.2, message=f"{count} running job(s) {job_id}")
        if count == 1 and found == [job_id]:
            return found
        return [self.job(j)["JobId"] for j in found]  # an array task's own job id (what %j names)

    def wait_gone(self, job_id: str, timeout: float) -> float:
        """Wait until no job of `job_id` is in the queue; the time it took (s)."""
        start = time.monotonic()
        wait_until(
            lambda: not [j for j in self.jobs() if j.split("_")[0] == job_id],
            timeout,
            interval=0.2,
            message=f"job {job_id} to leave the queue",
        )
        return time.monotonic() - start

    def steps(self) -> list[psutil.Process]:
        """The slurmstepd processes of this cluster's jobs (in slurmd's working directory, `root`)."""
        found = []
        for process in psutil.process_iter(["name", "create_time"]):
            if process.info["name"] != "slurmstepd" or process.info["create_time"] < self.started - 1:
                continue
            with contextlib.suppress(psutil.Error):
                if Path(process.cwd()).is_relative_to(self.root):
                    found.append(process)
        return found

    def close(self) -> tuple[list[int], list[int]]:
        """Cancel what runs, stop the daemons (slurmd, slurmctld, munged) by pid, wait until they are gone; the
        daemons' pids, and the pids of job steps that were still there (then SIGKILLed)."""
        if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", "root", check=False)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: not self.jobs(), 30, interval=0.2, message="the queue to empty")
        pids = []
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.daemons.get(name)
            if process is None:
                continue
            pids.append(process.pid)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
        leftover = self.steps()
        for step in leftover:  # a step left by a job that would not die: ours, by pid
            with contextlib.suppress(psutil.Error):
                step.kill()
        wait_until(lambda: all(process_gone(pid) for pid in pids), 10, message="the daemons gone")
        return pids, [step.pid for step in leftover]

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
