"""The chunked paged kernels and the int4 kernel equal the gather reference; the benchmark runs.

Every kernel is compared with ``_paged_decode_attention_gather`` (copy every sequence's blocks, pad,
mask, attend) or with contiguous attention per sequence, over head layouts (MHA/GQA/MQA), block sizes
(1 included), ragged lengths, lengths at chunk boundaries, 16-bit dtypes, shared blocks and garbage in
the slots no sequence owns.
"""

import csv
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from kvcore.kernels import (
    make_paged_problem,
    paged_decode_attention,
    quantize_paged_cache,
    quantized_paged_decode_attention,
)
from kvcore.kernels.attention import _paged_decode_attention_gather, contiguous_decode_attention
from kvcore.kernels.check import contiguous_reference
from kvcore.kernels.flash import merge_partials
from kvcore.kernels.paged_batched import batched_chunk_tokens, paged_attention_batched
from kvcore.kernels.paged_cpu import paged_attention_cpu
from kvcore.kernels.parallel import Span, plan_spans, run_spans
from kvcore.quant import QuantizedTensor, quantize

ROOT = Path(__file__).resolve().parents[1]
HEADS = [(8, 8), (8, 2), (8, 1)]  # MHA, GQA, MQA
RAGGED = [(37, 1, 16, 5), (64, 63, 2)]
CHUNK = 8  # tokens per chunk in the boundary tests


def inputs(p):
    return p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens


def reference(p):
    return _paged_decode_attention_gather(*inputs(p))


def run_cpu(p, chunk_tokens=CHUNK, workers=1):
    return paged_attention_cpu(*inputs(p), scale=p.query.shape[-1] ** -0.5, chunk_tokens=chunk_tokens,
                               workers=workers)


def run_batched(p, chunk_tokens=CHUNK):
    return paged_attention_batched(*inputs(p), scale=p.query.shape[-1] ** -0.5, chunk_tokens=chunk_tokens)


KERNELS = {"cpu": run_cpu, "cpu_3_workers": lambda p: run_cpu(p, workers=3), "batched": run_batched,
           "public": lambda p: paged_decode_attention(*inputs(p))}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), HEADS)
@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("seq_lens", RAGGED)
def test_kernels_equal_the_gather_reference_fp32(kernel, num_q_heads, num_kv_heads, block_size, seq_lens):
    p = make_paged_problem(seq_lens, num_q_heads, num_kv_heads, 16, block_size, seed=block_size)
    out = KERNELS[kernel](p)
    assert out.shape == (len(seq_lens), num_q_heads, 16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(p), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["cpu", "batched"])
