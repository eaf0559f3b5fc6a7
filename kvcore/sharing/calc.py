"""KV memory of MHA, GQA and MQA versions of the same model, and what fits on a GPU after the weights.

A model with ``Hq`` query heads can keep ``Hkv`` key/value heads for any divisor ``Hkv`` of ``Hq``:
``Hkv = Hq`` is multi-head attention (MHA, Vaswani et al. 2017), ``Hkv = 1`` multi-query attention (MQA,
Shazeer 2019), anything between grouped-query attention (GQA, Ainslie et al. 2023), where query head
``q`` reads KV head ``q // (Hq / Hkv)``. KV bytes scale with ``Hkv`` (:func:`kvcore.shapes.kv_bytes`,
the lab's one formula); the K and V projection weights shrink too (``2 x layers x hidden x Hkv x
head_dim`` parameters), everything else in the model stays. No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pandas as pd

from kvcore.shapes import GpuSpec, ModelShape, kv_bytes, tokens_that_fit, weight_bytes


def divisors(n: int) -> list[int]:
    """Divisors of ``n`` from largest to smallest (``n`` first, 1 last)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [d for d in range(n, 0, -1) if n % d == 0]


def with_kv_heads(shape: ModelShape, num_kv_heads: int) -> ModelShape:
    """``shape.with_kv_heads`` with the parameter count adjusted for the smaller (or larger) K/V projections.

    Needs ``hidden_size`` to adjust; a shape without it keeps its parameter count.
    """
    if num_kv_heads < 1 or shape.num_q_heads % num_kv_heads:
        raise ValueError(f"{shape.name}: KV heads must divide its {shape.num_q_heads} query heads; allowed "
                         f"{divisors(shape.num_q_heads)}, got {num_kv_heads}")
    variant = shape.with_kv_heads(num_kv_heads)
    if not shape.hidden_size:
        return variant
    delta = 2 * shape.num_layers * shape.hidden_size * (num_kv_heads - shape.num_kv_heads) * shape.head_dim
    return replace(variant, num_params=shape.num_params + delta)


def head_variants(shape: ModelShape, kv_heads: Sequence[int] | None = None) -> list[ModelShape]:
    """MHA, GQA and MQA versions of ``shape``: one per KV head count (default every divisor of the query heads).

    Returned from most KV heads (MHA) to fewest (MQA); parameters adjusted as in :func:`with_kv_heads`.
    """
    counts = divisors(shape.num_q_heads) if kv_heads is None else sorted(set(kv_heads), reverse=True)
    return [with_kv_heads(shape, h) for h in counts]


def kv_heads_table(shape: ModelShape, num_tokens: int, batch_size: int = 1, bits: int = 16,
                   gpu: GpuSpec | None = None, kv_heads: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per KV head count: KV bytes per token and in total, and (with a GPU) what fits after the weights.

    num_tokens: context length; batch_size: sequences; bits: KV precision (weights at 16 bits).
    ``max_batch_at_context``: sequences of ``num_tokens`` tokens whose KV fits next to the weights;
    ``weights_fit``: whether the 16-bit weights alone fit the GPU (when they do not, nothing else does).
    """
    if num_tokens < 1 or batch_size < 1:
        raise ValueError(f"context length and batch size must be >= 1, got {num_tokens} and {batch_size}")
    mha = kv_bytes(shape.with_kv_heads(shape.num_q_heads), 1, 1, bits)
    rows = []
    for v in head_variants(shape, kv_heads):
        per_token = kv_bytes(v, 1, 1, bits)
        row = {
            "model": shape.name, "attention": v.attention_kind, "kv_heads": v.num_kv_heads,
            "q_heads_per_kv_head": v.group_size, "kv_bits": bits, "kv_bytes_per_token": per_token,
            "kv_vs_mha": per_token / mha, "tokens": num_tokens, "batch": batch_size,
            "kv_bytes_total": kv_bytes(v, num_tokens, batch_size, bits), "params": v.num_params,
            "weights_GB_16bit": weight_bytes(v) / 1e9,
        }
        if gpu is not None:
            fit = tokens_that_fit(v, gpu, bits)
            row |= {"gpu": gpu.name, "weights_fit": weight_bytes(v) <= gpu.hbm_bytes, "tokens_fit_after_weights": fit,
                    "max_batch_at_context": fit // num_tokens}
        rows.append(row)
    return pd.DataFrame(rows)


def fit_table(shape: ModelShape, gpu: GpuSpec, bits: int = 16, contexts: Sequence[int] | None = None,
              kv_heads: Sequence[int] | None = None) -> pd.DataFrame:
    """Sequences that fit on ``gpu`` after the weights, per context length and KV head count (a chart's data).

    contexts: context lengths in tokens (default powers of two from 512 to the model's max context,
    at least 8192). Columns: ``variant, kv_heads, context, max_batch``.
    """
    if contexts is None:
        top = max(8192, shape.max_context)
        contexts = [2**p for p in range(9, 40) if 2**p <= top]
    if not contexts or min(contexts) < 1:
        raise ValueError(f"contexts must be positive token counts, got {list(contexts)}")
    rows = []
    for v in head_variants(shape, kv_heads):
        fit = tokens_that_fit(v, gpu, bits)
        label = f"{v.attention_kind} ({v.num_kv_heads} KV)"
        rows += [{"variant": label, "kv_heads": v.num_kv_heads, "context": c, "max_batch": fit // c}
                 for c in contexts]
    return pd.DataFrame(rows)


def group_map(num_q_heads: int, num_kv_heads: int) -> pd.DataFrame:
    """Which KV head each query head reads: ``q_head, kv_head`` (``kv_head = q_head // (Hq / Hkv)``, as repeat_kv)."""
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"KV heads must divide the {num_q_heads} query heads; allowed {divisors(num_q_heads)}, "
                         f"got {num_kv_heads}")
    size = num_q_heads // num_kv_heads
    return pd.DataFrame({"q_head": range(num_q_heads), "kv_head": [q // size for q in range(num_q_heads)]})
