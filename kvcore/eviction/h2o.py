"""H2O: heavy hitters (largest accumulated attention) plus a window of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvcore.eviction.base import EvictionPolicy, EvictionState, pad_tokens


@dataclass(slots=True)
class H2O(EvictionPolicy):
    """Keep the tokens with the largest attention summed over every query so far, plus the newest ones.

    Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
    Models" (NeurIPS 2023). The accumulator of a token counts the attention it received from every
    query since it entered the cache (averaged over the query heads of its KV head) and survives with it.
    recent_fraction: share of the budget (0 <= f < 1) reserved for the newest tokens; the rest goes to
    heavy hitters (the paper splits the budget evenly). kvpress's ``ObservedAttentionPress`` instead
    averages over the queries that saw each token and reserves no window: ``observed_attention``.
    """

    name: ClassVar[str] = "h2o"
    paper: ClassVar[str] = "H2O (Zhang et al. 2023)"
    needs_attention: ClassVar[bool] = True
    recent_fraction: float = field(default=0.5, metadata={"min": 0.0, "max": 0.95, "step": 0.05,
                                                          "help": "share of the budget kept for the newest tokens"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.recent_fraction < 1.0:
            raise ValueError(f"recent_fraction must be in [0, 1) (share of the budget for recent tokens), "
                             f"got {self.recent_fraction}")

    def recent_window(self, budget: int) -> int:
        """``round(recent_fraction * budget)`` newest tokens."""
        return round(self.recent_fraction * budget)

    def observe(self, state: EvictionState, attn: torch.Tensor) -> None:
        """Add each token's attention from the new queries to its running sum."""
        acc = pad_tokens(state.stats.get("acc"), attn.shape[-1], attn[..., 0, :])  # [B, Hkv, T]
        state.stats["acc"] = acc + attn.sum(dim=-2)

    def score_tokens(self, state: EvictionState, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Accumulated attention ``[B, Hkv, T]``."""
        return state.stats["acc"]
