"""SnapKV: attention of an observation window of the newest queries, pooled along the tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvcore.eviction.base import EvictionPolicy, EvictionState, pad_tokens

POOLINGS = ("avg", "max")


@dataclass(slots=True)
class SnapKV(EvictionPolicy):
    """Keep the tokens the last ``window`` queries attend to most, smoothed by pooling, plus the window itself.

    Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation" (NeurIPS 2024); scores
    as in kvpress's ``SnapKVPress``: mean attention of the observation window over older tokens, then a 1-D
    pool so neighbours of an important token survive with it. During decoding the window slides: the
    last ``window`` queries' attention rows are kept (aligned with the cache) and re-pooled at each eviction.
    window: observation queries (>= 1), whose own tokens are always kept. kernel_size: pooling width in
    tokens (odd). pooling: ``"avg"`` or ``"max"``.
    """

    name: ClassVar[str] = "snapkv"
    paper: ClassVar[str] = "SnapKV (Li et al. 2024)"
    needs_attention: ClassVar[bool] = True
    window: int = field(default=16, metadata={"min": 1, "max": 256, "help": "observation queries (newest tokens)"})
    kernel_size: int = field(default=5, metadata={"min": 1, "max": 31, "step": 2,
                                                  "help": "pooling width, odd (tokens)"})
    pooling: str = field(default="avg", metadata={"options": POOLINGS, "help": "how neighbouring scores are pooled"})

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1 (observation queries), got {self.window!r}")
        if (isinstance(self.kernel_size, bool) or not isinstance(self.kernel_size, int) or self.kernel_size < 1
                or self.kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be an odd integer >= 1 (tokens), got {self.kernel_size!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def recent_window(self, budget: int) -> int:
        """The observation window's own tokens (all of the budget when the budget is smaller)."""
        return min(self.window, budget)

    def observe(self, state: EvictionState, attn: torch.Tensor) -> None:
        """Append the new queries' rows to the observation window and keep its last ``window`` rows."""
        T = attn.shape[-1]
        old = pad_tokens(state.stats.get("rows"), T, attn[..., :0, :])  # [B, Hkv, w_old, T]
        state.stats["rows"] = torch.cat([old, attn.float()], dim=-2)[..., -self.window:, :]  # [B, Hkv, w, T]

    def score_tokens(self, state: EvictionState, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Pooled mean window attention ``[B, Hkv, T]`` over the tokens before the window."""
        B, H, T = state.positions.shape
        scores = state.stats["rows"].mean(dim=-2).clone()  # [B, Hkv, T]
        scores[..., max(0, T - self.window):] = 0.0  # the window is kept anyway; keep it out of the pooling
        flat = scores.view(B * H, 1, T)  # [B*Hkv, 1, T]
        pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
        return pool(flat, self.kernel_size, stride=1, padding=self.kernel_size // 2).view(B, H, T)
