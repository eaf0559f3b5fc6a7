"""Codecs: how one stream (keys or values) of a KV cache is stored once tokens leave the fp16 window.

A codec turns a chunk ``[B, H, T, D]`` of aged tokens into a stored form with ``nbytes`` and
``dequantize()``. ``chunk_tokens`` is the unit it compresses: 1 when each token is independent
(per-token scales), G when tokens share statistics (per-channel scales over groups of G tokens, KIVI's
keys). ``compress`` may be handed the stream's first stored chunk (``ref``) to reuse a calibrated
scale or basis, as the transformers ``Fp8QuantizedLayer`` freezes its scale after the first update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kvcore.quant.formats import (
    DenseSparseTensor,
    Fp8Tensor,
    HalfTensor,
    LowRankTensor,
    low_rank,
    quantize_fp8,
    split_outliers,
)
from kvcore.quant.integer import quantize
from kvcore.quant.packing import SUPPORTED_BITS


class Stored(Protocol):
    """What a codec returns: exact bytes held, and the chunk rebuilt."""

    @property
    def nbytes(self) -> int: ...

    def dequantize(self) -> torch.Tensor: ...


@dataclass(slots=True, frozen=True)
class Fp16Codec:
    """Keep tokens in fp16 (2 bytes per element): the baseline every ratio is taken against."""

    @property
    def chunk_tokens(self) -> int:
        return 1

    def compress(self, x: torch.Tensor, ref: Stored | None = None) -> HalfTensor:
        return HalfTensor(x.to(torch.float16), x.dtype)

    def describe(self) -> str:
        return "fp16"


@dataclass(slots=True, frozen=True)
class IntCodec:
    """Integer codes of ``bits`` bits, packed (KIVI, Liu et al. 2024; FlexGen group-wise, Sheng et al. 2023).

    axis: -1 per-token (a token's channels share a scale), -2 per-channel (a channel's tokens share a
    scale). group_size: per-token, channels per scale group (None = the whole head); per-channel,
    tokens per group, required: tokens are quantized once a whole group has aged (KIVI's keys).
    symmetric: absmax scales, no zero points. outlier_fraction: share (0-0.5) of each block's
    largest magnitudes kept as sparse fp16 with int16/int32 indices (KVQuant, Hooper et al. 2024).
    """

    bits: int
    axis: int = -1
    group_size: int | None = None
    symmetric: bool = False
    outlier_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.axis not in (-1, -2):
            raise ValueError(f"axis must be -1 (per-token) or -2 (per-channel), got {self.axis!r}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be a positive number of elements or None, got {self.group_size}")
        if self.axis == -2 and self.group_size is None:
            raise ValueError("per-channel quantization (axis=-2) needs group_size: the tokens that share a scale, "
                             "quantized once that many have left the fp16 window (e.g. 32 or 128)")
        if not 0.0 <= self.outlier_fraction < 0.5:
            raise ValueError(f"outlier_fraction must be in [0, 0.5), got {self.outlier_fraction}")

    @property
    def chunk_tokens(self) -> int:
        """Tokens compressed together: the token group for per-channel codes, else 1."""
        return self.group_size if self.axis == -2 else 1

    def compress(self, x: torch.Tensor, ref: Stored | None = None) -> Stored:
        """Packed codes of ``x`` ``[B, H, T, D]`` (T a multiple of ``chunk_tokens``), outliers split off first."""
        block = self.chunk_tokens
        if self.outlier_fraction > 0:
            dense, outliers = split_outliers(x, self.outlier_fraction, block)
            q = quantize(dense, self.bits, self.axis, self.group_size, self.symmetric)
            return DenseSparseTensor(q, outliers, block)
        return quantize(x, self.bits, self.axis, self.group_size, self.symmetric)

    def describe(self) -> str:
        where = "per-token" if self.axis == -1 else "per-channel"
        group = f", {'channels' if self.axis == -1 else 'tokens'}/group {self.group_size}" if self.group_size else ""
        sparse = f", {self.outlier_fraction:.1%} sparse fp16" if self.outlier_fraction else ""
        return f"int{self.bits} {where}{group}{', sym' if self.symmetric else ''}{sparse}"


@dataclass(slots=True, frozen=True)
class Fp8Codec:
    """FP8 e4m3 (vLLM ``kv_cache_dtype="fp8_e4m3"``; Micikevicius et al. 2022).

    per_token: a fp16 scale per token and head; else one fp32 per-tensor scale calibrated on the
    stream's first stored chunk and frozen (transformers ``Fp8QuantizedLayer``), later values saturate.
    """

    per_token: bool = True

    @property
    def chunk_tokens(self) -> int:
        return 1

    def compress(self, x: torch.Tensor, ref: Stored | None = None) -> Fp8Tensor:
        scale = ref.scale if (not self.per_token and isinstance(ref, Fp8Tensor)) else None
        return quantize_fp8(x, self.per_token, scale)

    def describe(self) -> str:
        return f"fp8 e4m3, {'per-token' if self.per_token else 'per-tensor'} scale"


@dataclass(slots=True, frozen=True)
class LowRankCodec:
    """Rank-r per-head SVD of the first stored chunk, later tokens projected on its basis, all in fp16.

    A plain truncated SVD in the spirit of Palu (Chang et al. 2024, "Palu: Compressing KV-Cache with
    Low-Rank Projection"), which learns the projection offline instead. rank: kept singular
    directions per head (1..D).
    """

    rank: int

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")

    @property
    def chunk_tokens(self) -> int:
        return 1

    def compress(self, x: torch.Tensor, ref: Stored | None = None) -> LowRankTensor:
        return low_rank(x, self.rank, ref.basis if isinstance(ref, LowRankTensor) else None)

    def describe(self) -> str:
        return f"SVD rank {self.rank} (fp16 U·S and V^T)"


Codec = Fp16Codec | IntCodec | Fp8Codec | LowRankCodec
