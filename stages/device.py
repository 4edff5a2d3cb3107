"""Which device a stage runs on. Inside a Ray actor the GPUs it may see are set by Ray."""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def default_device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """A CUDA device's compute capability, e.g. (9, 0) for Hopper; None for any other device."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def free_memory_bytes(device: torch.device) -> float:
    """What a device can still give this process. CUDA: the driver's free memory plus what
    PyTorch's allocator holds unused, within the process's memory fraction where one is set. CPU:
    the kernel's MemAvailable (unbounded where there is no /proc/meminfo)."""
    if device.type != "cuda":
        available = _proc_mib("/proc/meminfo", "MemAvailable")
        return float("inf") if available is None else available * 2**20
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    allocated = torch.cuda.memory_allocated(index)
    cached = torch.cuda.memory_reserved(index) - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 1.0)(index)  # torch >= 2.9
    return min(free + cached, fraction * total - allocated)


def describe(device: torch.device) -> str:
    """A readable device name for run records, e.g. 'cuda:0 (NVIDIA H100 80GB HBM3)' or 'cpu'."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _proc_mib(path: str, field: str) -> float | None:
    """A kB field of a /proc file (Linux), in MiB; None elsewhere."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of this process over a stretch of work: CUDA allocations on a GPU, resident
    memory (Linux VmHWM, which `clear_refs` resets) on the CPU. On the CPU the figure is the
    whole process's (model weights, runtime and results included), not only tensors."""

    def __init__(self, device: torch.device):
        self.device = device
        self._at_reset = 0.0

    def current_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return _proc_mib("/proc/self/status", "VmRSS") or 0.0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS to the current RSS
            except OSError:
                pass  # not Linux, or not allowed: the figure becomes the process's lifetime peak
        self._at_reset = self.current_mib()

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = _proc_mib("/proc/self/status", "VmHWM")
        return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def growth_mib(self) -> float:
        """How far the peak rose above what was in use at `reset`: what the work itself needed."""
        return max(0.0, self.peak_mib() - self._at_reset)
