"""TOVA: keep the tokens the newest query attends to most."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvcore.eviction.base import EvictionPolicy, EvictionState


@dataclass(slots=True)
class TOVA(EvictionPolicy):
    """Token Omission Via Attention: evict the token with the lowest attention from the newest query.

    Oren et al. 2024, "Transformers are Multi-State RNNs" (EMNLP 2024). The paper averages the newest
    query's attention over all heads of a layer, so every head keeps the same tokens.
    per_head: score each KV head with its own query group instead (False follows the paper).
    """

    name: ClassVar[str] = "tova"
    paper: ClassVar[str] = "TOVA (Oren et al. 2024)"
    needs_attention: ClassVar[bool] = True
    per_head: bool = field(default=False, metadata={"help": "score each KV head with its own query group"})

    def __post_init__(self) -> None:
        if not isinstance(self.per_head, bool):
            raise ValueError(f"per_head must be True or False, got {self.per_head!r}")

    def observe(self, state: EvictionState, attn: torch.Tensor) -> None:
        """Remember the newest query's attention ``[B, Hkv, T]`` (head-averaged unless ``per_head``)."""
        last = attn[..., -1, :]  # [B, Hkv, T]
        state.stats["last"] = last if self.per_head else last.mean(dim=1, keepdim=True).expand_as(last).clone()

    def score_tokens(self, state: EvictionState, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The newest query's attention ``[B, Hkv, T]``."""
        return state.stats["last"]
