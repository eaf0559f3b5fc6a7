"""Decode attention: a contiguous reference and paged attention reading K/V through block tables.

The paged version follows vLLM's PagedAttention contract (Kwon et al., SOSP 2023): K/V live in
``[num_blocks, block_size, Hkv, D]`` pools and each sequence names its blocks in a block table.
:func:`paged_decode_attention` picks a chunked split-K kernel (flash-decoding, Dao et al. 2023) by
device and problem size (Triton on CUDA, the C kernel or torch ops on CPU; ``backend`` forces one);
:func:`_paged_decode_attention_gather`, which copies every sequence's whole KV out of the pool padded
to the longest one and then attends, is kept as the clear reference.
"""

from __future__ import annotations

import math

import torch

from kvcore.kernels.paged_batched import batched_chunk_tokens, paged_attention_batched
from kvcore.kernels.paged_cpu import CPU_CHUNK_TOKENS, paged_attention_cpu
from kvcore.kernels.paged_native import paged_attention_native, unsupported
from kvcore.kernels.paged_triton import compiled_for, paged_attention_triton, unavailable
from kvcore.kernels.validate import check_paged, check_query


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    """query [B, Hq, D]; keys/values [B, Hkv, T, D]; mask [B, T] (True = attend). fp32 math."""
    B, Hq, D = query.shape
    Hkv = keys.shape[1]
    q = query.float().reshape(B, Hkv, Hq // Hkv, D)  # [B, Hkv, G, D]: query head h reads KV head h // G
    scores = (q @ keys.float().transpose(-1, -2)) * scale  # [B, Hkv, G, T]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ values.float()  # [B, Hkv, G, D]
    return out.reshape(B, Hq, D).to(query.dtype)  # [B, Hq, D]


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
    scale = 1.0 / math.sqrt(query.shape[2]) if scale is None else scale
    return _attend(query, keys, values, None, scale)


def _paged_decode_attention_gather(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                   block_tables: torch.Tensor, seq_lens: torch.Tensor,
                                   scale: float | None = None) -> torch.Tensor:
    """Reference paged attention: gather every sequence's blocks (padded to the longest), mask, attend.

    Same contract as :func:`paged_decode_attention`; materializes ``[B, Hkv, max_blocks * block_size, D]``
    for K and for V, so it is memory- and time-hungry; tests compare the fast kernels with it.
    """
    check_paged(query, key_cache, value_cache, block_tables, seq_lens)
    B, _, D = query.shape
    num_blocks, block_size, Hkv, _ = key_cache.shape
    max_blocks = block_tables.shape[1]
    device = key_cache.device
    seq_lens = seq_lens.to(device)
    positions = torch.arange(max_blocks * block_size, device=device)  # [max_blocks * block_size]
    mask = positions[None, :] < seq_lens[:, None]  # [B, T_max]
    blocks = block_tables.to(device=device, dtype=torch.long).clamp(0, num_blocks - 1)  # padding -> any block
    heads = torch.arange(Hkv, device=device)
    # Gather head-major: index [B, 1, max_blocks] x [1, Hkv, 1] -> [B, Hkv, max_blocks, block_size, D]
    index = (blocks[:, None, :], slice(None), heads[None, :, None])
    keys = key_cache[index].reshape(B, Hkv, max_blocks * block_size, D)  # [B, Hkv, T_max, D]
    values = value_cache[index].reshape(B, Hkv, max_blocks * block_size, D)  # [B, Hkv, T_max, D]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    return _attend(query.to(device), keys, values, mask, scale)


KERNELS = {
    "batched": "batch-vectorized torch ops (kvcore.kernels.paged_batched)",
    "fused": "fused C kernel (kvcore.kernels.paged_native)",
    "torch": "torch chunk loop (kvcore.kernels.paged_cpu)",
    "triton": "Triton split-K kernel (kvcore.kernels.paged_triton)",
}
BACKENDS = (None, "torch", "native", "triton")  # what the ``backend`` argument of the decode kernels accepts


def check_backend(backend: str | None) -> None:
    """Raise unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None (best for the device), 'torch', 'native' or 'triton', "
                         f"got {backend!r}")


def forced_kernel(backend: str, device: torch.device, native_unsupported: str) -> str:
    """The :data:`KERNELS` key that a forced ``backend`` runs on ``device``; ValueError naming why it cannot.

    native_unsupported: why the C kernel cannot run the call (``""`` when it can).
    """
    if backend == "torch":
        return "torch" if device.type == "cpu" else "batched"
    reason = native_unsupported if backend == "native" else unavailable(device)
    if reason:
        raise ValueError(f"backend {backend!r} cannot run this call: {reason}")
    return "fused" if backend == "native" else "triton"


def choose_kernel(device: torch.device, backend: str | None, native_reason: str) -> str:
    """The key in :data:`KERNELS` to run on ``device``: the forced ``backend``, else the best there is.

    native_reason: why the fused C kernel cannot run the call (``""`` when it can). On a GPU the Triton
    kernel when it compiles, else the batched torch ops; on CPU the C kernel when it can, else torch.
    """
    check_backend(backend)
    if backend is not None:
        return forced_kernel(backend, device, native_reason)
    if device.type != "cpu":
        return "triton" if compiled_for(device) else "batched"
    return "torch" if native_reason else "fused"


def paged_kernel(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 backend: str | None = None) -> str:
    """The key in :data:`KERNELS` of the kernel :func:`paged_decode_attention` runs for these (valid) tensors.

    backend: as in :func:`paged_decode_attention`; a forced backend that cannot run the call raises
    ValueError naming why.
    """
    return choose_kernel(key_cache.device, backend, unsupported(query, key_cache, value_cache))


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Decode attention reading each sequence's K/V through its block table (vLLM PagedAttention).

    query ``[B, Hq, D]``; key_cache/value_cache ``[num_blocks, block_size, Hkv, D]``; block_tables int
    ``[B, max_blocks]`` (entries past a sequence's last block are ignored, any value);
    seq_lens int ``[B]`` tokens per sequence; scale defaults to 1/sqrt(D). Hq must be a multiple of Hkv.
    Returns ``[B, Hq, D]`` in the query's dtype (fp32 accumulation).

    backend: None picks the best kernel for the tensors' device; ``"torch"``, ``"native"`` (the CPU C
    kernel) or ``"triton"`` force one, and raise ValueError naming why when it cannot run the call
    (``"triton"`` on CPU tensors needs the process started with ``TRITON_INTERPRET=1``).

    Kernel choice (each reads only the blocks a sequence uses, with split-K softmax; :func:`paged_kernel`
    names it): on a GPU the Triton kernel (:mod:`kvcore.kernels.paged_triton`: one program per sequence,
    KV head and split, FlashDecoding) when triton is installed, else the batch-vectorized torch kernel
    (:mod:`kvcore.kernels.paged_batched`: few large launches); on CPU the fused C kernel
    (:mod:`kvcore.kernels.paged_native`) when it is built and supports the call (fp32, head dim a
    multiple of 16, 1-16 query heads per KV head), else the per-sequence chunk loop of torch ops
    (:mod:`kvcore.kernels.paged_cpu`), which was faster than the batched kernel and the gather at every
    size measured, tiny batches included.
    """
    check_paged(query, key_cache, value_cache, block_tables, seq_lens)
    kernel = paged_kernel(query, key_cache, value_cache, backend)
    B, _, D = query.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if B == 0:
        return query.new_empty(query.shape)
    args = (query, key_cache, value_cache, block_tables, seq_lens, scale)
    if kernel == "triton":
        return paged_attention_triton(*args)
    if kernel == "batched":
        return paged_attention_batched(*args, chunk_tokens=batched_chunk_tokens(B, key_cache.shape[2], D,
                                                                                key_cache.shape[1]))
    if kernel == "fused":
        return paged_attention_native(*args, chunk_tokens=CPU_CHUNK_TOKENS)
    return paged_attention_cpu(*args, chunk_tokens=CPU_CHUNK_TOKENS)
