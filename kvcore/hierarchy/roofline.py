"""Roofline of prefill vs decode, the bytes a decode step moves, and what FlashAttention's tiling saves.

Follows LLM-Viewer (Yuan et al. 2024, "LLM Inference Unveiled"): a phase's arithmetic intensity is its
FLOPs over its HBM bytes; below the GPU's ridge point (peak FLOP/s / HBM bytes/s) it is memory-bound,
above it compute-bound. FLOPs and bytes come from :class:`~kvcore.sched.cost.CostModel` (weights read
once per step, KV read and written, FlashAttention-style attention that never stores the score matrix).
The attention I/O comparison follows Dao et al. 2022 (FlashAttention, Algorithm 0 vs tiling): standard
attention writes the T x T scores S = QK^T and probabilities P to HBM and reads them back; FlashAttention
keeps S and P tiles in on-chip SRAM, so HBM sees only Q, K, V and O.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from kvcore.sched.cost import CostModel, prefill_pairs


def _point(cost: CostModel, phase: str, new_tokens: int, pairs: int, kv_read: int, batch: int,
           context: int) -> dict:
    flops = cost.flops(new_tokens, pairs)
    weights = cost.weight_bytes
    kv_in, kv_out = cost.kv_bytes_per_token * kv_read, cost.kv_bytes_per_token * new_tokens
    total = cost.bytes_moved(new_tokens, kv_read)
    intensity = flops / total
    gpu = cost.gpu
    resident = weights + cost.kv_bytes_per_token * (kv_read + new_tokens)
    return {"phase": phase, "batch": batch, "context": context, "new_tokens": new_tokens,
            "flops": flops, "bytes": total, "weight_bytes": weights, "kv_read_bytes": kv_in,
            "kv_write_bytes": kv_out, "kv_share": (kv_in + kv_out) / total, "intensity": intensity,
            "ridge": gpu.ridge_point, "bound": "compute" if intensity >= gpu.ridge_point else "memory",
            "attainable_tflops": min(gpu.bf16_flops, intensity * gpu.hbm_bandwidth) / 1e12,
            "step_ms": cost.step_time(new_tokens, pairs, kv_read) * 1e3, "fits_in_hbm": resident <= gpu.hbm_bytes}


def prefill_point(cost: CostModel, prompt_tokens: int, batch: int = 1) -> dict:
    """Roofline numbers of prefilling ``batch`` prompts of ``prompt_tokens`` tokens from scratch."""
    if prompt_tokens < 1 or batch < 1:
        raise ValueError(f"prompt_tokens and batch must be >= 1, got {prompt_tokens}, {batch}")
    return _point(cost, "prefill", prompt_tokens * batch, batch * prefill_pairs(prompt_tokens, 0), 0, batch,
                  prompt_tokens)


def decode_point(cost: CostModel, batch: int, context: int) -> dict:
    """Roofline numbers of one decode step: ``batch`` sequences, each attending over ``context`` tokens."""
    if batch < 1 or context < 0:
        raise ValueError(f"batch must be >= 1 and context >= 0, got {batch}, {context}")
    return _point(cost, "decode", batch, batch * (context + 1), batch * context, batch, context)


def roofline_points(cost: CostModel, prompt_lengths: Iterable[int] = (128, 512, 2048, 8192, 32768),
                    batch_sizes: Iterable[int] = (1, 8, 32, 128), contexts: Iterable[int] = (1024, 8192, 32768),
                    ) -> pd.DataFrame:
    """Prefill at each prompt length (batch 1) and decode at each batch size x context, one row each."""
    contexts = list(contexts)
    rows = [prefill_point(cost, t) for t in prompt_lengths]
    rows += [decode_point(cost, b, c) for c in contexts for b in batch_sizes]
    df = pd.DataFrame(rows)
    df["label"] = [f"prefill T={r.context}" if r.phase == "prefill" else f"decode B={r.batch}, ctx={r.context}"
                   for r in df.itertuples()]
    return df


def roof(cost: CostModel, lo: float = 0.1, hi: float = 1e5, points: int = 60) -> pd.DataFrame:
    """The roof itself: attainable TFLOP/s = min(peak, intensity x HBM bandwidth) on a log grid."""
    step = (hi / lo) ** (1 / (points - 1))
    xs = sorted({lo * step**i for i in range(points)} | {cost.gpu.ridge_point})
    return pd.DataFrame({"intensity": xs,
                         "attainable_tflops": [min(cost.gpu.bf16_flops, x * cost.gpu.hbm_bandwidth) / 1e12
                                               for x in xs]})


def decode_bytes(cost: CostModel, batch: int, contexts: Iterable[int]) -> pd.DataFrame:
    """Bytes of one decode step split into weights, KV read (the context) and KV written, per context."""
    rows = []
    for c in contexts:
        p = decode_point(cost, batch, c)
        for part, col in (("weights", "weight_bytes"), ("KV read (context)", "kv_read_bytes"),
                          ("KV written (new token)", "kv_write_bytes")):
            rows.append({"context": c, "batch": batch, "part": part, "GB": p[col] / 1e9, "share": p[col] / p["bytes"]})
    return pd.DataFrame(rows)


def kv_crossover_context(cost: CostModel, batch: int) -> float:
    """Context length at which a decode step reads as many KV bytes as weight bytes."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return cost.weight_bytes / (batch * cost.kv_bytes_per_token)


