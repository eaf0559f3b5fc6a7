"""One engine step through a Llama-family model's own modules, with K/V only in the paged pools.

Follows vLLM's model runner and its PagedAttention backends (Kwon et al., SOSP 2023): every new token of
every sequence in the step is one row of a flattened ``[T, hidden]`` batch (varlen, no padding), so the
embeddings, norms, q/k/v/o projections, RoPE and MLP run once per layer for the whole step; only
attention is split per sequence. Each layer writes the step's K/V into their slots first
(``reshape_and_cache``), then attends:

* decode rows (one new token, context already cached): one call per layer to
  :func:`kvcore.kernels.paged_decode_attention` (or :func:`kvcore.kernels.quantized_paged_decode_attention`
  for quantized pools) over the whole decode batch, reading K/V through the block tables;
* prefill and chunked-prefill rows, and decode rows whose sliding window has cut into their context
  (the paged kernel has no window): keys read through the block table from the pools, then
  ``torch.nn.functional.scaled_dot_product_attention`` with a causal (and window) mask.

The modules are called as transformers 5.24 calls them in ``LlamaAttention.forward`` /
``LlamaDecoderLayer.forward`` (``modeling_llama.py``; Mistral, Qwen2 and Qwen3 are the same with a
window, q/k/v biases inside the Linear modules, and per-head ``q_norm``/``k_norm`` before RoPE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvcore.engine.pools import KVPools
from kvcore.kernels import paged_decode_attention, quantized_paged_decode_attention

RopeFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(slots=True)
class PagedDecode:
    """The step's decode rows that the paged decode kernel serves, in one call per layer.

    rows: ``[B]`` rows of the flattened step; block_tables: int32 ``[B, max_blocks]`` (padded with 0);
    seq_lens: int32 ``[B]`` tokens each row attends to (its context plus itself).
    """

    rows: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor


@dataclass(slots=True)
class GatheredAttention:
    """Queries that attend to keys read from the pools through their block tables (one SDPA call).

    rows: ``[S, n]`` rows of the flattened step (S sequences of n queries each);
    key_slots: ``[S, L]`` pool slots of the keys they may see, in position order;
    mask: bool ``[S, 1, n, L]`` (True = attend) or None; causal: SDPA's ``is_causal`` (only when L == n).
    """

    rows: torch.Tensor
    key_slots: torch.Tensor
    mask: torch.Tensor | None
    causal: bool


@dataclass(slots=True)
class AttentionPlan:
    """How every row of a step attends under one sliding window (None = full attention)."""

    decode: PagedDecode | None = None
    gathered: list[GatheredAttention] = field(default_factory=list)


@dataclass(slots=True)
class StepBatch:
    """A step's flattened inputs, shared by every layer.

    token_ids/positions/slots: ``[T]`` int64 (the slot each new token's K/V is written to);
    logits_rows: ``[R]`` rows whose logits are returned; plans: one :class:`AttentionPlan` per distinct
    layer window.
    """

    token_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    logits_rows: torch.Tensor
    plans: dict[int | None, AttentionPlan]


@dataclass(slots=True)
class ModelParts:
    """The model's own modules the step calls, found once.

    layers: the decoder layers; windows: each layer's sliding window (None = full attention);
    rope: the modeling module's ``apply_rotary_pos_emb``.
    """

    embed: torch.nn.Module
    layers: list[torch.nn.Module]
    norm: torch.nn.Module
    rotary: torch.nn.Module
    lm_head: torch.nn.Module
    rope: RopeFn
    windows: list[int | None]


def attend(q: torch.Tensor, pools: KVPools, layer: int, plan: AttentionPlan, scale: float) -> torch.Tensor:
    """Attention output ``[T, Hq, D]`` of the step's queries ``q`` ``[T, Hq, D]`` over one layer's pools."""
    out = torch.empty_like(q)  # [T, Hq, D]
    if plan.decode is not None:
        out[plan.decode.rows] = decode_attention(q[plan.decode.rows], pools, layer, plan.decode, scale)
    for group in plan.gathered:
        out[group.rows] = gathered_attention(q[group.rows], pools, layer, group, scale)
    return out


def decode_attention(q: torch.Tensor, pools: KVPools, layer: int, decode: PagedDecode, scale: float) -> torch.Tensor:
    """The paged decode kernel over the batch's queries ``[B, Hq, D]`` -> ``[B, Hq, D]``."""
    args = (q, pools.keys[layer], pools.values[layer], decode.block_tables, decode.seq_lens)
    if pools.kv_bits is None:
        return paged_decode_attention(*args, scale=scale)
    return quantized_paged_decode_attention(*args, scale=scale)


def gathered_attention(q: torch.Tensor, pools: KVPools, layer: int, group: GatheredAttention,
                       scale: float) -> torch.Tensor:
    """Queries ``[S, n, Hq, D]`` over keys read through their slots -> ``[S, n, Hq, D]`` (GQA kept grouped)."""
    S, L = group.key_slots.shape
    keys, values = pools.read(layer, group.key_slots.reshape(-1))  # [S * L, Hkv, D] each
    keys = keys.view(S, L, *keys.shape[1:]).transpose(1, 2)  # [S, Hkv, L, D]
    values = values.view(S, L, *values.shape[1:]).transpose(1, 2)  # [S, Hkv, L, D]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=group.mask,  # [S, Hq, n, D]
                                         is_causal=group.causal, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)  # [S, n, Hq, D]


def layer_forward(parts: ModelParts, index: int, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                  pools: KVPools, step: StepBatch) -> torch.Tensor:
    """One decoder layer over the step's rows ``[T, hidden]`` (``LlamaDecoderLayer.forward``)."""
    layer = parts.layers[index]
    attn = layer.self_attn
    T, D = hidden.shape[0], attn.head_dim
    x = layer.input_layernorm(hidden)  # [T, hidden]
    q = attn.q_proj(x).view(T, -1, D)  # [T, Hq, D]
    k = attn.k_proj(x).view(T, -1, D)  # [T, Hkv, D]
    v = attn.v_proj(x).view(T, -1, D)  # [T, Hkv, D]
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head's D channels, before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = rotary  # [T, D] each
    q, k = parts.rope(q, k, cos, sin, unsqueeze_dim=1)  # heads on dim 1: cos/sin broadcast as [T, 1, D]
    pools.write(index, step.slots, k, v)  # every row's K/V lands before any row attends
    out = attend(q, pools, index, step.plans[parts.windows[index]], attn.scaling)  # [T, Hq, D]
    hidden = hidden + attn.o_proj(out.reshape(T, -1))  # [T, hidden]
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))  # [T, hidden]


def model_forward(parts: ModelParts, pools: KVPools, step: StepBatch) -> torch.Tensor:
    """Logits ``[R, vocab]`` (float32, the model's device) of the step's ``logits_rows``."""
    hidden = parts.embed(step.token_ids)  # [T, hidden]
    cos, sin = parts.rotary(hidden[None], step.positions[None])  # [1, T, D] each, at the true positions
    for index in range(len(parts.layers)):
        hidden = layer_forward(parts, index, hidden, (cos[0], sin[0]), pools, step)
    last = parts.norm(hidden.index_select(0, step.logits_rows))  # [R, hidden]: norm is per token
    return parts.lm_head(last).float()  # [R, vocab]
