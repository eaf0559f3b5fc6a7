"""Attention kernels over the KV cache: contiguous reference, paged decode (torch, C, Triton), quantized pools."""

from kvcore.kernels.attention import contiguous_decode_attention, paged_decode_attention
from kvcore.kernels.check import AttentionCheckConfig, check_paged_attention, make_paged_problem, ragged_lengths
from kvcore.kernels.quantized import quantize_paged_cache, quantized_paged_decode_attention

__all__ = [
    "AttentionCheckConfig",
    "check_paged_attention",
    "contiguous_decode_attention",
    "make_paged_problem",
    "paged_decode_attention",
    "quantize_paged_cache",
    "quantized_paged_decode_attention",
    "ragged_lengths",
]