def attention_io(cost: CostModel, context: int, q_tile: int = 128, score_bits: int = 16) -> pd.DataFrame:
    """HBM bytes and intensity of causal self-attention over ``context`` tokens (all layers, all query heads).

    Rows: standard attention (Q, K, V read; S written, read; P written, read; O written: 4 T d + 4 T^2
    elements per head), FlashAttention in one pass (Q, K, V read once, O written once: 4 T d), and
    FlashAttention-2 tiles without cache reuse (each query tile of ``q_tile`` rows streams the K and V
    it attends to from HBM: O(T^2 d / q_tile)). FLOPs are the same for all: 4 d per (query, key) pair.
    q_tile: query rows per tile (FA-2 uses 64-128). score_bits: precision of a materialized S and P.
    """
    if context < 1 or q_tile < 1:
        raise ValueError(f"context and q_tile must be >= 1, got {context}, {q_tile}")
    s, T = cost.shape, context
    d, heads = s.head_dim, s.num_layers * s.num_q_heads
    e = cost.kv_bits / 8  # bytes per element of Q, K, V, O
    flops = 4.0 * d * prefill_pairs(T, 0) * heads
    sp = 4.0 * T * T * score_bits / 8  # S written, S read (softmax), P written, P read (PV)
    streamed = sum(min((i + 1) * q_tile, T) for i in range(-(-T // q_tile)))  # keys each query tile reads
    methods = (("standard (S and P in HBM)", 4 * T * d * e, sp),
               ("FlashAttention (Q, K, V, O once)", 4 * T * d * e, 0.0),
               (f"FlashAttention-2 tiles of {q_tile} rows, K/V re-read per tile", (2 * T * d + 2 * d * streamed) * e,
                0.0))
    ridge = cost.gpu.ridge_point
    rows = []
    for name, qkvo, scores in methods:
        total = (qkvo + scores) * heads
        rows.append({"method": name, "context": T, "qkvo_bytes": qkvo * heads, "score_bytes": scores * heads,
                     "bytes": total, "flops": flops, "intensity": flops / total,
                     "bound": "compute" if flops / total >= ridge else "memory"})
    return pd.DataFrame(rows)


def prefill_with_scores(cost: CostModel, prompt_tokens: int, score_bits: int = 16) -> pd.DataFrame:
    """Whole-model prefill intensity as the cost model has it (FlashAttention) vs with S and P in HBM."""
    base = prefill_point(cost, prompt_tokens)
    s = cost.shape
    extra = 4.0 * prompt_tokens**2 * score_bits / 8 * s.num_layers * s.num_q_heads
    rows = [{"prefill": "FlashAttention (cost model)", "bytes": base["bytes"], "flops": base["flops"]},
            {"prefill": "S and P materialized", "bytes": base["bytes"] + extra, "flops": base["flops"]}]
    df = pd.DataFrame(rows)
    df["context"] = prompt_tokens
    df["intensity"] = df["flops"] / df["bytes"]
    df["bound"] = ["compute" if x >= cost.gpu.ridge_point else "memory" for x in df["intensity"]]
    return df
