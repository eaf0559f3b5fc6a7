"""Decode attention over paged KV pools: one entry point, three backends, metadata built once per step.

The paged contract is vLLM's PagedAttention (Kwon et al., SOSP 2023): K/V live in
``[num_blocks, block_size, Hkv, D]`` pools (plain, or 2/4/8-bit codes with per-token scales) and each
sequence names its blocks in a block table. Three backends run it, all split-K (flash-decoding, Dao et al.
2023) and all equal to contiguous attention: ``"native"``, the C kernel on CPU
(:mod:`kvcore.kernels.native_paged`); ``"triton"`` on CUDA (:mod:`kvcore.kernels.paged_triton`); and
``"torch"``, batched torch ops on any device (:mod:`kvcore.kernels.torch_paged`), the reference and the
fallback. A :class:`DecodeBatch` holds what every layer of a step shares (tables, lengths, the C kernel's
span plan), validated once, as vLLM's attention metadata; :func:`paged_decode_attention` builds one per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvcore.kernels import native_paged as native
from kvcore.kernels.paged_triton import compiled_for, paged_attention_triton
from kvcore.kernels.paged_triton import unavailable as triton_unavailable
from kvcore.kernels.torch_paged import attend, paged_attention_torch
from kvcore.quant import QuantizedTensor, quantize

BACKENDS = {
    "native": "C kernel (kvcore/kernels/csrc/paged_decode.c)",
    "triton": "Triton kernel (kvcore/kernels/triton_decode.py)",
    "torch": "batched torch ops (kvcore/kernels/torch_paged.py)",
}
KERNEL_BITS = (2, 4, 8)  # widths whose codes never straddle a byte
Pool = torch.Tensor | QuantizedTensor


# Input checks at the edge, once per call (one clear ValueError per wrong argument); past them the backends
# trust their inputs, and the engine validates its own step once instead (kvcore/engine/runner.py).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_query(query: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    """Raise unless ``query`` is a float ``[B, Hq, D]`` with Hq a multiple of ``num_kv_heads``."""
    if query.dim() != 3:
        raise ValueError(f"query must be [B, Hq, D], got shape {tuple(query.shape)}")
    if query.dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {query.dtype}")
    if query.shape[2] != head_dim:
        raise ValueError(f"query head_dim {query.shape[2]} != K/V head_dim {head_dim}")
    if num_kv_heads < 1 or query.shape[1] % num_kv_heads:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of KV heads ({num_kv_heads})")


def check_block_tables(block_tables: torch.Tensor, seq_lens: torch.Tensor, batch: int, num_blocks: int,
                       block_size: int) -> None:
    """Raise unless the tables and lengths are int ``[B, max_blocks]`` / ``[B]`` naming blocks in the pool.

    Only the table entries that hold tokens (the first ``ceil(seq_len / block_size)`` of each row) must
    be valid block ids; the rest are padding and may hold anything (vLLM pads with 0 or -1).
    """
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.is_floating_point():
        raise ValueError(f"block_tables must be an int tensor [B={batch}, max_blocks], got "
                         f"{block_tables.dtype} {tuple(block_tables.shape)}")
    if seq_lens.shape != (batch,) or seq_lens.is_floating_point():
        raise ValueError(f"seq_lens must be an int tensor [B={batch}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    capacity = block_tables.shape[1] * block_size
    if batch and (int(seq_lens.min()) < 1 or int(seq_lens.max()) > capacity):
        raise ValueError(f"seq_lens must be in 1..max_blocks*block_size ({capacity}), got {seq_lens.tolist()}")
    needed = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] * block_size \
        < seq_lens.to(block_tables.device)[:, None]  # [B, max_blocks]: blocks holding tokens
    used = block_tables[needed]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
        raise ValueError(f"block_tables name blocks outside 0..{num_blocks - 1}")


def check_paged(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """Raise unless the arguments follow the ``paged_decode_attention`` contract (vLLM cache layout)."""
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"key_cache and value_cache must both be [num_blocks, block_size, Hkv, D], got "
                         f"{tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    if key_cache.dtype not in FLOAT_DTYPES or value_cache.dtype not in FLOAT_DTYPES:
        raise ValueError(f"cache dtype must be float32, float16 or bfloat16, got {key_cache.dtype}, "
                         f"{value_cache.dtype}")
    check_query(query, key_cache.shape[2], key_cache.shape[3])
    check_block_tables(block_tables, seq_lens, query.shape[0], key_cache.shape[0], key_cache.shape[1])


def check_quantized(query: torch.Tensor, key_cache: QuantizedTensor, value_cache: QuantizedTensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, bits: tuple[int, ...]) -> None:
    """Raise unless the arguments follow the ``quantized_paged_decode_attention`` contract (widths in ``bits``)."""
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if not isinstance(cache, QuantizedTensor) or len(cache.shape) != 4 or cache.axis != 3:
            raise ValueError(f"{name} must be a QuantizedTensor of a [num_blocks, block_size, Hkv, D] pool along D "
                             f"(axis 3); use quantize_paged_cache")
        if cache.bits not in bits:
            raise ValueError(f"{name} bits must be one of {bits}, got {cache.bits}")
    if key_cache.shape != value_cache.shape or (key_cache.bits, key_cache.group_size) != (
            value_cache.bits, value_cache.group_size):
        raise ValueError("key_cache and value_cache must have the same shape, bits and group_size")
    if key_cache.shape[3] % (8 // key_cache.bits):
        raise ValueError(f"head_dim {key_cache.shape[3]} must fill whole bytes of {key_cache.bits}-bit codes")
    check_query(query, key_cache.shape[2], key_cache.shape[3])
    check_block_tables(block_tables, seq_lens, query.shape[0], key_cache.shape[0], key_cache.shape[1])


def contiguous_decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                scale: float | None = None) -> torch.Tensor:
    """Attention of one new query token per sequence over contiguous K/V; the reference.

    query ``[B, Hq, D]``; keys/values ``[B, Hkv, T, D]``; scale defaults to 1/sqrt(D).
    Returns ``[B, Hq, D]`` in the query's dtype (softmax and sums in fp32).
    """
    if keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(f"keys and values must both be [B, Hkv, T, D], got {tuple(keys.shape)} and "
                         f"{tuple(values.shape)}")
    check_query(query, keys.shape[1], keys.shape[3])
    if keys.shape[0] != query.shape[0] or keys.shape[2] < 1:
        raise ValueError(f"keys must hold the query's batch ({query.shape[0]}) and >= 1 token, "
                         f"got {tuple(keys.shape)}")
    return attend(query, keys, values, 1.0 / math.sqrt(query.shape[2]) if scale is None else scale)


def choose_backend(query: torch.Tensor, key_cache: Pool, value_cache: Pool, backend: str | None = None) -> str:
    """The backend that runs these (valid) arguments: the forced ``backend``, else the best for the device.

    On a GPU Triton when it is installed, else torch; on CPU the C kernel when it can run the call, else
    torch. A forced backend that cannot run the call raises ValueError naming why.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None (best for the device) or one of {', '.join(BACKENDS)}, "
                         f"got {backend!r}")
    device = key_cache.device
    if backend == "torch":
        return backend
    if backend is not None:
        native_reason = native.unsupported(query, key_cache, value_cache) if backend == "native" else ""
        reason = native_reason if backend == "native" else triton_unavailable(device)
        if reason:
            raise ValueError(f"backend {backend!r} cannot run this call: {reason}")
        return backend
    if device.type != "cpu":
        return "triton" if compiled_for(device) else "torch"
    return "torch" if native.unsupported(query, key_cache, value_cache) else "native"


