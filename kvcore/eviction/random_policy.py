"""Random eviction, seeded: the floor every informed policy should beat."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvcore.eviction.base import EvictionPolicy, EvictionState


@dataclass(slots=True)
class RandomEviction(EvictionPolicy):
    """Keep a uniformly random subset of the cache, drawn afresh at every eviction.

    The control of H2O (Zhang et al. 2023) and of kvpress's ``RandomPress``: any attention-based policy
    should beat it. Scores are drawn from a generator seeded by ``(seed, layer, step)``, so a run is
    reproducible and layers draw independently. seed: integer seed.
    """

    name: ClassVar[str] = "random"
    paper: ClassVar[str] = "random control (as in Zhang et al. 2023)"
    seed: int = field(default=0, metadata={"min": 0, "max": 2**31 - 1, "help": "random seed"})

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def score_tokens(self, state: EvictionState, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Uniform draws ``[B, Hkv, T]`` from the ``(seed, layer, step)`` generator."""
        gen = torch.Generator().manual_seed(hash((self.seed, state.layer, state.step)) & (2**63 - 1))
        return torch.rand(keys.shape[:3], generator=gen).to(keys.device)
