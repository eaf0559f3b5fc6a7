"""Input checks shared by the decode-attention kernels: one clear ValueError per wrong argument."""

from __future__ import annotations

import torch

from kvcore.quant.integer import QuantizedTensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_query(query: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    """Raise unless ``query`` is a float ``[B, Hq, D]`` with Hq a multiple of ``num_kv_heads``."""
    if query.dim() != 3:
        raise ValueError(f"query must be [B, Hq, D], got shape {tuple(query.shape)}")
    if query.dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {query.dtype}")
    if query.shape[2] != head_dim:
        raise ValueError(f"query head_dim {query.shape[2]} != K/V head_dim {head_dim}")
    if num_kv_heads < 1 or query.shape[1] % num_kv_heads:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of KV heads ({num_kv_heads})")


def check_block_tables(block_tables: torch.Tensor, seq_lens: torch.Tensor, batch: int, num_blocks: int,
                       block_size: int) -> None:
    """Raise unless the tables and lengths are int ``[B, max_blocks]`` / ``[B]`` naming blocks in the pool.

    Only the table entries that hold tokens (the first ``ceil(seq_len / block_size)`` of each row) must
    be valid block ids; the rest are padding and may hold anything (vLLM pads with 0 or -1).
    """
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.is_floating_point():
        raise ValueError(f"block_tables must be an int tensor [B={batch}, max_blocks], got "
                         f"{block_tables.dtype} {tuple(block_tables.shape)}")
    if seq_lens.shape != (batch,) or seq_lens.is_floating_point():
        raise ValueError(f"seq_lens must be an int tensor [B={batch}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    capacity = block_tables.shape[1] * block_size
    if batch and (int(seq_lens.min()) < 1 or int(seq_lens.max()) > capacity):
        raise ValueError(f"seq_lens must be in 1..max_blocks*block_size ({capacity}), got {seq_lens.tolist()}")
    needed = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] * block_size \
        < seq_lens.to(block_tables.device)[:, None]  # [B, max_blocks]: blocks holding tokens
    used = block_tables[needed]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
        raise ValueError(f"block_tables name blocks outside 0..{num_blocks - 1}")


def check_paged(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """Raise unless the arguments follow the ``paged_decode_attention`` contract (vLLM cache layout)."""
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"key_cache and value_cache must both be [num_blocks, block_size, Hkv, D], got "
                         f"{tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    if key_cache.dtype not in FLOAT_DTYPES or value_cache.dtype not in FLOAT_DTYPES:
        raise ValueError(f"cache dtype must be float32, float16 or bfloat16, got {key_cache.dtype}, "
                         f"{value_cache.dtype}")
    check_query(query, key_cache.shape[2], key_cache.shape[3])
    check_block_tables(block_tables, seq_lens, query.shape[0], key_cache.shape[0], key_cache.shape[1])


def check_quantized(query: torch.Tensor, key_cache: QuantizedTensor, value_cache: QuantizedTensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, bits: tuple[int, ...]) -> None:
    """Raise unless the arguments follow the ``quantized_paged_decode_attention`` contract (widths in ``bits``)."""
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if not isinstance(cache, QuantizedTensor) or len(cache.shape) != 4 or cache.axis != 3:
            raise ValueError(f"{name} must be a QuantizedTensor of a [num_blocks, block_size, Hkv, D] pool along D "
                             f"(axis 3); use quantize_paged_cache")
        if cache.bits not in bits:
            raise ValueError(f"{name} bits must be one of {bits}, got {cache.bits}")
    if key_cache.shape != value_cache.shape or (key_cache.bits, key_cache.group_size) != (
            value_cache.bits, value_cache.group_size):
        raise ValueError("key_cache and value_cache must have the same shape, bits and group_size")
    if key_cache.shape[3] % (8 // key_cache.bits):
        raise ValueError(f"head_dim {key_cache.shape[3]} must fill whole bytes of {key_cache.bits}-bit codes")
    check_query(query, key_cache.shape[2], key_cache.shape[3])
    check_block_tables(block_tables, seq_lens, query.shape[0], key_cache.shape[0], key_cache.shape[1])