@dataclass(slots=True)
class DecodeBatch:
    """What every layer of a decode step shares: block tables, lengths and the backend's plan.

    block_tables: int ``[B, max_blocks]`` on the pools' device; seq_lens: int32 ``[B]`` there; lengths: the
    same as Python ints; native: the C kernel's span plan (``backend == "native"`` only).
    """

    backend: str
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    lengths: list[int]
    native: native.NativePlan | None = None

    @classmethod
    def of(cls, backend: str, block_tables: torch.Tensor, lengths: list[int], num_q_heads: int, head_dim: int,
           workers: int | None = None) -> DecodeBatch:
        """A batch for ``backend`` from valid tables and lengths; workers: the C kernel's threads (None: one per
        torch intra-op thread)."""
        device = block_tables.device
        plan = None
        if backend == "native":
            plan = native.NativePlan.of(block_tables, lengths, num_q_heads * head_dim,
                                        max(1, workers or torch.get_num_threads()))
        return cls(backend, block_tables, torch.tensor(lengths, dtype=torch.int32, device=device), lengths, plan)

    def attend(self, query: torch.Tensor, key_cache: Pool, value_cache: Pool, scale: float) -> torch.Tensor:
        """Decode attention of ``query`` ``[B, Hq, D]`` over one layer's pools -> ``[B, Hq, D]``."""
        if self.backend == "native":
            return native.paged_attention_native(query, key_cache, value_cache, self.native, scale)
        if self.backend == "triton":
            return paged_attention_triton(query, key_cache, value_cache, self.block_tables, self.seq_lens, scale,
                                          max(self.lengths))
        return paged_attention_torch(query, key_cache, value_cache, self.block_tables, self.lengths, scale)


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float | None = None,
                           backend: str | None = None, workers: int | None = None) -> torch.Tensor:
    """Decode attention reading each sequence's K/V through its block table (vLLM PagedAttention).

    query ``[B, Hq, D]``; key_cache/value_cache ``[num_blocks, block_size, Hkv, D]``; block_tables int
    ``[B, max_blocks]`` (entries past a sequence's last block are ignored, any value); seq_lens int ``[B]``
    tokens per sequence; scale defaults to 1/sqrt(D). Hq must be a multiple of Hkv (any group: GQA, MQA).
    Returns ``[B, Hq, D]`` in the query's dtype (fp32 accumulation).

    backend: None picks the best for the tensors' device (:func:`choose_backend`); ``"torch"``, ``"native"``
    (the CPU C kernel) or ``"triton"`` force one, and raise ValueError naming why when it cannot run the call
    (``"triton"`` on CPU tensors needs the process started with ``TRITON_INTERPRET=1``). workers: the C
    kernel's threads (None: one per torch intra-op thread).
    """
    check_paged(query, key_cache, value_cache, block_tables, seq_lens)
    return _decode(query, key_cache, value_cache, block_tables, seq_lens, scale, backend, workers)


