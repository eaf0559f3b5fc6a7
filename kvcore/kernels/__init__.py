"""Decode attention over the KV cache: a contiguous reference and paged decode with three backends
(C on CPU, Triton on GPU, batched torch everywhere), over fp32/16-bit or 2/4/8-bit quantized pools."""

from kvcore.kernels.attention import (
    BACKENDS,
    KERNEL_BITS,
    DecodeBatch,
    choose_backend,
    contiguous_decode_attention,
    paged_decode_attention,
    quantize_paged_cache,
    quantized_paged_decode_attention,
)

__all__ = [
    "BACKENDS",
    "KERNEL_BITS",
    "DecodeBatch",
    "choose_backend",
    "contiguous_decode_attention",
    "paged_decode_attention",
    "quantize_paged_cache",
    "quantized_paged_decode_attention",
]
