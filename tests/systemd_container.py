"""A real systemd, booted as PID 1 of its own namespaces on an isolated root, for tests/test_systemd_real.py.

Never on the machine's own root: at boot systemd-tmpfiles empties /tmp and /run on the root it sees, which on
the real root deletes every other process's temporary files and the database servers' socket directories.
The root here is an overlay of / with an upper layer on a tmpfs, and /run, /tmp and /dev are fresh tmpfs
mounts in it, all inside a new mount namespace with private propagation: nothing written there reaches the
machine, and it all goes with the namespace. (`mount -n`: mount(8) would otherwise create /run/mount on the
machine for its utab, before the fresh /run is there.)

The namespaces: PID (systemd is PID 1 and sees only its own processes), mount, UTS (it sets a host name),
IPC (RemoveIPC=) and cgroup. The network is the machine's, so that the services reach the database servers on
127.0.0.1. The cgroup: systemd needs a cgroup2 tree it may write; the container gets a new directory in the
machine's cgroup2 hierarchy, is moved into it before the cgroup namespace is made (so that directory is the
namespace's root), and mounts cgroup2 there. /sys and /proc/sys are read-only, as systemd-nspawn makes them.

Only what the test needs runs: systemd boots `djtest.target` (its own: journald's sockets and nothing else),
every generator is masked (the sysv generator would make units of /etc/init.d/mariadb and postgresql), and so
is every service, socket, timer, path, mount, automount and swap unit on the machine except journald's: the
database servers, systemd-tmpfiles-*, networking. A unit the test installs (`files`) is not masked.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

SYSTEMD = Path("/lib/systemd/systemd")
CGROUP_PREFIX = "djsupervisor-systemd-test-"  # the containers' cgroups, in the machine's cgroup2 hierarchy
PR_SET_PDEATHSIG = 1
TARGET = "djtest.target"
UNIT_DIRS = [Path("/lib/systemd/system"), Path("/usr/lib/systemd/system"), Path("/etc/systemd/system")]
GENERATOR_DIRS = [Path("/lib/systemd/system-generators"), Path("/usr/lib/systemd/system-generators")]
KEEP = {
    "systemd-journald.service",
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
    "systemd-poweroff.service",
}
MASKED_SUFFIXES = (".service", ".socket", ".timer", ".path", ".mount", ".automount", ".swap")
TARGET_UNIT = """[Unit]
Description=djsupervisor's systemd test: journald and nothing else
Requires=systemd-journald.socket
After=systemd-journald.socket
AllowIsolate=yes
"""

# Run by `unshare` as PID 1 of the new namespaces: $1 the directory to build the root in, $2 the files to copy
# into it, $3 the bind mounts ("HOST CONTAINER" lines), then the command to exec there (systemd, or a probe).
STAGE2 = r"""
set -eu
base=$1 files=$2 binds=$3; shift 3
mount -n -t tmpfs -o mode=0755 djsystemd "$base"
mkdir "$base/upper" "$base/work" "$base/root"
mount -n -t overlay overlay -o "lowerdir=/,upperdir=$base/upper,workdir=$base/work" "$base/root"
r=$base/root
mount -n -t proc proc "$r/proc"
mount -n --bind "$r/proc/sys" "$r/proc/sys" && mount -n -o remount,bind,ro "$r/proc/sys"
mount -n -t sysfs -o ro,nosuid,nodev,noexec sysfs "$r/sys"
mount -n -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$r/sys/fs/cgroup"
mount -n -t tmpfs -o mode=0755,nosuid djsystemd "$r/dev"
for node in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
  IFS=: read -r name major minor <<EOF
$node
EOF
  mknod -m 0666 "$r/dev/$name" c "$major" "$minor"
