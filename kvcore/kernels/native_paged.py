"""Paged decode attention on CPU with the C kernel (``csrc/paged_decode.c``): a step's plan, its workers, the merge.

Follows vLLM PagedAttention V2 (Kwon et al., SOSP 2023) and flash-decoding (Dao et al. 2023): a decode
batch is cut once per step into spans (a sequence's run of tokens; long sequences split so that every
worker has work), and every layer hands the same span list to the kernel. The kernel runs its workers on
OpenMP threads, the pool torch's own ops run on (as vLLM's CPU kernels do; a second pool of threads would
fight torch's for the cores while those spin between ops), each taking the next span from a shared counter;
``kvlab_merge`` then reduces each sequence's partial softmax states into its output. Small batches run on
the calling thread alone.
Supported: fp32 contiguous pools with head dim a multiple of 16 (any query heads per KV head), and
2/4/8-bit pools of :func:`kvcore.kernels.quantize_paged_cache` whose scale groups cover whole 16-byte
vectors of each bit plane; :func:`unsupported` says why a call is not.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from functools import cache

import torch

from kvcore.kernels import native
from kvcore.quant.integer import QuantizedTensor

LIBRARY = "paged_decode"
ERRORS = {1: "out of memory", 2: "unsupported shape"}
PARALLEL_WORK = 1 << 16  # query-key products (tokens x Hq x D) below which one thread does the batch
SPANS_PER_WORKER = 4  # more spans than workers, so a slowed worker is made up for by the others
MIN_SPAN_TOKENS = 256
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {"kvlab_decode": [_P, _I] + [_P] * 8 + [_I, _P] + [_I] * 7 + [_F] + [_P] * 5 + [_I],
              "kvlab_merge": [_P] * 5 + [_I] * 3 + [_P] * 2, "kvlab_rope_write": [_P] + [_I] * 5 + [_P] * 5}
Call = tuple[ctypes._CFuncPtr, tuple]  # a compiled function and its arguments


@cache
def functions() -> dict[str, ctypes._CFuncPtr] | None:
    """The kernel's entry points, typed; None when the library cannot be built or loaded (looked up once)."""
    return native.entry_points(LIBRARY, SIGNATURES)


def unsupported(query: torch.Tensor, key_cache: torch.Tensor | QuantizedTensor,
                value_cache: torch.Tensor | QuantizedTensor) -> str:
    """Why the C kernel cannot run this (validated) call, or ``""`` when it can."""
    if key_cache.device.type != "cpu" or query.device.type != "cpu":
        return f"the C kernel runs on CPU tensors, got {key_cache.device.type}"
    if query.shape[-1] % 16:
        return f"the C kernel needs a head dim that is a multiple of 16, got {query.shape[-1]}"
    quantized = isinstance(key_cache, QuantizedTensor)
    parts = [t for c in (key_cache, value_cache) for t in ((c.codes, c.scales, c.zeros) if quantized else (c,))
             if t is not None]
    if not all(t.is_contiguous() for t in parts):
        return "the C kernel needs contiguous pools"
    if quantized:
        reason = _quantized_layout(key_cache, value_cache)
        if reason:
            return reason
    elif not key_cache.dtype == value_cache.dtype == torch.float32:
        return f"the C kernel needs fp32 pools, got {key_cache.dtype}"
    if functions() is None:
        return f"the C kernel is not available: {native.unavailable_reason(LIBRARY)}"
    return ""


def _quantized_layout(key_cache: QuantizedTensor, value_cache: QuantizedTensor) -> str:
    if not all(c.scales.dtype == torch.float16 and (c.zeros is None or c.zeros.dtype == torch.float16)
               for c in (key_cache, value_cache)):
        return "the C kernel needs fp16 scales and zeros"
    dim, per_byte, group = key_cache.shape[3], 8 // key_cache.bits, key_cache.group_size
    if dim % group or group % (16 * per_byte) or dim // group > 64:
        return (f"the C kernel needs scale groups that divide head_dim ({dim}), span a multiple of {16 * per_byte} "
                f"channels and number at most 64, got group_size {group}")
    return ""


