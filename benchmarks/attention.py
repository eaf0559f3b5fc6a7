"""Decode attention speed: SDPA, the contiguous reference, paged (shuffled blocks) and int4 paged, one process.

    python benchmarks/attention.py [--lengths 1024 4096 16384] [--threads 1] [--repeats 7] [--memory]
                                   [--csv attention.csv] [--smoke] [--device cuda]

All methods attend the same query over the same K/V: torch SDPA on the contiguous ``[B, Hkv, T, D]``
layout (``enable_gqa=True``), :func:`kvcore.kernels.contiguous_decode_attention`,
:func:`kvcore.kernels.paged_decode_attention` on a vLLM pool ``[num_blocks, block_size, Hkv, D]`` whose
blocks are shuffled (also the batched torch path it falls back to, ``paged_torch``), and
:func:`kvcore.kernels.quantized_paged_decode_attention` on that pool quantized
to int4 per token and head. Calls are timed in interleaved rounds (a random order each round) and the
median is kept, so machine load drifts hit every method alike; ratios are to SDPA in the same run.
Effective bandwidth is KV bytes read per call / time, as a fraction of the machine's read bandwidth
measured in the same rounds (the sum of a large tensor). ``--memory`` also measures, in child
processes (Linux), the peak resident memory the int4 kernel adds versus dequantizing the pool first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvcore.kernels import (  # noqa: E402
    BACKENDS,
    choose_backend,
    contiguous_decode_attention,
    native,
    paged_decode_attention,
    quantize_paged_cache,
    quantized_paged_decode_attention,
)
from kvcore.kernels.native_paged import LIBRARY  # noqa: E402
from kvcore.quant import QuantizedTensor  # noqa: E402

SMOKE = {"batch": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 32, "lengths": [64, 160], "repeats": 2,
         "bandwidth_mib": 16}


@dataclass(slots=True)
class Problem:
    """One decode step laid out three ways: contiguous, paged (shuffled blocks), int4 paged."""

    query: torch.Tensor  # [B, Hq, D]
    keys: torch.Tensor  # [B, Hkv, T, D]
    values: torch.Tensor  # [B, Hkv, T, D]
    key_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    value_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    key_int4: QuantizedTensor
    value_int4: QuantizedTensor
    block_tables: torch.Tensor  # [B, T / block_size] int32
    seq_lens: torch.Tensor  # [B] int32


def to_pool(x: torch.Tensor, physical: torch.Tensor, block_size: int) -> torch.Tensor:
    """Contiguous ``[B, Hkv, T, D]`` -> pool ``[B * T / block_size, block_size, Hkv, D]``, block i at physical[i]."""
    B, Hkv, T, D = x.shape
    pool = torch.empty(B * T // block_size, block_size, Hkv, D, dtype=x.dtype, device=x.device)
    for b in range(B):  # one sequence at a time keeps the temporary small
        blocks = x[b].transpose(0, 1).reshape(T // block_size, block_size, Hkv, D)  # [nb, block_size, Hkv, D]
        pool[physical[b]] = blocks
    return pool


def make_problem(args: argparse.Namespace, length: int, dtype: torch.dtype, device: torch.device) -> Problem:
    """Random K/V for ``args.batch`` sequences of ``length`` tokens (a multiple of the block size)."""
    gen = torch.Generator(device=device).manual_seed(length)
    B, Hq, Hkv, D, bs = args.batch, args.q_heads, args.kv_heads, args.head_dim, args.block_size

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    keys, values, query = randn(B, Hkv, length, D), randn(B, Hkv, length, D), randn(B, Hq, D)
    nb = length // bs
    physical = torch.randperm(B * nb, generator=gen, device=device).view(B, nb)  # [B, nb] shuffled blocks
    key_cache, value_cache = to_pool(keys, physical, bs), to_pool(values, physical, bs)
    quant = {"bits": args.bits, "group_size": args.group_size}
    return Problem(query, keys, values, key_cache, value_cache, quantize_paged_cache(key_cache, **quant),
                   quantize_paged_cache(value_cache, **quant), physical.to(torch.int32),
                   torch.full((B,), length, dtype=torch.int32, device=device))


def methods(p: Problem, workers: int | None = None) -> dict[str, Callable[[], torch.Tensor]]:
    """The timed calls, by name; ``workers`` sets how many threads run the C kernel's spans (None: one per
    torch intra-op thread). ``paged`` is the public choice of backend (the C kernel on CPU when it is built,
    Triton on CUDA) and ``paged_torch`` the batched torch path it falls back to."""
    args = (p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens)
    return {
        "sdpa": lambda: F.scaled_dot_product_attention(p.query[:, :, None], p.keys, p.values,
                                                       enable_gqa=True)[:, :, 0],
        "contiguous": lambda: contiguous_decode_attention(p.query, p.keys, p.values),
        "paged": lambda: paged_decode_attention(*args, workers=workers),
        "paged_int4": lambda: quantized_paged_decode_attention(p.query, p.key_int4, p.value_int4, p.block_tables,
                                                               p.seq_lens, workers=workers),
        "paged_torch": lambda: paged_decode_attention(*args, backend="torch"),
    }


def paged_backend_line(p: Problem) -> str:
    """Which backend the ``paged`` row ran, and why not the C kernel on CPU."""
    backend = choose_backend(p.query, p.key_cache, p.value_cache)
    if backend != "torch" or p.query.device.type != "cpu":
        return f"paged: {backend} ({BACKENDS[backend]})"
    why = native.unavailable_reason(LIBRARY) or "a shape or dtype it does not cover"
    return f"paged: torch ({BACKENDS['torch']}); the C kernel not used: {why}"


def kv_bytes(p: Problem) -> dict[str, int]:
    """KV bytes each method holds and reads per call (the pool holds exactly the used blocks)."""
    dense = 2 * p.keys.numel() * p.keys.element_size()
    int4 = p.key_int4.nbytes + p.value_int4.nbytes
    return {"sdpa": dense, "contiguous": dense, "paged": dense, "paged_torch": dense, "paged_int4": int4}


def sync(device: torch.device) -> None:
    """Wait for queued device work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_rounds(calls: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                seed: int) -> dict[str, list[float]]:
    """Seconds per call of each method over ``repeats`` rounds, each round in a fresh random order.

    Each timed call follows an untimed call of the same method, so it does not pay for the previous
    method's state (a CPU kernel that ran on one intra-op thread leaves the OpenMP pool asleep, and the
    next multi-threaded op wakes it).
    """
    order, times = random.Random(seed), {name: [] for name in calls}
    for _ in range(repeats):
        names = list(calls)
        order.shuffle(names)
        for name in names:
            calls[name]()
            times[name].append(timed(calls[name], device))
    return times


