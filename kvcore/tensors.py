"""Byte accounting of stored tensors: what memory really holds, counted one way everywhere."""

from __future__ import annotations

import torch


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Sum of element_size x numel over ``tensors`` (None counts 0): the bytes a cache keeps for them."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
