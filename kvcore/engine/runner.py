"""The engine's model runner: one step of a real transformers causal LM whose K/V live only in paged pools.

Follows vLLM's GPU model runner (``vllm/v1/worker/gpu_model_runner.py``) and PagedAttention (Kwon et al.,
SOSP 2023): the scheduler and the block manager decide, per step, which sequences run, how many new
tokens each feeds (``num_computed_tokens`` already cached) and which physical blocks hold them; the
runner flattens the step's new tokens into one varlen batch, builds the slot mapping and the block
tables, runs the model's own modules over it (:mod:`kvcore.engine.forward`) with K/V in pools allocated
once (:mod:`kvcore.engine.pools`), and returns the logits of the positions that are sampled. No
transformers cache object is involved.

Sliding windows: a query at position ``q`` sees key positions ``> q - W`` (transformers'
``sliding_window_overlay``). Prefill chunks read keys from ``max(0, start - W + 1)`` on; a decode token
whose window still covers its whole context goes to the paged kernel with its block table; one whose
window has cut into the context attends, exactly, to the ``W`` keys of its window read through the block
table (the paged kernel takes no window). Blocks wholly before every query's window are never read, so
the engine may have freed and reused them.

Prefill reads its keys back from the pools as vLLM's attention backends read the paged cache for chunked
prefill, so with quantized pools a token sees the same dequantized K/V whichever path it attends through.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvcore.engine.forward import (
    AttentionPlan,
    GatheredAttention,
    Layer,
    ModelParts,
    Projection,
    RotaryTable,
    StepBatch,
    model_forward,
)
from kvcore.engine.graph import DecodeGraphs, graph_problem
from kvcore.engine.pools import KVPools
from kvcore.kernels import KERNEL_BITS, DecodeBatch, choose_backend
from kvcore.models.runtime import model_device, num_kv_heads, text_config

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # SmolLM2 and the bundled model are llama
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # frequencies fixed per position: cached keys stay valid
LAYER_TYPES = ("full_attention", "sliding_attention")
KNOWN_REASONS = {
    "gpt2": "learned absolute position embeddings (no RoPE) and a fused c_attn projection",
    "gpt_neox": "partial rotary embeddings and a fused query_key_value projection",
    "phi": "partial rotary embeddings", "phi3": "fused qkv_proj and gate_up_proj projections",
    "bloom": "ALiBi position biases", "mpt": "ALiBi position biases", "falcon": "ALiBi or fused QKV layers",
    "gemma": "embeddings scaled by sqrt(hidden_size) and (1 + weight) RMSNorm",
    "gemma2": "embedding scaling, logit soft-capping and extra norms",
    "gemma3": "embedding scaling, extra norms and per-layer RoPE",
}
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
LAYER_PARTS = ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp")


@dataclass(slots=True)
class SequenceChunk:
    """One sequence's share of an engine step."""

    seq_id: str
    token_ids: list[int]  # the n >= 1 new tokens fed this step, at positions start .. start + n - 1
    start: int  # tokens of this sequence already in the pools (num_computed_tokens)
    block_table: list[int]  # physical block ids covering positions 0 .. start + n - 1 (vLLM layout)
    wants_logits: bool = True  # whether this step samples from its last position

    def __post_init__(self) -> None:
        if len(self.token_ids) < 1:
            raise ValueError(f"sequence {self.seq_id!r}: a chunk feeds at least one token, got none")
        if self.start < 0:
            raise ValueError(f"sequence {self.seq_id!r}: start (num_computed_tokens) must be >= 0, got {self.start}")

    @property
    def end(self) -> int:
        """Tokens of the sequence in the pools after this step."""
        return self.start + len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        """One new token after a cached context: served by the paged decode kernel."""
        return len(self.token_ids) == 1 and self.start > 0


