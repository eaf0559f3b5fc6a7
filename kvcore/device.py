"""Where tensors live and how torch runs there: CUDA when available, else CPU; the CPU thread count."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block on ``n`` torch intra-op threads, then restore the count (None: leave it as it is).

    The one thread-pinning helper of the lab. One-token decode steps of a small model are many ops of a
    few thousand elements: extra threads only add synchronisation, and stall badly when other
    processes hold the cores (benchmarks/RESULTS.md). With the OpenMP backend the setting is per
    thread: it changes this thread's count and the default of threads started inside the block.
    """
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