@pytest.mark.parametrize("block_size", [1, 4])
def test_lengths_at_chunk_boundaries(kernel, block_size):
    """A chunk is CHUNK tokens: lengths one short of, at and one past one and two chunks."""
    lens = (CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 2 * CHUNK, 2 * CHUNK + 1, 1)
    p = make_paged_problem(lens, 4, 2, 8, block_size, seed=3)
    torch.testing.assert_close(KERNELS[kernel](p), reference(p), atol=1e-5, rtol=0)
    torch.testing.assert_close(KERNELS[kernel](p), contiguous_reference(p), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["cpu", "batched", "public"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_accumulates_in_fp32(kernel, dtype, tol):
    """16-bit K/V are read as stored and summed in fp32: only the output rounding differs."""
    p = make_paged_problem((40, 7, 17), 8, 2, 32, 4, dtype=dtype)
    out = KERNELS[kernel](p)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference(p).float(), atol=tol, rtol=0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_shared_blocks_are_read_by_every_sequence_naming_them(kernel):
    """Three sequences share blocks 5 and 2 (a prefix and a fork); 5 is the only block of the last one."""
    gen = torch.Generator().manual_seed(7)
    key_cache, value_cache = torch.randn(6, 4, 2, 8, generator=gen), torch.randn(6, 4, 2, 8, generator=gen)
    block_tables = torch.tensor([[5, 2, 0], [5, 2, 3], [5, -1, -1]], dtype=torch.int32)
    seq_lens = torch.tensor([10, 12, 3])
    query = torch.randn(3, 4, 8, generator=gen)
    p = make_paged_problem((1,), 4, 2, 8, 4)  # a holder for the hand-made tensors
    p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens = (query, key_cache, value_cache,
                                                                       block_tables, seq_lens)
    out = KERNELS[kernel](p)
    for b, (row, t) in enumerate(zip(block_tables.tolist(), seq_lens.tolist(), strict=True)):
        ids = torch.tensor([i for i in row if i >= 0])
        # [n, 4, Hkv, D] -> [n * 4, Hkv, D] -> [1, Hkv, t, D]
        keys = key_cache[ids].flatten(0, 1)[:t].transpose(0, 1)[None]
        values = value_cache[ids].flatten(0, 1)[:t].transpose(0, 1)[None]
        torch.testing.assert_close(out[b:b + 1], contiguous_decode_attention(query[b:b + 1], keys, values),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_slots_no_sequence_owns_may_hold_nan(kernel):
    """Unwritten slots of a last block, unused blocks and -1 table padding never reach the output."""
    lens = (13, 4, 30)
    p = make_paged_problem(lens, 4, 2, 8, 4, seed=1)
    spare = set(range(p.key_cache.shape[0])) - set(p.block_tables[p.block_tables >= 0].tolist())
    for cache in (p.key_cache, p.value_cache):
        cache[list(spare)] = math.nan
        for b, t in enumerate(lens):
            cache[p.block_tables[b, (t - 1) // 4], t % 4 or 4:] = math.nan
    out = KERNELS[kernel](p)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, contiguous_reference(p), atol=1e-5, rtol=0)


def test_cpu_kernel_leaves_the_thread_count_as_it_was():
    before = torch.get_num_threads()
    p = make_paged_problem((50, 20), 4, 2, 8, 4)
    run_cpu(p, workers=2)
    paged_decode_attention(*inputs(p))
    assert torch.get_num_threads() == before


def test_spans_cover_every_chunk_once_longest_first():
    num_chunks = [5, 1, 0, 12]
    one = plan_spans(num_chunks, workers=1)
    assert one == [Span(3, 0, 12), Span(0, 0, 5), Span(1, 0, 1)]  # one span per sequence
    many = plan_spans(num_chunks, workers=2)  # spans of ceil(18 / 8) = 3 chunks
    covered = sorted((s.seq, i) for s in many for i in range(s.first, s.stop))
    assert covered == sorted((b, i) for b, n in enumerate(num_chunks) for i in range(n))
    assert max(s.stop - s.first for s in many) == 3
    sizes = [s.stop - s.first for s in many]
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_run_spans_runs_every_span_once_on_the_caller_and_helpers(workers):
    spans, seen, lock = [Span(b, 0, 1) for b in range(20)], [], threading.Lock()

    def work(span):
        with lock:
            seen.append((span.seq, threading.get_ident()))

    run_spans(spans, work, workers)
    assert sorted(b for b, _ in seen) == list(range(20))
    if workers == 1:
        assert {t for _, t in seen} == {threading.get_ident()}


@pytest.mark.parametrize("failing", [0, 13])
def test_run_spans_reraises_a_failed_span_after_the_others_finish(failing):
    done = []

    def work(span):
        if span.seq == failing:
            raise RuntimeError(f"span {span.seq}")
        done.append(span.seq)

    with pytest.raises(RuntimeError, match=f"span {failing}"):
        run_spans([Span(b, 0, 1) for b in range(20)], work, workers=2)


def test_concurrent_callers_share_the_span_pool_and_get_their_own_results():
    """Two threads call the kernel at once (as two app sessions would): each gets its single-call output."""
    problems = [make_paged_problem([300] * 6, 8, 2, 16, 4, seed=s) for s in range(2)]
    expected = [paged_decode_attention(*inputs(p)) for p in problems]
    outputs = [[], []]

    def call(i):
        for _ in range(10):
            outputs[i].append(paged_decode_attention(*inputs(problems[i])))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert len(outputs[i]) == 10
        assert all(torch.equal(out, expected[i]) for out in outputs[i])


def test_merging_partials_ignores_chunks_never_written():
    """Two chunks' (m, l, o) plus an empty one (m=-inf) give the softmax over all scores."""
    scores, values = torch.tensor([0.5, 2.0, -1.0, 3.0]), torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    parts = [(scores[:2], values[:2]), (scores[2:], values[2:])]
    m = torch.tensor([[s.max()] for s, _ in parts] + [[-math.inf]])  # [3, 1]
    l = torch.stack([torch.exp(s - s.max()).sum(0, keepdim=True) for s, _ in parts] + [torch.zeros(1)])
    o = torch.stack([torch.exp(s - s.max()) @ v for s, v in parts] + [torch.zeros(1)])
    torch.testing.assert_close(merge_partials(m, l, o), torch.softmax(scores, 0) @ values)


def test_device_chunk_bounds_the_gathered_elements():
    assert batched_chunk_tokens(16, 8, 128, 16, elements=1 << 25) == 2048
    assert batched_chunk_tokens(1000, 8, 128, 16, elements=1 << 20) == 16  # at least one block


# --- int4 (and 2/8-bit) attention over a quantized paged pool -------------------------------------

QUANT = [(4, None, False), (4, 32, False), (4, 24, True), (2, 16, False), (8, 32, True)]


def quantized_problem(lens, heads, block_size, bits, group_size, symmetric, seed=0):
    p = make_paged_problem(lens, heads[0], heads[1], 64, block_size, seed=seed)
    quant = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
    return p, quantize_paged_cache(p.key_cache, **quant), quantize_paged_cache(p.value_cache, **quant)


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), QUANT)
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), HEADS)
def test_quantized_kernel_equals_attention_over_the_dequantized_cache(bits, group_size, symmetric, num_q_heads,
                                                                     num_kv_heads):
    p, kq, vq = quantized_problem((37, 1, 16, 5), (num_q_heads, num_kv_heads), 4, bits, group_size, symmetric)
    out = quantized_paged_decode_attention(p.query, kq, vq, p.block_tables, p.seq_lens, chunk_tokens=CHUNK)
    expected = _paged_decode_attention_gather(p.query, kq.dequantize(), vq.dequantize(), p.block_tables,
                                              p.seq_lens)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize("workers", [1, 2])
