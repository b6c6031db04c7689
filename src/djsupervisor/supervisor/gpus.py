"""GPU pools: which GPU each slot's child sees, and the checks of a pool's ``gpus`` and ``per_gpu``.

Labs pin their GPU workers by hand today (one service per GPU, ``CUDA_VISIBLE_DEVICES`` in each unit file);
a pool with ``gpus = [0, 1, 2, 3]`` does it for them. Slot ``i`` of such a pool gets GPU
``gpus[i % len(gpus)]``: a function of the slot's index alone, so a replacement child gets the GPU of the
child it replaces, the parent knows each slot's GPU without asking the child, and an autoscaled pool's first
children spread over the GPUs before any GPU gets a second one. ``per_gpu`` children share a GPU, so a pool
holds at most ``len(gpus) * per_gpu`` children (`capacity`): `replicas` defaults to it, and neither
`replicas`, `max_replicas`, ``scale`` nor the autoscaler may go past it.

The child sets ``CUDA_VISIBLE_DEVICES`` (and ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so that an index means what
``nvidia-smi`` shows; CUDA's own default order is fastest-first) first thing after fork, before any of the
worker's code runs (`apply_in_child`): CUDA reads both once, when a process initialises it. That is also why
the parent must never initialise CUDA (a worker module that touches the GPU at import time would): a CUDA
context does not survive a fork.

Pure and cheap: the devices NVML sees (to resolve ``"all"`` and to refuse an index that does not exist) are
given by the caller (`djsupervisor.supervisor.gpu_memory.list_devices`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from djsupervisor.worker.settings import type_name

#: What a GPU entry may name besides an index: a GPU's UUID or a MIG instance's, as nvidia-smi -L shows them.
UUID_PREFIXES = ("GPU-", "MIG-")


class GpuPool(Protocol):
    """What the GPU rules read of a pool's definition (`WorkerConfig` has it)."""

    @property
    def gpus(self) -> tuple[str, ...] | None: ...
    @property
    def per_gpu(self) -> int: ...


def _entry(item: Any) -> str:
    """One GPU of a ``gpus`` list as CUDA_VISIBLE_DEVICES names it; ValueError saying what is wrong."""
    if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
        return str(item)
    if isinstance(item, str) and item.isascii() and item.isdigit():
        return str(int(item))
    if isinstance(item, str) and item.startswith(UUID_PREFIXES) and item.replace("-", "").replace("/", "").isalnum():
        return item
    raise ValueError(f"must name each GPU by index >= 0 or UUID ('GPU-...', 'MIG-...'), got {type_name(item)} {item!r}")


def check_gpus(value: Any) -> object:
    """The shape of a ``gpus`` value (a list of indices or UUIDs, ``"all"``, or a count); ValueError if wrong.

    The form check of the setting (`config_read.FORMS`): what the devices are is `resolve`'s business."""
    if value == "all":
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"must be a count of GPUs >= 1 (or a list of them), got {value!r}")
        return value
    if not isinstance(value, list):
        raise ValueError(f'must be a list of GPU indices or UUIDs, "all", or a count, got {type_name(value)} {value!r}')
    if not value:
        raise ValueError("must name at least one GPU, got []")
    entries = [_entry(item) for item in value]
    twice = sorted({entry for entry in entries if entries.count(entry) > 1})
    if twice:
        raise ValueError(f"must list each GPU once, got {twice[0]} twice (per_gpu sets how many children share one)")
    return value


def resolve(value: Any, devices: Sequence[Any] | str) -> tuple[str, ...]:
    """The GPUs a checked ``gpus`` value names, as CUDA_VISIBLE_DEVICES entries; ValueError if they cannot be
    had. `devices` are the GPUs NVML sees (objects with ``index`` and ``uuid``), or why NVML cannot tell
    (then ``"all"`` is refused, and indices and UUIDs are taken on trust)."""
    check_gpus(value)
    if value == "all":
        if isinstance(devices, str):
            raise ValueError(f'"all" needs NVML to count the GPUs, but {devices}; list the GPUs instead ([0, 1])')
        if not devices:
            raise ValueError('"all": NVML sees no GPU')
        return tuple(str(device.index) for device in devices)
    wanted = tuple(str(i) for i in range(value)) if isinstance(value, int) else tuple(map(_entry, value))
    if isinstance(devices, str):
        return wanted
    listed: list[Any] = list(devices)
    known = {str(device.index) for device in listed} | {device.uuid for device in listed}
    for entry in wanted:
        if entry not in known and not entry.startswith("MIG-"):  # MIG instances are not listed as devices
            seen = ", ".join(f"{device.index} ({device.uuid})" for device in listed) or "none"
            raise ValueError(f"no GPU {entry} on this machine (NVML sees {len(listed)}: {seen})")
    return wanted


def capacity(pool: GpuPool) -> int | None:
    """The most children a GPU pool may have (``len(gpus) * per_gpu``); None for a pool without GPUs."""
    return len(pool.gpus) * pool.per_gpu if pool.gpus else None


def gpu_for_slot(pool: GpuPool, index: int) -> str | None:
    """The GPU (a CUDA_VISIBLE_DEVICES value) of slot `index`, or None for a pool without GPUs."""
    return pool.gpus[index % len(pool.gpus)] if pool.gpus else None


def child_environment(pool: GpuPool, index: int) -> dict[str, str]:
    """The variables the child in slot `index` sets before the worker's code runs (none without GPUs)."""
    gpu = gpu_for_slot(pool, index)
    return {} if gpu is None else {"CUDA_VISIBLE_DEVICES": gpu, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def apply_in_child(pool: GpuPool, index: int) -> None:
    """Set the slot's GPU in this (freshly forked) child's environment: CUDA reads it when it initialises,
    and so do the processes the worker starts."""
    os.environ.update(child_environment(pool, index))


def limit_problem(pool: GpuPool, value: int) -> str | None:
    """Why `value` children (replicas, max_replicas, a scale) do not fit the GPU pool (``must be <= ...``), or
    None."""
    limit = capacity(pool)
    if limit is None or value <= limit or not pool.gpus:  # (gpus: for the type checker; limit says it)
        return None
    return f"must be <= {limit} ({len(pool.gpus)} GPUs × per_gpu {pool.per_gpu}), got {value}"


@dataclasses.dataclass(frozen=True)
class GpuSet:
    """A pool's GPUs and how many children share each (what `capacity` and `gpu_for_slot` read)."""

    gpus: tuple[str, ...] | None
    per_gpu: int = 1


def read_pool(values: dict[str, Any], devices: Callable[[], Sequence[Any] | str]) -> list[tuple[str, str]]:
    """A ``[[worker]]`` entry's values (as read, ``gpus`` given) made a GPU pool's, in place: ``gpus``
    resolved against `devices()` (`resolve`), `replicas` defaulted to the pool's `capacity` (but in an
    autoscaled pool, whose minimum it is: there the usual 1 stays), and neither it nor `max_replicas` above
    it. Returns the problems, as (key, problem); ``gpus`` is dropped from `values` if it cannot be had."""
    try:
        values["gpus"] = resolve(values["gpus"], devices())
    except ValueError as error:
        values.pop("gpus")
        return [("gpus", str(error))]
    pool = GpuSet(values["gpus"], values.get("per_gpu", 1))
    if "replicas" not in values and "max_replicas" not in values:
        values["replicas"] = capacity(pool)
    found = []
    for key in ("replicas", "max_replicas"):
        if (problem := limit_problem(pool, values.get(key) or 0)) is not None:
            found.append((key, problem))
    return found
