"""Caches built from one shared prefill: every eviction policy's choice and every quantized store of the same prompt.

In prefill mode (kvpress: compress once after the prompt) the prompt's keys, values and queries are the same for
every method until the compression, so the prompt is read once with the full cache and each method's cache is
made from it: an eviction policy keeps its choice of tokens per layer and KV head (what
:func:`~kvcore.eviction.runner.run_prefill`'s hook keeps: the policy observes the attention of the prompt's
queries, recomputed from them, then keeps its top ``k``), a quantizer stores the same keys and values (a
quantized layer lets the pass that writes tokens read them exactly, so the prompt's own forward is the full
cache's). The full cache and the eviction policies share one batched cache, one row each, every row padded to
the batch's longest with the padding hidden by an attention mask, so their answers decode together (a one-token
step of a small model costs about the same for one row as for ten: it reads the weights once); the quantizers
share another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvcore.eviction import TOVA, EvictionPolicy, EvictionState, SnapKV, causal_attention, gather_kv, group_attention
from kvcore.models.cache import LabCache
from kvcore.models.plan import FULL
from kvcore.quant.hf_cache import nbytes_per_row, quantized_plan
from kvcore.quant.methods import QuantMethod


@dataclass(slots=True)
class Prefill:
    """The prompt read once. keys, values: per layer ``[1, Hkv, T, D]``. queries: per layer ``[1, Hq, T, D]``
    (RoPE applied), or None when no method reads attention. nbytes: bytes the full cache holds."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    queries: list[torch.Tensor] | None
    nbytes: int

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[2]


def query_rows(policy: EvictionPolicy) -> int | None:
    """How many of the prompt's last queries a policy's scores read (None: all of them). SnapKV reads its
    observation window, TOVA the last query; H2O, LRU and observed attention sum every query's attention."""
    if isinstance(policy, SnapKV):
        return policy.window
    if isinstance(policy, TOVA):
        return 1
    return None


def choose(prefill: Prefill, policies: Sequence[EvictionPolicy], budgets: Sequence[int]) -> list[list[torch.Tensor]]:
    """For each policy at its budget, per layer, the kept token indices ``[1, Hkv, k]`` (sorted).

    Each layer's attention is computed once for every policy that reads it (group-averaged per KV head), from the
    last queries the most demanding policy needs.
    """
    readers = [p for p in policies if p.needs_attention]
    if readers and prefill.queries is None:
        raise ValueError("policies that read attention need the prompt's queries")
    needed = [query_rows(p) for p in readers]
    rows = None if None in needed else max(needed, default=0)
    chosen: list[list[torch.Tensor]] = [[] for _ in policies]
    for layer, (keys, values) in enumerate(zip(prefill.keys, prefill.values, strict=True)):
        B, Hkv, T, _ = keys.shape
        attn = None
        if readers:
            q = prefill.queries[layer]  # [1, Hq, T, D]
            q = q if rows is None else q[:, :, -min(rows, T):]
            attn = group_attention(causal_attention(q, keys), Hkv)  # [1, Hkv, Tq, T]
        for i, (policy, k) in enumerate(zip(policies, budgets, strict=True)):
            state = EvictionState.empty(B, Hkv, keys.device, layer)
            state.append(T)
            if policy.needs_attention:
                policy.observe(state, attn)
            chosen[i].append(policy.select(state, keys, values, k))
    return chosen


def kept_share(kept: Sequence[torch.Tensor], span: tuple[int, int]) -> float:
    """Share of the entries of tokens ``[start, stop)`` (over layers and KV heads) that a choice keeps.

    kept: per layer, kept positions ``[1, Hkv, k]``.
    """
    start, stop = span
    inside = [((idx >= start) & (idx < stop)).sum(dim=-1).float() for idx in kept]  # each [1, Hkv]
    return float(torch.stack(inside).mean()) / (stop - start)


def padded_cache(model, prefill: Prefill, rows: Sequence[Sequence[torch.Tensor] | None]
                 ) -> tuple[LabCache, torch.Tensor]:
    """A cache with one batch row per choice, and which of its ``T`` entries each row may read ``[B, T]``.

    Row ``i`` holds, at the front of layer ``l``, the tokens ``rows[i][l]`` ``[1, Hkv, k_i]`` (None: every token
    of the prompt), padded to the prompt's ``T`` entries; the padding is never read (pass the mask to every step:
    :func:`~kvcore.needle.answer.greedy_answers`). Kept keys carry their rotation and the next token goes at
    position ``T``, so every row continues at the original positions.
    """
    B, T = len(rows), prefill.num_tokens
    sizes = torch.tensor([T if row is None else row[0].shape[-1] for row in rows])
    readable = torch.arange(T)[None, :] < sizes[:, None]  # [B, T]
    cache = FULL.new_cache(model)
    for layer, (keys, values) in enumerate(zip(prefill.keys, prefill.values, strict=True)):
        K, V = keys.new_zeros(B, *keys.shape[1:]), values.new_zeros(B, *values.shape[1:])  # [B, Hkv, T, D]
        for i, row in enumerate(rows):
            k = int(sizes[i])
            K[i, :, :k] = keys[0] if row is None else gather_kv(keys, row[layer])[0]  # [Hkv, k, D]
            V[i, :, :k] = values[0] if row is None else gather_kv(values, row[layer])[0]
        cache.update(K, V, layer)
    return cache, readable.to(prefill.keys[0].device)


def quantized_cache(model, prefill: Prefill, methods: Sequence[QuantMethod]) -> tuple[LabCache, list[int]]:
    """A cache with one batch row per quantization method, each holding the prompt stored its way; and the
    exact bytes each row holds."""
    B = len(methods)
    cache = quantized_plan(list(methods)).new_cache(model)
    for layer, (keys, values) in enumerate(zip(prefill.keys, prefill.values, strict=True)):
        cache.update(keys.expand(B, -1, -1, -1), values.expand(B, -1, -1, -1), layer)
    return cache, nbytes_per_row(cache)