def test_quantized_kernel_at_chunk_boundaries(block_size, workers):
    lens = (CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1)
    p, kq, vq = quantized_problem(lens, (8, 2), block_size, 4, 32, False, seed=2)
    out = quantized_paged_decode_attention(p.query, kq, vq, p.block_tables, p.seq_lens, chunk_tokens=CHUNK,
                                           workers=workers)
    expected = paged_decode_attention(p.query, kq.dequantize(), vq.dequantize(), p.block_tables, p.seq_lens)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_quantized_kernel_never_dequantizes_the_whole_cache(monkeypatch):
    """The chunks are unpacked inside the loop; the pool's own dequantize() is never called."""
    p, kq, vq = quantized_problem((40, 9), (8, 2), 4, 4, 32, False)
    expected = paged_decode_attention(p.query, kq.dequantize(), vq.dequantize(), p.block_tables, p.seq_lens)

    def refuse(self):
        raise AssertionError("the kernel dequantized the whole pool")

    monkeypatch.setattr(QuantizedTensor, "dequantize", refuse)
    out = quantized_paged_decode_attention(p.query, kq, vq, p.block_tables, p.seq_lens, chunk_tokens=CHUNK)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_quantized_pool_is_kvcore_quant_per_token_and_holds_exact_bytes():
    """quantize_paged_cache = quant.quantize(axis=-1) in steps; bytes = packed int4 + fp16 scale and zero."""
    cache = torch.randn(10, 4, 2, 128, generator=torch.Generator().manual_seed(0))
    stepped = quantize_paged_cache(cache, 4, group_size=128, blocks_per_step=3)
    whole = quantize(cache, 4, axis=-1, group_size=128)
    for field in ("codes", "scales", "zeros"):
        assert torch.equal(getattr(stepped, field), getattr(whole, field))
    assert stepped.shape == whole.shape
    tokens_heads = 10 * 4 * 2
    assert stepped.nbytes == tokens_heads * (128 // 2 + 2 + 2)
    assert stepped.nbytes / (cache.numel() * 2) < 0.27  # vs the same cache in fp16


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), QUANT)
@pytest.mark.parametrize("block_size", [1, 4])
def test_batched_kernel_over_a_quantized_pool_equals_the_dequantized_cache(bits, group_size, symmetric, block_size):
    """The GPU path for quantized pools, run here on CPU tensors: steps of CHUNK tokens over the batch."""
    p, kq, vq = quantized_problem((37, 1, 16, 5, 64), (8, 2), block_size, bits, group_size, symmetric)
    expected = _paged_decode_attention_gather(p.query, kq.dequantize(), vq.dequantize(), p.block_tables, p.seq_lens)
    spare = sorted(set(range(kq.codes.shape[0])) - set(p.block_tables[p.block_tables >= 0].tolist()))
    for cache in (kq, vq):
        cache.scales[spare] = math.nan  # blocks no sequence names: gathered never, or masked
    out = paged_attention_batched(p.query, kq, vq, p.block_tables, p.seq_lens, 64 ** -0.5, CHUNK)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_quantized_inputs_are_validated():
    p, kq, vq = quantized_problem((5, 3), (4, 2), 2, 4, 32, False)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_paged_cache(p.key_cache, bits=3)
    with pytest.raises(ValueError, match="axis 3"):
        quantized_paged_decode_attention(p.query, quantize(p.key_cache, 4, axis=1), vq, p.block_tables, p.seq_lens)
    with pytest.raises(ValueError, match="same shape, bits and group_size"):
        quantized_paged_decode_attention(p.query, kq, quantize_paged_cache(p.value_cache, 8), p.block_tables,
                                         p.seq_lens)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        quantized_paged_decode_attention(p.query[:, :3], kq, vq, p.block_tables, p.seq_lens)
    with pytest.raises(ValueError, match="seq_lens must be in"):
        quantized_paged_decode_attention(p.query, kq, vq, p.block_tables, torch.tensor([5, 99]))


