"""The full cache: nothing is evicted, the reference every other policy is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcore.eviction.base import EvictionPolicy, EvictionState


@dataclass(slots=True)
class FullCache(EvictionPolicy):
    """Keep every token whatever the budget (a standard decoder's cache; kvpress's "no press")."""

    name: ClassVar[str] = "full"
    paper: ClassVar[str] = "no eviction (reference)"
    keeps_all: ClassVar[bool] = True

    def score_tokens(self, state: EvictionState, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """All ones ``[B, Hkv, T]``: every token is worth keeping."""
        return torch.ones(keys.shape[:3], device=keys.device)