done
mkdir "$r/dev/pts" "$r/dev/shm"
mount -n -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$r/dev/pts"
ln -s pts/ptmx "$r/dev/ptmx"
mount -n -t tmpfs -o mode=1777,nosuid,nodev djsystemd "$r/dev/shm"
ln -s /proc/self/fd "$r/dev/fd"
mount -n -t tmpfs -o mode=0755,nosuid,nodev djsystemd "$r/run"
mount -n -t tmpfs -o mode=1777,nosuid,nodev djsystemd "$r/tmp"
cp -a "$files/." "$r/"
while read -r host inside; do
  [ -n "$host" ] || continue
  mkdir -p "$r$inside"
  mount -n --bind "$host" "$r$inside" && mount -n -o remount,bind,ro "$r$inside"
done < "$binds"
mkdir "$r/.hostroot"
cd "$r"
pivot_root . .hostroot
cd /
umount -l /.hostroot
rmdir /.hostroot
# systemd makes / shared only when the kernel started it; in a container that is the manager's job, and
# LoadCredential= needs it (the credentials are mounted in a child namespace and moved to /run/credentials)
mount -n --make-rshared /
exec env -i container=djsupervisor-test PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"
"""


def cgroup2_mount() -> Path | None:
    """Where the machine's cgroup2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a
    hybrid machine), or None."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        if fields[separator + 1] == "cgroup2":
            return Path(fields[4])
    return None


