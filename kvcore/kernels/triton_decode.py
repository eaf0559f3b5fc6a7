"""Triton kernels for paged decode attention over plain and integer-quantized KV pools, split-K plus merge.

Cache layout and block tables follow vLLM's PagedAttention (Kwon et al., SOSP 2023): pools
``[num_blocks, block_size, Hkv, D]``, block tables ``[B, max_blocks]``. The work is cut the way
FlashDecoding (Dao et al. 2023) and vLLM's PagedAttention V2 cut it: one program per (sequence, KV head,
split of the sequence's tokens) runs an online softmax over its split in tiles of ``BLOCK_N`` tokens and
leaves a normalized partial output and its log-sum-exp; :func:`merge_splits_kernel` reduces the splits.
With a single split the program writes the output itself. The ``G`` query heads that read one KV head
are the rows of one tile (GQA/MQA), so each K/V element is loaded once per program, as in vLLM's Triton
decode kernels. Quantized pools (per token and head along D, KIVI's per-token layout, Liu et al. 2024)
are unpacked and dequantized in registers: the fp32 cache never exists.

This module imports triton at the top; :mod:`kvcore.kernels.paged_triton` imports it on first use only,
so ``import kvcore.kernels`` works without triton. ``TRITON_INTERPRET=1`` in the environment when this
module is first imported makes every kernel run in Triton's interpreter (on CPU tensors): see
:data:`INTERPRETED`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _token_offsets(table_ptr, stride_table, seq, tok, valid, block_size, stride_block, stride_token):
    """Element offsets of tokens ``tok`` [BLOCK_N] of sequence ``seq`` in a pool, through its block table."""
    block = tl.load(table_ptr + seq * stride_table + tok // block_size, mask=valid, other=0).to(tl.int64)
    return block * stride_block + (tok % block_size).to(tl.int64) * stride_token  # [BLOCK_N] int64


@triton.jit
def _softmax_step(q, k, v, valid, scale, m, l, acc, DOT_F32: tl.constexpr):
    """One tile of the online softmax (FlashAttention): q [BLOCK_G, BLOCK_D]; k, v [BLOCK_N, BLOCK_D];
    valid [BLOCK_N]; running max m, sum l [BLOCK_G] and acc [BLOCK_G, BLOCK_D] in fp32."""
    # fp32 operands stay fp32 (no TF32 rounding); 16-bit operands run on tensor cores with fp32 accumulation
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") if DOT_F32 else tl.dot(q, tl.trans(k))  # [BLOCK_G, BLOCK_N]
    scores = tl.where(valid[None, :], scores * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))  # [BLOCK_G]
    alpha = tl.exp(m - m_new)  # rescales what was summed under the old max (0 on the first tile)
    p = tl.exp(scores - m_new[:, None])  # [BLOCK_G, BLOCK_N]
    l = l * alpha + tl.sum(p, axis=1)
    pv = tl.dot(p, v, input_precision="ieee") if DOT_F32 else tl.dot(p.to(v.dtype), v)  # [BLOCK_G, BLOCK_D]
    return m_new, l, acc * alpha[:, None] + pv


@triton.jit
def _store_split(out_ptr, part_o_ptr, part_lse_ptr, seq, heads, split, num_q_heads, max_splits, m, l, acc, d,
                 row_mask, dim_mask, D: tl.constexpr, SPLIT: tl.constexpr):
    """Write a program's result: the output rows [BLOCK_G, D], or with SPLIT its normalized partial
    output into ``part_o`` [B, Hq, S, D] and its log-sum-exp into ``part_lse`` [B, Hq, S]."""
    rows = seq * num_q_heads + heads  # [BLOCK_G] row of [B, Hq]
    out = acc / l[:, None]  # [BLOCK_G, BLOCK_D]
    mask = row_mask[:, None] & dim_mask[None, :]
    if SPLIT:
        slot = rows.to(tl.int64) * max_splits + split  # [BLOCK_G]
        tl.store(part_o_ptr + slot[:, None] * D + d[None, :], out, mask=mask)
        tl.store(part_lse_ptr + slot, m + tl.log(l), mask=row_mask)
    else:
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _dequantize_tile(codes_ptr, scales_ptr, zeros_ptr, code_rows, scale_rows, d, mask,
                     BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr):
    """fp32 values [BLOCK_N, BLOCK_D] of a quantized tile, as ``QuantizedTensor.dequantize`` computes them.

    Codes are packed little-endian, ``8 // BITS`` per byte (channel c: byte c // per_byte, bits
    ``(c % per_byte) * BITS``); channel c uses scale/zero ``c // GROUP``. code_rows / scale_rows [BLOCK_N]:
    offsets of the tokens' rows (KV head included) in the codes and in the scales/zeros.
    """
    per_byte = 8 // BITS
    byte = tl.load(codes_ptr + code_rows[:, None] + (d // per_byte)[None, :], mask=mask, other=0).to(tl.int32)
    code = (byte >> ((d % per_byte) * BITS)[None, :]) & ((1 << BITS) - 1)  # [BLOCK_N, BLOCK_D]
    group_offsets = scale_rows[:, None] + (d // GROUP)[None, :]
    scale = tl.load(scales_ptr + group_offsets, mask=mask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        return (code - (1 << (BITS - 1))).to(tl.float32) * scale
    zero = tl.load(zeros_ptr + group_offsets, mask=mask, other=0.0).to(tl.float32)
    return code.to(tl.float32) * scale + zero


@triton.jit
def paged_decode_kernel(
        out_ptr, part_o_ptr, part_lse_ptr, q_ptr, k_ptr, k_scales_ptr, k_zeros_ptr, v_ptr, v_scales_ptr, v_zeros_ptr,
        table_ptr, lens_ptr, scale,
        stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
        stride_sb, stride_st, stride_sh, stride_table, block_size, split_tokens, num_q_heads, max_splits,
        G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr, DOT_F32: tl.constexpr, QUANTIZED: tl.constexpr, BITS: tl.constexpr,
        GROUP: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Decode attention of one (sequence, KV head, split) over a pool; grid ``(B, Hkv, S)``.

    q [B, Hq, D] contiguous; table int [B, max_blocks]; lens int [B]; out [B, Hq, D] contiguous; splits of
    ``split_tokens`` tokens. A plain pool: k/v [num_blocks, block_size, Hkv, D] (any strides; the scale and zero
    pointers and ``stride_s*`` unused). QUANTIZED: k/v are uint8 codes [num_blocks, block_size, Hkv, D * BITS / 8]
    (bytes contiguous), scales and zeros [num_blocks, block_size, Hkv, num_groups] (strides ``stride_s*``, shared
    by K and V; zeros unused when SYMMETRIC), dequantized in registers (:func:`_dequantize_tile`).
    """
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(lens_ptr + seq)
    start = split * split_tokens
    if start >= seq_len:  # the grid covers the longest sequence; this one ends earlier
        return
    end = tl.minimum(start + split_tokens, seq_len)
    g, d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    row_mask, dim_mask = g < G, d < D
    heads = kv_head * G + g  # [BLOCK_G] query heads reading this KV head
    q_offsets = (seq * num_q_heads + heads).to(tl.int64)[:, None] * D + d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_mask[:, None] & dim_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if DOT_F32:
        q = q.to(tl.float32)
    elif not QUANTIZED:  # a 16-bit query over a pool of its dtype
        q = q.to(k_ptr.dtype.element_ty)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for first in range(start, end, BLOCK_N):
        tok = first + tl.arange(0, BLOCK_N)  # [BLOCK_N] token positions
        valid = tok < end
        tile_mask = valid[:, None] & dim_mask[None, :]  # [BLOCK_N, BLOCK_D]
        k_rows = _token_offsets(table_ptr, stride_table, seq, tok, valid, block_size, stride_kb, stride_kt) \
            + kv_head * stride_kh
        v_rows = _token_offsets(table_ptr, stride_table, seq, tok, valid, block_size, stride_vb, stride_vt) \
            + kv_head * stride_vh
        if QUANTIZED:
            s_rows = _token_offsets(table_ptr, stride_table, seq, tok, valid, block_size, stride_sb, stride_st) \
                + kv_head * stride_sh
            k = _dequantize_tile(k_ptr, k_scales_ptr, k_zeros_ptr, k_rows, s_rows, d, tile_mask,
                                 BITS, GROUP, SYMMETRIC)  # [BLOCK_N, BLOCK_D] fp32
            v = _dequantize_tile(v_ptr, v_scales_ptr, v_zeros_ptr, v_rows, s_rows, d, tile_mask,
                                 BITS, GROUP, SYMMETRIC)
            if not DOT_F32:  # a 16-bit query: tensor-core dots in its dtype
                k, v = k.to(q.dtype), v.to(q.dtype)
        else:
            k = tl.load(k_ptr + k_rows[:, None] + d[None, :] * stride_kd, mask=tile_mask, other=0.0)
            v = tl.load(v_ptr + v_rows[:, None] + d[None, :] * stride_vd, mask=tile_mask, other=0.0)
            if DOT_F32:
                k, v = k.to(tl.float32), v.to(tl.float32)
        m, l, acc = _softmax_step(q, k, v, valid, scale, m, l, acc, DOT_F32)
    _store_split(out_ptr, part_o_ptr, part_lse_ptr, seq, heads, split, num_q_heads, max_splits, m, l, acc, d,
                 row_mask, dim_mask, D, SPLIT)


