"""Paged decode attention in batched torch ops: the reference every other path is tested against, and the fallback.

Follows flash-decoding (Dao et al. 2023) and vLLM PagedAttention V2's split-K: step ``i`` attends tokens
``[i*C, (i+1)*C)`` of every sequence that reaches that far, all at once, and the partial softmax states
``(m, l, o)`` = (max score, sum of exp(score - m), sum of exp(score - m) * value) are merged at the end, so
the softmax stays exact while no step holds more than ``C`` tokens. Sequences are sorted by length so the
ones still active at step ``i`` are a prefix of the batch; only chunks where a sequence ends are masked. A
quantized pool (:class:`kvcore.quant.QuantizedTensor`) is dequantized one step's blocks at a time, so the
fp32 cache never exists whole. Runs on any device and dtype (fp32 math).
"""

from __future__ import annotations

import bisect
import math

import torch

from kvcore.quant.integer import QuantizedTensor

Cache = torch.Tensor | QuantizedTensor  # [num_blocks, block_size, Hkv, D], plain or quantized along D

CHUNK_ELEMENTS = 1 << 25  # K elements gathered per step (128 MiB in fp32), bounds the workspace


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Contiguous attention: query [B, Hq, D]; keys/values [B, Hkv, T, D] -> [B, Hq, D] (fp32 math)."""
    B, Hq, D = query.shape
    Hkv = keys.shape[1]
    q = query.float().reshape(B, Hkv, Hq // Hkv, D)  # [B, Hkv, G, D]: query head h reads KV head h // G
    scores = (q @ keys.float().transpose(-1, -2)) * scale  # [B, Hkv, G, T]
    out = torch.softmax(scores, dim=-1) @ values.float()  # [B, Hkv, G, D]
    return out.reshape(B, Hq, D).to(query.dtype)


def read_blocks(cache: Cache, ids: torch.Tensor) -> torch.Tensor:
    """Blocks ``ids`` (1-D) of a pool as fp32 ``[len(ids), block_size, Hkv, D]``; a quantized pool is
    dequantized here, for these blocks only."""
    if not isinstance(cache, QuantizedTensor):
        return cache.index_select(0, ids).float()

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, ids)

    return QuantizedTensor(take(cache.codes), take(cache.scales), take(cache.zeros), cache.bits, cache.axis,
                           cache.group_size, (ids.numel(), *cache.shape[1:]), torch.float32).dequantize()


def chunk_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk's partial softmax state: q [n, Hkv, G, D] (scaled); k/v [n, Hkv, C, D]; mask [n, 1, 1, C]
    (True = attend) or None. Returns m, l [n, Hkv, G, 1] and o [n, Hkv, G, D]."""
    scores = q @ k.transpose(-1, -2)  # [n, Hkv, G, C]
    if mask is not None:
        scores.masked_fill_(~mask, -math.inf)
    m = scores.amax(dim=-1, keepdim=True)
    p = (scores - m).exp_()
    return m, p.sum(dim=-1, keepdim=True), p @ v


def paged_attention_torch(query: torch.Tensor, key_cache: Cache, value_cache: Cache, block_tables: torch.Tensor,
                          lengths: list[int], scale: float, chunk_tokens: int | None = None) -> torch.Tensor:
    """Paged decode attention in steps of ``chunk_tokens`` tokens over all active sequences at once.

    query ``[B, Hq, D]``; key_cache/value_cache ``[num_blocks, block_size, Hkv, D]`` tensors or
    :class:`kvcore.quant.QuantizedTensor` pools quantized along D; block_tables int ``[B, max_blocks]``;
    lengths: tokens per sequence (B >= 1, inputs valid); chunk_tokens: tokens per step (None: as many as keep
    a step's K within :data:`CHUNK_ELEMENTS`; rounded down to whole blocks). Returns ``[B, Hq, D]`` in the
    query's dtype.
    """
    B, Hq, D = query.shape
    num_blocks, block_size, Hkv, _ = key_cache.shape
    device = key_cache.device
    if chunk_tokens is None:
        chunk_tokens = CHUNK_ELEMENTS // max(1, B * Hkv * D)
    order = sorted(range(B), key=lambda b: -lengths[b])  # longest first: active sequences are a prefix
    lens = [lengths[b] for b in order]
    order_t = torch.tensor(order, device=device)
    # Table padding past a sequence's end may be anything: clamp to a real block, its tokens are masked.
    tables = block_tables.to(device=device, dtype=torch.long)[order_t].clamp(0, num_blocks - 1)  # [B, max_blocks]
    lens_t = torch.tensor(lens, device=device)
    q = (query.to(device).float()[order_t] * scale).reshape(B, Hkv, Hq // Hkv, D)  # [B, Hkv, G, D]
    chunk_blocks = max(1, chunk_tokens // block_size)
    chunk = chunk_blocks * block_size
    descending = [-t for t in lens]
    partials = []
    for start in range(0, lens[0], chunk):
        n = bisect.bisect_left(descending, -start)  # sequences longer than `start`
        width = min(chunk, lens[0] - start)
        first = start // block_size
        ids = tables[:n, first: first + -(-width // block_size)]  # [n, nbl]
        k, v = (read_blocks(c, ids.reshape(-1)).view(n, -1, Hkv, D)[:, :width] for c in (key_cache, value_cache))
        mask = None
        if lens[n - 1] < start + width:  # some sequence ends inside this chunk
            valid = torch.arange(start, start + width, device=device)[None, :] < lens_t[:n, None]  # [n, width]
            v = v.masked_fill(~valid[:, :, None, None], 0.0)  # slots past the end may hold NaN; 0 * NaN = NaN
            mask = valid[:, None, None, :]
        partials.append((n, *chunk_partial(q[:n], k.transpose(1, 2), v.transpose(1, 2), mask)))
    out = merge(partials, (B, Hkv, Hq // Hkv, D), device)
    result = torch.empty_like(out)
    result[order_t] = out  # undo the sort
    return result.reshape(B, Hq, D).to(query.dtype)


def merge(partials: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]], shape: tuple[int, ...],
          device: torch.device) -> torch.Tensor:
    """Reduce chunk partials ``(n, m, l, o)``, each for the first n sequences: ``sum e^(m-M) o / sum e^(m-M) l``."""
    top = torch.full((*shape[:-1], 1), -math.inf, device=device)
    for n, m, _, _ in partials:
        top[:n] = torch.maximum(top[:n], m)
    numerator = torch.zeros(shape, device=device)
    denominator = torch.zeros((*shape[:-1], 1), device=device)
    for n, m, l, o in partials:
        w = torch.exp(m - top[:n])
        numerator[:n] += w * o
        denominator[:n] += w * l
    return numerator / denominator
