"""Where tensors live: CUDA when available, else CPU."""

from __future__ import annotations

import torch


def get_device(prefer: str | None = None) -> torch.device:
    """Return ``cuda`` when a GPU is visible, else ``cpu``.

    prefer: force a device name ("cpu", "cuda"); "cuda" without a GPU raises ValueError.
    """
    if prefer is not None:
        if prefer.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {prefer!r} requested but CUDA is not available; use 'cpu'")
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe(device: torch.device | None = None) -> str:
    """One line naming the device, for pages and benchmark headers."""
    device = device or get_device()
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