def rows_for_length(args: argparse.Namespace, length: int, dtype: torch.dtype, device: torch.device,
                    big: torch.Tensor) -> list[dict[str, object]]:
    """Benchmark rows of one context length, with the read bandwidth measured in the same rounds."""
    p = make_problem(args, length, dtype, device)
    calls = methods(p, args.workers)
    times = time_rounds({**calls, "read_bw": big.sum}, args.repeats, device, seed=length)
    bandwidth = big.numel() * big.element_size() / statistics.median(times.pop("read_bw"))
    sdpa_out, sdpa_s = calls["sdpa"]().float(), statistics.median(times["sdpa"])
    held = kv_bytes(p)
    rows = []
    for name, ts in times.items():
        seconds = statistics.median(ts)
        rows.append({
            "tokens": length, "method": name, "ms": seconds * 1e3, "ms_min": min(ts) * 1e3,
            "ratio_to_sdpa": seconds / sdpa_s, "kv_mib": held[name] / 2**20,
            "kv_bytes_vs_dense": held[name] / held["sdpa"],
            "kv_bytes_vs_fp16": held[name] / (held["sdpa"] / p.keys.element_size() * 2),
            "gb_per_s": held[name] / seconds / 1e9, "read_bw_gb_per_s": bandwidth / 1e9,
            "bw_fraction": held[name] / seconds / bandwidth,
            "max_abs_diff_vs_sdpa": float((calls[name]().float() - sdpa_out).abs().max()),
        })
    return rows