def unsupported(model) -> str | None:
    """Why :class:`ModelRunner` cannot run ``model``, or None when it can.

    It runs Llama-family decoders (Llama, SmolLM2, Mistral, Qwen2, Qwen3) whose modules it calls one by
    one: embeddings, q/k/v/o projections (+ q_norm/k_norm), RMSNorms, MLP, a RoPE over the whole head
    with position-independent frequencies, the LM head.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    if model_type not in SUPPORTED_MODEL_TYPES:
        why = KNOWN_REASONS.get(model_type, "an architecture outside the Llama family")
        return (f"{model_type} models cannot run on the paged runner: {why}; it runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} decoders (SmolLM2 is a llama)")
    return _layout_problem(model, model_type) or _rope_problem(model, model_type)


def _layout_problem(model, model_type: str) -> str | None:
    """What is missing from the Llama module layout in a model of a supported type, or None."""
    inner = getattr(model, "model", None)
    if not hasattr(model, "lm_head") or any(not hasattr(inner, n) for n in ("embed_tokens", "layers", "norm")):
        return f"{model_type}: expected a causal LM with model.embed_tokens, model.layers, model.norm and lm_head"
    for layer in inner.layers:
        attn = getattr(layer, "self_attn", None)
        if any(not hasattr(layer, n) for n in LAYER_PARTS) or any(not hasattr(attn, n) for n in ATTENTION_PARTS):
            return f"{model_type}: a decoder layer lacks {LAYER_PARTS} or attention {ATTENTION_PARTS}"
        if hasattr(attn, "q_norm") != hasattr(attn, "k_norm"):
            return f"{model_type}: attention has only one of q_norm / k_norm"
        norms = [layer.input_layernorm, layer.post_attention_layernorm, getattr(attn, "q_norm", None)]
        if any(n is not None and not (hasattr(n, "weight") and hasattr(n, "variance_epsilon")) for n in norms):
            return f"{model_type}: a norm is not an RMSNorm with weight and variance_epsilon"
    layer_types = getattr(text_config(model), "layer_types", None) or []
    if any(t not in LAYER_TYPES for t in layer_types):
        return f"{model_type}: layer types {sorted(set(layer_types))} include one outside {LAYER_TYPES}"
    return None


def _rope_problem(model, model_type: str) -> str | None:
    """Why the model's rotary embedding cannot be applied token by token at true positions, or None."""
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return f"{model_type}: expected a rotary embedding module at model.rotary_emb"
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in ROPE_TYPES:
        return (f"{model_type} uses RoPE type {rope_type!r}, whose frequencies depend on the sequence length; "
                f"the runner needs one of {ROPE_TYPES}")
    attn = model.model.layers[0].self_attn
    if 2 * rotary.inv_freq.numel() != attn.head_dim:
        return f"{model_type} rotates {2 * rotary.inv_freq.numel()} of {attn.head_dim} head channels (partial rotary)"
    return None


def layer_windows(model, sliding_window: int | None) -> list[int | None]:
    """Each layer's sliding window: ``sliding_window`` for all when given, else the config's.

    Mistral windows every layer with ``config.sliding_window`` (when set); Qwen2/Qwen3 window the layers
    whose ``layer_types`` entry is ``sliding_attention`` (``use_sliding_window``); Llama has none.
    """
    cfg = text_config(model)
    num_layers = len(model.model.layers)
    if sliding_window is not None:
        return [sliding_window] * num_layers
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or ["sliding_attention"] * num_layers
    return [window if t == "sliding_attention" else None for t in types]


def model_parts(model, sliding_window: int | None, pack: bool = False) -> ModelParts:
    """The weights :func:`kvcore.engine.forward.model_forward` applies, and each layer's window (pack: the
    projections' weights packed for oneDNN's GEMM, and at half width where that is exact,
    :class:`kvcore.engine.forward.Projection`)."""
    inner = model.model
    layers = [Layer.of(layer, window, pack) for layer, window in zip(inner.layers, layer_windows(model, sliding_window),
                                                                      strict=True)]
    return ModelParts(inner.embed_tokens, layers, inner.norm, RotaryTable(inner.rotary_emb),
                      Projection.of(pack, model.lm_head))


