"""Decode attention: a contiguous reference and a paged version reading K/V through block tables.

The paged version follows vLLM's PagedAttention contract (Kwon et al., SOSP 2023): K/V live in
``[num_blocks, block_size, Hkv, D]`` pools and each sequence names its blocks in a block table.
This implementation gathers the blocks with one index operation and masks past ``seq_lens``; it is
the clear version (a fused kernel would stream blocks without materializing the gather).
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_query(query: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    if query.dim() != 3:
        raise ValueError(f"query must be [B, Hq, D], got shape {tuple(query.shape)}")
    if query.dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {query.dtype}")
    if query.shape[2] != head_dim:
        raise ValueError(f"query head_dim {query.shape[2]} != K/V head_dim {head_dim}")
    if num_kv_heads < 1 or query.shape[1] % num_kv_heads:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of KV heads ({num_kv_heads})")


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    """query [B, Hq, D]; keys/values [B, Hkv, T, D]; mask [B, T] (True = attend). fp32 math."""
    B, Hq, D = query.shape
    Hkv = keys.shape[1]
    q = query.float().reshape(B, Hkv, Hq // Hkv, D)  # [B, Hkv, G, D]: query head h reads KV head h // G
    scores = (q @ keys.float().transpose(-1, -2)) * scale  # [B, Hkv, G, T]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ values.float()  # [B, Hkv, G, D]
    return out.reshape(B, Hq, D).to(query.dtype)  # [B, Hq, D]


def contiguous_decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                scale: float | None = None) -> torch.Tensor:
    """Attention of one new query token per sequence over contiguous K/V; the reference.

    query ``[B, Hq, D]``; keys/values ``[B, Hkv, T, D]``; scale defaults to 1/sqrt(D).
    Returns ``[B, Hq, D]`` in the query's dtype (softmax and sums in fp32).
    """
    if keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(f"keys and values must both be [B, Hkv, T, D], got {tuple(keys.shape)} and "
                         f"{tuple(values.shape)}")
    _check_query(query, keys.shape[1], keys.shape[3])
    if keys.shape[0] != query.shape[0] or keys.shape[2] < 1:
        raise ValueError(f"keys must hold the query's batch ({query.shape[0]}) and >= 1 token, "
                         f"got {tuple(keys.shape)}")
    scale = 1.0 / math.sqrt(query.shape[2]) if scale is None else scale
    return _attend(query, keys, values, None, scale)


def _check_paged(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"key_cache and value_cache must both be [num_blocks, block_size, Hkv, D], got "
                         f"{tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    _check_query(query, key_cache.shape[2], key_cache.shape[3])
    B = query.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.is_floating_point():
        raise ValueError(f"block_tables must be an int tensor [B={B}, max_blocks], got "
                         f"{block_tables.dtype} {tuple(block_tables.shape)}")
    if seq_lens.shape != (B,) or seq_lens.is_floating_point():
        raise ValueError(f"seq_lens must be an int tensor [B={B}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    num_blocks, block_size = key_cache.shape[:2]
    if B and (int(seq_lens.min()) < 1 or int(seq_lens.max()) > block_tables.shape[1] * block_size):
        raise ValueError(f"seq_lens must be in 1..max_blocks*block_size ({block_tables.shape[1] * block_size}), "
                         f"got {seq_lens.tolist()}")
    needed = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] * block_size \
        < seq_lens.to(block_tables.device)[:, None]  # [B, max_blocks]: blocks holding tokens
    used = block_tables[needed]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
        raise ValueError(f"block_tables name blocks outside 0..{num_blocks - 1}")


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """Decode attention reading each sequence's K/V through its block table (vLLM PagedAttention).

    query ``[B, Hq, D]``; key_cache/value_cache ``[num_blocks, block_size, Hkv, D]``; block_tables int
    ``[B, max_blocks]`` (entries past a sequence's last block are ignored, any value);
    seq_lens int ``[B]`` tokens per sequence; scale defaults to 1/sqrt(D). Hq must be a multiple of Hkv.
    Returns ``[B, Hq, D]`` in the query's dtype (fp32 accumulation).
    """
    _check_paged(query, key_cache, value_cache, block_tables, seq_lens)
    B, _, D = query.shape
    num_blocks, block_size, Hkv, _ = key_cache.shape
    max_blocks = block_tables.shape[1]
    device = key_cache.device
    seq_lens = seq_lens.to(device)
    positions = torch.arange(max_blocks * block_size, device=device)  # [max_blocks * block_size]
    mask = positions[None, :] < seq_lens[:, None]  # [B, T_max]
    blocks = block_tables.to(device=device, dtype=torch.long).clamp(0, num_blocks - 1)  # padding -> any block
    heads = torch.arange(Hkv, device=device)
    # Gather head-major: index [B, 1, max_blocks] x [1, Hkv, 1] -> [B, Hkv, max_blocks, block_size, D]
    index = (blocks[:, None, :], slice(None), heads[None, :, None])
    keys = key_cache[index].reshape(B, Hkv, max_blocks * block_size, D)  # [B, Hkv, T_max, D]
    values = value_cache[index].reshape(B, Hkv, max_blocks * block_size, D)  # [B, Hkv, T_max, D]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    return _attend(query.to(device), keys, values, mask, scale)
