"""Integer KV quantization (2/3/4/8 bits) with real bit packing and exact byte accounting.

Follows the group-wise min/max quantizers of gpt-fast (``quantize.py``: ``get_group_qparams``,
``group_quantize_tensor``) and KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache", ``quant/new_pack.py``): the elements that share a scale lie along one
axis, optionally split into groups; asymmetric codes store a scale and a zero point (the group
minimum) per group, symmetric codes only a scale. Scales and zeros are kept at ``scale_dtype``
(fp16 by default, as KIVI and the transformers quantized cache do), so ``nbytes`` is exactly packed
codes + scales + zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcore.quant.packing import check_bits, pack_codes, unpack_codes, unpack_range
from kvcore.tensors import tensor_bytes


def _groups(xt: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[..., n]`` -> ``[..., n_groups, group_size]``, the ragged last group padded with its last element.

    Repeating an element of the group leaves its min, max and absmax unchanged.
    """
    n = xt.shape[-1]
    pad = -n % group_size
    if pad:
        xt = torch.cat([xt, xt[..., -1:].expand(*xt.shape[:-1], pad)], dim=-1)  # [..., n + pad]
    return xt.reshape(*xt.shape[:-1], xt.shape[-1] // group_size, group_size)  # [..., n_groups, G]


def group_qparams(groups: torch.Tensor, bits: int, symmetric: bool,
                  scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zero points of ``[..., n_groups, G]`` groups, rounded to ``scale_dtype``: ``[..., n_groups]``.

    Asymmetric: scale = (max - min) / (2**bits - 1), zero = min (KIVI's ``mn``). Symmetric:
    scale = absmax / (2**(bits-1) - 1), no zero.
    """
    tiny = torch.finfo(scale_dtype).tiny  # an all-equal group would otherwise get a zero scale
    if symmetric:
        scales = groups.abs().amax(dim=-1) / (2 ** (bits - 1) - 1)
        zeros = None
    else:
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = (hi - lo) / (2**bits - 1)
        zeros = lo.to(scale_dtype)
    scales = scales.clamp_min(tiny).to(scale_dtype)
    if not bool(torch.isfinite(scales.float() if zeros is None else scales.float() + zeros.float()).all()):
        raise ValueError(f"values are too large for {scale_dtype} scales (finite range "
                         f"±{torch.finfo(scale_dtype).max:g}); use scale_dtype=torch.float32")
    return scales, zeros


def quantize_groups(xt: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                    scale_dtype: torch.dtype = torch.float16
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize along the last dim in groups of ``group_size``: (packed uint8, scales, zeros).

    xt: ``[..., n]``. Returns packed codes ``[..., ceil(n * bits / 8)]`` and scales/zeros
    ``[..., ceil(n / group_size)]``. Codes are computed against the rounded scales and zeros, so
    dequantization sees exactly what was stored.
    """
    check_bits(bits)
    n = xt.shape[-1]
    groups = _groups(xt.float(), group_size)  # [..., ng, G]
    scales, zeros = group_qparams(groups, bits, symmetric, scale_dtype)  # [..., ng]
    s = scales.float().unsqueeze(-1)  # [..., ng, 1]
    if symmetric:
        half = 2 ** (bits - 1)
        codes = (groups / s).round().clamp(-(half - 1), half - 1) + half  # [..., ng, G] in [1, 2**bits - 1]
    else:
        codes = ((groups - zeros.float().unsqueeze(-1)) / s).round().clamp(0, 2**bits - 1)  # [..., ng, G]
    codes = codes.reshape(*xt.shape[:-1], codes.shape[-2] * group_size)[..., :n]  # [..., n]
    return pack_codes(codes.to(torch.uint8), bits), scales, zeros


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                     group_index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unpacked codes ``[..., m]`` -> values, element j using scale/zero ``group_index[j]`` of ``[..., ng]``."""
    s = scales.float().index_select(-1, group_index)  # [..., m]
    if zeros is None:
        return ((codes.float() - 2 ** (bits - 1)) * s).to(dtype)
    return (codes.float() * s + zeros.float().index_select(-1, group_index)).to(dtype)


@dataclass(slots=True)
class QuantizedTensor:
    """A tensor stored as packed integer codes plus per-group scales (and zeros when asymmetric).

    Layout: the quantized ``axis`` is moved last, so ``codes`` is ``[..., ceil(n * bits / 8)]`` and
    ``scales``/``zeros`` are ``[..., ceil(n / group_size)]`` (``...`` = the other dims in order).
    shape/dtype: those of the original tensor, restored by :meth:`dequantize`.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    axis: int
    group_size: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if not 0 <= self.axis < len(self.shape):
            raise ValueError(f"axis must be in [0, {len(self.shape)}) for shape {self.shape}, got {self.axis}")
        if self.codes.dtype != torch.uint8:
            raise ValueError(f"codes must be packed uint8, got {self.codes.dtype}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    @property
    def symmetric(self) -> bool:
        """True when no zero points are stored."""
        return self.zeros is None

    @property
    def device(self) -> torch.device:
        """Where the codes (and scales and zeros) live."""
        return self.codes.device

    @property
    def n(self) -> int:
        """Length of the quantized axis."""
        return self.shape[self.axis]

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes + scales + zeros, at their stored dtypes."""
        return tensor_bytes(self.codes, self.scales, self.zeros)

    def dequantize(self) -> torch.Tensor:
        """The reconstructed tensor, in the original shape and dtype."""
        codes = unpack_codes(self.codes, self.bits, self.n)  # [..., n]
        index = torch.arange(self.n, device=codes.device) // self.group_size  # [n]
        out = dequantize_codes(codes, self.scales, self.zeros, self.bits, index, self.dtype)  # [..., n]
        return out.movedim(-1, self.axis)

    def dequantize_range(self, start: int, stop: int, dim: int = -2) -> torch.Tensor:
        """Dequantize only ``[start, stop)`` along ``dim`` (tokens by default), reading just those bytes.

        The per-block path of a paged attention kernel: when ``dim`` is the quantized axis
        (per-channel keys) only the packed bytes and groups of the range are touched; otherwise the
        range's rows of codes, scales and zeros are sliced.
        """
        dim = dim % len(self.shape)
        if not 0 <= start <= stop <= self.shape[dim]:
            raise ValueError(f"need 0 <= start <= stop <= {self.shape[dim]}, got {start}, {stop}")
        if dim == self.axis:
            codes = unpack_range(self.codes, self.bits, self.n, start, stop)  # [..., stop - start]
            index = torch.arange(start, stop, device=codes.device) // self.group_size
            return dequantize_codes(codes, self.scales, self.zeros, self.bits, index, self.dtype).movedim(-1, dim)
        moved = [i for i in range(len(self.shape)) if i != self.axis].index(dim)
        shape = list(self.shape)
        shape[dim] = stop - start
        part = QuantizedTensor(
            self.codes.narrow(moved, start, stop - start), self.scales.narrow(moved, start, stop - start),
            None if self.zeros is None else self.zeros.narrow(moved, start, stop - start),
            self.bits, self.axis, self.group_size, tuple(shape), self.dtype)
        return part.dequantize()


def quantize(x: torch.Tensor, bits: int, axis: int, group_size: int | None = None, symmetric: bool = False,
             scale_dtype: torch.dtype = torch.float16) -> QuantizedTensor:
    """Quantize ``x`` to ``bits``-bit integer codes, packed, sharing scales along ``axis``.

    Follows KIVI (Liu et al. 2024) and gpt-fast's group quantizer. For a ``[..., T, D]`` cache,
    ``axis=-1`` is per-token quantization (the D channels of a token share a scale) and ``axis=-2``
    per-channel (the T tokens of a channel share a scale, KIVI's keys).

    x: any float tensor. bits: 2, 3, 4 or 8. axis: the dimension whose elements share a scale.
    group_size: elements per scale group along ``axis`` (e.g. 32, 64, 128); ``None`` = the whole
    axis; a group larger than the axis is the whole axis; a ragged last group gets its own scale.
    symmetric: absmax scales and no zero points (one level fewer) instead of min/max + zero.
    scale_dtype: dtype of scales and zeros (fp16 by default; counted in ``nbytes``).
    """
    check_bits(bits)
    if x.ndim == 0 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor with at least one dimension, got {x.dtype} {tuple(x.shape)}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis must be in [{-x.ndim}, {x.ndim}) for a {x.ndim}-D tensor, got {axis}")
    axis %= x.ndim
    n = x.shape[axis]
    if n == 0:
        raise ValueError("cannot quantize an empty axis")
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be a positive number of elements or None, got {group_size}")
    group = n if group_size is None else min(group_size, n)
    xt = x.movedim(axis, -1)  # [..., n]
    codes, scales, zeros = quantize_groups(xt, bits, group, symmetric, scale_dtype)
    return QuantizedTensor(codes, scales, zeros, bits, axis, group, tuple(x.shape), x.dtype)
