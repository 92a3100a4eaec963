"""What the connected Ray cluster offers to pipeline stages: GPUs, or CPU slots with a RAM budget.

GPUs: every alive node advertising ``gpu_resource`` (default Ray's ``"GPU"``) contributes one
``DeviceInfo`` per unit. Memory per GPU, first match wins:

1. ``gpu_memory_bytes=`` (one number for all GPUs, or ``{node_id: bytes}``);
2. a live ``torch.cuda.mem_get_info`` when the node is the driver's own and CUDA is visible
   (this creates a CUDA context in the driver);
3. the node's custom resource ``gpu_memory_bytes`` (per GPU: ``ray start --resources
   '{"gpu_memory_bytes": 85899345920}'``);
4. ``DEFAULT_GPU_MEMORY_BYTES`` (16 GiB), with a warning naming the settings above.

CPU fallback (no GPU anywhere): each node gets ``cpu_slots`` slots (default 1) sharing its RAM
budget equally; the budget is ``ram_budget_bytes`` per node if given, else 70% of the available
RAM (psutil) on the driver's node and 70% of the ``memory`` resource on the others.

Throughput: every device starts at 1.0 (relative speed). ``measure_throughput()`` times a
matmul on a torch device; set the result on devices of that kind before planning, e.g.
``[d.model_copy(update={"throughput": gflops}) for d in devs]``.

Example:
    >>> devs = inventory(ram_budget_bytes=8 * 2**30, cpu_slots=2)  # doctest: +SKIP
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Mapping
from typing import Any

from inference._exceptions import PlanError
from inference._plan import DeviceInfo

__all__ = [
    "DEFAULT_GPU_MEMORY_BYTES",
    "DEFAULT_RAM_FRACTION",
    "GPU_MEMORY_RESOURCE",
    "inventory",
    "measure_throughput",
]

DEFAULT_GPU_MEMORY_BYTES = 16 * 2**30  # per GPU when nothing better is known (see the module docstring)
DEFAULT_RAM_FRACTION = 0.7  # share of a node's RAM the CPU slots may use by default
GPU_MEMORY_RESOURCE = "gpu_memory_bytes"  # node custom resource: memory of each of its GPUs, in bytes


def _short(node_id: str) -> str:
    return f"node-{node_id[:8]}"


def _local_cuda(count: int) -> list[tuple[int, int, str]] | None:
    """``[(free, total, name)]`` of this process's first ``count`` CUDA devices, or None without CUDA."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not torch.cuda.is_available():
        return None
    out = []
    for i in range(min(count, torch.cuda.device_count())):
        free, total = torch.cuda.mem_get_info(i)
        out.append((int(free), int(total), torch.cuda.get_device_name(i)))
    return out or None


