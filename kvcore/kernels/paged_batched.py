"""Paged decode attention vectorized across the batch: chunks of block columns, longest sequences first.

Follows flash-decoding (Dao et al. 2023) and vLLM PagedAttention V2's split-K: step ``i`` attends
tokens ``[i*C, (i+1)*C)`` of every sequence that reaches that far, all at once, and the partial softmax
states are merged at the end. Sequences are sorted by length so the ones still active at step ``i`` are
a prefix of the batch (no work for finished ones); only chunks where a sequence ends are masked. This is
the device path (few large kernels beat many small ones on a GPU) and the CPU path for short sequences.
A quantized pool (:class:`kvcore.quant.QuantizedTensor`) is dequantized one step's blocks at a time,
so the fp32 cache never exists whole (the step is bounded by :data:`DEVICE_CHUNK_ELEMENTS`).
"""

from __future__ import annotations

import bisect

import torch

from kvcore.kernels.flash import chunk_partial, empty_partials, merge_partials
from kvcore.quant.integer import QuantizedTensor

Cache = torch.Tensor | QuantizedTensor  # [num_blocks, block_size, Hkv, D], plain or quantized along D

DEVICE_CHUNK_ELEMENTS = 1 << 25  # K elements gathered per step (128 MiB in fp32), bounds the workspace


def batched_chunk_tokens(batch: int, num_kv_heads: int, head_dim: int, block_size: int,
                         elements: int = DEVICE_CHUNK_ELEMENTS) -> int:
    """Tokens per step so that ``batch x tokens x Hkv x D`` stays within ``elements`` (whole blocks)."""
    tokens = elements // max(1, batch * num_kv_heads * head_dim)
    return max(block_size, tokens // block_size * block_size)


def read_blocks(cache: Cache, ids: torch.Tensor) -> torch.Tensor:
    """Blocks ``ids`` (1-D) of a pool as ``[len(ids), block_size, Hkv, D]``; a quantized pool is
    dequantized here, for these blocks only, to fp32."""
    if not isinstance(cache, QuantizedTensor):
        return cache.index_select(0, ids)

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, ids)

    return QuantizedTensor(take(cache.codes), take(cache.scales), take(cache.zeros), cache.bits, cache.axis,
                           cache.group_size, (ids.numel(), *cache.shape[1:]), torch.float32).dequantize()


def gather_tokens(cache: Cache, ids: torch.Tensor, width: int) -> torch.Tensor:
    """fp32 tokens ``[n, width, Hkv, D]`` of block ids ``[n, nbl]`` (``nbl * block_size >= width``)."""
    n = ids.shape[0]
    blocks = read_blocks(cache, ids.reshape(-1))  # [n * nbl, block_size, Hkv, D]
    return blocks.view(n, -1, *blocks.shape[2:])[:, :width].float()  # [n, width, Hkv, D]


def mask_tails(v: torch.Tensor, lens: torch.Tensor, start: int) -> torch.Tensor:
    """Zero the value rows past each sequence's end; return the attend mask ``[n, 1, 1, width]``.

    v: fp32 ``[n, width, Hkv, D]`` holding tokens ``[start, start + width)``; lens: ``[n]`` lengths.
    Slots past the end may hold anything, NaN included, and 0 * NaN = NaN, so masking scores is not
    enough.
    """
    width = v.shape[1]
    valid = torch.arange(start, start + width, device=v.device)[None, :] < lens[:, None]  # [n, width]
    v.masked_fill_(~valid[:, :, None, None], 0.0)
    return valid[:, None, None, :]  # [n, 1, 1, width]


def paged_attention_batched(query: torch.Tensor, key_cache: Cache, value_cache: Cache,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                            chunk_tokens: int) -> torch.Tensor:
    """Paged decode attention in steps of ``chunk_tokens`` tokens over all active sequences at once.

    query ``[B, Hq, D]``; key_cache/value_cache ``[num_blocks, block_size, Hkv, D]`` tensors or
    :class:`kvcore.quant.QuantizedTensor` pools quantized along D; block_tables int
    ``[B, max_blocks]``; seq_lens int ``[B]`` (tokens); scale: softmax scale; chunk_tokens: tokens per
    step (rounded down to whole blocks, at least one). Inputs are assumed valid and B >= 1. Returns
    ``[B, Hq, D]`` in the query's dtype, fp32 accumulation.
    """
    B, Hq, D = query.shape
    num_blocks, block_size, Hkv, _ = key_cache.shape
    device = key_cache.device
    lens_all = seq_lens.to(device=device, dtype=torch.long)
    order = torch.argsort(lens_all, descending=True, stable=True)
    lens = lens_all[order]  # [B], longest first
    lens_host = lens.tolist()
    # Table padding past a sequence's end may be -1: clamp to a real block, its tokens are masked.
    tables = block_tables.to(device=device, dtype=torch.long)[order].clamp(0, num_blocks - 1)  # [B, max_blocks]
    q = (query.to(device).float()[order] * scale).reshape(B, Hkv, Hq // Hkv, D)  # [B, Hkv, G, D]
    chunk_blocks = max(1, chunk_tokens // block_size)
    chunk = chunk_blocks * block_size
    num_chunks = -(-lens_host[0] // chunk)
    m, l, o = empty_partials(num_chunks, (B, Hkv, Hq // Hkv), D, device)
    descending = [-t for t in lens_host]  # ascending keys for bisect
    for i in range(num_chunks):
        start = i * chunk
        n = bisect.bisect_left(descending, -start)  # sequences longer than `start`
        width = min(chunk, lens_host[0] - start)
        ids = tables[:n, i * chunk_blocks: i * chunk_blocks + -(-width // block_size)]  # [n, nbl]
        k = gather_tokens(key_cache, ids, width)  # [n, width, Hkv, D]
        v = gather_tokens(value_cache, ids, width)  # [n, width, Hkv, D]
        mask = mask_tails(v, lens[:n], start) if lens_host[n - 1] < start + width else None
        # [n, width, Hkv, D] -> [n, Hkv, width, D] views; matmul copies them where BLAS needs it
        chunk_partial(q[:n], k.transpose(1, 2), v.transpose(1, 2), m[i, :n], l[i, :n], o[i, :n], mask)
    out = torch.empty(B, Hkv, Hq // Hkv, D, device=device)
    out[order] = merge_partials(m, l, o)  # undo the sort
    return out.reshape(B, Hq, D).to(query.dtype)  # [B, Hq, D]
