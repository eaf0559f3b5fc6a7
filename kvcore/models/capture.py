"""Capture what attention sees and makes during a forward pass: each layer's queries and its output.

Queries are what SnapKV, TOVA and H2O-style scores need; outputs (the output projection's input) are
what the eviction runner compares against the full cache.

transformers does not return queries, so, like kvpress, a forward pre-hook on every attention module
recomputes them from the layer input: ``q_proj`` (+ ``q_norm`` when the model has one) + RoPE for the
Llama family (Llama, Mistral, Qwen2/3, SmolLM2, the bundled model), or the query third of ``c_attn``
for GPT-2. Queries come out exactly as the attention uses them: ``[B, Hq, Tq, D]`` per layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from kvcore.models.rope import rotate_half


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of each decoder layer, in layer order; ValueError if not recognised."""
    mods = [m for name, m in model.named_modules()
            if name.endswith((".self_attn", ".attn")) and (hasattr(m, "q_proj") or hasattr(m, "c_attn"))]
    if not mods:
        raise ValueError(f"cannot find attention modules with q_proj or c_attn in {type(model).__name__}; "
                         "query capture supports Llama-family and GPT-2 models")
    return mods


def _llama_queries(module, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    B, T, _ = hidden.shape
    q = module.q_proj(hidden).view(B, T, -1, module.head_dim)  # [B, T, Hq, D]
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)
    q = q.transpose(1, 2)  # [B, Hq, T, D]
    cos, sin = position_embeddings  # [B, T, D] each
    return q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)


def _gpt2_queries(module, hidden: torch.Tensor) -> torch.Tensor:
    B, T, _ = hidden.shape
    q = module.c_attn(hidden).split(module.split_size, dim=2)[0]  # [B, T, Hq * D]
    return q.view(B, T, -1, module.head_dim).transpose(1, 2)  # [B, Hq, T, D]


class QueryCapture:
    """Context manager recording per-layer queries ``[B, Hq, Tq, D]`` of every forward inside it.

    ``capture.queries`` holds the last forward's queries, one tensor per layer.
    """

    def __init__(self, model) -> None:
        self.modules = attention_modules(model)
        self.queries: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles: list[Any] = []

    def _hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():
                if hasattr(module, "q_proj"):
                    q = _llama_queries(module, hidden, kwargs.get("position_embeddings"))
                else:
                    q = _gpt2_queries(module, hidden)
            self.queries[layer_idx] = q.detach()
        return hook

    def __enter__(self) -> QueryCapture:
        self._handles = [m.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                         for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@contextmanager
def attention_outputs(model) -> Iterator[list[torch.Tensor | None]]:
    """Record each layer's attention output (the output projection's input) ``[B, n, Hq*D]`` of the last forward."""
    projections = [getattr(m, "o_proj", None) or getattr(m, "c_proj", None) for m in attention_modules(model)]
    if any(p is None for p in projections):
        raise ValueError("cannot find the attention output projection (o_proj / c_proj) of this model")
    captured: list[torch.Tensor | None] = [None] * len(projections)

    def hook(i: int):
        def record(module, args):
            captured[i] = args[0].detach().float()
        return record

    handles = [p.register_forward_pre_hook(hook(i)) for i, p in enumerate(projections)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()
