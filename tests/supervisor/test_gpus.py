"""GPU pools without a GPU: which GPU each slot gets, the checks of `gpus`/`per_gpu`/`replicas`, the autoscale
and scale caps, the GPU memory sampling and its failures, max_gpu_memory_mb, and the GPU columns of status,
metrics and the status page.

NVML is replaced here, and only here, by `FakeNvml` (a small stand-in for the ``pynvml`` module): these are
unit tests of what the supervisor makes of NVML's answers and failures. The process tests
(tests/supervisor/test_gpu_process.py) run the real supervisor with whatever NVML this machine has.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from helpers import write_config
from prometheus_client.parser import text_string_to_metric_families

from djsupervisor.cli_check import gpu_line
from djsupervisor.fleet.view import FleetView
from djsupervisor.serve.metrics import render_metrics
from djsupervisor.serve.status_format import format_status
from djsupervisor.serve.status_page import render_page
from djsupervisor.supervisor import gpus
from djsupervisor.supervisor.autoscale import HostBudget, Observation
from djsupervisor.supervisor.config import ConfigError, WorkerConfig, load_config
from djsupervisor.supervisor.gpu_memory import (
    NOT_INSTALLED,
    RETRY_AFTER,
    GpuDevice,
    GpuMemorySampler,
    GpuReading,
    Nvml,
    list_devices,
)
from djsupervisor.supervisor.monitor import judge
from djsupervisor.supervisor.pool import Pool
from djsupervisor.supervisor.slot import Slot, SlotState

pytestmark = pytest.mark.timeout(30)

ENTRY = 'name = "gpu"\ntarget = "m:w"\n'
TWO = [GpuDevice(0, "Fake A100", "GPU-aaaa", 40 * 2**30), GpuDevice(1, "Fake A100", "GPU-bbbb", 40 * 2**30)]


class NVMLError(Exception):
    """pynvml's error class stands in: its str() is NVML's message."""


class FakeNvml(types.SimpleNamespace):
    """The pynvml calls the supervisor makes: `processes` maps a device index to [(pid, bytes)]; `fail` names
    a call that raises NVMLError(`message`) (``nvmlInit``, ``nvmlDeviceGetComputeRunningProcesses``, ...)."""

    def __init__(self, devices=TWO, processes=None, fail="", message="Driver Not Loaded"):
        super().__init__(devices=list(devices), processes=processes or {}, fail=fail, message=message, calls=[])

    def _call(self, name):
        self.calls.append(name)
        if self.fail == name:
            raise NVMLError(self.message)

    def nvmlInit(self):
        self._call("nvmlInit")

    def nvmlShutdown(self):
        self._call("nvmlShutdown")

    def nvmlDeviceGetCount(self):
        self._call("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.devices[index]

    def nvmlDeviceGetName(self, handle):
        return handle.name.encode()  # older pynvml returns bytes

    def nvmlDeviceGetUUID(self, handle):
        return handle.uuid

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(total=handle.memory_total, used=0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        self._call("nvmlDeviceGetComputeRunningProcesses")
        return [types.SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in self.processes.get(handle.index, [])]


def load(tmp_path, text, devices=TWO):
    """The config of `text` (a [[worker]] entry's keys after ENTRY), with NVML seeing `devices`."""
    path = write_config(tmp_path / "lab.toml", f"[[worker]]\n{ENTRY}{text}")
    return load_config(path, check_targets=False, gpu_devices=lambda: devices)


def problem(tmp_path, text, devices=TWO) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, devices)
    message = str(caught.value)
    assert "\n" not in message
    return message.split(": ", 1)[1]


# ----- which GPU a slot gets, and the checks of the config


