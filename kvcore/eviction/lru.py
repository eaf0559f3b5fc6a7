"""LRU: evict the token whose last real use (attention above a threshold) is the oldest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvcore.eviction.base import EvictionPolicy, EvictionState, pad_tokens


@dataclass(slots=True)
class LRU(EvictionPolicy):
    """Least recently used, the classic cache rule with attention as the access signal.

    A token is *used* by a query when that query's attention on it (averaged over the query heads of its
    KV head) is at least ``threshold`` times the uniform share ``1 / n``, n = tokens the query sees. A
    token counts as used when it enters the cache. The token whose last use is the oldest goes first
    (ties: the older position). Scissorhands (Liu et al. 2023, "persistence of importance") motivates
    keeping recently attended tokens; the rule itself is Belady-era LRU (Mattson et al. 1970).
    threshold: multiple of the uniform share (> 0).
    """

    name: ClassVar[str] = "lru"
    paper: ClassVar[str] = "LRU on attention (after Scissorhands, Liu et al. 2023)"
    needs_attention: ClassVar[bool] = True
    threshold: float = field(default=1.0, metadata={"min": 0.05, "max": 20.0, "step": 0.05,
                                                    "help": "use = attention >= threshold x uniform share"})

    def __post_init__(self) -> None:
        if not self.threshold > 0.0:
            raise ValueError(f"threshold must be > 0 (a multiple of the uniform attention share), got {self.threshold}")

    def observe(self, state: EvictionState, attn: torch.Tensor) -> None:
        """Move a token's last-use step to the newest query that attended to it above the threshold."""
        Tq, T = attn.shape[-2:]
        last = pad_tokens(state.stats.get("last_use"), T, attn[..., 0, :]).clone()  # [B, Hkv, T]
        old = T - Tq if "last_use" in state.stats else 0
        last[..., old:] = state.positions[..., old:].float()  # entering the cache is a use
        rows = torch.arange(Tq, device=attn.device)
        visible = (T - Tq + rows + 1).float()  # [Tq] keys each new query sees
        used = attn >= (self.threshold / visible)[:, None]  # [B, Hkv, Tq, T]
        query_pos = (state.step - Tq + rows).float()[:, None]  # [Tq, 1]
        newest = torch.where(used, query_pos, torch.full_like(attn, -1.0)).amax(dim=-2)  # [B, Hkv, T]
        state.stats["last_use"] = torch.maximum(last, newest)

    def score_tokens(self, state: EvictionState, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Step of last use ``[B, Hkv, T]`` plus position / (step + 1) (< 1) to break ties toward the newer."""
        return state.stats["last_use"] + state.positions.float() / (state.step + 1)
