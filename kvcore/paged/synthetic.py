"""Deterministic stand-in K/V for a token sequence, so paged bookkeeping can be checked on real tensors.

Like a real transformer, the K/V of position ``i`` depends on all tokens up to ``i`` (through a
chained hash of the prefix), so two requests with the same prefix have the same K/V there and a
prefix-cache hit serves exactly what recomputing would have produced.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def prefix_hashes(token_ids: Sequence[int], seed: int = 0) -> list[int]:
    """One 63-bit hash per position, covering the tokens up to and including it."""
    hashes, h = [], seed
    for token in token_ids:
        h = hash((h, int(token))) & 0x7FFF_FFFF_FFFF_FFFF
        hashes.append(h)
    return hashes


def synthetic_kv(token_ids: Sequence[int], num_layers: int, num_kv_heads: int, head_dim: int, start: int = 0,
                 seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[num_layers, T - start, Hkv, D]`` for positions ``start ..`` of ``token_ids``.

    seed: changes every value (a different "model").
    """
    if not 0 <= start <= len(token_ids):
        raise ValueError(f"start must be in 0..{len(token_ids)}, got {start}")
    per_token = [np.random.default_rng(h).standard_normal((2, num_layers, num_kv_heads, head_dim), dtype=np.float32)
                 for h in prefix_hashes(token_ids, seed)[start:]]
    if not per_token:
        empty = torch.zeros(num_layers, 0, num_kv_heads, head_dim, dtype=dtype)
        return empty, empty.clone()
    kv = torch.from_numpy(np.stack(per_token, axis=2)).to(dtype)  # [2, L, T, Hkv, D]
    return kv[0], kv[1]
