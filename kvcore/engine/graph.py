"""A pure decode step replayed as a fixed list of compiled calls: the CPU counterpart of vLLM's CUDA graphs.

vLLM captures the decode step once per batch size as a CUDA graph whose inputs are static buffers, and replays it
with each step's inputs copied in (``CUDAGraphRunner``; nano-vllm's ``capture_cudagraph``), so a step pays for one
launch instead of hundreds. On a CPU the cost a graph removes is Python's: the eager step (:mod:`kvcore.engine.forward`)
checks and wraps each of its C calls, six per layer, and allocates their outputs: on the bundled model a replayed
batch-16 step takes 2.20 ms on one thread where the eager one takes 2.58 (benchmarks/RESULTS.md).
A :class:`DecodeGraph` makes those calls' arguments once, pointing at buffers it owns (the step's rows, its slots,
block tables and spans, every layer's activations); a replay copies the step's inputs in and makes the calls. The
kernels, their inputs and their order are the eager step's, so the logits are too, bit for bit (tested).

It serves steps whose every row is a decode the paged kernel serves and is sampled, on models whose every projection
runs the half-width kernel (:mod:`kvcore.kernels.native_linear`), with fp32 pools, SiLU MLPs and no per-head q/k
norms: :func:`graph_problem` says why a model is not served; other steps run eagerly.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvcore.engine.forward import ModelParts, StepBatch
from kvcore.engine.pools import KVPools
from kvcore.kernels import native_linear
from kvcore.kernels.native_paged import Call, NativePlan, decode_calls, rope_call, run

GRAPHS_KEPT = 64  # graphs kept, the least recently used dropped first: a capture takes 0.13 ms (bundled model), and
# in a served run the batch size, span count and table width change every few steps
MIN_TABLE_WIDTH = 8  # block-table columns a graph holds at least (then the next power of two): few recaptures


def graph_problem(parts: ModelParts, pools: KVPools, backend: str) -> str | None:
    """Why this model's decode steps cannot be replayed (None: they can)."""
    layers = parts.layers
    projections = [parts.lm_head] + [p for layer in layers for p in (layer.qkv, layer.o, layer.mlp.gate_up,
                                                                     layer.mlp.down)]
    if backend != "native":
        return f"decode attention runs the {backend!r} backend, not the C kernel"
    if pools.kv_bits is not None:
        return "the pools are quantized"
    if any(p.narrow is None for p in projections):
        return "some weights are exact in neither fp16 nor bf16, so not every projection runs the half-width kernel"
    if any(layer.q_norm is not None for layer in layers):
        return "the layers norm each query and key head (Qwen3)"
    if any(layer.mlp.act is not F.silu for layer in layers):
        return "the MLP's activation is not SiLU"
    shapes = {(layer.head_dim, layer.qkv.sizes, layer.mlp.down.sizes, layer.mlp.gate_up.sizes) for layer in layers}
    if len(shapes) > 1:
        return "the layers differ in size"
    return None


def table_width(columns: int) -> int:
    """Block-table columns a graph holds for tables of ``columns``."""
    return max(MIN_TABLE_WIDTH, 1 << (columns - 1).bit_length())