def rss_kib(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process from /proc, in KiB.

    Not ``getrusage``: after fork + exec a child's ``ru_maxrss`` starts at its parent's resident size.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def lean_int4_pool(num_blocks: int, block_size: int, heads: int, dim: int, bits: int, group: int) -> QuantizedTensor:
    """A random quantized pool built 4 MiB of fp32 at a time (small temporaries)."""
    step = max(1, (4 << 20) // (block_size * heads * dim * 4))
    parts = [quantize_paged_cache(torch.randn(min(step, num_blocks - i), block_size, heads, dim), bits, group)
             for i in range(0, num_blocks, step)]
    return QuantizedTensor(torch.cat([q.codes for q in parts]), torch.cat([q.scales for q in parts]),
                           torch.cat([q.zeros for q in parts]), bits, 3, parts[0].group_size,
                           (num_blocks, block_size, heads, dim), torch.float32)


def peak_memory_child(args: argparse.Namespace) -> None:
    """(Child process) print the peak resident memory one attention call adds over an int4 pool, in MiB.

    ``args.child_memory`` is ``chunked`` (the int4 kernel, codes read in registers) or ``dequantized``
    (dequantize both pools with
    ``QuantizedTensor.dequantize``, then paged attention): the path the chunked kernel avoids. Linux only:
    the peak is reset just before the call (``/proc/self/clear_refs``) and read after (``VmHWM``).
    """
    torch.manual_seed(0)
    B, Hq, Hkv, D, bs, T = args.batch, args.q_heads, args.kv_heads, args.head_dim, args.block_size, args.lengths[0]
    num_blocks = B * T // bs
    kq, vq = (lean_int4_pool(num_blocks, bs, Hkv, D, args.bits, args.group_size) for _ in range(2))
    query, tables, lens = torch.randn(B, Hq, D), torch.randperm(num_blocks).view(B, T // bs), torch.full((B,), T)
    quantized_paged_decode_attention(query[:1], kq, vq, tables[:1], torch.ones(1, dtype=torch.long))  # warm up
    paged_decode_attention(query[:1], torch.randn(1, bs, Hkv, D), torch.randn(1, bs, Hkv, D), tables[:1] * 0,
                           torch.ones(1, dtype=torch.long))
    Path("/proc/self/clear_refs").write_text("5")  # peak resident := resident now
    before = rss_kib("VmRSS")
    if args.child_memory == "chunked":
        quantized_paged_decode_attention(query, kq, vq, tables, lens)
    else:
        paged_decode_attention(query, kq.dequantize(), vq.dequantize(), tables, lens)
    print(json.dumps({"mode": args.child_memory, "pool_mib": (kq.nbytes + vq.nbytes) / 2**20,
                      "peak_added_mib": (rss_kib("VmHWM") - before) / 1024,
                      "fp32_cache_mib": 2 * kq.codes.shape[0] * bs * Hkv * D * 4 / 2**20}))


def peak_memory(args: argparse.Namespace, length: int) -> list[dict[str, object]]:
    """Peak resident memory one int4 call adds, chunked vs dequantize-first, each in a fresh process."""
    rows = []
    for mode in ("chunked", "dequantized"):
        cmd = [sys.executable, __file__, "--child-memory", mode, "--lengths", str(length), "--threads",
               str(torch.get_num_threads())] + [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                                                ("batch", "q_heads", "kv_heads", "head_dim", "block_size", "bits",
                                                 "group_size")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append({"tokens": length, **json.loads(out)})
    return rows


def machine(threads: int) -> str:
    """One line: cores, torch threads, load average, torch version."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores, torch {torch.__version__} with {threads} threads, load average {load}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (``--smoke`` swaps in tiny sizes)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384], help="tokens per sequence")
    parser.add_argument("--bits", type=int, default=4, help="quantized pool: bits per code (2, 4 or 8)")
    parser.add_argument("--group-size", type=int, default=128, help="quantized pool: channels per scale")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--workers", type=int, help="threads running the C kernel's spans (default: one per "
                                                    "torch thread; kvcore.kernels.native_paged)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", help="float32 (CPU default), float16 (CUDA default) or bfloat16")
    parser.add_argument("--bandwidth-mib", type=int, default=1024, help="tensor summed for the read bandwidth")
    parser.add_argument("--memory", action="store_true", help="also measure int4 peak memory (CPU, child processes)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for CI (seconds)")
    parser.add_argument("--csv", help="write the table here")
    parser.add_argument("--child-memory", choices=["chunked", "dequantized"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if any(t % args.block_size for t in args.lengths):
        parser.error(f"--lengths must be multiples of --block-size {args.block_size}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_memory:
        peak_memory_child(args)
        return
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "float16"))
    print(f"{machine(torch.get_num_threads())}; device {device}, {dtype}")
    print(f"B={args.batch} Hq={args.q_heads} Hkv={args.kv_heads} D={args.head_dim} block_size={args.block_size}, "
          f"int{args.bits} groups of {args.group_size} channels, kernel workers {args.workers or 'one per thread'}, "
          f"median of {args.repeats} interleaved rounds")
    print(paged_backend_line(make_problem(args, args.lengths[0], dtype, device)))
    big = torch.ones(args.bandwidth_mib << 18, device=device)  # MiB of fp32
    rows = [row for t in args.lengths for row in rows_for_length(args, t, dtype, device, big)]
    table = pd.DataFrame(rows)
    table["threads"], table["device"], table["dtype"] = torch.get_num_threads(), str(device), str(dtype)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3g}".format):
        print(table.drop(columns=["threads", "device", "dtype"]).to_string(index=False))
    if args.memory and device.type == "cpu" and Path("/proc/self/clear_refs").exists():
        memory = pd.DataFrame([row for t in args.lengths for row in peak_memory(args, t)])
        print("\nPeak resident memory one int4 call adds (child processes):")
        print(memory.to_string(index=False, float_format="{:.1f}".format))
    print(f"after: {machine(torch.get_num_threads())}")
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
