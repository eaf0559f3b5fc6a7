"""Paged decode attention over an integer-quantized KV pool, dequantized chunk by chunk.

The pool is a :class:`kvcore.quant.QuantizedTensor` of ``[num_blocks, block_size, Hkv, D]`` quantized
per token and head along D (``axis=-1``, groups of ``group_size`` channels, packed codes + fp16 scales
and zero points; KIVI's per-token layout, here used for keys too): each new token is quantized on its
own, so a block can be appended to without requantizing it. The kernel follows the chunked split-K
loop of :mod:`kvcore.kernels.paged_cpu` (flash-decoding, Dao et al. 2023) and, like KIVI's fused
kernels (Liu et al. 2024), never builds the fp32 cache: per chunk the packed codes are unpacked to fp32
integers, and the scales and zeros are folded into the scores and probabilities, which are
``[Hkv, G, C]`` instead of ``[C, Hkv, D]``:

    q . k_t = sum_j s_tj (q_j . c_tj) + sum_j z_tj sum(q_j)        (j = channel group)
    sum_t p_t v_t[d] = sum_t (p_t s_tj) c_t[d] + sum_t p_t z_tj    (d in group j)
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvcore.kernels import native
from kvcore.kernels.attention import choose_kernel
from kvcore.kernels.flash import empty_partials, merge_partials
from kvcore.kernels.paged_batched import batched_chunk_tokens, paged_attention_batched
from kvcore.kernels.paged_cpu import CPU_CHUNK_TOKENS, ChunkPlan
from kvcore.kernels.paged_native import GROUPS, LIBRARY, native_function, run_native
from kvcore.kernels.paged_triton import quantized_paged_attention_triton
from kvcore.kernels.parallel import DEFAULT_WORKERS, Span, one_intra_op_thread, plan_spans, run_spans
from kvcore.kernels.validate import check_block_tables, check_query
from kvcore.quant import QuantizedTensor, quantize

KERNEL_BITS = (2, 4, 8)  # widths whose codes never straddle a byte


def quantize_paged_cache(cache: torch.Tensor, bits: int = 4, group_size: int | None = None,
                         symmetric: bool = False, blocks_per_step: int = 1024) -> QuantizedTensor:
    """Quantize a ``[num_blocks, block_size, Hkv, D]`` pool per token and head, ``blocks_per_step`` at a time.

    Same result as ``kvcore.quant.quantize(cache, bits, axis=-1, group_size, symmetric)``; quantizing in
    steps bounds the fp32 temporaries to one step. bits: 2, 4 or 8; group_size: channels per scale
    (None = all D).
    """
    if cache.dim() != 4 or not cache.is_floating_point():
        raise ValueError(f"cache must be a float [num_blocks, block_size, Hkv, D] tensor, got "
                         f"{cache.dtype} {tuple(cache.shape)}")
    if bits not in KERNEL_BITS:
        raise ValueError(f"bits must be one of {KERNEL_BITS} for the paged kernel, got {bits}")
    parts = [quantize(cache[i:i + blocks_per_step], bits, axis=-1, group_size=group_size, symmetric=symmetric)
             for i in range(0, cache.shape[0], blocks_per_step)]
    zeros = None if symmetric else torch.cat([p.zeros for p in parts])
    return QuantizedTensor(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), zeros,
                           bits, 3, parts[0].group_size, tuple(cache.shape), cache.dtype)


@dataclass(slots=True)
class ChannelLayout:
    """Where unpacked channels land and which group each belongs to.

    Codes are unpacked plane by plane (all low nibbles, then all high nibbles), so the fp32 chunk holds
    channel ``order[i]`` at position ``i``; queries are permuted the same way once per call and the
    output is un-permuted once. groups: ``[num_groups, D]`` one-hot of each position's scale group.
    """

    order: torch.Tensor  # [D] int64
    groups: torch.Tensor  # [num_groups, D] fp32

    @classmethod
    def of(cls, cache: QuantizedTensor, device: torch.device) -> ChannelLayout:
        """The layout of a pool quantized along D with ``cache.bits`` and ``cache.group_size``."""
        dim = cache.shape[3]
        per_byte = 8 // cache.bits
        order = torch.arange(dim, device=device).view(dim // per_byte, per_byte).t().reshape(-1)  # [D]
        groups = F.one_hot(order // cache.group_size).t().float()  # [num_groups, D]
        return cls(order, groups)


def unpack_chunk(codes: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """Unpack uint8 codes ``[rows, Hkv, D * bits / 8]`` into fp32 ``out[:rows]`` ``[rows, Hkv, D]``.

    Plane p holds bit field ``p`` of every byte (kvcore.quant packs little-endian), so channel
    ``byte * per_byte + p`` lands at position ``p * D / per_byte + byte`` (see :class:`ChannelLayout`).
    """
    rows, heads, nbytes = codes.shape
    planes = out[:rows].view(rows, heads, 8 // bits, nbytes)  # [rows, Hkv, planes, D / planes]
    last = 8 // bits - 1
    for p in range(last + 1):
        field = codes >> (p * bits) if p else codes  # the top plane needs no mask, the bottom no shift
        planes[:, :, p].copy_(field if p == last else field & ((1 << bits) - 1))  # uint8 -> fp32
    return out[:rows].view(rows, heads, -1)  # [rows, Hkv, D]


def gather_scales(cache: QuantizedTensor, ids: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scales and zero points of the chunk's tokens, ``[Hkv, num_groups, rows]`` each."""
    heads, groups = cache.scales.shape[2:]

    def take(t: torch.Tensor) -> torch.Tensor:
        # [n, block_size, Hkv, ng] -> [rows, Hkv, ng] -> [Hkv, ng, rows]
        return t.index_select(0, ids).view(-1, heads, groups)[:rows].float().permute(1, 2, 0).contiguous()

    scales = take(cache.scales)
    zeros = -(2 ** (cache.bits - 1)) * scales if cache.zeros is None else take(cache.zeros)
    return scales, zeros


