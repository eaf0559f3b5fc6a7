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
    """Thresholds that call a key a sink or a heavy hitter.

    sink_ratio: a key is a sink when the mean attention it gets from later queries (at positions
    >= min_query) is at least ``sink_ratio`` times the uniform share 1/(t+1).
    heavy_fraction: the share of keys (0-1] with the largest accumulated attention called heavy hitters.
    min_query: queries before this position are ignored (every key is "large" when there are few).
    """

    sink_ratio: float = 5.0
    heavy_fraction: float = 0.05
    min_query: int = 32

    def __post_init__(self) -> None:
        if not self.sink_ratio > 1.0:
            raise ValueError(f"sink_ratio must be > 1 (a multiple of the uniform share), got {self.sink_ratio}")
        if not 0.0 < self.heavy_fraction <= 1.0:
            raise ValueError(f"heavy_fraction must be in (0, 1], got {self.heavy_fraction}")
        if self.min_query < 0:
            raise ValueError(f"min_query must be >= 0, got {self.min_query}")


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
    """One row per key position of a ``[Tq, Tk]`` map: mean and accumulated attention, sink and heavy-hitter flags.

    received: mean attention the key gets from queries at >= min_query that can see it, divided by the
    mean uniform share for those queries (1.0 = average). accumulated: column sum over all queries (H2O).
    """
    Tq, Tk = attn.shape
    offset = Tk - Tq  # queries are the last Tq positions
    q_pos = torch.arange(Tq) + offset
    accumulated = attn.sum(dim=0)  # [Tk]
    ratios = []
    for j in range(Tk):
        sel = q_pos >= max(j, patterns.min_query)
        if not bool(sel.any()):
            ratios.append(float("nan"))
            continue
        ratios.append(float(attn[sel, j].mean() / (1.0 / (q_pos[sel].float() + 1)).mean()))
    k = max(1, math.ceil(patterns.heavy_fraction * Tk))
    heavy = set(accumulated.topk(min(k, Tk)).indices.tolist())
    return pd.DataFrame({
        "position": range(Tk),
        "accumulated": accumulated.tolist(),
        "received_vs_uniform": ratios,
        "sink": [r >= patterns.sink_ratio for r in ratios],
        "heavy_hitter": [j in heavy for j in range(Tk)],
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
