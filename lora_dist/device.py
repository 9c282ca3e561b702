"""Where a process computes and in which dtype: the one place every tensor's device and every
float dtype come from (docs/design.md decision 8: the same code on CPU and CUDA).

A Ray worker with ``cluster.gpus_per_worker >= 1`` computes on its CUDA device, any other process
on the CPU; ``train.dtype`` picks the compute dtype (auto: bf16 on CUDA, fp32 on CPU), whatever
the checkpoint's ``config.json`` says. LoRA master weights and AdamW state are fp32 always.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_dist.spec import JobSpec, resolve_dtype

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MASTER_DTYPE = torch.float32  # LoRA weights as the optimizer holds them, and AdamW's moments


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype_name: str  # bf16 | fp16 | fp32

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: activations, frozen float weights, the dequantized int8 blocks."""
        return TORCH_DTYPES[self.dtype_name]

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def record(self) -> dict[str, str]:
        """What the manifest records about precision."""
        return {"compute_dtype": self.dtype_name, "lora_master_dtype": "fp32", "optimizer_state_dtype": "fp32",
                "base_weight_dtype": "int8", "base_scale_dtype": "fp32", "device": self.device.type}


def worker_placement(spec: JobSpec) -> Placement:
    """A Ray worker: its CUDA device (Ray Train sets the current one) when the job asks for GPUs."""
    if spec.cluster.gpus_per_worker > 0:
        if not torch.cuda.is_available():
            raise RuntimeError("cluster.gpus_per_worker >= 1 but this worker sees no CUDA device")
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return Placement(device, resolve_dtype(spec.train.dtype, device.type))


def local_placement(spec: JobSpec) -> Placement:
    """The single process of ``lora-dist train`` and of the parity reference: the CPU."""
    name = resolve_dtype(spec.train.dtype, "cpu")
    if name == "fp16":
        raise ValueError("train.dtype: fp16 needs DeepSpeed's loss scaling on GPU workers (`lora-dist submit` "
                         "with cluster.gpus_per_worker >= 1); a single CPU process trains in fp32 or bf16")
    return Placement(torch.device("cpu"), name)


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak: allocated device memory on CUDA, peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS): on CPU workers, what ``lora-dist plan``'s
    per-process ``overhead`` term stands for when taken before the model is built."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Memory a new model could take on ``device`` now: free GPU memory, or for the CPU the
    kernel's MemAvailable estimate, capped by this process's cgroup (v2) limit less its usage
    where one is set (a container's memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    host = _host_available()
    return min(host, _cgroup_available() or host)


def _cgroup_available() -> int | None:
    """This process's cgroup memory limit less what the cgroup uses, page cache the kernel can
    reclaim (inactive file pages) not counted as used; None where no limit is set. cgroup v2
    (``memory.max``) or v1 (``memory.limit_in_bytes``), at the process's own group or, inside a
    container's namespace, at the mount's root."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            mount, files = Path("/sys/fs/cgroup"), ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            mount, files = Path("/sys/fs/cgroup/memory"), ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        for group in (mount / rel.strip().lstrip("/"), mount):
            try:
                limit = (group / files[0]).read_text().strip()
                if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as a huge number
                    return None
                stat = dict(x.split() for x in (group / "memory.stat").read_text().splitlines())
                used = int((group / files[1]).read_text()) - int(stat.get("inactive_file", 0))
                return max(0, int(limit) - used)
            except (OSError, ValueError):
                continue
    return None


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def worker_memory(placement: Placement, workers_here: int) -> int:
    """Memory one worker of a job may plan for: its GPU's free memory, or on the CPU the host's
    available memory shared by the job's ``workers_here`` workers on this node."""
    if placement.cuda:
        return available_bytes(placement.device)
    return available_bytes("cpu") // max(1, workers_here)
