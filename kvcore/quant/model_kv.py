"""A real model's queries, keys and values, captured as its attention kernel receives them.

Queries and post-RoPE keys/values are captured through transformers' attention interface (the
tensors the attention kernel receives), so any causal LM that uses it works, GQA included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvcore.models.runtime import attention_implementation, model_device

_CAPTURE = "kvcore_capture"


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """Record what attention receives on the module, then run SDPA."""
    module._kvcore_qkv = (query.detach(), key.detach(), value.detach(), kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(_CAPTURE, _capture_attention)


@dataclass(slots=True)
class CapturedKV:
    """Per layer: queries ``[B, Hq, T, D]``, keys and values ``[B, Hkv, T, D]`` (post-RoPE), float32 on CPU.

    scaling: the softmax scale the model uses (1/sqrt(D) for Llama).
    """

    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    scaling: float

    def __post_init__(self) -> None:
        if not (len(self.queries) == len(self.keys) == len(self.values)) or not self.keys:
            raise ValueError("need the same, non-zero number of layers of queries, keys and values")

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[-2]


@torch.no_grad()
def capture_qkv(model, input_ids: torch.Tensor) -> CapturedKV:
    """Run one forward pass over ``input_ids`` ``[T]`` and keep every layer's queries, keys and values."""
    ids = input_ids.reshape(1, -1).to(model_device(model))  # [1, T]
    with attention_implementation(model, _CAPTURE):
        model(input_ids=ids, use_cache=False)
    modules = [m for m in model.modules() if hasattr(m, "_kvcore_qkv")]
    modules.sort(key=lambda m: getattr(m, "layer_idx", 0))
    records = [m.__dict__.pop("_kvcore_qkv") for m in modules]
    if not records:
        raise ValueError(f"{type(model).__name__} does not route attention through transformers' attention interface")
    q, k, v, scaling = zip(*records, strict=True)
    scale = scaling[0] if scaling[0] is not None else 1.0 / math.sqrt(k[0].shape[-1])
    as_cpu = [t.float().cpu() for t in (*q, *k, *v)]
    n = len(records)
    return CapturedKV(as_cpu[:n], as_cpu[n:2 * n], as_cpu[2 * n:], float(scale))
