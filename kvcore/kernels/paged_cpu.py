"""Paged decode attention on CPU: each sequence's blocks in cache-sized chunks, split-K across threads.

Follows flash-decoding (Dao et al. 2023) and vLLM PagedAttention V2 (Kwon et al., SOSP 2023) in the
shape that suits a CPU. A chunk of a sequence's blocks is copied into a reused buffer (each block
``[block_size, Hkv, D]`` is contiguous, so ``index_select`` is one memcpy per block), attended while it
is still in cache, and leaves a partial softmax state; the partials are merged at the end. Only the
blocks a sequence uses are read (no padding to the longest sequence, no mask: a last chunk just has
fewer rows), the GQA group stays a dimension (one ``bmm`` over KV heads, no K/V repeat) and the math is
fp32. The chunk loop runs on one intra-op thread (why: :mod:`kvcore.kernels.parallel`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from kvcore.kernels.flash import chunk_partial, empty_partials, merge_partials
from kvcore.kernels.parallel import DEFAULT_WORKERS, Span, one_intra_op_thread, plan_spans, run_spans

CPU_CHUNK_TOKENS = 512  # 512 tokens x 8 heads x 128 dims x 4 B = 2 MiB of K: an L2-sized chunk


@dataclass(slots=True)
class ChunkBuffers:
    """One worker's reused chunk buffers: blocks as gathered, and fp32 copies for a 16-bit cache.

    key/value: ``[chunk_blocks, block_size, Hkv, D]`` in the cache dtype; key_f32/value_f32 the same in
    fp32, or None for an fp32 cache (the gathered chunk is used directly).
    """

    key: torch.Tensor
    value: torch.Tensor
    key_f32: torch.Tensor | None
    value_f32: torch.Tensor | None

    @classmethod
    def allocate(cls, key_cache: torch.Tensor, value_cache: torch.Tensor, chunk_blocks: int) -> ChunkBuffers:
        """Buffers for ``chunk_blocks`` blocks of these caches (same device and dtype)."""
        shape = (chunk_blocks, *key_cache.shape[1:])  # [chunk_blocks, block_size, Hkv, D]

        def f32(cache: torch.Tensor) -> torch.Tensor | None:
            return None if cache.dtype == torch.float32 else torch.empty(shape, device=cache.device)

        return cls(torch.empty(shape, dtype=key_cache.dtype, device=key_cache.device),
                   torch.empty(shape, dtype=value_cache.dtype, device=value_cache.device),
                   f32(key_cache), f32(value_cache))


def gather_chunk(cache: torch.Tensor, ids: torch.Tensor, rows: int, buffer: torch.Tensor,
                 buffer_f32: torch.Tensor | None) -> torch.Tensor:
    """The first ``rows`` tokens of blocks ``ids`` as fp32 ``[rows, Hkv, D]``, copied into ``buffer``.

    cache: ``[num_blocks, block_size, Hkv, D]``; ids: int64 block ids (at most ``buffer.shape[0]``).
    """
    heads, dim = cache.shape[2:]
    blocks = torch.index_select(cache, 0, ids, out=buffer[:ids.numel()])  # [n, block_size, Hkv, D]
    tokens = blocks.view(-1, heads, dim)[:rows]  # [rows, Hkv, D]
    if buffer_f32 is None:
        return tokens
    return buffer_f32.view(-1, heads, dim)[:rows].copy_(tokens)  # [rows, Hkv, D] fp32


@dataclass(slots=True)
class ChunkPlan:
    """Which blocks and rows chunk ``i`` of a sequence covers."""

    lengths: list[int]  # tokens per sequence
    chunk_blocks: int
    block_size: int

    @classmethod
    def of(cls, seq_lens: torch.Tensor, chunk_tokens: int, block_size: int) -> ChunkPlan:
        """Chunks of ``chunk_tokens`` rounded down to whole blocks (at least one) over ``seq_lens`` tokens."""
        return cls(seq_lens.tolist(), max(1, chunk_tokens // block_size), block_size)

    @property
    def chunk(self) -> int:
        """Tokens per full chunk."""
        return self.chunk_blocks * self.block_size

    def num_chunks(self) -> list[int]:
        """Chunks per sequence."""
        return [-(-t // self.chunk) for t in self.lengths]

    def rows(self, seq: int, i: int) -> int:
        """Tokens of sequence ``seq`` in its chunk ``i`` (the last chunk may be short)."""
        return min(self.chunk, self.lengths[seq] - i * self.chunk)

    def block_ids(self, table: torch.Tensor, seq: int, i: int) -> torch.Tensor:
        """The table entries chunk ``i`` reads (only blocks holding its rows)."""
        first = i * self.chunk_blocks
        return table[first: first + -(-self.rows(seq, i) // self.block_size)]


@dataclass(slots=True)
class PagedJob:
    """One call's inputs and partial outputs; :meth:`run` fills the partials of one span."""

    q: torch.Tensor  # [B, Hkv, G, D] fp32, scaled
    key_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    value_cache: torch.Tensor
    tables: torch.Tensor  # [B, max_blocks] int64
    plan: ChunkPlan
    partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # m, l [P, B, Hkv, G, 1]; o [P, B, Hkv, G, D]
    local: threading.local

    def buffers(self) -> ChunkBuffers:
        """This thread's chunk buffers, allocated on first use."""
        if not hasattr(self.local, "buffers"):
            self.local.buffers = ChunkBuffers.allocate(self.key_cache, self.value_cache, self.plan.chunk_blocks)
        return self.local.buffers

    def run(self, span: Span) -> None:
        """Partials of chunks ``span.first..span.stop`` of sequence ``span.seq``."""
        b, buf, (m, l, o) = span.seq, self.buffers(), self.partials
        for i in range(span.first, span.stop):
            rows, ids = self.plan.rows(b, i), self.plan.block_ids(self.tables[b], b, i)
            k = gather_chunk(self.key_cache, ids, rows, buf.key, buf.key_f32)  # [rows, Hkv, D]
            v = gather_chunk(self.value_cache, ids, rows, buf.value, buf.value_f32)  # [rows, Hkv, D]
            # [rows, Hkv, D] -> [Hkv, rows, D]: a strided view whose heads are valid BLAS matrices (no copy)
            chunk_partial(self.q[b], k.transpose(0, 1), v.transpose(0, 1), m[i, b], l[i, b], o[i, b])