def unavailable() -> str | None:
    """Why a systemd cannot be booted here (a skip reason), or None. The namespaces and the overlay are tried
    for real by `probe`."""
    if os.geteuid() != 0:
        return "needs root (namespaces, overlayfs, cgroups)"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is not installed"
    for tool in ("unshare", "nsenter", "pivot_root", "systemctl", "journalctl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if "overlay" not in Path("/proc/filesystems").read_text().split():
        return "the kernel has no overlayfs"
    if cgroup2_mount() is None:
        return "no cgroup2 hierarchy is mounted (systemd needs one to delegate)"
    return None


class Container:
    """A systemd booted in namespaces of its own on an overlay of / (module docstring). `files` maps paths in
    the container to their text (units, configs); `binds` maps directories of the machine to paths in the
    container where they appear read-only. `workdir` is a directory of the test's own, on the machine."""

    def __init__(
        self, workdir: Path, files: dict[str, str | tuple[str, int]] | None = None, binds: dict[Path, str] | None = None
    ):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.files = dict(files or {})
        self.binds = dict(binds or {})
        self.process: subprocess.Popen | None = None
        self.cgroup: Path | None = None
        self.console = workdir / "console.log"

    def _prepare(self) -> list[str]:
        """Write the stage-2 script, the file tree and the bind list; return unshare's command line."""
        tree = self.workdir / "files"
        tree.mkdir(parents=True)
        masks = tree / "etc/systemd/system"
        masks.mkdir(parents=True)
        for directory in UNIT_DIRS:
            for unit in directory.glob("*") if directory.is_dir() else []:
                masked = unit.name.endswith(MASKED_SUFFIXES) and unit.name not in KEEP and not unit.is_dir()
                if masked and not (masks / unit.name).is_symlink():
                    (masks / unit.name).symlink_to("/dev/null")
        generators = tree / "etc/systemd/system-generators"
        generators.mkdir(parents=True)
        for directory in GENERATOR_DIRS:
            for generator in directory.glob("*") if directory.is_dir() else []:
                if not (generators / generator.name).is_symlink():
                    (generators / generator.name).symlink_to("/dev/null")
        self.files.setdefault(f"/etc/systemd/system/{TARGET}", TARGET_UNIT)
        for path, content in self.files.items():
            text, mode = content if isinstance(content, tuple) else (content, 0o644)
            target = tree / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink():
                target.unlink()  # a unit the test installs is not masked
            target.write_text(text)
            target.chmod(mode)
        (self.workdir / "binds").write_text("".join(f"{host} {inside}\n" for host, inside in self.binds.items()))
        (self.workdir / "stage2.sh").write_text(STAGE2)
        (self.workdir / "root").mkdir()
        return [
            "unshare", "--pid", "--mount", "--uts", "--ipc", "--cgroup", "--propagation", "private",
            "--kill-child", "--", "/bin/sh", str(self.workdir / "stage2.sh"),
            str(self.workdir / "root"), str(tree), str(self.workdir / "binds"),
        ]  # fmt: skip

    def _spawn(self, command: list[str]) -> subprocess.Popen:
        """Start `command` in the container's namespaces, moved first into a cgroup of its own."""
        parent = cgroup2_mount()
        assert parent is not None
        for stale in parent.glob(f"{CGROUP_PREFIX}*"):  # left by a test process that was killed: empty ones go
            remove_cgroup(stale, patience=0)
        wrapper = ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"']
        command = self._prepare() + command
        with self.console.open("ab") as console:
            self.cgroup = parent / f"{CGROUP_PREFIX}{uuid.uuid4().hex[:8]}"
            self.cgroup.mkdir()
            return subprocess.Popen(
                [*wrapper, str(self.cgroup), *command],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                preexec_fn=die_with_parent,
            )

    def probe(self, command: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        """Run `command` (no systemd) as PID 1 on the isolated root; its output is in the console log."""
        process = self._spawn(command)
        try:
            process.wait(timeout)
        finally:
            self._reap(process)
        return subprocess.CompletedProcess(command, process.returncode, self.console.read_text(), "")

    def boot(self, timeout: float = 60) -> None:
        """Boot systemd into TARGET; return once `systemctl is-system-running` says running (or degraded)."""
        self.process = self._spawn([str(SYSTEMD), f"--unit={TARGET}", "--show-status=no"])
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"systemd exited with {self.process.returncode}:\n{self.console.read_text()}")
            if self.pid() is not None:
                state = self.run(["systemctl", "is-system-running"], timeout=10, check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.2)
        raise RuntimeError(f"systemd did not finish booting in {timeout} s (state {state!r}):\n{self.log()}")

    def pid(self) -> int | None:
        """systemd's PID as the machine sees it (unshare's child), or None before it is there."""
        if self.process is None:
            return None
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        except OSError:
            return None
        if not children:
            return None
        pid = int(children[0])
        try:
            if os.readlink(f"/proc/{pid}/exe") != str(SYSTEMD.resolve()):
                return None  # still the stage-2 shell
        except OSError:
            return None
        return pid

    def run(
        self, command: list[str], timeout: float = 30, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess:
        """Run `command` inside the container (all its namespaces, its root); stdout and stderr as text."""
        pid = self.pid()
        assert pid is not None, "systemd is not running"
        enter = ["nsenter", "--target", str(pid), "--mount", "--uts", "--ipc", "--pid", "--cgroup", "--root", "--wd"]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LANG": "C.UTF-8"}
        result = subprocess.run(
            [*enter, "--", *command], capture_output=True, text=True, timeout=timeout, input=input, env=env
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{command} exited with {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def log(self) -> str:
        """The console log so far."""
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def shutdown(self, timeout: float = 30) -> None:
        """Power the container off (SIGKILL to everything in it if that does not finish in time); remove
        its cgroup."""
        if self.process is None:
            return
        if self.process.poll() is None and self.pid() is not None:
            try:
                self.run(["systemctl", "poweroff", "--no-block"], timeout=10, check=False)
            except subprocess.TimeoutExpired:
                pass
        self._reap(self.process, timeout)

    def _reap(self, process: subprocess.Popen, timeout: float = 10) -> None:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()  # unshare --kill-child: its child, PID 1, gets SIGKILL, and with it the namespace
            process.wait(10)
        if self.cgroup is not None:
            if (self.cgroup / "cgroup.kill").exists():  # a safety net: anything left in the container's cgroups
                (self.cgroup / "cgroup.kill").write_text("1")
            remove_cgroup(self.cgroup, patience=10)


def die_with_parent() -> None:
    """Run in the child before exec: SIGKILL when the test process dies, however it dies (unshare passes it on
    to PID 1 with --kill-child, and the namespaces go with it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def remove_cgroup(cgroup: Path, patience: float) -> None:
    """Remove a container's cgroup tree, deepest first, once its processes are gone (EBUSY until the kernel has
    reaped the last one: retried for `patience` seconds, then raised; with patience 0, left as it is)."""
    deadline = time.monotonic() + patience
    for directory in [*sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)), cgroup]:
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if not patience:
                    return
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
