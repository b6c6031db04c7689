"""Workers whose callable step records, from inside the child, the GPU it was given: each cycle writes
``CUDA_VISIBLE_DEVICES CUDA_DEVICE_ORDER`` (``-`` for an unset one) into DJS_TEST_GPU_OUT/<pid>. `gpu` is
meant for a pool with ``gpus``, `cpu` for a plain pool beside it. Used by tests/supervisor/test_gpu_process.py;
connects nothing at import."""

from __future__ import annotations

import os
from pathlib import Path

from djsupervisor import DataJointWorker

PREFIX = os.environ["DJS_TEST_PREFIX"]


def record_gpu() -> None:
    """Write what this process sees of its GPU to DJS_TEST_GPU_OUT/<pid> (atomically: a rename)."""
    seen = " ".join(os.environ.get(name, "-") for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"))
    target = Path(os.environ["DJS_TEST_GPU_OUT"]) / str(os.getpid())
    if not target.exists():
        target.with_suffix(".part").write_text(seen)
        target.with_suffix(".part").rename(target)


gpu = DataJointWorker("gpu", f"{PREFIX}_workers", sleep_duration=0.2)
gpu(record_gpu)
cpu = DataJointWorker("cpu", f"{PREFIX}_workers", sleep_duration=0.2)
cpu(record_gpu)
