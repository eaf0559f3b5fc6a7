"""Paged decode attention with Triton on CUDA (or Triton's interpreter on CPU): launch, split plan, merge.

Follows vLLM's PagedAttention V2 (Kwon et al., SOSP 2023) and FlashDecoding (Dao et al. 2023): when
the batch and KV heads alone do not give the GPU enough programs, every sequence's tokens are cut into
splits of ``split_tokens``, each split leaves a partial softmax state and a second kernel merges them.
The kernels live in :mod:`kvcore.kernels.triton_decode`; this module is the boundary that keeps triton
optional: it imports that module (and so triton) on the first call that needs it, and :func:`unavailable`
says in words why Triton cannot run a call (not installed, or CPU tensors without ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math
from functools import cache
from importlib.util import find_spec
from types import ModuleType

import torch

from kvcore.quant.integer import QuantizedTensor

BLOCK_N = 64  # tokens per tile of a program's loop
MIN_SPLIT_TOKENS = 256  # a split shorter than this costs more in the merge than it gains in parallelism
PROGRAMS_PER_SM = 4  # programs wanted per streaming multiprocessor before splitting stops
MAX_SPLITS = 64  # most splits the planner makes for one sequence
MERGE_SPLITS = 32  # splits the merge kernel reads per step
NUM_WARPS = 4
INSTALL_HINT = "requirements-gpu.txt installs it: torch 2.13.0's CUDA build requires triton==3.7.1"


@cache
def kernels() -> tuple[ModuleType | None, str]:
    """The module of Triton kernels and ``""``, or None and why it cannot be imported; imported once.

    Importing it decorates the kernels, which is when Triton reads ``TRITON_INTERPRET``.
    """
    if find_spec("triton") is None:
        return None, f"triton is not installed ({INSTALL_HINT})"
    try:
        from kvcore.kernels import triton_decode  # optional dependency: imported on first use, not with kvcore
    except ImportError as e:
        return None, f"triton could not be imported: {e}"
    return triton_decode, ""


def unavailable(device: torch.device) -> str:
    """Why Triton cannot run a call on ``device``, or ``""`` when it can."""
    module, reason = kernels()
    if module is None:
        return reason
    if device.type == "cuda" or module.INTERPRETED:
        return ""
    return (f"Triton runs on CUDA tensors, and on {device.type} tensors only in its interpreter: start the "
            "process with TRITON_INTERPRET=1 (read when the kernels are first imported)")


def compiled_for(device: torch.device) -> bool:
    """True when Triton is the best kernel for ``device``: CUDA tensors and kernels compiled for the GPU."""
    module, _ = kernels()
    return device.type == "cuda" and module is not None and not module.INTERPRETED


@cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_plan(batch: int, num_kv_heads: int, max_len: int, device: torch.device,
               split_tokens: int | None = None) -> tuple[int, int]:
    """Tokens per split (whole tiles of :data:`BLOCK_N`) and splits of the longest sequence, for a batch whose longest
    sequence has ``max_len`` tokens.

    split_tokens: forced (rounded up to whole tiles); None picks it so that ``batch x Hkv x splits`` reaches
    :data:`PROGRAMS_PER_SM` programs per SM on a GPU, with splits of at least :data:`MIN_SPLIT_TOKENS` and at most
    :data:`MAX_SPLITS` of them; on CPU (the interpreter) nothing is split.
    """
    if split_tokens is None:
        wanted = 1
        if device.type == "cuda":
            programs = PROGRAMS_PER_SM * _multiprocessors(device.index or 0)
            wanted = min(-(-programs // (batch * num_kv_heads)), max(1, max_len // MIN_SPLIT_TOKENS), MAX_SPLITS)
        split_tokens = -(-max_len // wanted)
    split_tokens = max(BLOCK_N, -(-split_tokens // BLOCK_N) * BLOCK_N)
    return split_tokens, -(-max_len // split_tokens)


def triton_size(n: int) -> int:
    """The power of two a Triton block needs to hold ``n`` elements."""
    return 1 << max(0, math.ceil(math.log2(n)))


def _require(device: torch.device) -> ModuleType:
    reason = unavailable(device)
    if reason:
        raise ValueError(f"backend 'triton' cannot run this call: {reason}")
    return kernels()[0]


def f32_dots(module: ModuleType, dtype: torch.dtype) -> bool:
    """True when dot products of ``dtype`` operands must run in fp32: bf16 in Triton 3.9's interpreter,
    whose ``tl.dot`` multiplies bf16 operands as their raw uint16 bits (on a GPU bf16 dots are fine)."""
    return module.INTERPRETED and dtype == torch.bfloat16


def _tables(block_tables: torch.Tensor, seq_lens: torch.Tensor, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 block tables ``[B, max_blocks]`` (any row stride) and lengths ``[B]`` on ``device``."""
    tables = block_tables.to(device=device, dtype=torch.int32)
    if tables.stride(1) != 1:
        tables = tables.contiguous()
    return tables, seq_lens.to(device=device, dtype=torch.int32).contiguous()


