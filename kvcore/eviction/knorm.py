"""Knorm: keep the keys with the smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcore.eviction.base import EvictionPolicy, EvictionState


@dataclass(slots=True)
class KNorm(EvictionPolicy):
    """Keep the tokens whose key has the lowest L2 norm (no attention needed, works with fused kernels).

    Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
    (EMNLP 2024): low-norm keys tend to receive high attention. Same scoring as kvpress's ``KnormPress``.
    """

    name: ClassVar[str] = "knorm"
    paper: ClassVar[str] = "Knorm (Devoto et al. 2024)"

    def score_tokens(self, state: EvictionState, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Minus the key norm ``[B, Hkv, T]``."""
        return -keys.float().norm(dim=-1)
