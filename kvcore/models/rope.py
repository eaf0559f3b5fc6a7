"""Re-rotating cached keys to new positions (RoPE models only), as StreamingLLM does after eviction.

RoPE (Su et al. 2021) stores position by rotating each pair of key channels ``(i, i + D/2)`` by the
angle ``p * inv_freq[i]``. A rotation by ``a`` followed by one by ``b`` is a rotation by ``a + b``, so
a key rotated at position ``p`` becomes the key rotated at ``q`` by rotating it by ``(q - p) * inv_freq``.
StreamingLLM (Xiao et al. 2023) uses this to give kept tokens compact positions 0..T_keep-1.

Supported: models whose rotary module exposes ``inv_freq`` covering the whole head (Llama, Mistral,
Qwen2/Qwen3, SmolLM2, Gemma, Phi-3 and the bundled model) with a static frequency table. Not
supported: learned absolute positions (GPT-2), ALiBi, partial rotary, dynamic NTK scaling; those raise
ValueError, and "keep original positions" is the alternative that works with every model.
"""

from __future__ import annotations

import torch

from kvcore.models.runtime import text_config

STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn", "longrope"})


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension (the transformers RoPE convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[..., T, D]`` by ``positions * inv_freq`` (RoPE at ``positions``; negative undoes).

    positions: broadcastable to ``x.shape[:-1]`` (``[T]``, or ``[B, H, T]`` for per-head positions).
    inv_freq: ``[D/2]`` radians per position for each channel pair.
    """
    if 2 * inv_freq.shape[-1] != x.shape[-1]:
        raise ValueError(f"inv_freq has {inv_freq.shape[-1]} frequencies but keys have {x.shape[-1]} channels; "
                         "partial rotary embeddings are not supported")
    angles = positions.to(torch.float64)[..., None] * inv_freq.to(torch.float64)  # [..., T, D/2]
    emb = torch.cat((angles, angles), dim=-1)  # [..., T, D]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    return x * cos + rotate_half(x) * sin


def rope_inv_freq(model) -> torch.Tensor:
    """The model's RoPE inverse frequencies ``[D/2]``, or ValueError when keys cannot be re-rotated.

    Looks for the rotary module (``model.model.rotary_emb`` in transformers' Llama-family models).
    """
    rotary = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
    model_type = getattr(model.config, "model_type", "?")
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise ValueError(f"{model_type} models have no rotary position embedding (RoPE), so cached keys cannot be "
                         "re-rotated; keep original positions instead")
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"{model_type} uses RoPE type {rope_type!r} whose frequencies change with length; "
                         "re-rotation is only exact for static RoPE types "
                         f"({', '.join(sorted(STATIC_ROPE_TYPES))}); keep original positions instead")
    cfg = text_config(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv_freq = rotary.inv_freq.detach().float().cpu()
    if 2 * inv_freq.numel() != head_dim:
        raise ValueError(f"{model_type} rotates {2 * inv_freq.numel()} of {head_dim} head channels (partial "
                         "rotary); re-rotation is not supported, keep original positions instead")
    return inv_freq
