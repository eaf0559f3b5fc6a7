"""A generation or a streamed text, step by step: what each step's query attended to and what each cache held.

SinkVis-style (streaming attention, stepped through): step ``s`` is the query at position ``queries[s]``;
for it the view keeps its attention row over the keys it could see, what every cache plan held when it
read (share of layers and KV heads holding each position, and the share stored compressed), and the
attention sinks and heavy hitters found by the one detector (:func:`~kvcore.models.attention.detect_patterns`)
over the attention up to that step. The Live model and Eviction pages draw it the same way.

What a cache holds is read from the cache itself. A plan's hook that tracks original positions exposes
``states``, one per layer, each with ``positions`` ``[B, Hkv, T]`` (the eviction hook does); otherwise a cache
in original-position mode knows its own positions. A cache layer stored in compressed form exposes
``stores``, whose ``k`` and ``v`` streams report ``num_sink``, ``num_aged`` and their ``codec`` (the quantized
layer does): aged tokens are the compressed ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from kvcore.models.attention import AttentionPatterns, detect_patterns
from kvcore.models.cache import LabCache


@dataclass(slots=True)
class StepView:
    """Steps of a run. steps: one row per step (``step``, ``query`` position, plus what the caller adds).
    attention: ``[S, T]`` each step's attention over key positions (NaN past the query). held / compressed:
    cache name -> ``[S, T]`` share of (layer, KV head) holding each position / storing it compressed (NaN
    past the query). sinks, heavy: per step, the positions the detector flags. tokens: ``T`` key labels."""

    steps: pd.DataFrame
    attention: np.ndarray
    held: dict[str, np.ndarray]
    compressed: dict[str, np.ndarray]
    sinks: list[list[int]]
    heavy: list[list[int]]
    tokens: list[str]

    @property
    def num_steps(self) -> int:
        return len(self.steps)


def _held_positions(cache: LabCache, hook: object, layer: int) -> torch.Tensor | None:
    """Original positions ``[Hkv, T]`` layer ``layer`` holds, or None when the cache cannot tell (all held)."""
    states = getattr(hook, "states", None)
    if states and len(states) == len(cache.layers) and hasattr(states[layer], "positions"):
        return states[layer].positions[0]
    positions = cache.positions[layer] if layer < len(cache.positions) else None
    if positions is not None and cache.position_mode == "original":
        return positions[0]
    return None


def cache_holdings(cache: LabCache, hook: object, seen: int) -> tuple[np.ndarray, np.ndarray]:
    """Before a step: for each of the ``seen`` positions fed so far, the share of (layer, KV head) pairs that
    hold it, and the share of held K and V entries stored compressed. ``([seen], [seen])``."""
    held, compressed = np.zeros(seen), np.zeros(seen)
    layers = len(cache.layers)
    if seen == 0 or cache.get_seq_length(0) == 0:
        return held, compressed
    for i, layer in enumerate(cache.layers):
        pos = _held_positions(cache, hook, i)
        if pos is None:
            held += 1.0 / layers
        else:
            counts = torch.bincount(pos.flatten().cpu(), minlength=seen)[:seen].double()
            held += (counts / (pos.shape[0] * layers)).numpy()
        stores = getattr(layer, "stores", None)
        if stores:
            for stream in (stores[0].k, stores[0].v):
                if stream.codec.describe() != "fp16":
                    start = stream.num_sink
                    compressed[start:start + stream.num_aged] += 0.5 / layers
    return held, compressed


def step_rows(values: np.ndarray, queries: Sequence[int], width: int) -> np.ndarray:
    """``[S, width]`` rows: row s holds ``values[s]`` at positions 0..queries[s] and NaN after."""
    out = np.full((len(queries), width), np.nan)
    for s, (row, q) in enumerate(zip(values, queries, strict=True)):
        out[s, :q + 1] = np.asarray(row, dtype=np.float64)[:q + 1]
    return out


def step_patterns(maps: torch.Tensor, queries: Sequence[int], patterns: AttentionPatterns
                  ) -> tuple[list[list[int]], list[list[int]]]:
    """Sinks and heavy hitters the detector finds in the attention up to each query: maps ``[T, T]`` or
    ``[L, T, T]``; per step, the flagged positions."""
    sinks, heavy = [], []
    for q in queries:
        table = detect_patterns(maps[..., :q + 1, :q + 1], patterns)
        sinks.append(table.loc[table["sink"], "position"].tolist())
        heavy.append(table.loc[table["heavy_hitter"], "position"].tolist())
    return sinks, heavy


def build_view(steps: pd.DataFrame, attention: np.ndarray, held: Mapping[str, np.ndarray],
               compressed: Mapping[str, np.ndarray], maps: torch.Tensor, patterns: AttentionPatterns,
               tokens: Sequence[str]) -> StepView:
    """A :class:`StepView` from per-step rows (``query`` column), attention rows and holdings (all ``[S, >= T]``),
    and the maps the detector reads."""
    queries = steps["query"].tolist()
    width = len(tokens)
    sinks, heavy = step_patterns(maps, queries, patterns)
    frame = steps.assign(sinks=[", ".join(map(str, s)) or "none" for s in sinks],
                         heavy_hitters=[", ".join(map(str, h)) or "none" for h in heavy])
    return StepView(frame.reset_index(drop=True), step_rows(attention, queries, width),
                    {k: step_rows(v, queries, width) for k, v in held.items()},
                    {k: step_rows(v, queries, width) for k, v in compressed.items()}, sinks, heavy, list(tokens))