def _pools(cache: torch.Tensor | QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A quantized pool's codes, scales and zeros (scales again when symmetric); a float pool three times (the
    kernel reads its scale and zero pointers only for a quantized pool)."""
    if not isinstance(cache, QuantizedTensor):
        return cache, cache, cache
    zeros = cache.scales if cache.zeros is None else cache.zeros
    return cache.codes.contiguous(), cache.scales.contiguous(), zeros.contiguous()


def paged_attention_triton(query: torch.Tensor, key_cache: torch.Tensor | QuantizedTensor,
                           value_cache: torch.Tensor | QuantizedTensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, max_len: int | None = None,
                           split_tokens: int | None = None) -> torch.Tensor:
    """Paged decode attention with the kernels of :mod:`kvcore.kernels.triton_decode` (+ the split merge).

    query ``[B, Hq, D]``; key_cache/value_cache ``[num_blocks, block_size, Hkv, D]`` (fp32/fp16/bf16, any
    strides), or :func:`kvcore.kernels.quantize_paged_cache` pools (2/4/8 bits, dequantized in registers,
    KIVI's per-token layout); block_tables int ``[B, max_blocks]``; seq_lens int ``[B]``; scale: softmax
    scale; max_len: the longest sequence (given, no host read of ``seq_lens``); split_tokens: force the split
    length (None: :func:`split_plan`). Inputs are assumed valid and B >= 1. A 16-bit query uses 16-bit dot
    products with fp32 accumulation over a pool of its dtype (or a quantized pool); any other mix runs in
    fp32. Returns ``[B, Hq, D]`` in the query's dtype.
    """
    module = _require(key_cache.device)
    device, Hkv, quantized = key_cache.device, key_cache.shape[2], isinstance(key_cache, QuantizedTensor)
    q = query.to(device).contiguous()  # [B, Hq, D]
    B, Hq, D = q.shape
    tables, lens = _tables(block_tables, seq_lens, device)
    same = quantized or q.dtype == key_cache.dtype == value_cache.dtype
    dot_f32 = q.dtype == torch.float32 or not same or f32_dots(module, q.dtype)
    max_len = int(lens.max()) if max_len is None else max_len
    split, S = split_plan(B, Hkv, max_len, device, split_tokens)
    out = torch.empty_like(q)
    part_o = torch.empty(B, Hq, S, D, dtype=torch.float32, device=device)  # split partials (not touched when S = 1)
    part_lse = torch.empty(B, Hq, S, dtype=torch.float32, device=device)
    keys, values = _pools(key_cache), _pools(value_cache)  # data (the pool or its codes), scales, zeros
    quant = {"QUANTIZED": quantized, "BITS": key_cache.bits if quantized else 8,
             "GROUP": key_cache.group_size if quantized else 1, "SYMMETRIC": quantized and key_cache.zeros is None}
    scale_strides = keys[1].stride()[:3] if quantized else (0, 0, 0)  # K's and V's scales and zeros share theirs
    block_d = max(16, triton_size(D))
    module.paged_decode_kernel[(B, Hkv, S)](  # one program per (sequence, KV head, split)
        out, part_o, part_lse, q, *keys, *values, tables, lens, scale, *keys[0].stride(), *values[0].stride(),
        *scale_strides, tables.stride(0), key_cache.shape[1], split, Hq, S, G=Hq // Hkv, D=D,
        BLOCK_G=max(16, triton_size(Hq // Hkv)), BLOCK_D=block_d, BLOCK_N=BLOCK_N, SPLIT=S > 1, DOT_F32=dot_f32,
        **quant, num_warps=NUM_WARPS)
    if S > 1:
        module.merge_splits_kernel[(B, Hq)](out, part_o, part_lse, lens, split, Hq, S, D=D,
                                            BLOCK_S=min(MERGE_SPLITS, triton_size(S)), BLOCK_D=block_d,
                                            num_warps=NUM_WARPS)
    return out
