"""bench/gpu_check.py where there is no GPU: one line saying so and a non-zero exit; and with --no-gpu, every
check that needs no GPU (its own pip-installed PostgreSQL, the pool of two slots on GPU 0, what the children see,
the empty GPU columns, the graceful stop) passes. The GPU checks themselves run on a GPU machine only."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

from djsupervisor import embedded

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def has_cuda_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@pytest.mark.timeout(60)
def test_without_a_gpu_it_says_so_in_one_line_and_fails():
    if has_cuda_driver():
        pytest.skip("this machine has an NVIDIA driver: run bench/gpu_check.py itself")
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=50)
    assert done.returncode == 3, done
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no NVIDIA GPU/driver found ("), lines


@pytest.mark.process
@pytest.mark.timeout(180)
def test_no_gpu_runs_everything_but_the_gpu_checks():
    if not embedded.available():
        pytest.skip("the embedded extra's PostgreSQL is not installed")
    done = subprocess.run([sys.executable, str(SCRIPT), "--no-gpu"], capture_output=True, text=True, timeout=170)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    marks = [line[:4] for line in lines]
    assert "FAIL" not in marks and marks.count("skip") == 1, lines
    assert lines[-1].startswith("ok   all checks passed in ")
    assert "ok   children saw CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER = [('0', 'PCI_BUS_ID')]" in lines
    assert "ok   metrics: djsupervisor_child_gpu_memory_bytes present, no samples" in lines