def test_each_slot_gets_its_gpu_round_robin_and_the_child_environment_names_it(tmp_path):
    worker = load(tmp_path, 'gpus = [1, "GPU-aaaa"]\nper_gpu = 2\n').workers[0]
    assert worker.gpus == ("1", "GPU-aaaa") and worker.replicas == 4  # len(gpus) × per_gpu
    assert [gpus.gpu_for_slot(worker, i) for i in range(4)] == ["1", "GPU-aaaa", "1", "GPU-aaaa"]
    assert gpus.child_environment(worker, 1) == {"CUDA_VISIBLE_DEVICES": "GPU-aaaa", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    plain = WorkerConfig("w", "m:w")
    assert gpus.gpu_for_slot(plain, 0) is None and gpus.child_environment(plain, 0) == {}
    assert gpus.capacity(plain) is None


def test_a_count_and_all_name_the_gpus_nvml_sees(tmp_path):
    assert load(tmp_path, "gpus = 2\n").workers[0].gpus == ("0", "1")
    assert load(tmp_path, 'gpus = "all"\n').workers[0].replicas == 2
    # without NVML, indices and a count are taken on trust; "all" cannot be
    assert load(tmp_path, "gpus = [0, 7]\n", devices=NOT_INSTALLED).workers[0].gpus == ("0", "7")
    assert problem(tmp_path, 'gpus = "all"\n', devices=NOT_INSTALLED) == (
        f'worker[0] (gpu).gpus: "all" needs NVML to count the GPUs, but {NOT_INSTALLED}; list the GPUs instead ([0, 1])'
    )


@pytest.mark.parametrize(
    "text, key, message",
    [
        ("gpus = [0, 2]\n", "gpus", "no GPU 2 on this machine (NVML sees 2: 0 (GPU-aaaa), 1 (GPU-bbbb))"),
        ('gpus = ["GPU-zzzz"]\n', "gpus", "no GPU GPU-zzzz on this machine"),
        ("gpus = 3\n", "gpus", "no GPU 2 on this machine"),
        ("gpus = [0, 0]\n", "gpus", "must list each GPU once, got 0 twice"),
        ("gpus = []\n", "gpus", "must name at least one GPU"),
        ("gpus = 0\n", "gpus", "must be a count of GPUs >= 1"),
        ('gpus = ["cuda:0"]\n', "gpus", "must name each GPU by index >= 0 or UUID"),
        ("gpus = [-1]\n", "gpus", "must name each GPU by index >= 0 or UUID"),
        ("gpus = true\n", "gpus", 'must be a list of GPU indices or UUIDs, "all", or a count, got bool True'),
        ("gpus = [0, 1]\nreplicas = 3\n", "replicas", "must be <= 2 (2 GPUs × per_gpu 1), got 3"),
        ("gpus = [0]\nper_gpu = 2\nreplicas = 1\nmax_replicas = 3\n", "max_replicas", "must be <= 2"),
        ("per_gpu = 2\n", "per_gpu", "only applies to a GPU pool: set gpus too"),
        ("gpus = [0]\nper_gpu = 0\n", "per_gpu", "must be >= 1"),
        ("max_gpu_memory_mb = 0\n", "max_gpu_memory_mb", "must be > 0"),
    ],
)
def test_bad_gpu_settings_are_one_line_naming_the_key(tmp_path, text, key, message):
    found = problem(tmp_path, text)
    assert found.startswith(f"worker[0] (gpu).{key}: ") and message in found, found


def test_an_autoscaled_gpu_pool_starts_at_its_minimum_and_never_grows_past_its_gpus(tmp_path):
    worker = load(tmp_path, "gpus = 2\nper_gpu = 2\nmax_replicas = 4\n").workers[0]
    assert worker.replicas == 1 and worker.autoscale is not None and worker.autoscale.max_replicas == 4
    pool = Pool.create(worker, HostBudget(), "lab")
    assert pool.autoscaler is not None
    seen = dict(reading_time=0.0, pending=1000, minimum=1, live=4, stale_after=15.0)
    for now in (0.0, 100.0, 200.0):  # two readings above the threshold: a grow, unless at the cap
        decision = pool.autoscaler.decide(Observation(now=now, desired=4, **{**seen, "reading_time": now}))
        assert decision.replicas <= 4 and decision.action != "grow"
    # a definition built by hand past its GPUs (not from a file) is capped all the same
    wide = WorkerConfig("g", "m:w", gpus=("0",), per_gpu=1, replicas=1, max_replicas=8)
    assert wide.autoscale is not None and wide.autoscale.max_replicas == 1


def test_scale_and_ttin_stop_at_the_gpus(tmp_path):
    pool = Pool.create(load(tmp_path, "gpus = [0, 1]\n").workers[0], HostBudget(), "lab")
    assert pool.replicas == 2
    with pytest.raises(ValueError, match=r"replicas must be <= 2 \(2 GPUs × per_gpu 1\), got 3"):
        pool.scale(3)
    pool.resize_by(1)
    assert pool.replicas == 2
    pool.resize_by(-1)
    assert pool.replicas == 1
    # a reload onto fewer GPUs cuts a pool that scale had made larger
    wide = Pool.create(load(tmp_path, "gpus = [0, 1]\nreplicas = 1\n").workers[0], HostBudget(), "lab")
    wide.scale(2)
    wide.reconfigure(load(tmp_path, "gpus = [1]\nreplicas = 1\n").workers[0], HostBudget())
    assert wide.replicas == 1 and any("cut to 1" in change for change in wide.changes)


# ----- GPU memory: NVML's answers and failures


def test_one_nvml_query_per_gpu_gives_each_child_tree_its_memory_per_gpu():
    fake = FakeNvml(processes={0: [(10, 100 * 2**20), (11, 50 * 2**20), (99, 1)], 1: [(12, 30 * 2**20)]})
    sampler = GpuMemorySampler(Nvml(fake))
    readings = sampler.sample({10: [10, 11], 12: [12], 20: [20]})
    assert readings[10] == GpuReading({"0": 150 * 2**20}) and readings[10].total_mb == 150
    assert readings[12].memory == {"1": 30 * 2**20}
    assert readings[20] == GpuReading({})  # measured: uses no GPU
    assert fake.calls.count("nvmlDeviceGetComputeRunningProcesses") == 2  # one per GPU, for all children
    sampler.sample({10: [10, 11]})
    assert fake.calls.count("nvmlInit") == 1  # started once


def test_unavailable_nvml_gives_empty_readings_with_the_reason_and_is_retried_later():
    now = [0.0]
    fake = FakeNvml(fail="nvmlInit", message="NVML Shared Library Not Found")
    sampler = GpuMemorySampler(Nvml(fake, clock=lambda: now[0]))
    readings = sampler.sample({10: [10]})
    assert readings == {10: GpuReading(None, "no NVIDIA GPU/driver found (NVML: NVML Shared Library Not Found)")}
    sampler.sample({10: [10]})
    assert fake.calls.count("nvmlInit") == 1  # not again before RETRY_AFTER
    fake.fail = ""
    now[0] = RETRY_AFTER + 1
    assert sampler.sample({10: [10]}) == {10: GpuReading({})}


def test_a_failing_query_never_raises_and_restarts_nvml():
    fake = FakeNvml(fail="nvmlDeviceGetComputeRunningProcesses", message="GPU is lost")
    now = [0.0]
    sampler = GpuMemorySampler(Nvml(fake, clock=lambda: now[0]))
    assert sampler.sample({10: [10]}) == {10: GpuReading(None, "NVML failed: GPU is lost")}
    assert "nvmlShutdown" in fake.calls
    fake.fail, now[0] = "", RETRY_AFTER + 1
    assert sampler.sample({10: [10]})[10].memory == {}
    assert fake.calls.count("nvmlInit") == 2


def test_broken_nvml_bindings_never_raise():
    broken = types.SimpleNamespace()  # no functions at all: AttributeError on nvmlInit
    reading = GpuMemorySampler(Nvml(broken)).sample({10: [10]})[10]
    assert reading.memory is None and reading.note and reading.note.startswith("NVML failed")


def test_without_nvidia_ml_py_the_reason_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as if not installed: importing it raises ImportError
    assert list_devices() == NOT_INSTALLED
    assert GpuMemorySampler().sample({1: [1]}) == {1: GpuReading(None, NOT_INSTALLED)}


def test_listing_the_gpus_lets_nvml_go_after(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)  # what `import pynvml` finds
    assert list_devices() == TWO and fake.calls[-1] == "nvmlShutdown"


def test_check_reports_the_gpus_it_sees(tmp_path):
    config = load(tmp_path, "gpus = [0]\n")
    fake = FakeNvml()
    assert list_devices(Nvml(fake)) == TWO and "nvmlShutdown" not in fake.calls  # a given NVML stays started
    line = gpu_line(config, TWO)
    assert line == "gpus: 2 (0: Fake A100 40960 MiB (GPU-aaaa), 1: Fake A100 40960 MiB (GPU-bbbb))"
    assert gpu_line(config, "no NVIDIA GPU/driver found") == "gpus: none seen: no NVIDIA GPU/driver found"
    cpu_only = load(tmp_path, "replicas = 1\n")
    assert gpu_line(cpu_only, "no NVIDIA GPU/driver found") is None and gpu_line(cpu_only, []) is None


def test_max_gpu_memory_mb_recycles_after_the_job_like_max_memory_mb():
    config = WorkerConfig("gpu", "m:w", gpus=("0",), max_gpu_memory_mb=1000)
    slot = Slot("gpu", 0, config, state=SlotState.RUNNING, pid=1234, last_report=0.0)
    slot.gpu_reading = GpuReading({"0": 900 * 2**20})
    assert judge(slot, 1.0, heartbeat_timeout=30, hang_timeout=600) is None
    slot.gpu_reading = GpuReading({"0": 900 * 2**20, "1": 200 * 2**20})  # on every GPU together
    verdict = judge(slot, 1.0, heartbeat_timeout=30, hang_timeout=600)
    assert verdict is not None and (verdict.action, verdict.kind) == ("recycle", "memory")
    assert verdict.reason == "GPU memory 1100 MB > max_gpu_memory_mb 1000"
    slot.gpu_reading = GpuReading(None, NOT_INSTALLED)  # not measured: nothing to judge
    assert judge(slot, 1.0, heartbeat_timeout=30, hang_timeout=600) is None
    replaced = Slot("gpu", 0, config, state=SlotState.BACKOFF, gpu_reading=GpuReading({"0": 1}))
    replaced.spawned(4321, -1, 2.0)  # a new child starts unmeasured
    assert replaced.gpu_reading is None


def test_the_pool_recycles_a_child_over_max_gpu_memory_mb_after_its_job_and_tells_the_notifiers():
    pool = Pool.create(WorkerConfig("gpu", "m:w", gpus=("0", "1"), replicas=2, max_gpu_memory_mb=1000), HostBudget())
    for action in pool.reconcile(0.0, None):
        action.slot.spawned(100 + action.slot.index, -1, 0.0)
        action.slot.reported([{"cycles_done": 1}], 0.5)
    pool.slots[1].gpu_reading = GpuReading({"1": 1500 * 2**20})
    (stop,) = pool.judge_children(1.0, heartbeat_timeout=30, hang_timeout=600, stopping=False)
    assert (stop.slot.index, stop.signal.name) == (1, "SIGTERM")  # graceful: the job in flight finishes
    assert stop.slot.stop_intent.name == "RESPAWN" and "max_gpu_memory_mb 1000" in stop.reason
    (event,) = pool.notices.take()
    assert event["kind"] == "memory" and event["message"].endswith("; recycled after its job")


# ----- status, metrics, status page


def status_of(*slots: Slot) -> dict:
    entries = [slot.status(5.0) for slot in slots]
    return {"supervisor": "lab", "pid": 1, "state": "running", "started": 0.0, "slots": entries, "pools": []}


def gpu_slots(reading: GpuReading | None) -> tuple[Slot, Slot]:
    config = WorkerConfig("gpu", "m:w", gpus=("0", "GPU-bbbb"))
    slots = tuple(Slot("gpu", i, config, state=SlotState.RUNNING, pid=100 + i) for i in range(2))
    for slot in slots:
        slot.gpu_reading = reading
    return slots


def metric_samples(text: str) -> list:
    families = {family.name: family for family in text_string_to_metric_families(text)}
    return families["djsupervisor_child_gpu_memory_bytes"].samples


def test_status_and_metrics_columns_are_present_and_empty_without_nvml():
    status = status_of(*gpu_slots(GpuReading(None, NOT_INSTALLED)))
    assert status["slots"][1]["gpu"] == "GPU-bbbb" and status["slots"][1]["gpu_memory_mb"] is None
    table = format_status(status).splitlines()
    header = table[1].split()
    assert header[10:13] == ["GPU", "GPU", "MB"]
    assert table[2].split()[8:10] == ["0", "-"] and table[3].split()[8:10] == ["GPU-bbbb", "-"]
    assert table[-1] == f"GPU memory not measured: {NOT_INSTALLED}"
    text = render_metrics(status, {}, FleetView(), version="1")
    assert "# TYPE djsupervisor_child_gpu_memory_bytes gauge" in text and metric_samples(text) == []
    page = render_page(status, FleetView(), version="1")
    assert "<th>GPU</th><th>GPU MB</th>" in page and "GPU memory not measured: nvidia-ml-py" in page


def test_status_and_metrics_show_each_childs_gpu_memory():
    status = status_of(*gpu_slots(GpuReading({"0": 512 * 2**20})))
    assert status["slots"][0]["gpu_memory_mb"] == 512.0 and status["slots"][0]["gpu_memory"] == {"0": 512 * 2**20}
    assert format_status(status).splitlines()[2].split()[8:10] == ["0", "512"]
    samples = {
        (s.labels["slot"], s.labels["gpu"]): s.value
        for s in metric_samples(render_metrics(status, {}, FleetView(), version="1"))
    }
    # slot 1's own GPU (by UUID) shows 0 until it uses it; the memory it uses on GPU 0 shows as GPU 0's
    assert samples == {("0", "0"): 512 * 2**20, ("1", "0"): 512 * 2**20, ("1", "GPU-bbbb"): 0}


def test_a_supervisor_without_gpu_pools_shows_no_gpu_columns():
    plain = Slot("standard", 0, WorkerConfig("standard", "m:w"), state=SlotState.RUNNING, pid=100)
    status = status_of(plain)
    assert "GPU" not in format_status(status) and "GPU" not in render_page(status, FleetView(), version="1")
    assert status["slots"][0]["gpu"] is None and status["slots"][0]["gpu_note"] is None


def test_the_readme_workstation_config_is_valid_on_four_gpus_and_refused_on_two(tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### GPU workers") :]
    start = section.index("```toml\n") + 8
    block = section[start : section.index("\n```", start)]
    path = write_config(tmp_path / "lab.toml", block)
    four = [GpuDevice(i, "Fake", f"GPU-{i}", 2**34) for i in range(4)]
    config = load_config(path, check_targets=False, gpu_devices=lambda: four)
    standard, gpu = config.workers
    assert (standard.gpus, gpu.gpus, gpu.replicas, gpu.max_gpu_memory_mb) == (None, ("0", "1", "2", "3"), 4, 20000)
    with pytest.raises(ConfigError, match=r"worker\[1\] \(gpu\)\.gpus: no GPU 2 on this machine"):
        load_config(path, check_targets=False, gpu_devices=lambda: four[:2])
