"""SnapKV: attention of an observation window of the newest queries, pooled along the tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvcore.eviction.base import EvictionPolicy, EvictionState, pad_tokens

POOLINGS = ("avg", "max")
WINDOW_TIES = ("newest", "topk")


@dataclass(slots=True)
class SnapKV(EvictionPolicy):
    """Keep the tokens the last ``window`` queries attend to most, smoothed by pooling, plus the window itself.

    Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation" (NeurIPS 2024); scores
    as in kvpress's ``SnapKVPress``: mean attention of the observation window over older tokens, then a 1-D
    pool so neighbours of an important token survive with it. During decoding the window slides: the
    last ``window`` queries' attention rows are kept (aligned with the cache) and re-pooled at each eviction.
    window: observation queries (>= 1), whose own tokens are always kept. kernel_size: pooling width in
    tokens (odd). pooling: ``"avg"`` or ``"max"``.
    window_ties: which window tokens a budget below the window keeps: ``"newest"`` (the lab's choice), or
    ``"topk"``: every window token gets one score above all others (kvpress's ``SnapKVPress`` pads the
    window with ``max + 1``), so ``torch.topk``'s order among equal scores picks them.
    """

    name: ClassVar[str] = "snapkv"
    paper: ClassVar[str] = "SnapKV (Li et al. 2024)"
    needs_attention: ClassVar[bool] = True
    window: int = field(default=16, metadata={"min": 1, "max": 256, "help": "observation queries (newest tokens)"})
    kernel_size: int = field(default=5, metadata={"min": 1, "max": 31, "step": 2,
                                                  "help": "pooling width, odd (tokens)"})
    pooling: str = field(default="avg", metadata={"options": POOLINGS, "help": "how neighbouring scores are pooled"})
    window_ties: str = field(default="newest", metadata={
        "label_if_set": True, "options": WINDOW_TIES,
        "help": "budget below the window: keep its newest tokens, or top-k's pick among the window's equal scores "
                "(kvpress)"})

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1 (observation queries), got {self.window!r}")
        if (isinstance(self.kernel_size, bool) or not isinstance(self.kernel_size, int) or self.kernel_size < 1
                or self.kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be an odd integer >= 1 (tokens), got {self.kernel_size!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.window_ties not in WINDOW_TIES:
            raise ValueError(f"window_ties must be one of {WINDOW_TIES}, got {self.window_ties!r}")

    def recent_window(self, budget: int) -> int:
        """The observation window's own tokens (all of the budget when the budget is smaller).

        With ``window_ties="topk"`` none: the window's tokens are scored above the rest instead.
        """
        return 0 if self.window_ties == "topk" else min(self.window, budget)

    def observe(self, state: EvictionState, attn: torch.Tensor) -> None:
        """Append the new queries' rows to the observation window and keep its last ``window`` rows."""
        T = attn.shape[-1]
        old = pad_tokens(state.stats.get("rows"), T, attn[..., :0, :])  # [B, Hkv, w_old, T]
        state.stats["rows"] = torch.cat([old, attn.float()], dim=-2)[..., -self.window:, :]  # [B, Hkv, w, T]

    def score_tokens(self, state: EvictionState, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Pooled mean window attention ``[B, Hkv, T]`` over the tokens before the window.

        With ``window_ties="topk"`` the window's tokens all score the largest older score + 1 (kvpress).
        """
        B, H, T = state.positions.shape
        start = max(0, T - self.window)  # first token of the observation window
        scores = state.stats["rows"].mean(dim=-2).clone()  # [B, Hkv, T]
        scores[..., start:] = 0.0  # the window is kept anyway; keep it out of the pooling
        flat = scores.view(B * H, 1, T)  # [B*Hkv, 1, T]
        pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
        pooled = pool(flat, self.kernel_size, stride=1, padding=self.kernel_size // 2).view(B, H, T)
        if self.window_ties == "topk":
            top = pooled[..., :start].max() + 1.0 if start else pooled.new_tensor(1.0)
            pooled[..., start:] = top
        return pooled
