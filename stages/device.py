"""Which device a stage runs on. Inside a Ray actor the GPUs it may see are set by Ray."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def describe(device: torch.device) -> str:
    """A readable device name for run records, e.g. 'cuda:0 (NVIDIA H100 80GB HBM3)' or 'cpu'."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