def _gpu_devices(node: dict[str, Any], count: int, local: bool, gpu_resource: str,
                 gpu_memory_bytes: int | Mapping[str, int] | None) -> list[DeviceInfo]:
    node_id, resources = str(node["NodeID"]), node.get("Resources", {})
    label = str(next((k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")), gpu_resource))
    explicit = gpu_memory_bytes.get(node_id) if isinstance(gpu_memory_bytes, Mapping) else gpu_memory_bytes
    measured = _local_cuda(count) if explicit is None and local and gpu_resource == "GPU" else None
    if measured is not None:
        specs = measured
    else:
        per_gpu = explicit if explicit is not None else resources.get(GPU_MEMORY_RESOURCE)
        if per_gpu is None:
            warnings.warn(
                f"no GPU memory size known for node {node_id[:8]}; assuming {DEFAULT_GPU_MEMORY_BYTES / 2**30:g} "
                f"GiB per GPU. Pass inventory(gpu_memory_bytes=...) or give the node a "
                f"'{GPU_MEMORY_RESOURCE}' resource", stacklevel=3)
            per_gpu = DEFAULT_GPU_MEMORY_BYTES
        specs = [(int(per_gpu), int(per_gpu), label)] * count
    return [
        DeviceInfo(device_id=f"{_short(node_id)}/gpu:{i}", node_id=node_id, kind="gpu", name=name,
                   total_bytes=total, free_bytes=free, ray_resource=gpu_resource)
        for i, (free, total, name) in enumerate(specs)
    ]


def _cpu_devices(node: dict[str, Any], local: bool, ram_budget_bytes: int | None, slots: int) -> list[DeviceInfo]:
    node_id, resources = str(node["NodeID"]), node.get("Resources", {})
    if ram_budget_bytes is not None:
        budget = int(ram_budget_bytes)
    elif local:
        import psutil

        budget = int(DEFAULT_RAM_FRACTION * psutil.virtual_memory().available)
    else:
        budget = int(DEFAULT_RAM_FRACTION * float(resources.get("memory", 0)))
    share, cpus = budget // slots, int(resources.get("CPU", 0))
    return [
        DeviceInfo(device_id=f"{_short(node_id)}/cpu:{k}", node_id=node_id, kind="cpu",
                   name=f"cpu slot {k + 1}/{slots} ({cpus} logical CPUs on the node)",
                   total_bytes=share, free_bytes=share)
        for k in range(slots)
    ]


def inventory(
    ram_budget_bytes: int | None = None,
    cpu_slots: int | None = None,
    *,
    gpu_resource: str = "GPU",
    gpu_memory_bytes: int | Mapping[str, int] | None = None,
) -> list[DeviceInfo]:
    """Devices of the connected Ray cluster's alive nodes (see the module docstring for the rules).

    Args:
        ram_budget_bytes: RAM per node the CPU slots share (CPU fallback only); default 70%
            of the node's available RAM / ``memory`` resource.
        cpu_slots: CPU slots per node (CPU fallback only); default 1.
        gpu_resource: the Ray resource counting GPUs; a custom name (e.g. ``"sim_gpu"``) makes
            nodes advertising it count as GPU nodes.
        gpu_memory_bytes: memory per GPU, one number or ``{node_id: bytes}``.

    Returns:
        GPUs of every node (the driver's node first, then by node id), or CPU slots when no node
        has ``gpu_resource``.

    Raises:
        PlanError: Ray is not initialised, ``cpu_slots < 1``, or a negative budget.

    Example:
        >>> [d.device_id for d in inventory(cpu_slots=2)]  # doctest: +SKIP
        ['node-9e7f8074/cpu:0', 'node-9e7f8074/cpu:1']
    """
    import ray

    if not ray.is_initialized():
        raise PlanError("no Ray cluster connected: call hive.init() or ray.init() first, "
                        "or pass devices=[DeviceInfo(...), ...] to plan()")
    slots = 1 if cpu_slots is None else cpu_slots
    if slots < 1:
        raise PlanError(f"cpu_slots={cpu_slots}; pass at least 1 slot per node")
    if ram_budget_bytes is not None and ram_budget_bytes < 0:
        raise PlanError(f"ram_budget_bytes={ram_budget_bytes} is negative; pass a byte count or None")
    here = ray.get_runtime_context().get_node_id()
    nodes = sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: (n["NodeID"] != here, n["NodeID"]))
    gpus: list[DeviceInfo] = []
    for node in nodes:
        count = int(node.get("Resources", {}).get(gpu_resource, 0))
        if count:
            gpus += _gpu_devices(node, count, node["NodeID"] == here, gpu_resource, gpu_memory_bytes)
    if gpus:
        return gpus
    return [d for node in nodes for d in _cpu_devices(node, node["NodeID"] == here, ram_budget_bytes, slots)]


def measure_throughput(device: str = "cpu", size: int = 512, repeats: int = 5) -> float:
    """Matmul speed of a torch device in GFLOP/s (median of ``repeats`` timings).

    Only ratios between devices matter to the planner, so any consistent measurement works.

    Args:
        device: torch device string ("cpu", "cuda:0").
        size: side of the square float32 matrices.
        repeats: timed runs after one warm-up.

    Returns:
        Median GFLOP/s.

    Example:
        >>> measure_throughput("cpu", size=64, repeats=1) > 0
        True
    """
    import torch

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)

    def sync() -> None:
        if a.is_cuda:
            torch.cuda.synchronize(a.device)

    torch.matmul(a, b)
    sync()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        times.append(max(time.perf_counter() - t0, 1e-9))
    return 2 * size**3 / statistics.median(times) / 1e9