# --- CUDA (skipped without a GPU) -------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_cuda_paged_attention_matches_the_cpu_reference(dtype, tol):
    p = make_paged_problem((300, 3, 64, 129), 8, 2, 64, 16, dtype=dtype, device="cuda")
    out = paged_decode_attention(*inputs(p))
    assert out.is_cuda
    assert out.dtype == dtype
    expected = _paged_decode_attention_gather(*(t.cpu() for t in inputs(p)))
    torch.testing.assert_close(out.cpu().float(), expected.float(), atol=tol, rtol=0)


@cuda
def test_cuda_quantized_attention_matches_the_dequantized_cache():
    p, kq, vq = quantized_problem((300, 3, 64), (8, 2), 16, 4, 32, False)
    to_cuda = [p.query.cuda(), *(QuantizedTensor(q.codes.cuda(), q.scales.cuda(), q.zeros.cuda(), q.bits, q.axis,
                                                 q.group_size, q.shape, q.dtype) for q in (kq, vq))]
    out = quantized_paged_decode_attention(*to_cuda, p.block_tables.cuda(), p.seq_lens.cuda())
    expected = _paged_decode_attention_gather(p.query, kq.dequantize(), vq.dequantize(), p.block_tables, p.seq_lens)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=0)


# --- the benchmark's CI size ------------------------------------------------------------------------

def test_attention_benchmark_smoke_runs_and_writes_its_csv(tmp_path):
    out = tmp_path / "attention.csv"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--smoke", "--csv", str(out)],
                   check=True, capture_output=True, timeout=120)
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"sdpa", "contiguous", "paged", "paged_int4", "paged_torch"}
    assert len(rows) == 10