@one_intra_op_thread()
def paged_attention_cpu(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                        chunk_tokens: int = CPU_CHUNK_TOKENS, workers: int | None = DEFAULT_WORKERS) -> torch.Tensor:
    """Paged decode attention in chunks of one sequence, split-K over worker threads (the CPU kernel).

    query ``[B, Hq, D]``; key_cache/value_cache ``[num_blocks, block_size, Hkv, D]``; block_tables int
    ``[B, max_blocks]``; seq_lens int ``[B]`` (tokens); scale: softmax scale; chunk_tokens: tokens per
    chunk (rounded down to whole blocks, at least one block); workers: threads running chunk spans (see
    :mod:`kvcore.kernels.parallel`). Inputs are assumed valid
    (:func:`kvcore.kernels.validate.check_paged`). Returns ``[B, Hq, D]`` in the query's dtype.
    """
    B, Hq, D = query.shape
    block_size, Hkv = key_cache.shape[1:3]
    device = key_cache.device
    q = (query.to(device).float() * scale).reshape(B, Hkv, Hq // Hkv, D)  # [B, Hkv, G, D]
    plan = ChunkPlan.of(seq_lens, chunk_tokens, block_size)
    num_chunks = plan.num_chunks()
    partials = empty_partials(max(num_chunks), (B, Hkv, Hq // Hkv), D, device)  # unused slots weigh 0
    job = PagedJob(q, key_cache, value_cache, block_tables.to(device=device, dtype=torch.long), plan, partials,
                   threading.local())
    run_spans(plan_spans(num_chunks, workers), job.run, workers)
    return merge_partials(*partials).reshape(B, Hq, D).to(query.dtype)  # [B, Hkv, G, D] -> [B, Hq, D]