@dataclass(slots=True)
class NativePlan:
    """A decode batch's work list for the C kernel, built once per step and used by every layer.

    spans: int64 ``[S, 4]`` = (sequence, first token, tokens, partial slot), longest first; first/count: int64
    ``[B]`` each sequence's partial slots; tables: int64 ``[B, max_blocks]``; workers: threads per call.
    """

    spans: torch.Tensor
    first: torch.Tensor
    count: torch.Tensor
    tables: torch.Tensor
    workers: int
    counter: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.int64))
    buffers: dict[tuple[int, int], tuple[torch.Tensor, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, tables: torch.Tensor, lengths: list[int], work_per_token: int, workers: int) -> NativePlan:
        """Spans over ``lengths`` tokens per sequence. work_per_token: Hq x D; workers: threads available (one
        is used when the whole batch is under :data:`PARALLEL_WORK`)."""
        total = sum(lengths)
        if total * work_per_token < PARALLEL_WORK:
            workers = 1
        size = max(lengths) if workers <= 1 else max(MIN_SPAN_TOKENS, -(-total // (SPANS_PER_WORKER * workers)))
        spans, first, count = [], [], []
        for b, n in enumerate(lengths):
            first.append(len(spans))
            pieces = -(-n // size)
            count.append(pieces)
            step = -(-n // pieces)
            spans += [[b, start, min(step, n - start), len(spans) + i] for i, start in enumerate(range(0, n, step))]
        spans.sort(key=lambda s: -s[2])
        as_long = {"dtype": torch.int64}
        return cls(torch.tensor(spans, **as_long), torch.tensor(first, **as_long), torch.tensor(count, **as_long),
                   tables.to(torch.int64).contiguous(), workers)

    def partials(self, rows: int, dim: int) -> tuple[torch.Tensor, ...]:
        """m, l ``[slots, rows]`` and o ``[slots, rows, dim]`` fp32 buffers, allocated once per step."""
        if (rows, dim) not in self.buffers:
            slots = len(self.spans)
            self.buffers[(rows, dim)] = (torch.empty(slots, rows), torch.empty(slots, rows),
                                         torch.empty(slots, rows, dim))
        return self.buffers[(rows, dim)]

    def calls(self, pointers: tuple[int | None, ...], sizes: tuple[int, ...], scale: float, query: torch.Tensor,
              out: torch.Tensor, counter: torch.Tensor, order: torch.Tensor | None = None) -> list[Call]:
        """The kernel's call over every span on :attr:`workers` threads, then the merge's: fp32 ``query [B, Hq, D]``
        (rows any stride apart, heads contiguous) into ``out [B, Hq, D]``.

        pointers: the pools' six (key and value, then their scales and zeros; None for fp32 pools); sizes: the
        kernel's shape arguments after the table stride; counter: the workers' shared int64 counter, zeroed before
        each run; order: for quantized pools, where each plane-order channel goes. When every sequence is one span the
        kernel writes the output itself and there is no merge.
        """
        fns = functions()
        B, Hq, D = query.shape
        m, l, o = self.partials(Hq, D)
        direct = len(self.spans) == B
        order_ptr = None if order is None else order.data_ptr()
        decode = (fns["kvlab_decode"], (
            query.data_ptr(), query.stride(0), *pointers, self.tables.data_ptr(), self.spans.data_ptr(),
            len(self.spans), counter.data_ptr(), self.tables.stride(0), *sizes, scale, m.data_ptr(), l.data_ptr(),
            o.data_ptr(), out.data_ptr() if direct else None, order_ptr, self.workers))
        if direct:
            return [decode]
        return [decode, (fns["kvlab_merge"], (m.data_ptr(), l.data_ptr(), o.data_ptr(), self.first.data_ptr(),
                                              self.count.data_ptr(), B, Hq, D, order_ptr, out.data_ptr()))]


def run(calls: list[Call]) -> None:
    """Each call in turn; a kernel's non-zero status raises."""
    for fn, args in calls:
        status = fn(*args)
        if status:
            raise RuntimeError(f"{fn.__name__}: {ERRORS.get(status, f'error {status}')}")


@cache
def plane_order(dim: int, bits: int) -> torch.Tensor:
    """Channel at each position of the kernel's plane order: bit field p of byte x is channel x * 8/bits + p."""
    per_byte = 8 // bits
    return torch.arange(dim).view(dim // per_byte, per_byte).t().reshape(-1).contiguous()  # [D] int64


def paged_attention_native(query: torch.Tensor, key_cache: torch.Tensor | QuantizedTensor,
                           value_cache: torch.Tensor | QuantizedTensor, plan: NativePlan, scale: float
                           ) -> torch.Tensor:
    """Decode attention with the C kernel over fp32 pools, or quantized ones whose codes it unpacks in
    registers (KIVI-style folding of scales and zeros); ``[B, Hq, D]`` in the query's dtype (valid inputs)."""
    q = query.float()
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        q = q.contiguous()
    out = torch.empty(q.shape)
    plan.counter.zero_()
    run(decode_calls(q, key_cache, value_cache, plan, scale, out, plan.counter))
    return out.to(query.dtype)


def decode_calls(query: torch.Tensor, key_cache: torch.Tensor | QuantizedTensor,
                 value_cache: torch.Tensor | QuantizedTensor, plan: NativePlan, scale: float, out: torch.Tensor,
                 counter: torch.Tensor) -> list[Call]:
    """:meth:`NativePlan.calls` for fp32 ``query [B, Hq, D]`` (heads contiguous) over these pools into ``out``."""
    block_size, Hkv, D = key_cache.shape[1:]
    sizes = (block_size, Hkv, query.shape[1] // Hkv, D)
    if not isinstance(key_cache, QuantizedTensor):
        pointers = (key_cache.data_ptr(), value_cache.data_ptr(), None, None, None, None)
        return plan.calls(pointers, (*sizes, 0, 1), scale, query, out, counter)
    pointers = (key_cache.codes.data_ptr(), value_cache.codes.data_ptr(),
                *(None if t is None else t.data_ptr() for c in (key_cache, value_cache) for t in (c.scales, c.zeros)))
    sizes += (key_cache.bits, key_cache.scales.shape[-1])
    return plan.calls(pointers, sizes, scale, query, out, counter, plane_order(D, key_cache.bits))


def rope_and_cache(qkv: torch.Tensor, num_q_heads: int, cos: torch.Tensor, signed_sin: torch.Tensor,
                   slots: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> bool:
    """RoPE on the queries and keys of ``qkv [T, Hq + 2 Hkv, D]`` in place, then keys and values into ``slots [T]`` of
    fp32 pools ``[num_blocks, block_size, Hkv, D]``, with the C kernel (vLLM's ``rotary_embedding`` and
    ``reshape_and_cache`` in one pass; cos and signed_sin ``[T, 1, D]`` as :func:`kvcore.engine.forward.rotate` takes
    them). False, with nothing done, where the kernel cannot: other dtypes or devices, strided rows, no library."""
    call = rope_call(qkv, num_q_heads, cos, signed_sin, slots, key_cache, value_cache)
    if call is not None:
        run([call])
    return call is not None


def rope_call(qkv: torch.Tensor, num_q_heads: int, cos: torch.Tensor, signed_sin: torch.Tensor, slots: torch.Tensor,
              key_cache: torch.Tensor, value_cache: torch.Tensor) -> Call | None:
    """:func:`rope_and_cache`'s call, or None where the kernel cannot make it."""
    T, heads, D = qkv.shape
    if heads != num_q_heads + 2 * key_cache.shape[2] or key_cache.shape[3] != D:
        raise ValueError(f"qkv rows of {heads} heads of {D} do not hold {num_q_heads} query heads and K/V for pools "
                         f"of {tuple(key_cache.shape)}")
    tensors = (qkv, cos, signed_sin, key_cache, value_cache)
    if (functions() is None or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors)
            or slots.dtype != torch.int64 or not slots.is_contiguous() or qkv.stride(2) != 1 or qkv.stride(1) != D
            or not all(t.is_contiguous() for t in tensors[1:])):
        return None
    return functions()["kvlab_rope_write"], (qkv.data_ptr(), T, qkv.stride(0), num_q_heads, key_cache.shape[2], D,
                                             cos.data_ptr(), signed_sin.data_ptr(), slots.data_ptr(),
                                             key_cache.data_ptr(), value_cache.data_ptr())
