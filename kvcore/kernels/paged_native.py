"""Paged decode attention on CPU with the fused C kernel (``csrc/paged_decode.c``), split-K over threads.

Follows vLLM PagedAttention V2 (Kwon et al., SOSP 2023) and flash-decoding (Dao et al. 2023): each
sequence is cut into spans of whole chunks (:func:`kvcore.kernels.parallel.plan_spans`); one C call reads
a span's K and V rows once, straight from their blocks, and leaves a partial softmax state that
:func:`kvcore.kernels.flash.merge_partials` reduces. Against :mod:`kvcore.kernels.paged_cpu` (torch ops on
gathered chunks) it skips the gather copy and does the dot products in registers (benchmarks/RESULTS.md).
Supported: fp32 contiguous caches, head dim a multiple of 16, 1, 2, 4, 8 or 16 query heads per KV head;
:func:`supports` says whether a call qualifies and :mod:`kvcore.kernels.attention` falls back otherwise.
The same library holds the quantized-pool kernel that :mod:`kvcore.kernels.quantized` calls; the
helpers here (:func:`native_function`, :func:`run_native`) serve both.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from kvcore.kernels import native
from kvcore.kernels.flash import empty_partials, merge_partials
from kvcore.kernels.paged_cpu import CPU_CHUNK_TOKENS, ChunkPlan
from kvcore.kernels.parallel import DEFAULT_WORKERS, Span, plan_spans, run_spans

LIBRARY = "paged_decode"
GROUPS = (1, 2, 4, 8, 16)  # query heads per KV head the kernel has register layouts for
ERRORS = {1: "out of memory", 2: "unsupported shape"}


@cache
def native_function(symbol: str, pointers: int, ints: int, outputs: int) -> ctypes._CFuncPtr | None:
    """``symbol`` of the compiled library, typed as ``pointers`` pointers, ``ints`` int64s, ``outputs``
    pointers, returning an int status; None if the library is not available (looked up once)."""
    library = native.load(LIBRARY)
    if library is None:
        return None
    fn = getattr(library, symbol)
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int64] * ints + [ctypes.c_void_p] * outputs
    return fn


def _function() -> ctypes._CFuncPtr | None:
    return native_function("kvlab_paged_span_f32", 4, 5, 3)


def check_status(status: int) -> None:
    """Raise for a non-zero status from a kernel in ``csrc/paged_decode.c``."""
    if status:
        raise RuntimeError(f"paged_decode.c: {ERRORS.get(status, f'error {status}')}")


def span_extent(plan: ChunkPlan, tables: torch.Tensor, span: Span) -> tuple[int, torch.Tensor]:
    """Tokens in ``span`` and the block-table entries from its first block on (``tables`` int64 contiguous)."""
    first = span.first * plan.chunk
    tokens = min(span.stop * plan.chunk, plan.lengths[span.seq]) - first
    return tokens, tables[span.seq, span.first * plan.chunk_blocks:]


def unsupported(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> str:
    """Why the fused kernel cannot run this call (shapes already validated), or ``""`` when it can."""
    num_q_heads, dim = query.shape[1:]
    num_kv_heads = key_cache.shape[2]
    if key_cache.device.type != "cpu":
        return f"the fused C kernel runs on CPU tensors, got {key_cache.device.type}"
    if not key_cache.dtype == value_cache.dtype == torch.float32:
        return f"the fused C kernel needs fp32 caches, got {key_cache.dtype}"
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        return "the fused C kernel needs contiguous caches"
    if dim % 16 or num_q_heads // num_kv_heads not in GROUPS:
        return (f"the fused C kernel needs head_dim a multiple of 16 and {GROUPS} query heads per KV head, "
                f"got head_dim {dim} and {num_q_heads // num_kv_heads}")
    if _function() is None:
        return f"the fused C kernel is not available: {native.unavailable_reason(LIBRARY)}"
    return ""


def supports(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> bool:
    """True if the fused kernel can run this call (shapes already validated) and its library loads."""
    return not unsupported(query, key_cache, value_cache)


@dataclass(slots=True)
class NativeJob:
    """One call of a span kernel of ``csrc/paged_decode.c``; :meth:`run` fills one span's partial.

    Every such kernel takes ``(*pointers(seq), block_ids, tokens, *sizes, m, l, o)``: the sequence's
    inputs, the span's block-table entries and token count, the shape, and the partial to write (slot
    ``span.first`` of the call's partials).
    """

    fn: ctypes._CFuncPtr
    pointers: Callable[[int], tuple[int | None, ...]]  # a sequence's input pointers
    sizes: tuple[int, ...]
    tables: torch.Tensor  # [B, max_blocks] int64 contiguous
    plan: ChunkPlan
    partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # m, l [P, B, Hkv, G, 1]; o [P, B, Hkv, G, D]

    def run(self, span: Span) -> None:
        tokens, table = span_extent(self.plan, self.tables, span)
        m, l, o = (t[span.first, span.seq].data_ptr() for t in self.partials)
        check_status(self.fn(*self.pointers(span.seq), table.data_ptr(), tokens, *self.sizes, m, l, o))


def run_native(fn: ctypes._CFuncPtr, pointers: Callable[[int], tuple[int | None, ...]], sizes: tuple[int, ...],
               block_tables: torch.Tensor, plan: ChunkPlan, lead: tuple[int, int, int], dim: int,
               workers: int | None) -> torch.Tensor:
    """Run a span kernel over every span of ``plan`` on ``workers`` threads; the merged ``[*lead, dim]``.

    lead: ``(B, Hkv, G)``; unused partial slots weigh 0 in the merge.
    """
    num_chunks = plan.num_chunks()
    partials = empty_partials(max(num_chunks), lead, dim, block_tables.device)
    tables = block_tables.to(dtype=torch.long).contiguous()
    job = NativeJob(fn, pointers, sizes, tables, plan, partials)
    run_spans(plan_spans(num_chunks, workers), job.run, workers)
    return merge_partials(*partials)


def paged_attention_native(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           chunk_tokens: int = CPU_CHUNK_TOKENS, workers: int | None = DEFAULT_WORKERS
                           ) -> torch.Tensor:
    """Paged decode attention with the fused C kernel; same contract as :func:`paged_attention_cpu`.

    Requires :func:`supports` to be True. chunk_tokens: the split unit (rounded down to whole blocks);
    a span of chunks is one C call and one partial. Returns ``[B, Hq, D]`` in the query's dtype.
    """
    fn = _function()
    if fn is None:
        raise RuntimeError(f"the fused paged kernel is not available: {native.unavailable_reason(LIBRARY)}")
    B, Hq, D = query.shape
    block_size, Hkv = key_cache.shape[1:3]
    q = (query.float() * scale).reshape(B, Hkv, Hq // Hkv, D).contiguous()  # [B, Hkv, G, D]
    out = run_native(fn, lambda b: (q[b].data_ptr(), key_cache.data_ptr(), value_cache.data_ptr()),
                     (block_size, Hkv, Hq // Hkv, D), block_tables, ChunkPlan.of(seq_lens, chunk_tokens, block_size),
                     (B, Hkv, Hq // Hkv), D, workers)
    return out.reshape(B, Hq, D).to(query.dtype)  # [B, Hkv, G, D] -> [B, Hq, D]