@dataclass(slots=True)
class DecodeGraph:
    """One batch shape's calls and the buffers they read and write; build with :meth:`capture`."""

    plan: NativePlan  # static spans, partial slots, block tables (table_width columns) and partials
    hidden: torch.Tensor  # [B, hidden]: the residual stream, updated in place
    cos: torch.Tensor  # [B, 1, D]
    signed_sin: torch.Tensor  # [B, 1, D]
    slots: torch.Tensor  # [B] int64
    counters: torch.Tensor  # [layers] int64: each layer's decode workers' counter
    scratch: tuple[torch.Tensor, ...]  # q/k/v, attention and gate/up rows, shared by the layers: the calls point into
    # them, so the graph holds them
    calls: list[Call]

    @classmethod
    def capture(cls, parts: ModelParts, pools: KVPools, batch: int, spans: int, width: int, workers: int
                ) -> DecodeGraph:
        """The calls of a decode step of ``batch`` sequences cut into ``spans`` spans (block tables up to ``width``
        columns; ``workers`` threads for the decode kernel) over a model :func:`graph_problem` accepts."""
        layer = parts.layers[0]
        D, (q_size, kv_size, _) = layer.head_dim, layer.qkv.sizes
        Hq, Hkv = q_size // D, kv_size // D
        long = {"dtype": torch.int64}
        plan = NativePlan(torch.zeros(spans, 4, **long), torch.zeros(batch, **long), torch.zeros(batch, **long),
                          torch.zeros(batch, width, **long), workers)
        hidden = torch.empty(batch, parts.embed.weight.shape[1])
        qkv = torch.empty(batch, Hq + 2 * Hkv, D)
        attn = torch.empty(batch, Hq, D)
        gate_up = torch.empty(batch, sum(layer.mlp.gate_up.sizes))
        graph = cls(plan, hidden, torch.empty(batch, 1, D), torch.empty(batch, 1, D), torch.empty(batch, **long),
                    torch.zeros(len(parts.layers), **long), (qkv, attn, gate_up), [])
        linear = native_linear.kernel()
        for index, layer in enumerate(parts.layers):
            keys, values = pools.keys[index], pools.values[index]
            norm_in, norm_post = layer.input_norm, layer.post_norm
            graph.calls += [
                (linear, layer.qkv.narrow.arguments(hidden, qkv.view(batch, -1), norm_in.weight,
                                                    norm_in.variance_epsilon)),
                rope_call(qkv, Hq, graph.cos, graph.signed_sin, graph.slots, keys, values),
                *decode_calls(qkv[:, :Hq], keys, values, plan, layer.scale, attn, graph.counters[index]),
                (linear, layer.o.narrow.arguments(attn.view(batch, -1), hidden, residual=hidden)),
                (linear, layer.mlp.gate_up.narrow.arguments(hidden, gate_up, norm_post.weight,
                                                            norm_post.variance_epsilon)),
                (linear, layer.mlp.down.narrow.arguments(gate_up, hidden, gated=True, residual=hidden)),
            ]
        return graph

    def replay(self, parts: ModelParts, step: StepBatch, plan: NativePlan) -> torch.Tensor:
        """The step's logits ``[B, vocab]`` (a new tensor), its K/V written into the pools: ``step``'s rows and
        ``plan``'s spans and tables copied into the graph's buffers, then its calls."""
        torch.index_select(parts.embed.weight, 0, step.token_ids, out=self.hidden)
        table = parts.rotary
        table.cover(step.end, self.hidden)
        torch.index_select(table.cos, 0, step.positions, out=self.cos)
        torch.index_select(table.signed_sin, 0, step.positions, out=self.signed_sin)
        self.slots.copy_(step.slots)
        static = self.plan
        for mine, theirs in ((static.spans, plan.spans), (static.first, plan.first), (static.count, plan.count)):
            mine.copy_(theirs)
        static.tables[:, :plan.tables.shape[1]].copy_(plan.tables)
        self.counters.zero_()
        run(self.calls)
        norm = parts.norm
        logits = torch.empty(self.hidden.shape[0], parts.lm_head.narrow.outputs)
        run([(native_linear.kernel(), parts.lm_head.narrow.arguments(self.hidden, logits, norm.weight,
                                                                     norm.variance_epsilon))])
        return logits


class DecodeGraphs:
    """A model's captured decode graphs by shape (the :data:`GRAPHS_KEPT` most recently used)."""

    def __init__(self, parts: ModelParts, pools: KVPools) -> None:
        self.parts, self.pools = parts, pools
        self.graphs: OrderedDict[tuple[int, ...], DecodeGraph] = OrderedDict()
        self.captures = 0

    def replay(self, step: StepBatch) -> torch.Tensor | None:
        """The step's logits through a graph (captured on first sight of its shape), or None when the step is not
        a pure decode step that the paged kernel serves whole (then the caller runs it eagerly)."""
        plans = list(step.plans.values())
        if len(step.logits_rows) != len(step.token_ids) or any(p.gathered or p.decode is None for p in plans):
            return None
        plan = plans[0].decode.native  # windows that cut no context: every plan is the same
        key = (len(step.token_ids), len(plan.spans), table_width(plan.tables.shape[1]), plan.workers,
               torch.get_num_threads())
        graph = self.graphs.pop(key, None)
        if graph is None:
            graph = DecodeGraph.capture(self.parts, self.pools, *key[:4])
            self.captures += 1
        self.graphs[key] = graph
        if len(self.graphs) > GRAPHS_KEPT:
            self.graphs.popitem(last=False)
        return graph.replay(self.parts, step, plan)
