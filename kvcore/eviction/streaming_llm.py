"""StreamingLLM: a few attention-sink tokens from the start plus a window of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvcore.eviction.base import EvictionPolicy, EvictionState


@dataclass(slots=True)
class StreamingLLM(EvictionPolicy):
    """Keep the first ``n_sink`` tokens and the most recent ``budget - n_sink``.

    Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024): queries
    park surplus attention on the first tokens, so keeping them (the sinks) stops the collapse a pure
    sliding window shows. n_sink: sink tokens kept, counted from the first token of the text (>= 1).
    """

    name: ClassVar[str] = "streaming_llm"
    paper: ClassVar[str] = "StreamingLLM (Xiao et al. 2023)"
    positional: ClassVar[bool] = True
    n_sink: int = field(default=4, metadata={"min": 1, "max": 64, "help": "first tokens kept as attention sinks"})

    def __post_init__(self) -> None:
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 1:
            raise ValueError(f"n_sink must be an integer >= 1 (the first tokens kept as sinks), got {self.n_sink!r}")

    def min_budget(self) -> int:
        """Sinks plus at least one recent token."""
        return self.n_sink + 1

    def score_tokens(self, state: EvictionState, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Original position ``[B, Hkv, T]``, with the first ``n_sink`` positions at +inf."""
        pos = state.positions.float()
        return pos.masked_fill(state.positions < self.n_sink, float("inf"))
