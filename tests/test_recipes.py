"""The recipes in examples/fleet (Kubernetes, Slurm, docker-compose) say what the supervisor needs.

No cluster, scheduler, container engine or database: the manifests are parsed and checked for the
invariants that matter (grace periods above `graceful_timeout`, distinct host names, memory limits that hold
every pool at its largest, command lines the CLI accepts, configs that load), and the Slurm script's shell
logic runs for real under bash with fake SLURM_* variables and a stub `djsupervisor` that records its
arguments and the signals it gets.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import wait_until

from djsupervisor.cli import UsageError, _parser
from djsupervisor.serve.http_access import is_loopback
from djsupervisor.supervisor.config import ConfigError, SupervisorConfig, parse_config

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
FLEET = ROOT / "examples" / "fleet"
SBATCH = FLEET / "slurm" / "djsupervisor.sbatch"
#: Config keys of the fleet, autoscaling and metrics work. Until config.py knows one of them, `load` drops
#: it (and only it) so that the rest of the recipe's config is still checked.
PENDING_KEYS = {
    "host",
    "fleet_interval",
    "http",
    "max_cpu_percent",
    "min_available_memory_mb",
    "max_replicas",
    "scale_up_pending",
    "scale_down_after",
    "scale_cooldown",
}
MARGIN = 10  # seconds an orchestrator must wait beyond graceful_timeout, at least


def load(text: str, source: str, dropped: set | None = None) -> SupervisorConfig:
    """The config in `text` as `djsupervisor start` would load it, without importing the targets; the
    pending keys it had to drop are added to `dropped`."""
    data = tomllib.loads(text)
    while True:
        try:
            return parse_config(data, source, "recipe", check_targets=False)
        except ConfigError as error:
            name = error.key.rsplit(".", 1)[-1]
            if not (error.problem.startswith("unknown key") and name in PENDING_KEYS):
                raise
            if dropped is not None:
                dropped.add(name)
            table = data["supervisor"] if error.key.startswith("supervisor.") else _worker_table(data, error.key)
            del table[name]


def _worker_table(data: dict, key: str) -> dict:
    return data["worker"][int(re.match(r"worker\[(\d+)\]", key).group(1))]


def cli_accepts(argv: list[str]) -> None:
    """Fail unless the `djsupervisor` command line parses (the options exist, the values are valid)."""
    assert argv[0] == "djsupervisor", argv
    try:
        _parser().parse_args(argv[1:])
    except UsageError as error:
        pytest.fail(f"djsupervisor rejects {argv}: {error}")


def max_children(worker: dict) -> int:
    return max(worker.get("replicas", 1), worker.get("max_replicas", 0))


def mebibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i)?", quantity).groups()
    return float(number) * {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024**2, None: 1 / 1024**2}[unit]


def seconds(duration: str) -> float:
    """A compose duration ("75s", "1m30s") in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and duration, f"not a duration: {duration!r}"
    hours, minutes, secs = (float(p or 0) for p in parts.groups())
    return hours * 3600 + minutes * 60 + secs


# ----- Kubernetes


