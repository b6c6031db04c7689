"""GPU pools run for real, without a GPU: each slot's child sees its GPU (read from inside the child by the
worker), the same after it is killed and replaced; a standard pool beside it sees none; the GPU columns of
`status`, `--json` and the metrics are there and empty, with the reason, and the parent lives through NVML
being absent; `check` refuses a pool with more children than GPUs and reports the GPUs it sees.

Nothing is faked here: NVML is whatever this machine has (nvidia-ml-py with or without a driver). On a
machine where NVML sees one GPU the pool of two GPUs below is refused: skipped there (bench/gpu_check.py is
the test for GPU machines).
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

import pytest
from helpers import process_gone, run_cli, wait_until, write_config
from prometheus_client.parser import text_string_to_metric_families

from djsupervisor.supervisor.gpu_memory import list_devices

pytestmark = [pytest.mark.process, pytest.mark.timeout(150)]

CONFIG = """
[supervisor]
name = "gpulab"
sample_interval = 0.5
graceful_timeout = 10
http = "127.0.0.1:0"

[[worker]]
name = "cpu"
target = "pipelines.gpu_worker:cpu"

[[worker]]
name = "gpu"
target = "pipelines.gpu_worker:gpu"
gpus = [1, 0]
max_gpu_memory_mb = 4000
"""


@pytest.fixture
def two_gpus_or_none():
    devices = list_devices()
    if not isinstance(devices, str) and len(devices) < 2:
        pytest.skip(f"NVML sees {len(devices)} GPU: this test needs none (or two); bench/gpu_check.py tests GPUs")
    return devices


def seen_by(out: Path, pid: int) -> str:
    return wait_until(lambda: (out / str(pid)).exists() and (out / str(pid)).read_text(), 30, message=f"pid {pid}")


def test_each_slot_sees_its_gpu_also_after_a_restart_and_status_says_gpu_memory_is_not_measured(
    db, supervise, tmp_path, two_gpus_or_none
):
    out = tmp_path / "seen"
    out.mkdir()
    config = write_config(tmp_path / "gpulab.toml", CONFIG)
    sup = supervise(["-c", str(config)], env={**db.env, "DJS_TEST_GPU_OUT": str(out)})
    pids = sup.wait_children({"cpu": 1, "gpu": 2})
    assert seen_by(out, pids["gpu[0]"]) == "1 PCI_BUS_ID"  # gpus = [1, 0]: slot 0 gets GPU 1
    assert seen_by(out, pids["gpu[1]"]) == "0 PCI_BUS_ID"
    assert seen_by(out, pids["cpu[0]"]) == "- -"  # a standard pool's child sees every GPU, as before

    os.kill(pids["gpu[0]"], signal.SIGKILL)
    new = wait_until(
        lambda: (p := sup.pids().get("gpu[0]")) not in (None, pids["gpu[0]"]) and p, 30, message="a replacement"
    )
    assert process_gone(pids["gpu[0]"]) and seen_by(out, new) == "1 PCI_BUS_ID"

    def sampled():
        result = run_cli(db, tmp_path, "status", "--json", "-c", str(config))
        if result.returncode != 0:
            return None
        status = json.loads(result.stdout)
        slots = {f"{s['worker']}[{s['slot']}]": s for s in status["slots"]}
        return status if slots["gpu[0]"]["pid"] == new and slots["gpu[0]"]["gpu_note"] else None

    status = wait_until(sampled, 30, message="a GPU sample of the new child")
    slots = {f"{s['worker']}[{s['slot']}]": s for s in status["slots"]}
    note = slots["gpu[0]"]["gpu_note"]
    if isinstance(two_gpus_or_none, str):  # no NVML here: every GPU reading is empty, and says why
        assert note == two_gpus_or_none
        assert [slots[label]["gpu_memory_mb"] for label in ("gpu[0]", "gpu[1]")] == [None, None]
    assert (slots["gpu[0]"]["gpu"], slots["gpu[1]"]["gpu"], slots["cpu[0]"]["gpu"]) == ("1", "0", None)
    assert slots["cpu[0]"]["gpu_note"] is None  # a standard pool is not sampled

    table = run_cli(db, tmp_path, "status", "-c", str(config)).stdout.splitlines()
    header = next(line for line in table if line.startswith("WORKER"))
    assert "CPU %  GPU  GPU MB  DONE" in header
    assert f"GPU memory not measured: {note}" in table

    with urllib.request.urlopen(f"http://{status['http']}/metrics", timeout=5) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    gpu_memory = families["djsupervisor_child_gpu_memory_bytes"]
    assert gpu_memory.type == "gauge" and gpu_memory.samples == []
    with urllib.request.urlopen(f"http://{status['http']}/", timeout=5) as response:
        page = response.read().decode()
    assert "<th>CPU %</th><th>GPU</th><th>GPU MB</th>" in page and "GPU memory not measured: " in page
    assert sup.process.poll() is None  # NVML's absence never stopped the parent
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(30) == 0


def test_check_refuses_more_children_than_gpus_and_reports_the_gpus(db, tmp_path, two_gpus_or_none):
    bad = write_config(tmp_path / "bad.toml", CONFIG.replace("gpus = [1, 0]", "gpus = [1, 0]\nreplicas = 3"))
    result = run_cli(db, tmp_path, "check", "-c", str(bad))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"djsupervisor: error: {bad}: worker[1] (gpu).replicas: must be <= 2 (2 GPUs × per_gpu 1), got 3"
    )
    good = write_config(tmp_path / "good.toml", CONFIG)
    result = run_cli(db, tmp_path, "check", "-c", str(good), env={**db.env, "DJS_TEST_GPU_OUT": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    gpus = result.stdout.splitlines()[-1]
    if isinstance(two_gpus_or_none, str):
        assert gpus == f"gpus: none seen: {two_gpus_or_none}"
    else:
        assert gpus.startswith(f"gpus: {len(two_gpus_or_none)} (0: ")
