"""GPU memory of the children, read through NVML (``nvidia-ml-py``, the optional ``gpu`` extra), and the GPUs
``check`` reports.

Why NVML and not ``nvidia-smi``: it is a library call (no process to start every sample) and it gives each
process's memory on each GPU. Why in the parent, next to the psutil sampling: the parent already knows each
child's process tree there, and one call per GPU per sample (``nvmlDeviceGetComputeRunningProcesses``)
covers every child at once, however many there are. NVML makes no CUDA context and the parent never
initialises CUDA, so forking after it is safe (bench/gpu_check.py checks that the parent stays one thread).

What can go wrong is normal here, and never the parent's end: ``nvidia-ml-py`` not installed, no driver (no
``libnvidia-ml``), no GPU, a GPU fallen off the bus, a driver reloaded under us. Every NVML call is guarded;
a failure leaves the readings empty with the reason (`GpuReading.note`, shown by ``status``), and NVML is
tried again `RETRY_AFTER` seconds later. The module is imported lazily, on the first sample of a GPU pool:
a supervisor without one never loads it.

NVML names processes by their pid in the host's pid namespace: inside a container that does not share it
(docker without ``--pid=host``) no pid matches and the readings stay at zero.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any, NoReturn

#: Seconds before NVML is tried again after it failed (a driver being reloaded, a GPU reset).
RETRY_AFTER = 60.0
NOT_INSTALLED = "nvidia-ml-py is not installed (pip install 'djsupervisor[gpu]')"


@dataclasses.dataclass(frozen=True)
class GpuDevice:
    """A GPU as NVML sees it: `index` (as nvidia-smi numbers it), `name`, `uuid`, `memory_total` in bytes."""

    index: int
    name: str
    uuid: str
    memory_total: int


@dataclasses.dataclass(frozen=True)
class GpuReading:
    """A child's GPU memory at its last sample: bytes per GPU index (``{}``: none used), or None with the
    reason it was not measured in `note`."""

    memory: Mapping[str, int] | None
    note: str | None = None

    @property
    def total_mb(self) -> float | None:
        """MB (MiB) on every GPU together; None if not measured."""
        return None if self.memory is None else sum(self.memory.values()) / 2**20


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _why(error: BaseException) -> str:
    """A failed NVML call in words: NVML's own message, which names the cause ("Driver Not Loaded")."""
    text = str(error) or error.__class__.__name__
    if "Library Not Found" in text or "Driver Not Loaded" in text:
        return f"no NVIDIA GPU/driver found (NVML: {text})"
    return f"NVML failed: {text}"


class Nvml:
    """NVML, started on first use and again after a failure (at most every `RETRY_AFTER` seconds).

    `module` stands in for ``pynvml`` (the unit tests' fake); `clock` for `time.monotonic`."""

    def __init__(self, module: ModuleType | Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._module = module
        self._clock = clock
        self._handles: list[tuple[str, Any]] | None = None  # (index, handle) once started
        self.unavailable: str | None = None  # why the last attempt failed
        self._retry_at = 0.0

    def _start(self) -> list[tuple[str, Any]]:
        """The GPUs' handles, starting NVML if needed; RuntimeError(reason) if it cannot be had now."""
        if self._handles is not None:
            return self._handles
        if self.unavailable is not None and self._clock() < self._retry_at:
            raise RuntimeError(self.unavailable)
        try:
            if self._module is None:
                try:
                    self._module = importlib.import_module("pynvml")
                except ImportError:
                    raise RuntimeError(NOT_INSTALLED)
            nvml = self._module
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
            self._handles = [(str(i), nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
        except Exception as error:  # NVMLError and whatever a broken install raises: never the parent's end
            self._failed(error if isinstance(error, RuntimeError) else RuntimeError(_why(error)))
        self.unavailable = None
        return self._handles or []

    def _failed(self, error: RuntimeError) -> NoReturn:
        self.close()  # started once: let NVML drop what it holds before it is started again
        self.unavailable = str(error)
        self._retry_at = self._clock() + RETRY_AFTER
        raise error

    def close(self) -> None:
        """Let NVML go (it counts its starts: a config read at every reload must not leave one behind)."""
        if self._handles is not None:
            self._handles = None
            try:
                self._module.nvmlShutdown()
            except Exception:
                pass

    def devices(self) -> list[GpuDevice]:
        """Every GPU NVML sees; RuntimeError(reason) if NVML cannot be had."""
        handles = self._start()
        nvml = self._module
        try:
            return [
                GpuDevice(
                    int(index),
                    _text(nvml.nvmlDeviceGetName(handle)),
                    _text(nvml.nvmlDeviceGetUUID(handle)),
                    int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                )
                for index, handle in handles
            ]
        except Exception as error:
            self._failed(RuntimeError(_why(error)))

    def used_by_pid(self) -> dict[int, dict[str, int]]:
        """Bytes of GPU memory per process and GPU index, one NVML query per GPU; RuntimeError(reason)."""
        handles = self._start()
        nvml = self._module
        used: dict[int, dict[str, int]] = {}
        try:
            for index, handle in handles:
                for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    memory = getattr(process, "usedGpuMemory", None)  # None: not available (WDDM, some MIG)
                    if memory is not None:
                        per_gpu = used.setdefault(int(process.pid), {})
                        per_gpu[index] = per_gpu.get(index, 0) + int(memory)
        except Exception as error:
            self._failed(RuntimeError(_why(error)))
        return used


def list_devices(nvml: Nvml | None = None) -> list[GpuDevice] | str:
    """The GPUs NVML sees, or why it cannot tell (one line); NVML is let go after, unless `nvml` was given."""
    own = nvml or Nvml()
    try:
        return own.devices()
    except RuntimeError as error:
        return str(error)
    finally:
        if nvml is None:
            own.close()


class GpuMemorySampler:
    """GPU memory of the children's process trees, from one NVML reading per sample (see the module)."""

    def __init__(self, nvml: Nvml | None = None) -> None:
        self.nvml = nvml or Nvml()

    def sample(self, trees: Mapping[int, Iterable[int]]) -> dict[int, GpuReading]:
        """A reading per child: `trees` maps each child's pid to the pids of its process tree."""
        try:
            used = self.nvml.used_by_pid()
        except RuntimeError as error:
            return {root: GpuReading(None, str(error)) for root in trees}
        readings = {}
        for root, members in trees.items():
            memory: dict[str, int] = {}
            for pid in members:
                for gpu, amount in used.get(pid, {}).items():
                    memory[gpu] = memory.get(gpu, 0) + amount
            readings[root] = GpuReading(memory)
        return readings


def slot_fields(gpu: str | None, reading: GpuReading | None) -> dict[str, Any]:
    """A slot's GPU entries in the status: its GPU, its memory (MB in all, bytes per GPU) or why none."""
    total = None if reading is None else reading.total_mb
    return {
        "gpu": gpu,
        "gpu_memory_mb": None if total is None else round(total, 1),
        "gpu_memory": None if reading is None or reading.memory is None else dict(reading.memory),
        "gpu_note": None if reading is None else reading.note,
    }
