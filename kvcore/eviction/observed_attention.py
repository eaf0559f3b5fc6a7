"""Observed attention: keep the tokens with the largest mean attention from the queries that saw them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcore.eviction.base import EvictionPolicy, EvictionState, pad_tokens


@dataclass(slots=True)
class ObservedAttention(EvictionPolicy):
    """Score a token by the attention it received, averaged over the queries that could see it; no recent window.

    kvpress's ``ObservedAttentionPress`` (NVIDIA, 2024), "related to H2O" (Zhang et al. 2023, "H2O:
    Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"). H2O sums the
    attention a token received and reserves part of the budget for the newest tokens; here the sum is
    divided by the number of queries that saw the token (``T - j`` for position ``j`` of a ``T``-token
    prompt, under the causal mask), so late tokens are not penalised for having had fewer queries, and
    the whole budget goes to the best means. Attention is averaged over the query heads of each KV head.
    """

    name: ClassVar[str] = "observed_attention"
    paper: ClassVar[str] = "kvpress ObservedAttentionPress (after H2O, Zhang et al. 2023)"
    needs_attention: ClassVar[bool] = True

    def observe(self, state: EvictionState, attn: torch.Tensor) -> None:
        """Add the new queries' attention to each token's sum and count the queries that saw it.

        attn: ``[B, Hkv, Tq, T]``; row ``i`` sees the first ``T - Tq + i + 1`` tokens, so token ``j`` is
        seen by ``min(Tq, T - j)`` of the rows.
        """
        Tq, T = attn.shape[-2:]
        acc = pad_tokens(state.stats.get("acc"), T, attn[..., 0, :])  # [B, Hkv, T]
        seen = pad_tokens(state.stats.get("seen"), T, attn[..., 0, :])  # [B, Hkv, T]
        rows = (T - torch.arange(T, device=attn.device)).clamp(max=Tq)  # [T]
        state.stats["acc"] = acc + attn.float().sum(dim=-2)
        state.stats["seen"] = seen + rows.float()

    def score_tokens(self, state: EvictionState, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Mean attention received ``[B, Hkv, T]`` (sum over the queries that saw the token / their count)."""
        return state.stats["acc"] / state.stats["seen"].clamp(min=1.0)
