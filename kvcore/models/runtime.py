"""Model plumbing every experiment shares: where a model lives, its shape, its attention, and token ids.

One home for each helper, so the eviction runner, the quantization evaluation, the sharing experiments
and the engine read a config, switch attention and cut text the same way (CPU threads are pinned with
:func:`kvcore.device.torch_threads`). Nothing here knows a cache policy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


def model_device(model) -> torch.device:
    """The device of a model's parameters."""
    return next(model.parameters()).device


def text_config(model):
    """The decoder config of a transformers model (the text part of a multimodal one)."""
    return model.config.get_text_config(decoder=True)


def num_kv_heads(model) -> int:
    """KV heads per layer (query heads when the config does not say: MHA)."""
    cfg = text_config(model)
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def max_positions(model) -> int | None:
    """The model's position limit (``max_position_embeddings``), or None when it has none."""
    return getattr(text_config(model), "max_position_embeddings", None) or None


@contextmanager
def attention_implementation(model, name: str) -> Iterator[None]:
    """Switch a transformers model's attention implementation (``"eager"``, ``"sdpa"``, a registered one)
    for a block; eager attention is the one that can return probabilities."""
    before = getattr(model.config, "_attn_implementation", "eager")
    if before != name:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if before != name:
            model.set_attn_implementation(before)


def as_ids(model, input_ids: torch.Tensor | Sequence[int], min_tokens: int = 2) -> torch.Tensor:
    """Token ids ``[T]`` or ``[B, T]`` as ``[B, T]`` long on the model's device.

    Raises ValueError with fewer than ``min_tokens`` tokens or more than the model's positions.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    ids = ids.reshape(1, -1) if ids.dim() <= 1 else ids  # [B, T]
    if ids.dim() != 2:
        raise ValueError(f"token ids must be [T] or [B, T], got shape {list(ids.shape)}")
    if ids.shape[1] < min_tokens:
        raise ValueError(f"need at least {min_tokens} tokens to score a text, got {ids.shape[1]}")
    limit = max_positions(model)
    if limit and ids.shape[1] > limit:
        raise ValueError(f"{ids.shape[1]} tokens exceed this model's {limit} positions; use a shorter text")
    return ids.to(model_device(model))


def text_ids(model, tokenizer, text: str, max_tokens: int) -> torch.Tensor:
    """Token ids ``[1, T]`` of ``text`` (special tokens as the tokenizer adds them), cut to ``max_tokens`` (>= 4)."""
    if max_tokens < 4:
        raise ValueError(f"max_tokens must be >= 4, got {max_tokens}")
    return as_ids(model, tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens], min_tokens=4)


def encode_prompt(tokenizer, prompt: str) -> torch.Tensor:
    """Prompt ids ``[1, T]`` with the tokenizer's special tokens (the bundled model's ``<bos>``)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # [1, T]
    if ids.shape[1] == 0:
        if tokenizer.bos_token_id is None:
            raise ValueError("the prompt is empty and this tokenizer has no <bos> token to start from")
        ids = torch.tensor([[tokenizer.bos_token_id]])
    return ids


def token_windows(body: Sequence[int], length: int, windows: int, bos: int | None, start: int = 0) -> torch.Tensor:
    """``windows`` consecutive windows of ``body`` from ``start``, each ``<bos>`` (when given) + the next tokens.

    Every window holds ``length`` ids; consecutive windows do not overlap. Returns ``[W, L]`` long.
    """
    head = [] if bos is None else [bos]
    need = length - len(head)
    if need < 1 or windows < 1:
        raise ValueError(f"need length > {len(head)} and windows >= 1, got {length} and {windows}")
    if start < 0 or start + need * windows > len(body):
        raise ValueError(f"the text holds {len(body)} tokens, fewer than the {need * windows} asked for")
    rows = [head + list(body[start + w * need:start + (w + 1) * need]) for w in range(windows)]
    return torch.tensor(rows, dtype=torch.long)
