"""Attention-only window: each query reads only the last N tokens, but the cache still stores everything."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcore.eviction.base import EvictionPolicy, EvictionState


@dataclass(slots=True)
class AttentionWindow(EvictionPolicy):
    """Limit attention to the ``budget`` newest tokens without freeing any memory.

    Longformer-style local attention (Beltagy et al. 2020) applied with a mask at inference: the
    accuracy of a sliding window with the memory of the full cache. It shows that a window alone saves
    nothing unless storage is actually evicted (compare ``sliding_window``: same attention with
    original positions, memory held at the budget).
    """

    name: ClassVar[str] = "attention_window"
    paper: ClassVar[str] = "local attention mask (Beltagy et al. 2020)"
    stores_all: ClassVar[bool] = True

    def score_tokens(self, state: EvictionState, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Original position ``[B, Hkv, T]``: the newest are the ones attention may read."""
        return state.positions.float()