@dataclass(slots=True)
class QuantChunk:
    """One chunk of a quantized pool ready for the folded math: fp32 integer codes, scales, zeros.

    codes ``[Hkv, rows, D]`` (a view, channels in :class:`ChannelLayout` order); scales/zeros
    ``[Hkv, num_groups, rows]``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    @classmethod
    def read(cls, cache: QuantizedTensor, ids: torch.Tensor, rows: int, buffer: torch.Tensor) -> QuantChunk:
        """Gather blocks ``ids`` of ``cache`` (their first ``rows`` tokens), unpacking into ``buffer``."""
        heads, nbytes = cache.codes.shape[2:]
        packed = cache.codes.index_select(0, ids).view(-1, heads, nbytes)[:rows]  # [rows, Hkv, D*bits/8]
        codes = unpack_chunk(packed, cache.bits, buffer)  # [rows, Hkv, D]
        return cls(codes.transpose(0, 1), *gather_scales(cache, ids, rows))  # codes [Hkv, rows, D]


def quant_chunk_partial(q_groups: torch.Tensor, q_sums: torch.Tensor, k: QuantChunk, v: QuantChunk,
                        m_out: torch.Tensor, l_out: torch.Tensor, o_out: torch.Tensor) -> None:
    """Partial softmax state of one chunk with scales and zeros folded in (see the module docstring).

    q_groups: scaled queries split by channel group ``[Hkv, G * ng, D]`` (zeros outside the group);
    q_sums: their per-group sums ``[Hkv, G, ng]``. Writes m/l ``[Hkv, G, 1]`` and o ``[Hkv, G, ng * D]``
    (row ``(g, j)`` is only meaningful on group j's channels; :func:`finish_output` picks them).
    """
    heads, group, groups = q_sums.shape
    rows = k.codes.shape[1]
    raw = torch.matmul(q_groups, k.codes.transpose(-1, -2)).view(heads, group, groups, rows)  # [Hkv, G, ng, C]
    scores = (raw * k.scales[:, None]).sum(dim=2)  # [Hkv, G, C]
    scores.baddbmm_(q_sums, k.zeros)  # + sum_j z_tj sum(q_j): [Hkv, G, ng] @ [Hkv, ng, C]
    torch.amax(scores, dim=-1, keepdim=True, out=m_out)
    p = scores.sub_(m_out).exp_()  # [Hkv, G, C]
    torch.sum(p, dim=-1, keepdim=True, out=l_out)
    p_scaled = (p[:, :, None, :] * v.scales[:, None]).view(heads, group * groups, rows)  # [Hkv, G * ng, C]
    out = o_out.view(heads, group * groups, -1)  # [Hkv, G * ng, D]
    torch.matmul(p_scaled, v.codes, out=out)
    out.view(heads, group, groups, -1).add_(torch.matmul(p, v.zeros.transpose(-1, -2))[..., None])


def unpermute(x: torch.Tensor, layout: ChannelLayout) -> torch.Tensor:
    """``[..., D]`` in unpacking (plane) order -> the channels' real order."""
    out = torch.empty_like(x)
    out[..., layout.order] = x
    return out


def finish_output(merged: torch.Tensor, layout: ChannelLayout) -> torch.Tensor:
    """``[..., ng * D]`` merged partials -> ``[..., D]``: group j's row on group j's channels, real order."""
    groups, dim = layout.groups.shape
    return unpermute((merged.unflatten(-1, (groups, dim)) * layout.groups).sum(dim=-2), layout)  # [..., D]


@dataclass(slots=True)
class QuantJob:
    """One call's inputs and partial outputs; :meth:`run` fills the partials of one span."""

    q_groups: torch.Tensor  # [B, Hkv, G * ng, D] scaled queries split by channel group
    q_sums: torch.Tensor  # [B, Hkv, G, ng]
    key_cache: QuantizedTensor
    value_cache: QuantizedTensor
    tables: torch.Tensor  # [B, max_blocks] int64
    plan: ChunkPlan
    partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # m, l [P, B, Hkv, G, 1]; o [P, B, Hkv, G, ng*D]
    local: threading.local

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This thread's fp32 code buffers for K and V, ``[chunk, Hkv, D]`` each, allocated on first use."""
        if not hasattr(self.local, "buffers"):
            shape = (self.plan.chunk, *self.key_cache.shape[2:])
            device = self.key_cache.device
            self.local.buffers = (torch.empty(shape, device=device), torch.empty(shape, device=device))
        return self.local.buffers

    def run(self, span: Span) -> None:
        """Partials of chunks ``span.first..span.stop`` of sequence ``span.seq``."""
        b, (key_buf, value_buf), (m, l, o) = span.seq, self.buffers(), self.partials
        for i in range(span.first, span.stop):
            rows, ids = self.plan.rows(b, i), self.plan.block_ids(self.tables[b], b, i)
            k = QuantChunk.read(self.key_cache, ids, rows, key_buf)
            v = QuantChunk.read(self.value_cache, ids, rows, value_buf)
            quant_chunk_partial(self.q_groups[b], self.q_sums[b], k, v, m[i, b], l[i, b], o[i, b])


def native_unsupported(query: torch.Tensor, key_cache: QuantizedTensor, value_cache: QuantizedTensor) -> str:
    """Why the fused C kernel (``csrc/paged_decode.c``) cannot run this validated call, ``""`` when it can.

    It needs CPU tensors, contiguous fp16 scales and zeros (or none), 1-16 query heads per KV head as
    in :data:`kvcore.kernels.paged_native.GROUPS`, and groups that divide D and cover a multiple of
    16 bytes of each bit plane (4-bit: group_size 32, 64, 128...).
    """
    dim, per_byte = key_cache.shape[3], 8 // key_cache.bits
    tensors = [t for c in (key_cache, value_cache) for t in (c.codes, c.scales, c.zeros) if t is not None]
    if key_cache.device.type != "cpu":
        return f"the fused C kernel runs on CPU tensors, got {key_cache.device.type}"
    if not all(t.is_contiguous() for t in tensors):
        return "the fused C kernel needs contiguous codes, scales and zeros"
    if not all(c.scales.dtype == torch.float16 and (c.zeros is None or c.zeros.dtype == torch.float16)
               for c in (key_cache, value_cache)):
        return "the fused C kernel needs fp16 scales and zeros"
    if query.shape[1] // key_cache.shape[2] not in GROUPS:
        return f"the fused C kernel needs {GROUPS} query heads per KV head, got {query.shape[1] // key_cache.shape[2]}"
    if dim % key_cache.group_size or key_cache.group_size % (16 * per_byte):
        return (f"the fused C kernel needs groups that divide head_dim ({dim}) and span a multiple of "
                f"{16 * per_byte} channels, got group_size {key_cache.group_size}")
    if _native_function() is None:
        return f"the fused C kernel is not available: {native.unavailable_reason(LIBRARY)}"
    return ""


def native_supports(query: torch.Tensor, key_cache: QuantizedTensor, value_cache: QuantizedTensor) -> bool:
    """True if the fused C kernel (``csrc/paged_decode.c``) can run this validated call and loads."""
    return not native_unsupported(query, key_cache, value_cache)


def quantized_kernel(query: torch.Tensor, key_cache: QuantizedTensor, value_cache: QuantizedTensor,
                     backend: str | None = None) -> str:
    """The key in :data:`kvcore.kernels.attention.KERNELS` of the kernel that
    :func:`quantized_paged_decode_attention` runs for these (valid) arguments; ``"torch"`` on CPU is this
    module's chunk loop. A forced backend that cannot run the call raises ValueError naming why."""
    return choose_kernel(key_cache.device, backend, native_unsupported(query, key_cache, value_cache))


def _native_function() -> ctypes._CFuncPtr | None:
    return native_function("kvlab_paged_span_quantized", 9, 7, 3)


def chunk_workspace_bytes(cache: QuantizedTensor, num_q_heads: int, chunk_tokens: int = CPU_CHUNK_TOKENS) -> int:
    """Bytes of the tensors one chunk step of :func:`quantized_paged_decode_attention` allocates (one worker).

    From the shapes in :meth:`QuantChunk.read` and :func:`quant_chunk_partial`, for K and V: the fp32
    code buffer ``[C, Hkv, D]``, the gathered packed codes and their shifted/masked planes, fp16 scales
    and zeros and their fp32 copies; and the score-sized tensors ``[Hkv, G * ng, C]`` (raw scores, scaled
    probabilities) and ``[Hkv, G, C]`` (scores), and the output ``[Hkv, G * ng, D]``. Independent of the
    context length: this is what replaces the ``[num_blocks, block_size, Hkv, D]`` fp32 cache.
    """
    _, block_size, heads, dim = cache.shape
    rows = max(1, chunk_tokens // block_size) * block_size
    groups = -(-dim // cache.group_size)
    packed = rows * heads * cache.codes.shape[-1]  # uint8 codes of the chunk
    per_cache = rows * heads * dim * 4 + 3 * packed + 2 * rows * heads * groups * (2 + 4)
    score_floats = num_q_heads * rows * (2 * groups + 1) + num_q_heads * groups * dim
    return 2 * per_cache + 4 * score_floats


def _check_quantized(query: torch.Tensor, key_cache: QuantizedTensor, value_cache: QuantizedTensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if len(cache.shape) != 4 or cache.axis != 3:
            raise ValueError(f"{name} must quantize a [num_blocks, block_size, Hkv, D] pool along D (axis 3), "
                             f"got shape {cache.shape}, axis {cache.axis}; use quantize_paged_cache")
        if cache.bits not in KERNEL_BITS:
            raise ValueError(f"{name} bits must be one of {KERNEL_BITS}, got {cache.bits}")
    if key_cache.shape != value_cache.shape or (key_cache.bits, key_cache.group_size) != (
            value_cache.bits, value_cache.group_size):
        raise ValueError("key_cache and value_cache must have the same shape, bits and group_size")
    if key_cache.shape[3] % (8 // key_cache.bits):
        raise ValueError(f"head_dim {key_cache.shape[3]} must fill whole bytes of {key_cache.bits}-bit codes")
    check_query(query, key_cache.shape[2], key_cache.shape[3])
    check_block_tables(block_tables, seq_lens, query.shape[0], key_cache.shape[0], key_cache.shape[1])


@one_intra_op_thread()
def quantized_paged_decode_attention(query: torch.Tensor, key_cache: QuantizedTensor,
                                     value_cache: QuantizedTensor, block_tables: torch.Tensor,
                                     seq_lens: torch.Tensor, scale: float | None = None,
                                     chunk_tokens: int = CPU_CHUNK_TOKENS, workers: int | None = DEFAULT_WORKERS,
                                     backend: str | None = None) -> torch.Tensor:
    """Decode attention over a quantized paged pool, dequantizing one chunk at a time (split-K).

    query ``[B, Hq, D]``; key_cache/value_cache: :func:`quantize_paged_cache` pools of
    ``[num_blocks, block_size, Hkv, D]`` (2, 4 or 8 bits); block_tables int ``[B, max_blocks]``;
    seq_lens int ``[B]`` (tokens); scale defaults to 1/sqrt(D); chunk_tokens: tokens per chunk (whole
    blocks); workers: threads running chunk spans (see :mod:`kvcore.kernels.parallel`). Equals attention
    over ``cache.dequantize()`` up to fp32 rounding. Returns ``[B, Hq, D]`` in the query's dtype.

    backend: None picks the best kernel for the device (:func:`quantized_kernel` names it); ``"torch"``,
    ``"native"`` or ``"triton"`` force one, as in :func:`kvcore.kernels.paged_decode_attention`.
    On a GPU the Triton kernel (:func:`kvcore.kernels.paged_triton.quantized_paged_attention_triton`,
    codes dequantized in registers) when triton is installed, else
    :func:`kvcore.kernels.paged_batched.paged_attention_batched`, which dequantizes each step's blocks
    (few large launches instead of one chunk loop per sequence). On CPU the fused C kernel when
    :func:`native_supports` says it can (it reads the packed codes straight into registers), else the
    chunk loop of torch ops described in the module docstring.
    """
    _check_quantized(query, key_cache, value_cache, block_tables, seq_lens)
    kernel = quantized_kernel(query, key_cache, value_cache, backend)
    B, Hq, D = query.shape
    if B == 0:
        return query.new_empty(query.shape)
    _, block_size, Hkv, _ = key_cache.shape
    device = key_cache.device
    scale = D ** -0.5 if scale is None else scale
    if kernel == "triton":
        return quantized_paged_attention_triton(query, key_cache, value_cache, block_tables, seq_lens, scale)
    if kernel == "batched":  # few large steps over the whole batch, each dequantizing only its blocks
        chunk = batched_chunk_tokens(B, Hkv, D, block_size)
        return paged_attention_batched(query, key_cache, value_cache, block_tables, seq_lens, scale, chunk)
    layout = ChannelLayout.of(key_cache, device)
    q = (query.to(device).float() * scale).reshape(B, Hkv, Hq // Hkv, D)[..., layout.order]  # [B, Hkv, G, D]
    q_split = q[:, :, :, None, :] * layout.groups  # [B, Hkv, G, ng, D]
    plan = ChunkPlan.of(seq_lens, chunk_tokens, block_size)
    if kernel == "fused":
        q, q_sums, k, v = q.contiguous(), q_split.sum(dim=-1).contiguous(), key_cache, value_cache

        def pointers(b: int) -> tuple[int | None, ...]:  # [Hkv, G, D] queries, [Hkv, G, ng] sums, both pools
            return (q[b].data_ptr(), q_sums[b].data_ptr(), *(None if t is None else t.data_ptr() for t in (
                k.codes, k.scales, k.zeros, v.codes, v.scales, v.zeros)))

        sizes = (block_size, Hkv, Hq // Hkv, D, k.bits, k.scales.shape[-1])
        out = run_native(_native_function(), pointers, sizes, block_tables, plan, (B, Hkv, Hq // Hkv), D, workers)
        return unpermute(out, layout).reshape(B, Hq, D).to(query.dtype)
    num_chunks = plan.num_chunks()
    partials = empty_partials(max(num_chunks), (B, Hkv, Hq // Hkv), layout.groups.numel(), device)
    tables = block_tables.to(device=device, dtype=torch.long)
    job = QuantJob(q_split.flatten(2, 3), q_split.sum(dim=-1), key_cache, value_cache, tables, plan, partials,
                   threading.local())
    run_spans(plan_spans(num_chunks, workers), job.run, workers)
    out = finish_output(merge_partials(*partials), layout)  # [B, Hkv, G, D]
    return out.reshape(B, Hq, D).to(query.dtype)  # [B, Hq, D]
