"""Bit packing of quantization codes into bytes: what a quantized KV cache really holds.

Codes of ``bits`` bits are laid little-endian along the last dimension, densely: two 4-bit codes per
byte, four 2-bit codes per byte, eight 3-bit codes in three bytes (KIVI packs the same way into int32
words, ``quant/new_pack.py``; gpt-fast packs int4 pairs into uint8). A row of ``n`` codes takes
exactly ``ceil(n * bits / 8)`` bytes; unused high bits of the last byte are zero.
"""

from __future__ import annotations

import math
from functools import cache

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    """Raise ValueError unless ``bits`` is one of the packed widths."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def packed_length(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits occupy when packed densely."""
    return -(-n * bits // 8)


def _chunk(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte chunk: (2, 1) for 4 bits, (8, 3) for 3 bits."""
    codes = 8 // math.gcd(bits, 8)
    return codes, codes * bits // 8


@cache
def _shifts(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit offsets of the codes in a chunk word, and of the bytes: int32 ``[codes]``, ``[bytes]``."""
    per, nbytes = _chunk(bits)
    return (torch.arange(per, dtype=torch.int32, device=device) * bits,
            torch.arange(nbytes, dtype=torch.int32, device=device) * 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[..., n]`` (values < 2**bits) into uint8 ``[..., ceil(n * bits / 8)]``."""
    check_bits(bits)
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    n = codes.shape[-1]
    per, nbytes = _chunk(bits)
    pad = -n % per
    words = torch.nn.functional.pad(codes, (0, pad)).to(torch.int32)  # [..., n + pad]
    chunks = (n + pad) // per
    words = words.reshape(*codes.shape[:-1], chunks, per)  # [..., chunks, per]
    shifts, byte_shifts = _shifts(bits, codes.device)  # [per], [nbytes]
    words = (words << shifts).sum(dim=-1, dtype=torch.int32)  # [..., chunks], at most 24 bits used
    packed = (words.unsqueeze(-1) >> byte_shifts) & 0xFF  # [..., chunks, nbytes]
    packed = packed.reshape(*codes.shape[:-1], chunks * nbytes)  # [..., chunks * nbytes]
    return packed[..., :packed_length(n, bits)].to(torch.uint8).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[..., ceil(n * bits / 8)]`` -> uint8 codes ``[..., n]``."""
    check_bits(bits)
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(f"{n} codes of {bits} bits take {packed_length(n, bits)} bytes, got {packed.shape[-1]}")
    if bits == 8:
        return packed
    per, nbytes = _chunk(bits)
    chunks = -(-n // per)
    pad = chunks * nbytes - packed.shape[-1]
    data = torch.nn.functional.pad(packed, (0, pad)).to(torch.int32)  # [..., chunks * nbytes]
    data = data.reshape(*packed.shape[:-1], chunks, nbytes)  # [..., chunks, nbytes]
    shifts, byte_shifts = _shifts(bits, packed.device)  # [per], [nbytes]
    words = (data << byte_shifts).sum(dim=-1, dtype=torch.int32)  # [..., chunks]
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., chunks, per]
    return codes.reshape(*packed.shape[:-1], chunks * per)[..., :n].to(torch.uint8)


def unpack_range(packed: torch.Tensor, bits: int, n: int, start: int, stop: int) -> torch.Tensor:
    """Codes ``[start, stop)`` of rows holding ``n`` codes, unpacking only the bytes that hold them.

    The per-block dequantization path: a kernel reading one block of a long row touches only its bytes.
    """
    if not 0 <= start <= stop <= n:
        raise ValueError(f"need 0 <= start <= stop <= {n}, got start={start}, stop={stop}")
    per, nbytes = _chunk(bits)
    first = start // per  # whole chunks keep the byte offset aligned (3-bit codes straddle bytes)
    last = -(-stop // per)
    byte0, byte1 = first * nbytes, min(last * nbytes, packed.shape[-1])
    count = min(last * per, n) - first * per
    codes = unpack_codes(packed[..., byte0:byte1], bits, count) if count else packed[..., :0]
    return codes[..., start - first * per: stop - first * per]