@pytest.fixture(scope="module")
def k8s():
    documents = {}
    for name in ("configmap.yaml", "deployment.yaml"):
        (document,) = yaml.safe_load_all((FLEET / "k8s" / name).read_text())
        documents[document["kind"]] = document
    deployment, configmap = documents["Deployment"], documents["ConfigMap"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    (config_volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
    command = container["command"]
    config_path = command[command.index("-c") + 1]
    assert Path(config_path).parent == Path(mounts[config_volume["name"]]["mountPath"])
    text = configmap["data"][Path(config_path).name]  # the file the command names is in the ConfigMap
    return {
        "deployment": deployment,
        "pod": pod,
        "container": container,
        "config_path": config_path,
        "text": text,
        "toml": tomllib.loads(text),
        "config": load(text, "k8s/configmap.yaml"),
    }


def test_k8s_pod_waits_longer_than_graceful_timeout(k8s):
    assert k8s["pod"]["terminationGracePeriodSeconds"] >= k8s["config"].graceful_timeout + MARGIN
    assert "preStop" not in k8s["container"].get("lifecycle", {})  # its time would count against the period


def test_k8s_commands_are_ones_the_cli_accepts(k8s):
    container = k8s["container"]
    assert container["command"][:2] == ["djsupervisor", "start"] and "args" not in container
    cli_accepts(container["command"])
    for probe in ("startupProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command == ["djsupervisor", "status", "-c", k8s["config_path"]]
        cli_accepts(command)
    # the probes and `kubectl exec` find the control socket where the supervisor made it: a writable mount
    env = {e["name"]: e for e in container["env"]}
    runtime_dir = Path(env["DJSUPERVISOR_RUNTIME_DIR"]["value"])
    writable = [Path(m["mountPath"]) for m in container["volumeMounts"] if not m.get("readOnly")]
    assert any(runtime_dir.is_relative_to(path) for path in writable)
    assert env["DJ_PASS"]["valueFrom"]["secretKeyRef"]["key"] and "value" not in env["DJ_PASS"]


def test_k8s_probe_fails_when_no_supervisor_listens(k8s, tmp_path):
    dropped: set[str] = set()
    load(k8s["text"], "k8s/configmap.yaml", dropped)
    text = "\n".join(line for line in k8s["text"].splitlines() if line.split("=")[0].strip() not in dropped)
    config = tmp_path / "djsupervisor.toml"
    config.write_text(text)
    command = k8s["container"]["livenessProbe"]["exec"]["command"]
    argv = [sys.executable, "-m", "djsupervisor", *command[1:-1], str(config)]  # the probe, on this file
    env = {**os.environ, "DJSUPERVISOR_RUNTIME_DIR": str(tmp_path / "run")}
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2 and "no supervisor listening" in result.stderr, result.stderr


def test_k8s_metrics_port_is_the_one_scraped_and_probed(k8s):
    port = int(k8s["toml"]["supervisor"]["http"].rsplit(":", 1)[1])
    annotations = k8s["deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == port
    (metrics,) = [p for p in k8s["container"]["ports"] if p["containerPort"] == port]
    assert k8s["container"]["readinessProbe"]["tcpSocket"]["port"] == metrics["name"]  # httpGet: no token, 401


def test_k8s_metrics_token_is_a_secret_file_the_supervisor_accepts(k8s):
    """A network bind needs http_token_file; the Secret must come out as root:GROUP 0440 with GROUP the
    supervisor's own (fsGroup = runAsGroup): the one group-readable token file the supervisor reads."""
    supervisor = k8s["toml"]["supervisor"]
    assert not is_loopback(supervisor["http"].rsplit(":", 1)[0])
    token = Path(supervisor["http_token_file"])
    mounts = {m["name"]: m for m in k8s["container"]["volumeMounts"]}
    secrets = [v for v in k8s["pod"]["volumes"] if "secret" in v]
    (volume,) = [v for v in secrets if Path(mounts[v["name"]]["mountPath"]) == token.parent]
    assert volume["secret"]["defaultMode"] == 0o440 and mounts[volume["name"]]["readOnly"]
    security = k8s["pod"]["securityContext"]
    assert security["fsGroup"] == security["runAsGroup"] and security["runAsUser"] != 0
    assert "http_allow_anonymous" not in supervisor


def test_the_shared_fleet_config_binds_loopback():
    """compose and Slurm share it; a Slurm node is shared with other users."""
    data = tomllib.loads((FLEET / "djsupervisor.toml").read_text())
    assert is_loopback(data["supervisor"]["http"].rsplit(":", 1)[0])


def test_k8s_memory_limit_holds_every_pool_at_its_largest(k8s):
    workers = k8s["toml"]["worker"]
    assert all("max_memory_mb" in w for w in workers), "a pool without max_memory_mb can outgrow any limit"
    largest = sum(max_children(w) * w["max_memory_mb"] for w in workers)
    resources = k8s["container"]["resources"]
    assert mebibytes(resources["limits"]["memory"]) >= largest + 512  # the supervisor and a job's overshoot
    assert mebibytes(resources["requests"]["memory"]) <= mebibytes(resources["limits"]["memory"])
    for worker in workers:  # a reservation is never judged stale while its job may still be running
        if "job_timeout" in worker:
            assert worker["stale_timeout_hours"] * 3600 > worker["job_timeout"], worker["name"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_k8s_kustomization_builds():
    result = subprocess.run(
        ["kubectl", "kustomize", str(FLEET / "k8s")], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(result.stdout))
    assert kinds == ["ConfigMap", "Deployment"]


# ----- docker-compose


@pytest.fixture(scope="module")
def compose():
    path = FLEET / "compose" / "docker-compose.yml"
    services = yaml.safe_load(path.read_text())["services"]
    dockerfile = FLEET / "Dockerfile"
    cmd = next(line for line in dockerfile.read_text().splitlines() if line.startswith("CMD "))
    return {"path": path, "services": services, "cmd": yaml.safe_load(cmd[4:])}  # a JSON array: exec form


def supervisors(compose) -> dict:
    return {
        name: s
        for name, s in compose["services"].items()
        if s.get("image", "").startswith("djsupervisor") and "command" not in s
    }


def test_compose_runs_two_supervisors_with_distinct_host_names(compose):
    workers = supervisors(compose)
    assert len(workers) == 2
    assert len({s["hostname"] for s in workers.values()}) == 2
    cli_accepts(compose["cmd"])
    assert compose["cmd"][:2] == ["djsupervisor", "start"]
    for service in workers.values():
        assert service["environment"]["DJ_HOST"] in compose["services"]  # the database service
        assert service["depends_on"]["seed"]["condition"] == "service_completed_successfully"
        build = compose["path"].parent / service["build"]["context"]
        assert (build / service["build"]["dockerfile"]).resolve() == (FLEET / "Dockerfile").resolve()


def test_compose_waits_longer_than_graceful_timeout(compose):
    config_path = compose["cmd"][compose["cmd"].index("-c") + 1]
    for name, service in supervisors(compose).items():
        (mount,) = [v for v in service["volumes"] if v.split(":")[1] == config_path]
        source = (compose["path"].parent / mount.split(":")[0]).resolve()
        config = load(source.read_text(), str(source))
        assert seconds(service["stop_grace_period"]) >= config.graceful_timeout + MARGIN, name


def test_compose_seeds_the_example_pipeline(compose):
    seed = compose["services"]["seed"]
    assert seed["depends_on"]["db"]["condition"] == "service_healthy" and seed["restart"] == "no"
    assert seed["command"][:2] == ["python", "-c"]
    code = ast.parse(seed["command"][2])
    (imported,) = [n for n in ast.walk(code) if isinstance(n, ast.ImportFrom)]
    (call,) = [n for n in ast.walk(code) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "seed"]
    # the function and the keywords exist (read, not imported: importing the pipeline connects)
    package = ROOT / "src" / Path(*imported.module.split(".")) / "__init__.py"
    assert "seed" in ast.literal_eval(
        next(
            n.value
            for n in ast.parse(package.read_text()).body
            if isinstance(n, ast.Assign) and n.targets[0].id == "__all__"
        )
    )
    tables = ast.parse((package.parent / "tables.py").read_text())
    (definition,) = [n for n in tables.body if isinstance(n, ast.FunctionDef) and n.name == "seed"]
    assert {k.arg for k in call.keywords} <= {a.arg for a in definition.args.args}


def test_fleet_config_loads():
    config = load((FLEET / "djsupervisor.toml").read_text(), "examples/fleet/djsupervisor.toml")
    assert [w.name for w in config.workers] == ["standard", "analysis"]
    assert all(w.target.startswith("djsupervisor.example.pipeline.workers:") for w in config.workers)


def readme_commands() -> list[list[str]]:
    """The `djsupervisor ...` command lines in the code blocks of examples/fleet/README.md."""
    commands, in_code = [], False
    for line in (FLEET / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        words = shlex.split(line, comments=True) if in_code else []
        if "djsupervisor" in words:
            commands.append(words[words.index("djsupervisor") :])
    return commands


def cli_knows(argv: list[str]) -> bool:
    try:
        _parser().parse_args(argv)
        return True
    except UsageError:
        return False


def test_fleet_readme_commands_are_ones_the_cli_accepts():
    pending = {
        "drain": ["drain", "--host", "h", "-c", "x"],
        "resume": ["resume", "--host", "h", "-c", "x"],
        "--fleet": ["status", "--fleet", "-c", "x"],
    }
    unknown = {word for word, probe in pending.items() if not cli_knows(probe)}  # the fleet work, not merged yet
    commands = readme_commands()
    assert len(commands) >= 6
    checked = [argv for argv in commands if not unknown.intersection(argv)]
    if not checked:
        pytest.skip(f"the CLI does not know {', '.join(sorted(unknown))} yet")
    for argv in checked:
        cli_accepts(argv)


# ----- Slurm


def sbatch_directives() -> list[str]:
    directives = []
    for line in SBATCH.read_text().splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break  # sbatch reads no directive after the first command
        if line.startswith("#SBATCH "):
            directives.append(line.split(None, 1)[1])
    assert not [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")][len(directives) :], (
        "an #SBATCH line after the first command is ignored by sbatch"
    )
    return directives


def test_sbatch_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert os.access(SBATCH, os.X_OK)


def test_sbatch_signal_leaves_graceful_timeout_and_margin():
    (signal_option,) = [d for d in sbatch_directives() if d.startswith("--signal=")]
    match = re.fullmatch(r"--signal=B:TERM@(\d+)", signal_option)
    assert match, f"{signal_option}: the batch shell (B:) must get SIGTERM before the time limit"
    config = load((FLEET / "djsupervisor.toml").read_text(), "examples/fleet/djsupervisor.toml")
    margin = int(re.search(r"DJSUPERVISOR_STOP_MARGIN:-(\d+)", SBATCH.read_text()).group(1))
    assert int(match.group(1)) >= config.graceful_timeout + margin


class FakeSlurm:
    """Runs the sbatch script with bash as Slurm would start it, with stubs on PATH."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.record = tmp_path / "record"
        stub = self.bin / "djsupervisor"  # records its arguments and the TERM it gets, then exits 0
        stub.write_text(
            '#!/bin/bash\necho "args $$ $*" >> "$STUB_RECORD"\n'
            'trap \'echo "TERM $$" >> "$STUB_RECORD"; exit 0\' TERM\n'
            "while :; do sleep 0.05; done\n"
        )
        stub.chmod(0o755)
        self.env = {
            "PATH": f"{self.bin}:{Path(sys.executable).parent}:/usr/bin:/bin",
            "STUB_RECORD": str(self.record),
            "TMPDIR": str(tmp_path),
            "HOME": str(tmp_path),
            "SLURM_JOB_ID": "4242",
            "SLURMD_NODENAME": "node07",
            "SLURM_SUBMIT_DIR": str(ROOT),
            "DJSUPERVISOR_CONFIG": str(FLEET / "djsupervisor.toml"),
        }
        self.process: subprocess.Popen | None = None

    def squeue_prints(self, text: str, status: int = 0) -> None:
        """A stub `squeue` that prints `text` and exits with `status`."""
        squeue = self.bin / "squeue"
        squeue.write_text(f"#!/bin/bash\nprintf '%s\\n' '{text}'\nexit {status}\n")
        squeue.chmod(0o755)

    def start(self, **env: str) -> subprocess.Popen:
        self.process = subprocess.Popen(
            ["bash", str(SBATCH)], env={**self.env, **env}, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        return self.process

    def lines(self, kind: str) -> list[list[str]]:
        text = self.record.read_text() if self.record.exists() else ""
        return [line.split()[1:] for line in text.splitlines() if line.split()[0] == kind]

    def stub_args(self) -> list[str]:
        """Once the stub runs: its arguments (after its pid)."""
        return wait_until(lambda: self.lines("args"), 15, message="the stub djsupervisor to start")[0][1:]

    def command_line(self) -> list[str]:
        """The command line of the `timeout` the script started (its child; the script stays, to clean up)."""

        def started() -> list[str] | None:
            for child in psutil.Process(self.process.pid).children():
                with contextlib.suppress(psutil.Error):
                    if child.cmdline()[:1] == ["timeout"]:
                        return child.cmdline()
            return None

        return wait_until(started, 15, message="the script's timeout command")

    def config_copies(self) -> list[Path]:
        """The per-allocation config copies in the fake TMPDIR."""
        return sorted(self.tmp.glob("djsupervisor-*"))

    def finish(self, timeout: float = 15) -> tuple[int, str]:
        _, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, err

    def close(self) -> None:
        for pid in {int(p) for p, *_ in self.lines("args")}:  # a stub still running holds the output pipes
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=10)


@pytest.fixture
def slurm(tmp_path):
    fake = FakeSlurm(tmp_path)
    yield fake
    fake.close()


def stop_after(command_line: list[str]) -> float:
    assert command_line[:2] == ["timeout", "--preserve-status"], command_line
    assert command_line[2].startswith("--kill-after="), command_line
    return float(command_line[3])


def test_sbatch_names_the_host_and_stops_before_the_allocation_ends(slurm):
    graceful, margin = 60, 60  # examples/fleet/djsupervisor.toml, the script's default margin
    slurm.start(SLURM_JOB_END_TIME=str(int(time.time()) + 1000))
    args = slurm.stub_args()
    assert args[:2] == ["start", "-c"] and len(args) == 3
    cli_accepts(["djsupervisor", *args])
    command_line = slurm.command_line()
    assert command_line[-4:] == ["djsupervisor", *args]
    assert 1000 - graceful - margin - 5 <= stop_after(command_line) <= 1000 - graceful - margin
    assert command_line[2] == f"--kill-after={graceful + 30}"
    # this allocation's config: the given one, with the node as host and the job in the name
    generated = Path(args[2])
    assert generated.parent == slurm.tmp and (generated.stat().st_mode & 0o077) == 0
    data = tomllib.loads(generated.read_text())
    assert data["supervisor"]["host"] == "node07" and data["supervisor"]["name"] == "fleet-4242"
    original = tomllib.loads((FLEET / "djsupervisor.toml").read_text())
    assert data["worker"] == original["worker"]
    assert {k: v for k, v in data["supervisor"].items() if k not in ("host", "name")} == {
        k: v for k, v in original["supervisor"].items() if k != "name"
    }
    load(generated.read_text(), str(generated))
    # Slurm's --signal=B:TERM goes to the batch shell's pid: it reaches the supervisor, which exits 0
    slurm.process.send_signal(signal.SIGTERM)
    status, err = slurm.finish()
    assert status == 0, err
    assert [pid for (pid,) in slurm.lines("TERM")] == [slurm.lines("args")[0][0]]
    assert not generated.exists() and slurm.config_copies() == []  # the copy (maybe a password) is removed


def test_sbatch_reads_the_end_time_from_squeue(slurm):
    """`squeue -j ID -o "%A %e"`: an array's first task has the array's id, and squeue lists every task of the
    array for it (the real Slurm test found this): the script keeps the line of its own job id."""
    end = int(time.time()) + 3600
    other = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(end - 1800))
    ours = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(end))
    slurm.squeue_prints(f"4243 {other}\n4242 {ours}")
    slurm.start()
    slurm.stub_args()
    assert 3600 - 120 - 5 <= stop_after(slurm.command_line()) <= 3600 - 120


def test_sbatch_timer_stops_the_supervisor_by_itself(slurm):
    slurm.start(SLURM_JOB_END_TIME=str(int(time.time()) + 60 + 60 + 2))
    slurm.stub_args()
    assert stop_after(slurm.command_line()) <= 2
    wait_until(lambda: slurm.lines("TERM"), 10, message="the timer's SIGTERM to reach the supervisor")
    status, err = slurm.finish()
    assert status == 0, err


def test_sbatch_signal_before_the_supervisor_starts_ends_the_job_cleanly(slurm):
    """Slurm's --signal comes up to a minute early: in a short allocation, while the script still writes the
    config (a slow `python3` here). The shell remembers it and does not start the supervisor; before, the
    signal killed the shell (exit 143)."""
    slow = slurm.bin / "python3"
    slow.write_text(f'#!/bin/bash\nsleep 1\nexec {sys.executable} "$@"\n')
    slow.chmod(0o755)
    slurm.start(SLURM_JOB_END_TIME=str(int(time.time()) + 1000))

    def writing_config() -> bool:
        return any("python3" in " ".join(p.cmdline()) for p in psutil.Process(slurm.process.pid).children(True))

    wait_until(writing_config, 15, message="the script's python3")
    slurm.process.send_signal(signal.SIGTERM)
    out, err = slurm.process.communicate(timeout=15)
    assert slurm.process.returncode == 0, err
    assert "SIGTERM before the supervisor started: not starting it" in out
    assert not slurm.lines("args") and slurm.config_copies() == []


def test_sbatch_without_a_known_end_time_relies_on_the_signal(slurm):
    slurm.squeue_prints("squeue: error: Invalid job id specified", status=1)
    slurm.start()
    slurm.stub_args()
    assert stop_after(slurm.command_line()) == 0  # timeout's "no timeout"
    slurm.process.send_signal(signal.SIGTERM)
    status, err = slurm.finish()
    assert status == 0 and slurm.lines("TERM"), err


def test_sbatch_refuses_an_allocation_too_short_to_stop_cleanly(slurm):
    slurm.start(SLURM_JOB_END_TIME=str(int(time.time()) + 100))
    status, err = slurm.finish()
    assert status == 1 and "less than graceful_timeout (60 s) + margin (60 s): not starting" in err
    assert not slurm.lines("args") and slurm.config_copies() == []  # removed on this way out too


def test_sbatch_config_copy_cannot_be_planted_and_is_removed(slurm, tmp_path):
    """Security issue 18: the copy (maybe with a [database] password) went to the predictable
    $TMPDIR/djsupervisor-JOB-HOST.toml, which another user could plant as a symlink to a file of the job
    owner's (overwritten) or as a file of their own (then reading the password); and it was never removed."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    planted = slurm.tmp / "djsupervisor-4242-node07.toml"  # the old name
    planted.symlink_to(victim)
    slurm.start(SLURM_JOB_END_TIME=str(int(time.time()) + 1000), DJ_PASS="not-in-any-file")
    generated = Path(slurm.stub_args()[2])
    assert victim.read_text() == "precious\n" and generated != planted
    assert generated.name.startswith("djsupervisor-4242-node07.") and len(generated.name) > len(planted.name) - 5
    assert not generated.is_symlink() and generated.stat().st_uid == os.getuid()
    assert (generated.stat().st_mode & 0o777) == 0o600
    slurm.process.send_signal(signal.SIGTERM)
    status, err = slurm.finish()
    assert status == 0, err
    assert not generated.exists() and slurm.config_copies() == [planted] and victim.read_text() == "precious\n"


def test_sbatch_exits_with_the_supervisors_status_and_cleans_up(slurm):
    stub = slurm.bin / "djsupervisor"
    stub.write_text('#!/bin/bash\necho "args $$ $*" >> "$STUB_RECORD"\nexit 3\n')  # a supervisor that fails
    slurm.start(SLURM_JOB_END_TIME=str(int(time.time()) + 1000))
    status, err = slurm.finish()
    assert status == 3, err
    assert slurm.lines("args") and slurm.config_copies() == []


def test_sbatch_outside_slurm_says_so(slurm):
    del slurm.env["SLURM_JOB_ID"]
    slurm.start()
    status, err = slurm.finish()
    assert status != 0 and "SLURM_JOB_ID is not set" in err and not slurm.lines("args")
