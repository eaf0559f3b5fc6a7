"""Sliding window: keep the most recent tokens only ("window attention" in StreamingLLM's comparison)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcore.eviction.base import EvictionPolicy, EvictionState


@dataclass(slots=True)
class SlidingWindow(EvictionPolicy):
    """Evict the oldest token: the cache holds the last ``budget`` tokens.

    The baseline of StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
    Sinks", Fig. 1b): once the first tokens leave the cache, perplexity rises sharply.
    """

    name: ClassVar[str] = "sliding_window"
    paper: ClassVar[str] = "window attention (Beltagy et al. 2020; baseline in Xiao et al. 2023)"
    positional: ClassVar[bool] = True

    def score_tokens(self, state: EvictionState, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Original position ``[B, Hkv, T]``: newer is better."""
        return state.positions.float()
