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
    keep_last: always keep the newest token, whatever its attention (kvpress's ``TOVAPress`` scores the
    newest token above every other; False follows the paper, where it competes like the rest).
    """

    name: ClassVar[str] = "tova"
    paper: ClassVar[str] = "TOVA (Oren et al. 2024)"
    needs_attention: ClassVar[bool] = True
    per_head: bool = field(default=False, metadata={"help": "score each KV head with its own query group"})
    keep_last: bool = field(default=False, metadata={"label_if_set": True,
                                                     "help": "always keep the newest token (kvpress's TOVAPress)"})

    def __post_init__(self) -> None:
        if not isinstance(self.per_head, bool):
            raise ValueError(f"per_head must be True or False, got {self.per_head!r}")
        if not isinstance(self.keep_last, bool):
            raise ValueError(f"keep_last must be True or False, got {self.keep_last!r}")

    def recent_window(self, budget: int) -> int:
        """The newest token when ``keep_last``, else none."""
        return 1 if self.keep_last else 0

    def observe(self, state: EvictionState, attn: torch.Tensor) -> None:
        """Remember the newest query's attention ``[B, Hkv, T]`` (head-averaged unless ``per_head``)."""
        last = attn[..., -1, :]  # [B, Hkv, T]
        state.stats["last"] = last if self.per_head else last.mean(dim=1, keepdim=True).expand_as(last).clone()

    def score_tokens(self, state: EvictionState, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The newest query's attention ``[B, Hkv, T]``."""
        return state.stats["last"]
