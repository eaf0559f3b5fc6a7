"""One engine step through a Llama-family model's own weights, with K/V only in the paged pools.

Follows vLLM's model runner and its PagedAttention backends (Kwon et al., SOSP 2023), and the lean
decode loops of nano-vllm and gpt-fast: every new token of every sequence in the step is one row of a
flattened ``[T, hidden]`` batch (varlen, no padding), decode rows first, so the embeddings, norms, q/k/v/o
projections, RoPE and MLP run once per layer for the whole step and the decode rows are a view; only
attention is split. Each layer writes the step's K/V into their slots first (``reshape_and_cache``), then
attends:

* decode rows (one new token, context already cached): one :class:`kvcore.kernels.DecodeBatch` call per
  layer over the whole decode batch, reading K/V through the block tables (the C kernel on CPU, Triton on
  CUDA), with tables, lengths and the kernel's plan built once per step;
* prefill and chunked-prefill rows, and decode rows whose sliding window has cut into their context
  (the paged kernels take no window): keys read through the block table from the pools, then
  ``torch.nn.functional.scaled_dot_product_attention`` with a causal (and window) mask.

The weights are applied as transformers 5.24 applies them in ``LlamaDecoderLayer.forward`` and
``LlamaAttention.forward`` (``modeling_llama.py``; Mistral, Qwen2 and Qwen3 are the same with a window,
q/k/v biases, and per-head ``q_norm``/``k_norm`` before RoPE), called as functions (``F.rms_norm``, the
projections' GEMMs) rather than through module calls: the same math with fewer ops per layer. On a CPU the
projections can run oneDNN's GEMM on weights packed once (:class:`Projection`), as inductor's CPU backend
packs them when it freezes a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvcore.engine.pools import KVPools
from kvcore.kernels import DecodeBatch
from kvcore.kernels.native_linear import HalfWidthLinear


@dataclass(slots=True)
class GatheredAttention:
    """Queries that attend to keys read from the pools through their block tables (one SDPA call).

    rows: the slice of the step's rows (S sequences of n queries each, consecutive);
    key_slots: ``[S, L]`` pool slots of the keys they may see, in position order;
    mask: bool ``[S, 1, n, L]`` (True = attend) or None; causal: SDPA's ``is_causal`` (only when L == n).
    """

    rows: slice
    key_slots: torch.Tensor
    mask: torch.Tensor | None
    causal: bool


@dataclass(slots=True)
class AttentionPlan:
    """How every row of a step attends under one sliding window (None = full attention).

    decode: the decode rows ``[0, B)`` that the paged kernel serves, or None; gathered: the rest.
    """

    decode: DecodeBatch | None = None
    gathered: list[GatheredAttention] = field(default_factory=list)


@dataclass(slots=True)
class StepBatch:
    """A step's flattened inputs, shared by every layer (built once per step by the runner).

    token_ids/positions/slots: ``[T]`` int64 (the slot each new token's K/V is written to); logits_rows:
    ``[R]`` rows whose logits are returned, in the order the caller asked; plans: one :class:`AttentionPlan`
    per distinct layer window; end: one past the step's largest position.
    """

    token_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    logits_rows: torch.Tensor
    plans: dict[int | None, AttentionPlan]
    end: int


ROW_BUCKET = 16  # packed GEMMs over more rows see them rounded up to a multiple of this: oneDNN builds its kernel
# once per row count (0.5-1 ms), so a decode batch of 1-16 gets its own and longer steps share a few


def can_pack(weight: torch.Tensor) -> bool:
    """Whether oneDNN can pack this weight for the CPU (fp32 on a CPU build with mkldnn)."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


@dataclass(slots=True)
class Projection:
    """Linear layers that read the same rows, as the step applies them: ``x @ W.T + b`` for each, side by side
    in one ``[T, sum of outputs]`` result (q/k/v as one, gate/up as one: vLLM's ``QKVParallelLinear`` and
    ``MergedColumnParallelLinear``). With torch's linear per weight, or with one oneDNN GEMM on the weights
    packed once, side by side (the blocked layout its GEMM reads; the same fp32 math in another summation order).
    On the CPU of benchmarks/RESULTS.md the packed GEMM at the step's own row count is 1.4-2.8x faster than
    torch's linear at 2 to 16 rows on the bundled model and 2.3-4.8x at 1 to 16 rows on SmolLM2 (at one row on the
    bundled model 0.8x, 26 us); padding a few rows up to 16 would cost the bundled model up to 2x. The packed
    copy takes the weights' bytes again. Weights that are all fp16 (or all bf16) values are packed at that width
    instead (:class:`kvcore.kernels.native_linear.HalfWidthLinear`: half the bytes, the same fp32 weights in
    registers; 1.6-3x oneDNN's speed at 1-16 rows, 0.9-0.95x at 512)."""

    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor | None, ...]
    sizes: tuple[int, ...]
    packed: torch.Tensor | None = None
    packed_bias: torch.Tensor | None = None
    narrow: HalfWidthLinear | None = None

    @classmethod
    def of(cls, pack: bool, *modules: torch.nn.Linear) -> Projection:
        weights = tuple(m.weight for m in modules)
        biases = tuple(m.bias for m in modules)
        packed = packed_bias = narrow = None
        if pack and can_pack(weights[0]):
            with torch.no_grad():
                weight = torch.cat(weights).detach()
                if any(b is not None for b in biases):
                    packed_bias = torch.cat([w.new_zeros(w.shape[0]) if b is None else b.detach()
                                             for w, b in zip(weights, biases, strict=True)])
                narrow = HalfWidthLinear.of(weight, packed_bias)
                if narrow is None:
                    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
        return cls(weights, biases, tuple(w.shape[0] for w in weights), packed, packed_bias, narrow)

    def __call__(self, x: torch.Tensor, norm: torch.nn.Module | None = None, residual: torch.Tensor | None = None,
                 act: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """``[residual +] proj(inputs)``, the inputs being ``norm(x)`` (norm: an RMSNorm module), or ``act(gate) *
        up`` of ``x = [gate | up]`` (act: the MLP's activation), or ``x``. On half-width weights the norm, SiLU and
        the residual run in the kernel's pass."""
        if norm is not None and self.narrow is None:
            x, norm = rms_norm(norm, x), None
        if act is not None and (self.narrow is None or act is not F.silu):
            gate, up = x.chunk(2, dim=-1)
            x, act = act(gate) * up, None
        if self.narrow is not None:
            return self.narrow(x, *(() if norm is None else (norm.weight, norm.variance_epsilon)),
                               gated=act is not None, residual=residual)
        out = self.dense(x)
        return out if residual is None else residual + out

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` with torch's linear, or oneDNN's GEMM on the packed fp32 copy."""
        rows = x.shape[0]
        if self.packed is None:
            outs = [F.linear(x, w, b) for w, b in zip(self.weights, self.biases, strict=True)]
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        pad = -rows % ROW_BUCKET if rows > ROW_BUCKET else 0
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.packed_bias, "none", [], "")
        return out[:rows] if pad else out


@dataclass(slots=True)
class MLP:
    """``down(act(gate(x)) * up(x))`` (``LlamaMLP``), gate and up as one projection."""

    gate_up: Projection
    down: Projection
    act: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, hidden: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
        """``hidden + mlp(norm(hidden))``: the decoder layer's second half."""
        return self.down(self.gate_up(hidden, norm), residual=hidden, act=self.act)


@dataclass(slots=True)
class Layer:
    """One decoder layer's weights and norms as the step applies them."""

    input_norm: torch.nn.Module
    post_norm: torch.nn.Module
    qkv: Projection
    o: Projection
    q_norm: torch.nn.Module | None
    k_norm: torch.nn.Module | None
    mlp: MLP
    head_dim: int
    scale: float
    window: int | None

    @classmethod
    def of(cls, layer: torch.nn.Module, window: int | None, pack: bool = False) -> Layer:
        """The layer's modules; pack: apply its projections with packed weights (:class:`Projection`)."""
        attn, mlp = layer.self_attn, layer.mlp
        ffn = MLP(Projection.of(pack, mlp.gate_proj, mlp.up_proj), Projection.of(pack, mlp.down_proj),
                  F.silu if is_silu(mlp.act_fn) else mlp.act_fn)
        return cls(layer.input_layernorm, layer.post_attention_layernorm,
                   Projection.of(pack, attn.q_proj, attn.k_proj, attn.v_proj), Projection.of(pack, attn.o_proj),
                   getattr(attn, "q_norm", None), getattr(attn, "k_norm", None), ffn, attn.head_dim, attn.scaling,
                   window)


@dataclass(slots=True)
class RotaryTable:
    """cos and signed_sin ``[P, 1, D]`` (as :func:`rotate` takes them) of positions 0 .. P - 1 from the model's own
    rotary module, computed for the first step and again, twice as long, for a step that reaches past them: a step
    looks its rows up (two ops) instead of running the module (about ten; 33 us of a bundled-model decode step). Every
    RoPE type the engine takes fixes the frequencies per position (``kvcore.engine.runner.ROPE_TYPES``)."""

    module: torch.nn.Module
    cos: torch.Tensor | None = None
    signed_sin: torch.Tensor | None = None

    def __call__(self, positions: torch.Tensor, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed_sin ``[T, 1, D]`` at ``positions [T]`` (all below ``end``), in the dtype and on the device
        of ``like``."""
        self.cover(end, like)
        return self.cos.index_select(0, positions), self.signed_sin.index_select(0, positions)

    def cover(self, end: int, like: torch.Tensor) -> None:
        """Make the table hold positions 0 .. end - 1 (computed in the dtype and on the device of ``like``)."""
        if self.cos is None or end > len(self.cos):
            size = max(end, 256, 0 if self.cos is None else 2 * len(self.cos))
            cos, sin = self.module(like[None], torch.arange(size, device=like.device)[None])  # [1, P, D] each
            half = sin.shape[-1] // 2
            self.cos = cos[0, :, None]
            self.signed_sin = torch.cat((-sin[0, :, None, :half], sin[0, :, None, half:]), dim=-1)


@dataclass(slots=True)
class ModelParts:
    """The model's own modules the step calls, found once."""

    embed: torch.nn.Embedding
    layers: list[Layer]
    norm: torch.nn.Module
    rotary: RotaryTable
    lm_head: Projection

    @property
    def windows(self) -> set[int | None]:
        """The distinct sliding windows of the layers (None = full attention)."""
        return {layer.window for layer in self.layers}


def is_silu(act: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether a model's MLP activation is SiLU: torch's module, transformers' own (what ``"silu"`` maps to), or the
    function."""
    from transformers.activations import SiLUActivation  # here, not at import: pages without a model never load it

    return act is F.silu or isinstance(act, (torch.nn.SiLU, SiLUActivation))


def rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Llama-style RMSNorm (``weight * x / rms(x)``, transformers' ``LlamaRMSNorm``) as one op."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE (Su et al. 2021) as transformers' Llama ``apply_rotary_pos_emb`` applies it, ``x * cos +
    rotate_half(x) * sin``, with the half rotation's sign moved into ``signed_sin`` (``[-sin1, sin2]``, built once
    per step) so it is a roll: the same products, bit for bit, in 4 ops instead of 7. x ``[T, H, D]``; cos and
    signed_sin ``[T, 1, D]``."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def attend(q: torch.Tensor, pools: KVPools, index: int, plan: AttentionPlan, scale: float) -> torch.Tensor:
    """Attention output ``[T, Hq, D]`` of the step's queries ``q`` ``[T, Hq, D]`` over one layer's pools."""
    decode, gathered = plan.decode, plan.gathered
    keys, values = pools.keys[index], pools.values[index]
    if not gathered:  # a pure decode step: the kernel's output is the whole step's
        return decode.attend(q, keys, values, scale)
    out = torch.empty_like(q)  # [T, Hq, D]
    if decode is not None:
        B = len(decode.lengths)
        out[:B] = decode.attend(q[:B], keys, values, scale)
    for group in gathered:
        out[group.rows] = gathered_attention(q[group.rows], pools, index, group, scale)
    return out


def gathered_attention(q: torch.Tensor, pools: KVPools, index: int, group: GatheredAttention,
                       scale: float) -> torch.Tensor:
    """Queries ``[S * n, Hq, D]`` over keys read through their slots -> ``[S * n, Hq, D]`` (GQA kept grouped)."""
    S, L = group.key_slots.shape
    keys, values = pools.read(index, group.key_slots.reshape(-1))  # [S * L, Hkv, D] each
    keys = keys.view(S, L, *keys.shape[1:]).transpose(1, 2)  # [S, Hkv, L, D]
    values = values.view(S, L, *values.shape[1:]).transpose(1, 2)  # [S, Hkv, L, D]
    q = q.view(S, -1, *q.shape[1:]).transpose(1, 2)  # [S, Hq, n, D]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=group.mask, is_causal=group.causal,
                                         scale=scale, enable_gqa=True)  # [S, Hq, n, D]
    return out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3])  # [S * n, Hq, D]


def layer_forward(parts: ModelParts, index: int, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                  pools: KVPools, step: StepBatch) -> torch.Tensor:
    """One decoder layer over the step's rows ``[T, hidden]`` (``LlamaDecoderLayer.forward``)."""
    layer = parts.layers[index]
    T, D = hidden.shape[0], layer.head_dim
    Hq, Hkv = layer.qkv.sizes[0] // D, layer.qkv.sizes[1] // D
    qkv = layer.qkv(hidden, layer.input_norm).view(T, Hq + 2 * Hkv, D)
    # every row's K/V lands before any row attends
    if layer.q_norm is None and pools.rope_and_write(index, step.slots, qkv, Hq, *rotary):
        q = qkv[:, :Hq]  # rotated in place
    else:
        qk, v = qkv[:, :Hq + Hkv], qkv[:, Hq + Hkv:]  # [T, Hq + Hkv, D], [T, Hkv, D]
        if layer.q_norm is not None:  # Qwen3: RMSNorm over each head's D channels, before RoPE
            qk = torch.cat((rms_norm(layer.q_norm, qk[:, :Hq]), rms_norm(layer.k_norm, qk[:, Hq:])), dim=1)
        qk = rotate(qk, *rotary)  # queries and keys rotated together
        q, k = qk[:, :Hq], qk[:, Hq:]
        pools.write(index, step.slots, k, v)
    out = attend(q, pools, index, step.plans[layer.window], layer.scale)  # [T, Hq, D]
    hidden = layer.o(out.reshape(T, -1), residual=hidden)  # [T, hidden]
    return layer.mlp(hidden, layer.post_norm)  # [T, hidden]


def model_forward(parts: ModelParts, pools: KVPools, step: StepBatch) -> torch.Tensor:
    """Logits ``[R, vocab]`` (float32, the model's device) of the step's ``logits_rows``."""
    hidden = F.embedding(step.token_ids, parts.embed.weight)  # [T, hidden]
    rotary = parts.rotary(step.positions, step.end, hidden)
    for index in range(len(parts.layers)):
        hidden = layer_forward(parts, index, hidden, rotary, pools, step)
    last = hidden.index_select(0, step.logits_rows)  # [R, hidden]: the norm is per token
    return parts.lm_head(last, parts.norm).float()  # [R, vocab]

