"""Non-integer stored forms of a KV chunk: fp16, FP8 (e4m3), low-rank (SVD), and sparse fp16 outliers.

Each class holds exactly the tensors a cache would keep, reports ``nbytes`` (sum of
element_size x numel of what is stored) and rebuilds the chunk with ``dequantize()``. Chunks are
``[B, H, T, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcore.quant.integer import QuantizedTensor
from kvcore.tensors import tensor_bytes

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


@dataclass(slots=True)
class HalfTensor:
    """A chunk kept in fp16: the uncompressed baseline, and the sink/recent tokens of other methods."""

    data: torch.Tensor
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """2 bytes per element."""
        return tensor_bytes(self.data)

    def dequantize(self) -> torch.Tensor:
        """The chunk at its original dtype."""
        return self.data.to(self.dtype)


@dataclass(slots=True)
class Fp8Tensor:
    """A chunk in FP8 e4m3 with a per-tensor or per-token scale (vLLM ``fp8_e4m3`` KV cache; Micikevicius et al.
    2022, "FP8 Formats for Deep Learning").

    data: ``[B, H, T, D]`` float8_e4m3fn. scale: ``[]`` (per tensor) or ``[B, H, T, 1]`` (per token).
    shared_scale: the scale belongs to an earlier chunk (calibrated once, as the transformers
    ``Fp8QuantizedLayer`` freezes it after the first update) and is not counted again.
    """

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype
    shared_scale: bool = False

    @property
    def nbytes(self) -> int:
        """1 byte per element + the scale(s) unless shared."""
        return tensor_bytes(self.data) + (0 if self.shared_scale else tensor_bytes(self.scale))

    def dequantize(self) -> torch.Tensor:
        """data x scale, at the original dtype."""
        return (self.data.float() * self.scale.float()).to(self.dtype)


def quantize_fp8(x: torch.Tensor, per_token: bool, scale: torch.Tensor | None = None,
                 scale_dtype: torch.dtype = torch.float16) -> Fp8Tensor:
    """Scale ``x`` so its absmax maps to 448 and cast to float8_e4m3fn; values beyond a given scale saturate.

    per_token: one scale per ``[..., t, :]`` row (stored at ``scale_dtype``); else one fp32 scale.
    scale: reuse a calibrated per-tensor scale (then it is not counted in ``nbytes``).
    """
    xf = x.float()
    shared = scale is not None
    if scale is None:
        tiny = torch.finfo(scale_dtype if per_token else torch.float32).tiny
        amax = xf.abs().amax(dim=-1, keepdim=True) if per_token else xf.abs().amax()
        scale = (amax / FP8_MAX).clamp_min(tiny).to(scale_dtype if per_token else torch.float32)
    data = (xf / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # e4m3fn has no inf: saturate first
    return Fp8Tensor(data, scale, x.dtype, shared)


@dataclass(slots=True)
class LowRankTensor:
    """A chunk as ``coeffs @ basis``: rank-r factors of each head's ``[T, D]`` matrix, in fp16.

    coeffs: ``[B, H, T, r]`` (U x S of the SVD). basis: ``[B, H, r, D]`` (V^T). shared_basis: the basis
    belongs to an earlier chunk (the first one) and is not counted again.
    """

    coeffs: torch.Tensor
    basis: torch.Tensor
    dtype: torch.dtype
    shared_basis: bool = False

    @property
    def nbytes(self) -> int:
        """fp16 coefficients + the basis unless shared."""
        return tensor_bytes(self.coeffs) + (0 if self.shared_basis else tensor_bytes(self.basis))

    def dequantize(self) -> torch.Tensor:
        """coeffs @ basis, at the original dtype."""
        return (self.coeffs.float() @ self.basis.float()).to(self.dtype)  # [B, H, T, D]


def low_rank(x: torch.Tensor, rank: int, basis: torch.Tensor | None = None,
             store_dtype: torch.dtype = torch.float16) -> LowRankTensor:
    """Per-head truncated SVD of ``x`` ``[B, H, T, D]``, or its projection on an existing basis.

    Without ``basis``: x_h = U S V^T, keep coeffs = (U S)[:, :r] and basis = V^T[:r] (rank
    min(rank, T, D)). With ``basis`` ``[B, H, r, D]``: coeffs = x basis^T, the least-squares fit for
    orthonormal rows; new tokens reuse the first chunk's basis so only r numbers per token are added.
    """
    xf = x.float()
    shared = basis is not None
    if basis is None:
        U, S, Vh = torch.linalg.svd(xf, full_matrices=False)  # [B,H,T,k], [B,H,k], [B,H,k,D]
        r = min(rank, S.shape[-1])
        coeffs = U[..., :r] * S[..., None, :r]  # [B, H, T, r]
        basis = Vh[..., :r, :].to(store_dtype)  # [B, H, r, D]
    else:
        coeffs = xf @ basis.float().transpose(-1, -2)  # [B, H, T, r]
    return LowRankTensor(coeffs.to(store_dtype), basis, x.dtype, shared)


@dataclass(slots=True)
class SparseOutliers:
    """The largest-magnitude elements of a chunk kept exactly in fp16, as (value, index) pairs.

    Follows KVQuant's dense-and-sparse split (Hooper et al. 2024, "KVQuant: Towards 10 Million
    Context Length LLM Inference with KV Cache Quantization"). Rows are (sequence, block of tokens);
    each row keeps the same number k of outliers, so no row pointers are stored. values: ``[R, k]``
    fp16. indices: ``[R, k]`` int16 (int32 when a row has more than 32767 elements), positions in
    the row's ``[H, t, D]`` elements.
    """

    values: torch.Tensor
    indices: torch.Tensor

    @property
    def nbytes(self) -> int:
        """fp16 values + integer indices."""
        return tensor_bytes(self.values) + tensor_bytes(self.indices)


def _rows(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B * T/block, H * block * D]``: one row per sequence and block of tokens."""
    B, H, T, D = x.shape
    x = x.reshape(B, H, T // block, block, D).permute(0, 2, 1, 3, 4)  # [B, m, H, block, D]
    return x.reshape(B * (T // block), H * block * D)


def _unrows(rows: torch.Tensor, shape: tuple[int, ...], block: int) -> torch.Tensor:
    B, H, T, D = shape
    x = rows.reshape(B, T // block, H, block, D).permute(0, 2, 1, 3, 4)  # [B, H, m, block, D]
    return x.reshape(B, H, T, D)


def split_outliers(x: torch.Tensor, fraction: float, block: int) -> tuple[torch.Tensor, SparseOutliers]:
    """Take the top ``fraction`` magnitudes of each (sequence, ``block`` tokens) row out of ``x``.

    Returns (dense, outliers): dense is ``x`` clamped to the largest magnitude left in its row, so the
    quantizer's range no longer stretches to the outliers; the outliers are restored by
    :func:`merge_outliers`. At least one element per row is kept when fraction > 0.
    """
    rows = _rows(x, block)  # [R, n]
    n = rows.shape[-1]
    k = min(n - 1, max(1, round(fraction * n)))
    top = rows.abs().topk(k + 1, dim=-1)  # the (k+1)-th largest magnitude bounds the dense part
    idx = top.indices[:, :k]  # [R, k]
    limit = top.values[:, k:k + 1]  # [R, 1]
    dense = torch.maximum(torch.minimum(rows, limit), -limit)
    index_dtype = torch.int16 if n <= torch.iinfo(torch.int16).max else torch.int32
    outliers = SparseOutliers(rows.gather(-1, idx).to(torch.float16), idx.to(index_dtype))
    return _unrows(dense, tuple(x.shape), block), outliers


def merge_outliers(dense: torch.Tensor, outliers: SparseOutliers, block: int) -> torch.Tensor:
    """Write the kept fp16 outliers back into a dequantized ``[B, H, T, D]`` chunk."""
    rows = _rows(dense, block).clone()
    rows.scatter_(-1, outliers.indices.long(), outliers.values.to(rows.dtype))
    return _unrows(rows, tuple(dense.shape), block)


@dataclass(slots=True)
class DenseSparseTensor:
    """A quantized dense part plus fp16 sparse outliers (KVQuant, Hooper et al. 2024)."""

    dense: QuantizedTensor
    outliers: SparseOutliers
    block: int

    @property
    def nbytes(self) -> int:
        """Packed dense codes + sparse outliers."""
        return self.dense.nbytes + self.outliers.nbytes

    def dequantize(self) -> torch.Tensor:
        """The dense part dequantized, outliers written back."""
        return merge_outliers(self.dense.dequantize(), self.outliers, self.block)
