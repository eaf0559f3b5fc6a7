"""Additive attention masks for policies that limit what attention reads without freeing storage.

An attention-only window (Longformer-style local attention at inference) keeps every entry in the
cache and hides the rest from each query head with an additive mask: 0 where a head may read, the
dtype's lowest value elsewhere, the form transformers' eager attention adds to its scores.
"""

from __future__ import annotations

import torch


def additive_mask(allowed: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """``allowed`` ``[Hkv, Tq, T]`` (True = may read) as an additive mask ``[1, Hq, Tq, T]`` (Hq = Hkv x groups)."""
    heads = allowed.repeat_interleave(groups, dim=0)  # [Hq, Tq, T]: query head h reads KV head h // groups
    return torch.zeros(heads.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~heads, torch.finfo(dtype).min)[None]


def decode_mask(readable: torch.Tensor, length: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """One new query that reads cache positions ``readable`` ``[Hkv, m]`` and itself (the last of ``length``):
    ``[1, Hq, 1, length]``."""
    allowed = torch.zeros(readable.shape[0], 1, length, dtype=torch.bool, device=readable.device)
    allowed[:, 0].scatter_(1, readable, True)
    allowed[:, 0, -1] = True  # the new token reads itself
    return additive_mask(allowed, groups, dtype)


def prefill_mask(kept: torch.Tensor, prompt: int, total: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """A continuation of ``total - prompt`` queries that read prompt positions ``kept`` ``[Hkv, k]`` plus the
    continuation causally: ``[1, Hq, total - prompt, total]``."""
    Tc = total - prompt
    allowed = torch.zeros(kept.shape[0], Tc, total, dtype=torch.bool, device=kept.device)
    allowed[:, :, :prompt].scatter_(2, kept[:, None, :].expand(-1, Tc, -1), True)
    allowed[:, :, prompt:] = torch.ones(Tc, Tc, dtype=torch.bool, device=kept.device).tril()
    return additive_mask(allowed, groups, dtype)
