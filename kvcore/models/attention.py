"""Attention probabilities of a real model, and the two patterns KV eviction relies on: sinks and heavy hitters.

Attention sinks: queries far from the start put a large share of their attention on the first
token(s) whatever they say (StreamingLLM, Xiao et al. 2023). Heavy hitters: a few keys collect most of
the attention mass, summed over queries (H2O, Zhang et al. 2023). Both are measured here on captured
probabilities, never assumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from kvcore.models.runtime import attention_implementation, model_device


@torch.no_grad()
def capture_attention(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of every layer and head for one sequence: ``[layers, Hq, T, T]`` float32.

    input_ids: ``[T]`` or ``[1, T]`` token ids (include ``<bos>`` if the model expects it). Runs one
    forward pass with eager attention and ``output_attentions=True``; row ``t`` is query ``t``.
    """
    ids = input_ids.reshape(1, -1).to(model_device(model))  # [1, T]
    with attention_implementation(model, "eager"):
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
    return torch.stack([a[0].float().cpu() for a in out.attentions])  # [L, Hq, T, T]


@dataclass(slots=True)
class AttentionPatterns:
    """Thresholds that call a key a sink or a heavy hitter (one detector for every page).

    sink_ratio: a key is a sink when queries at least ``min_distance`` positions after it give it, on
    average, ``sink_ratio`` times the uniform share 1/(t+1) or more (:func:`far_attention_ratio`).
    min_queries: a key with fewer such far queries is not judged (too few to tell a sink from a
    neighbour that local attention favours). heavy_fraction: the share of keys (0-1] with the largest
    accumulated attention called heavy hitters (H2O).
    """

    sink_ratio: float = 5.0
    heavy_fraction: float = 0.05
    min_distance: int = 32
    min_queries: int = 8

    def __post_init__(self) -> None:
        if not self.sink_ratio > 1.0:
            raise ValueError(f"sink_ratio must be > 1 (a multiple of the uniform share), got {self.sink_ratio}")
        if not 0.0 < self.heavy_fraction <= 1.0:
            raise ValueError(f"heavy_fraction must be in (0, 1], got {self.heavy_fraction}")
        if self.min_distance < 1:
            raise ValueError(f"min_distance must be >= 1 position, got {self.min_distance}")
        if self.min_queries < 1:
            raise ValueError(f"min_queries must be >= 1, got {self.min_queries}")

    @classmethod
    def for_length(cls, tokens: int, **thresholds: float) -> AttentionPatterns:
        """Thresholds for a ``tokens``-long sequence: ``min_distance`` a quarter of it (at most 32, at least 1)."""
        return cls(min_distance=max(1, min(32, tokens // 4)), **thresholds)


def far_attention_ratio(attn: torch.Tensor, min_distance: int, min_queries: int = 1) -> torch.Tensor:
    """Per key j of causal ``[..., T, T]`` maps: the mean of ``attn[t, j] / (1 / (t + 1))`` over queries
    ``t >= j + min_distance``: ``[..., T]``.

    1.0 = the uniform share. NaN where fewer than ``min_queries`` queries are that far (too few to judge).
    StreamingLLM's sinks (Xiao et al. 2023) draw attention from far-away queries whatever they say;
    counting only distant queries keeps a key that its neighbours attend to (local attention) from
    passing for one.
    """
    T = attn.shape[-1]
    q = torch.arange(T)[:, None]
    far = (q - torch.arange(T)[None, :]) >= min_distance  # [T, T]
    counts = far.sum(dim=0)  # [T]
    ratio = (attn.float() * (q + 1) * far).sum(dim=-2) / counts.clamp_min(1)
    return ratio.masked_fill(counts < max(1, min_queries), float("nan"))


def _queries(attn: torch.Tensor, min_query: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows at positions >= min_query (falls back to the last row when the sequence is shorter)."""
    T = attn.shape[-2]
    start = min(min_query, T - 1)
    return attn[..., start:, :], torch.arange(start, T, dtype=torch.float32)


def sink_share(attn: torch.Tensor, min_query: int = 32, key: int = 0) -> tuple[torch.Tensor, float]:
    """Mean attention that queries at positions >= min_query put on ``key``, per leading index.

    attn: ``[..., T, T]`` causal probabilities. Returns (``[...]`` mean share, the uniform share
    mean(1/(t+1)) over the same queries, what a key gets when attention is spread evenly).
    """
    rows, pos = _queries(attn, min_query)  # rows [..., Tq, T]
    return rows[..., key].mean(dim=-1), float((1.0 / (pos + 1)).mean())


def top_share(attn: torch.Tensor, fraction: float = 0.05, min_query: int = 32,
              skip_first: bool = False) -> tuple[torch.Tensor, float]:
    """Mean share of each query's attention on its top ``fraction`` of keys (at least one key).

    skip_first: leave key 0 (the sink) out and measure concentration among the other keys, renormalised.
    Returns (``[...]`` mean share, the uniform value k/(t+1) for the same queries).
    """
    rows, pos = _queries(attn, min_query)  # [..., Tq, T]
    shares, uniform = [], []
    for i, t in enumerate(pos.long().tolist()):
        row = rows[..., i, 1 if skip_first else 0: t + 1]  # [..., n_keys]
        n = row.shape[-1]
        if n == 0:
            continue
        k = max(1, math.ceil(fraction * n))
        mass = row.sum(dim=-1).clamp_min(1e-12)
        shares.append(row.topk(k, dim=-1).values.sum(dim=-1) / mass)
        uniform.append(k / n)
    return torch.stack(shares, dim=-1).mean(dim=-1), sum(uniform) / len(uniform)


def detect_patterns(attn: torch.Tensor, patterns: AttentionPatterns) -> pd.DataFrame:
    """One row per key of causal ``[T, T]`` maps (or ``[L, T, T]``, one per layer): the sink and heavy-hitter
    detector every page uses.

    accumulated: the key's column sum (H2O's score; layers averaged). far_queries: queries at least
    ``min_distance`` after it. received_vs_uniform: :func:`far_attention_ratio` (the largest over layers;
    NaN below ``min_queries`` far queries). sink: received_vs_uniform >= sink_ratio. heavy_hitter: among
    the top ``heavy_fraction`` of keys by accumulated attention.
    """
    maps = attn.float().reshape(-1, *attn.shape[-2:])  # [L, T, T]
    T = maps.shape[-1]
    far = far_attention_ratio(maps, patterns.min_distance, patterns.min_queries)  # [L, T]
    received = torch.where(far.isnan().all(dim=0), torch.nan, far.nan_to_num(float("-inf")).amax(dim=0))
    accumulated = maps.mean(dim=0).sum(dim=0)  # [T]
    k = min(T, max(1, math.ceil(patterns.heavy_fraction * T)))
    heavy = torch.zeros(T, dtype=torch.bool)
    heavy[accumulated.topk(k).indices] = True
    return pd.DataFrame({
        "position": range(T),
        "accumulated": accumulated.tolist(),
        "far_queries": (T - patterns.min_distance - torch.arange(T)).clamp_min(0).tolist(),
        "received_vs_uniform": received.tolist(),
        "sink": (received >= patterns.sink_ratio).tolist(),
        "heavy_hitter": heavy.tolist(),
    })


def accumulated_top_share(attn: torch.Tensor, fraction: float = 0.05, min_query: int = 32) -> torch.Tensor:
    """Share of the attention summed over queries >= min_query that the top ``fraction`` of keys collect (H2O).

    attn: ``[..., T, T]``. Keys are ranked by that sum (H2O's accumulated attention score); ``[...]``.
    """
    rows, _ = _queries(attn, min_query)  # [..., Tq, T]
    accumulated = rows.sum(dim=-2)  # [..., T]
    k = max(1, math.ceil(fraction * accumulated.shape[-1]))
    return accumulated.topk(k, dim=-1).values.sum(dim=-1) / accumulated.sum(dim=-1).clamp_min(1e-12)


def layer_summary(attn: torch.Tensor, min_query: int = 32, fraction: float = 0.05) -> pd.DataFrame:
    """Per layer of ``[L, H, T, T]``: attention on position 0 vs uniform, and how concentrated attention is.

    top_keys_share: per query, the share on its top ``fraction`` of keys (uniform: top_keys_uniform).
    accumulated_top_share: the share of attention summed over queries that the top ``fraction`` of keys
    collect (H2O's heavy hitters); accumulated_top_uniform: the same for uniform causal attention
    (above ``fraction``, since early keys are seen by more queries).
    """
    sink, uniform = sink_share(attn, min_query)  # [L, H]
    top, top_uniform = top_share(attn, fraction, min_query)  # [L, H]
    top_ns, _ = top_share(attn, fraction, min_query, skip_first=True)
    accumulated = accumulated_top_share(attn, fraction, min_query)  # [L, H]
    T = attn.shape[-1]
    flat = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1).unsqueeze(1)  # uniform causal [T, T]
    return pd.DataFrame({
        "layer": range(attn.shape[0]),
        "attn_on_pos0": sink.mean(dim=1).tolist(),
        "uniform_share": uniform,
        "pos0_vs_uniform": (sink.mean(dim=1) / uniform).tolist(),
        "max_head_attn_on_pos0": sink.max(dim=1).values.tolist(),
        "top_keys_share": top.mean(dim=1).tolist(),
        "top_keys_share_without_pos0": top_ns.mean(dim=1).tolist(),
        "top_keys_uniform": top_uniform,
        "accumulated_top_share": accumulated.mean(dim=1).tolist(),
        "accumulated_top_uniform": float(accumulated_top_share(flat, fraction, min_query)),
    })