@triton.jit
def merge_splits_kernel(out_ptr, part_o_ptr, part_lse_ptr, lens_ptr, split_tokens, num_q_heads, max_splits,
                        D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Reduce a row's split partials (FlashDecoding): ``sum_s e^(lse_s - M) o_s / sum_s e^(lse_s - M)``.

    Grid ``(B, Hq)``; part_o [B, Hq, S, D] fp32, part_lse [B, Hq, S] fp32; out [B, Hq, D]. Only the
    ``ceil(seq_len / split_tokens)`` splits the sequence reaches are read, ``BLOCK_S`` at a time: one
    pass for the largest log-sum-exp M, one for the weighted sums.
    """
    seq, head = tl.program_id(0), tl.program_id(1)
    num_splits = tl.cdiv(tl.load(lens_ptr + seq), split_tokens)
    s, d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    dim_mask = d < D
    row = (seq * num_q_heads + head).to(tl.int64)
    lse_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for first in range(0, num_splits, BLOCK_S):
        lse = tl.load(part_lse_ptr + row * max_splits + first + s, mask=first + s < num_splits, other=float("-inf"))
        lse_max = tl.maximum(lse_max, lse)  # [BLOCK_S]
    top = tl.max(lse_max, axis=0)
    weight_sum = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for first in range(0, num_splits, BLOCK_S):
        split_mask = first + s < num_splits
        lse = tl.load(part_lse_ptr + row * max_splits + first + s, mask=split_mask, other=float("-inf"))
        weights = tl.exp(lse - top)  # [BLOCK_S], 0 for splits past the end
        partial = tl.load(part_o_ptr + (row * max_splits + first + s)[:, None] * D + d[None, :],
                          mask=split_mask[:, None] & dim_mask[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
        acc += tl.sum(partial * weights[:, None], axis=0)  # [BLOCK_D]
        weight_sum += weights
    out = acc / tl.sum(weight_sum, axis=0)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty), mask=dim_mask)


INTERPRETED = isinstance(paged_decode_kernel, InterpretedFunction)  # TRITON_INTERPRET=1 at first import