class ModelRunner:
    """Executes engine steps on a transformers causal LM with K/V in paged pools (vLLM's model runner).

    model: a loaded Llama-family causal LM (:func:`unsupported` says why another cannot run).
    num_blocks, block_size: the pool geometry (blocks, token slots per block), as the engine's
    ``KVCacheManager`` counts them. kv_bits: None keeps K/V in the model's dtype; 8, 4 (or 2) store them
    as :func:`kvcore.kernels.quantize_paged_cache` pools (per token and head, ``kv_group_size`` channels
    per scale, None = the whole head). sliding_window: tokens each query sees in every layer (None: the
    model config's windows, e.g. Mistral's ``sliding_window``). backend: the decode kernels' backend (None:
    the best for the device, :func:`kvcore.kernels.choose_backend`). packed_weights: run the projections with
    oneDNN on weights packed once (a copy of them; fp32 on a CPU only), and small steps on an fp16 or bf16 copy where
    every weight is such a value (:class:`kvcore.kernels.native_linear.HalfWidthLinear`); None: wherever it can.
    enforce_eager: never replay a pure decode step as a captured graph (:mod:`kvcore.engine.graph`; vLLM's name);
    ``graph_problem`` says why a model gets none anyway.
    """

    def __init__(self, model, num_blocks: int, block_size: int = 16, kv_bits: int | None = None,
                 sliding_window: int | None = None, kv_group_size: int | None = None,
                 backend: str | None = None, packed_weights: bool | None = None, enforce_eager: bool = False
                 ) -> None:
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(reason)
        _check_settings(num_blocks, block_size, kv_bits, sliding_window)
        self.model = model
        self.block_size = block_size
        self.parts = model_parts(model, sliding_window, pack=packed_weights is not False)
        head_dim = self.parts.layers[0].head_dim
        if kv_bits is not None and head_dim % (8 // kv_bits):
            raise ValueError(f"head_dim {head_dim} does not fill whole bytes of {kv_bits}-bit codes")
        self.device = model_device(model)
        self.pools = KVPools.allocate(len(self.parts.layers), num_blocks, block_size, num_kv_heads(model), head_dim,
                                      self.parts.embed.weight.dtype, self.device, kv_bits, kv_group_size)
        self.num_q_heads = text_config(model).num_attention_heads
        probe = torch.empty(1, self.num_q_heads, head_dim, dtype=self.parts.embed.weight.dtype, device=self.device)
        self.backend = choose_backend(probe, self.pools.keys[0], self.pools.values[0], backend)
        self.graph_problem = "enforce_eager is set" if enforce_eager else graph_problem(self.parts, self.pools,
                                                                                        self.backend)
        self.graphs = None if self.graph_problem else DecodeGraphs(self.parts, self.pools)

    @property
    def num_blocks(self) -> int:
        """Blocks in every pool."""
        return self.pools.shape[0]

    @property
    def kv_bytes(self) -> int:
        """Exact bytes of all pools (codes + scales + zeros when quantized)."""
        return self.pools.nbytes

    @property
    def sliding_window(self) -> int | None:
        """The window every layer shares, or None: only then may blocks before all windows be freed."""
        windows = self.parts.windows
        return windows.pop() if len(windows) == 1 else None

    def execute(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        """Run one engine step: write the chunks' K/V into their slots and return the sampled logits.

        Returns ``[number of chunks with wants_logits, vocab]`` float32 on CPU, rows in chunk order
        (each the logits after the chunk's last token). Chunks are validated here, once per step.
        """
        with torch.inference_mode():
            if not chunks:
                return torch.empty(0, self.parts.lm_head.sizes[0])
            step = self.plan(chunks)
            logits = None if self.graphs is None else self.graphs.replay(step)
            return (model_forward(self.parts, self.pools, step) if logits is None else logits).cpu()

    def copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write: every layer's K and V of block ``src`` into block ``dst``."""
        for name, block in (("src", src), ("dst", dst)):
            if not 0 <= block < self.num_blocks:
                raise ValueError(f"{name} block {block} is outside 0..{self.num_blocks - 1}")
        with torch.inference_mode():
            self.pools.copy_block(src, dst)

    def plan(self, chunks: Sequence[SequenceChunk]) -> StepBatch:
        """The step's flattened inputs and attention plans, built with plain integers then one tensor each.

        Rows are ordered decodes first (so the decode batch is a view of the step's rows), then the rest;
        logits rows follow the chunks' order.
        """
        self._check_chunks(chunks)
        windows = self.parts.windows
        decodes = [i for i, c in enumerate(chunks) if c.is_decode]
        fits_all = [i for i in decodes if all(w is None or chunks[i].end <= w for w in windows)]
        first = set(fits_all)
        order = fits_all + [i for i in decodes if i not in first]
        order += [i for i, c in enumerate(chunks) if not c.is_decode]
        offsets, ids, positions, slots, row = {}, [], [], [], 0
        bs = self.block_size
        for i in order:
            chunk = chunks[i]
            offsets[i] = row
            row += len(chunk.token_ids)
            ids += chunk.token_ids
            table = chunk.block_table
            span = range(chunk.start, chunk.end)
            positions += span
            slots += [table[p // bs] * bs + p % bs for p in span]
        logits_rows = [offsets[i] + len(c.token_ids) - 1 for i, c in enumerate(chunks) if c.wants_logits]
        plans = {w: self._attention_plan(chunks, order, len(decodes), offsets, w) for w in windows}
        long = {"dtype": torch.long, "device": self.device}
        return StepBatch(torch.tensor(ids, **long), torch.tensor(positions, **long), torch.tensor(slots, **long),
                         torch.tensor(logits_rows, **long), plans, max(positions) + 1)

    def _check_chunks(self, chunks: Sequence[SequenceChunk]) -> None:
        seen, vocab, bs = set(), self.parts.embed.num_embeddings, self.block_size
        for chunk in chunks:
            name = chunk.seq_id
            if name in seen:
                raise ValueError(f"sequence {name!r} appears twice in one step")
            seen.add(name)
            if min(chunk.token_ids) < 0 or max(chunk.token_ids) >= vocab:
                raise ValueError(f"sequence {name!r}: token ids must be in 0..{vocab - 1}")
            needed = -(-chunk.end // bs)
            if needed > len(chunk.block_table):
                raise ValueError(f"sequence {name!r}: positions up to {chunk.end - 1} do not fit its block table of "
                                 f"{len(chunk.block_table)} blocks x {bs} slots")
            used = chunk.block_table[:needed]
            if min(used) < 0 or max(used) >= self.num_blocks:
                raise ValueError(f"sequence {name!r}: block table entries {used} must be in "
                                 f"0..{self.num_blocks - 1}")

    def _slots(self, chunk: SequenceChunk, first: int, stop: int) -> list[int]:
        """Pool slots of positions ``first .. stop - 1`` (vLLM's slot mapping)."""
        table, bs = chunk.block_table, self.block_size
        return [table[p // bs] * bs + p % bs for p in range(first, stop)]

    def _attention_plan(self, chunks: Sequence[SequenceChunk], order: list[int], num_decodes: int,
                        offsets: dict[int, int], window: int | None) -> AttentionPlan:
        """How each row attends under ``window``: the leading decodes that the window does not cut go to the
        paged kernel in one batch; decodes the window cut into attend to exactly their window (one batch when
        consecutive); everything else as a (chunked) prefill."""
        plan = AttentionPlan()
        decodes = [chunks[i] for i in order[:num_decodes]]
        num_kernel = next((j for j, c in enumerate(decodes) if window is not None and c.end > window), num_decodes)
        if num_kernel:
            tables = [c.block_table[:-(-c.end // self.block_size)] for c in decodes[:num_kernel]]
            width = max(len(t) for t in tables)
            padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=self.device)
            plan.decode = DecodeBatch.of(self.backend, padded, [c.end for c in decodes[:num_kernel]], self.num_q_heads,
                                         self.parts.layers[0].head_dim)
        cut = decodes[num_kernel:]
        rest = order[num_kernel:]
        if cut and all(c.end > window for c in cut):  # every other decode sees exactly its last `window` keys
            start = offsets[order[num_kernel]]
            key_slots = [self._slots(c, c.end - window, c.end) for c in cut]
            plan.gathered.append(GatheredAttention(slice(start, start + len(cut)),
                                                   torch.tensor(key_slots, device=self.device), None, False))
            rest = order[num_decodes:]
        plan.gathered += [self._prefill(chunks[i], offsets[i], window) for i in rest]
        return plan

    def _prefill(self, chunk: SequenceChunk, offset: int, window: int | None) -> GatheredAttention:
        """A (chunked) prefill: the chunk's queries over its window of the cached prefix plus itself."""
        n = len(chunk.token_ids)
        first = 0 if window is None else max(0, chunk.start - window + 1)  # the first query's oldest key
        to = self.device
        rows = slice(offset, offset + n)
        key_slots = torch.tensor([self._slots(chunk, first, chunk.end)], device=to)  # [1, L]
        if first == chunk.start == 0 and (window is None or n <= window):
            return GatheredAttention(rows, key_slots, None, True)  # L == n: SDPA's causal mask is the one
        q_pos = torch.arange(chunk.start, chunk.end, device=to)[:, None]  # [n, 1]
        k_pos = torch.arange(first, chunk.end, device=to)[None, :]  # [1, L]
        mask = k_pos <= q_pos  # [n, L]
        if window is not None:
            mask &= k_pos > q_pos - window
        return GatheredAttention(rows, key_slots, mask[None, None], False)  # mask [1, 1, n, L]


def _check_settings(num_blocks: int, block_size: int, kv_bits: int | None, sliding_window: int | None) -> None:
    for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if kv_bits is not None and kv_bits not in KERNEL_BITS:
        raise ValueError(f"kv_bits must be None (the model's dtype) or one of {KERNEL_BITS}, got {kv_bits!r}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or an integer >= 1, got {sliding_window!r}")