def quantized_paged_decode_attention(query: torch.Tensor, key_cache: QuantizedTensor, value_cache: QuantizedTensor,
                                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float | None = None,
                                     backend: str | None = None, workers: int | None = None) -> torch.Tensor:
    """:func:`paged_decode_attention` over :func:`quantize_paged_cache` pools (2, 4 or 8 bits, per token and head).

    Equals attention over ``cache.dequantize()`` up to fp32 rounding; the C and Triton kernels read the
    packed codes straight into registers and fold scales and zero points into the dot products (KIVI,
    Liu et al. 2024), so the fp32 cache never exists.
    """
    check_quantized(query, key_cache, value_cache, block_tables, seq_lens, KERNEL_BITS)
    return _decode(query, key_cache, value_cache, block_tables, seq_lens, scale, backend, workers)


def _decode(query: torch.Tensor, key_cache: Pool, value_cache: Pool, block_tables: torch.Tensor,
            seq_lens: torch.Tensor, scale: float | None, backend: str | None, workers: int | None) -> torch.Tensor:
    chosen = choose_backend(query, key_cache, value_cache, backend)
    B, Hq, D = query.shape
    if B == 0:
        return query.new_empty(query.shape)
    tables = block_tables.to(key_cache.device)
    batch = DecodeBatch.of(chosen, tables, seq_lens.tolist(), Hq, D, workers)
    return batch.attend(query.to(key_cache.device), key_cache, value_cache, D ** -0.5 if scale is None else scale)


def quantize_paged_cache(cache: torch.Tensor, bits: int = 4, group_size: int | None = None,
                         symmetric: bool = False, blocks_per_step: int = 1024) -> QuantizedTensor:
    """Quantize a ``[num_blocks, block_size, Hkv, D]`` pool per token and head, ``blocks_per_step`` at a time.

    Same result as ``kvcore.quant.quantize(cache, bits, axis=-1, group_size, symmetric)`` (KIVI's per-token
    layout, used here for keys too, so a block can be appended to without requantizing it); stepping bounds
    the fp32 temporaries. bits: 2, 4 or 8; group_size: channels per scale (None = all D).
    """
    if cache.dim() != 4 or not cache.is_floating_point():
        raise ValueError(f"cache must be a float [num_blocks, block_size, Hkv, D] tensor, got "
                         f"{cache.dtype} {tuple(cache.shape)}")
    if bits not in KERNEL_BITS:
        raise ValueError(f"bits must be one of {KERNEL_BITS} for the paged kernels, got {bits}")
    parts = [quantize(cache[i:i + blocks_per_step], bits, axis=-1, group_size=group_size, symmetric=symmetric)
             for i in range(0, cache.shape[0], blocks_per_step)]
    zeros = None if symmetric else torch.cat([p.zeros for p in parts])
    return QuantizedTensor(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), zeros,
                           bits, 3, parts[0].group_size, tuple(cache.shape), cache.dtype)

