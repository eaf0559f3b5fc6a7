"""GPU check, safe to run unattended: the CUDA tests, decode-attention bandwidth, pinned copy bandwidth.

    python benchmarks/gpu_check.py --csv gpu_check.csv [--contexts 4096 16384] [--repeats 20] [--tests cuda|none]

On a CUDA device, in this order and within :data:`BUDGET_S` (about 6 minutes, checked between steps):

1. ``pytest -k cuda`` over the kernel test files (every Triton case compiled, the torch paths on the GPU);
   the result is a CSV row, a failure does not stop the benchmarks.
2. Decode attention at B=16, Hq=32, Hkv=8, D=128, bf16, block size 16, for each context length: torch
   SDPA over contiguous ``[B, Hkv, T, D]`` K/V (``enable_gqa``), the Triton paged kernel (vLLM
   PagedAttention layout, FlashDecoding split-K), the torch batched paged path, FlashInfer's paged
   decode when ``flashinfer`` imports, and the Triton kernel over int8 and int4 pools. Blocks are
   shuffled. Each is timed with CUDA events, warm-up first, median of ``--repeats``; effective bandwidth
   is bytes of K/V read per call / median time, reported as a share of the HBM peak of the matching
   :data:`kvcore.shapes.GPU_PRESETS` entry (or ``--peak-gbps``); which peak was used is printed.
   Outputs are compared with SDPA's (max abs difference), never asserted.
3. Pinned host <-> device copies of 256 MiB, medians, against the preset's host link.
4. The serving engine on the GPU (the bundled model, the 64-request workload of benchmarks/engine.py): the
   engine and transformers' generate with static batching, one run each (throughput, TTFT, TPOT).

Without a CUDA device it runs ``tests/test_kernels_triton.py`` (Triton's interpreter on CPU), prints
that it measured no GPU, and writes the CSV all the same. Times are reported, never asserted; the exit
status is non-zero only when the tests fail.
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvcore.kernels import paged_decode_attention, quantize_paged_cache, quantized_paged_decode_attention  # noqa: E402
from kvcore.shapes import GPU_PRESETS, GpuSpec  # noqa: E402

BUDGET_S = 330  # the whole run stays under 6 minutes
TEST_TIMEOUT_S = 200
CUDA_TESTS = ["tests/test_kernels_triton.py", "tests/test_kernels_fast.py", "tests/test_kernels.py",
              "tests/test_engine.py"]
CPU_TESTS = ["tests/test_kernels_triton.py"]
SHAPE = {"batch": 16, "q_heads": 32, "kv_heads": 8, "head_dim": 128, "block_size": 16}
COPY_BYTES = 256 << 20
FIELDS = ["section", "name", "context", "dtype", "median_ms", "p10_ms", "p90_ms", "bytes", "gb_per_s",
          "peak_gb_per_s", "share_of_peak", "max_abs_diff_vs_sdpa", "output_tok_per_s", "ttft_ms_p50",
          "tpot_ms_p50", "note"]


def log(message: str) -> None:
    print(message, flush=True)


def run_tests(files: list[str], selection: str | None) -> dict:
    """Run pytest in a child process; a CSV row with its summary line."""
    command = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-n", "0"]  # one process
    command += ["-k", selection] if selection else []
    log(f"$ {' '.join(command[2:])}")
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TEST_TIMEOUT_S)
        summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
        status = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
        if done.returncode:
            log(done.stdout[-6000:] + done.stderr[-2000:])
    except subprocess.TimeoutExpired:
        summary, status = f"timed out after {TEST_TIMEOUT_S} s", "failed (timeout)"
    log(f"tests {status}: {summary}")
    return {"section": "tests", "name": " ".join(files) + (f" -k {selection}" if selection else ""),
            "note": f"{status}: {summary} ({time.perf_counter() - start:.0f} s with start-up)"}


def gpu_spec(name: str, peak_gbps: float | None) -> tuple[GpuSpec | None, str]:
    """The preset whose model (its first word: H200, H100, A100, L4...) is a word of the device name."""
    for spec in GPU_PRESETS.values():
        if re.search(rf"\b{re.escape(spec.name.split()[0])}\b", name):
            found = spec
            break
    else:
        found = None
    if peak_gbps:
        return found, f"--peak-gbps {peak_gbps:g}"
    if found is None:
        return None, f"no GPU_PRESETS entry matches {name!r}: shares of peak left empty (pass --peak-gbps)"
    return found, f"GPU_PRESETS[{found.name!r}]: HBM {found.hbm_bandwidth / 1e9:g} GB/s, host link " \
                  f"{found.host_link_bandwidth / 1e9:g} GB/s ({found.host_link}); datasheet, SXM where it differs"


def time_cuda(fn: Callable[[], object], repeats: int, warmup: int = 3) -> list[float]:
    """Milliseconds of each of ``repeats`` calls after ``warmup`` calls, from CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return times


def timing_row(section: str, name: str, times: list[float], nbytes: int, peak: float | None, **extra) -> dict:
    """Median and 10th/90th percentiles of ``times`` (ms), bandwidth of ``nbytes`` per call and its share."""
    median = statistics.median(times)
    deciles = statistics.quantiles(times, n=10) if len(times) > 1 else [median] * 9
    gbps = nbytes / (median * 1e-3) / 1e9
    return {"section": section, "name": name, "median_ms": median, "p10_ms": deciles[0], "p90_ms": deciles[-1],
            "bytes": nbytes, "gb_per_s": gbps, "peak_gb_per_s": peak / 1e9 if peak else "",
            "share_of_peak": gbps * 1e9 / peak if peak else "", **extra}


@dataclass(slots=True)
class DecodeProblem:
    """One bf16 decode step laid out for every method: a shuffled vLLM pool and contiguous copies."""

    query: torch.Tensor  # [B, Hq, D]
    key_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    value_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor  # [B, T / block_size] int32, shuffled blocks
    seq_lens: torch.Tensor  # [B] int32
    keys: torch.Tensor  # [B, Hkv, T, D] contiguous
    values: torch.Tensor  # [B, Hkv, T, D] contiguous

    @classmethod
    def make(cls, context: int, seed: int = 0, device: str = "cuda") -> DecodeProblem:
        B, Hq, Hkv, D, bs = (SHAPE[k] for k in ("batch", "q_heads", "kv_heads", "head_dim", "block_size"))
        gen = torch.Generator(device=device).manual_seed(seed)
        per_seq = -(-context // bs)
        num_blocks = B * per_seq

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16)

        key_cache, value_cache = randn(num_blocks, bs, Hkv, D), randn(num_blocks, bs, Hkv, D)
        tables = torch.randperm(num_blocks, generator=gen, device=device).view(B, per_seq).int()  # [B, per_seq]

        def contiguous(pool: torch.Tensor) -> torch.Tensor:
            # [B, per_seq, bs, Hkv, D] -> [B, T, Hkv, D] -> [B, Hkv, T, D]
            return pool[tables.long()].reshape(B, -1, Hkv, D)[:, :context].transpose(1, 2).contiguous()

        return cls(randn(B, Hq, D), key_cache, value_cache, tables,
                   torch.full((B,), context, dtype=torch.int32, device=device),
                   contiguous(key_cache), contiguous(value_cache))

    def paged(self) -> tuple[torch.Tensor, ...]:
        return self.query, self.key_cache, self.value_cache, self.block_tables, self.seq_lens

    def kv_bytes(self) -> int:
        """Bytes of K and V that attention must read: every token of every sequence."""
        return 2 * self.keys.numel() * self.keys.element_size()


def flashinfer_decode(p: DecodeProblem) -> tuple[Callable[[], torch.Tensor] | None, str]:
    """FlashInfer's paged decode over the same pool (NHD layout = vLLM's), or None and why not."""
    try:
        import flashinfer  # optional: measured only when installed
    except ImportError as e:
        return None, f"flashinfer not importable: {e}"
    B, Hq, D = p.query.shape
    _, bs, Hkv, _ = p.key_cache.shape
    per_seq = p.block_tables.shape[1]
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=p.query.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    indptr = torch.arange(B + 1, dtype=torch.int32, device=p.query.device) * per_seq  # [B + 1]
    last = (p.seq_lens - 1) % bs + 1  # [B] tokens in each sequence's last page
    wrapper.plan(indptr, p.block_tables.reshape(-1), last.int(), Hq, Hkv, D, bs, q_data_type=torch.bfloat16,
                 kv_data_type=torch.bfloat16)
    return (lambda: wrapper.run(p.query, (p.key_cache, p.value_cache))), f"flashinfer {flashinfer.__version__}"


def decode_rows(context: int, repeats: int, peak: float | None, device: str = "cuda") -> list[dict]:
    """Every decode method at one context length; one row each."""
    p = DecodeProblem.make(context, device=device)
    q4 = p.query[:, :, None, :]  # [B, Hq, 1, D]
    reference = F.scaled_dot_product_attention(q4, p.keys, p.values, enable_gqa=True)[:, :, 0]  # [B, Hq, D]
    methods: dict[str, tuple[Callable[[], torch.Tensor], int, str]] = {
        "sdpa_contiguous": (lambda: F.scaled_dot_product_attention(q4, p.keys, p.values, enable_gqa=True),
                            p.kv_bytes(), "torch SDPA, enable_gqa, [B, Hkv, T, D]"),
        "triton_paged": (lambda: paged_decode_attention(*p.paged(), backend="triton"), p.kv_bytes(),
                         "kvcore Triton split-K kernel"),
        "torch_batched_paged": (lambda: paged_decode_attention(*p.paged(), backend="torch"), p.kv_bytes(),
                                "kvcore torch batched path (the fallback)"),
    }
    try:
        fi, note = flashinfer_decode(p)
    except Exception as e:  # an API change in an optional package must not stop the run
        fi, note = None, f"flashinfer setup failed: {e!r}"[:300]
    if fi is not None:
        methods["flashinfer_paged"] = (fi, p.kv_bytes(), note)
    else:
        log(f"  flashinfer: {note}")
    for bits in (8, 4):
        kq, vq = (quantize_paged_cache(c, bits, group_size=32) for c in (p.key_cache, p.value_cache))
        methods[f"triton_paged_int{bits}"] = (
            lambda kq=kq, vq=vq: quantized_paged_decode_attention(p.query, kq, vq, p.block_tables, p.seq_lens,
                                                                  backend="triton"),
            kq.nbytes + vq.nbytes,
            f"int{bits} per token and head, groups of 32, fp16 scales and zeros (diff includes quantization)")
    rows = []
    for name, (fn, nbytes, note) in methods.items():
        try:
            out = fn()
            out = out[:, :, 0] if out.dim() == 4 else out  # SDPA keeps the query-length axis
            diff = float((out.float() - reference.float()).abs().max())
            row = timing_row("decode", name, time_cuda(fn, repeats), nbytes, peak, context=context,
                             dtype="bfloat16", max_abs_diff_vs_sdpa=diff, note=note)
        except Exception as e:  # one failing method must not stop an unattended run
            row = {"section": "decode", "name": name, "context": context, "note": f"error: {e!r}"[:300]}
        log(f"  T={context:6d} {name:22s} {format_row(row)}")
        rows.append(row)
    return rows


def copy_rows(repeats: int, link: float | None) -> list[dict]:
    """Pinned host -> device and device -> host copies of :data:`COPY_BYTES`."""
    host = torch.empty(COPY_BYTES, dtype=torch.uint8).pin_memory()
    device = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    rows = []
    for name, dst, src in (("host_to_device_pinned", device, host), ("device_to_host_pinned", host, device)):
        times = time_cuda(lambda dst=dst, src=src: dst.copy_(src, non_blocking=True), repeats)
        row = timing_row("copy", name, times, COPY_BYTES, link, note="copy_ non_blocking, 256 MiB")
        log(f"  {name:22s} {format_row(row)}")
        rows.append(row)
    return rows


def engine_rows() -> list[dict]:
    """The engine and transformers serving the benchmark workload on the GPU, one run each."""
    from kvcore.engine.experiment import EngineSettings, serve_engine, serve_transformers
    from kvcore.engine.workload import ServeWorkload
    from kvcore.models import load_model

    model, tokenizer = load_model(None, "cuda")
    prompts, outputs = ServeWorkload(64).build(tokenizer)
    settings = EngineSettings(num_blocks=1024, max_num_seqs=16, max_num_batched_tokens=512, threads=None)
    runs = [serve_engine(model, prompts, outputs, settings),
            serve_transformers(model, prompts, outputs, 16, tokenizer.pad_token_id or 0, threads=None)]
    return [{"section": "engine", "name": r.system, "dtype": "float32", "median_ms": r.summary["makespan_s"] * 1e3,
             **{k: r.summary[k] for k in ("output_tok_per_s", "ttft_ms_p50", "tpot_ms_p50")},
             "note": "one run each"} for r in runs]


def format_row(row: dict) -> str:
    if "median_ms" not in row or "gb_per_s" not in row:
        return row.get("note", "")
    share = row["share_of_peak"]
    share_text = f" = {share:.0%} of peak" if isinstance(share, float) else ""
    diff = row.get("max_abs_diff_vs_sdpa")
    diff_text = f", |diff| {diff:.1e}" if isinstance(diff, float) else ""
    return f"{row['median_ms']:8.3f} ms  {row['gb_per_s']:7.1f} GB/s{share_text}{diff_text}"


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})
    log(f"wrote {len(rows)} rows to {path}")


def environment() -> str:
    try:
        import triton  # optional
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    python = sys.version.split()[0]
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, python {python}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, required=True, help="where to write every measurement")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384], help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per method (median kept)")
    parser.add_argument("--peak-gbps", type=float, default=None, help="HBM peak to compare with (default: preset)")
    parser.add_argument("--tests", choices=["cuda", "none"], default="cuda",
                        help="run the CUDA tests first (on CPU: the interpreter tests), or not")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    log(environment())
    rows: list[dict] = []
    if not torch.cuda.is_available():
        log("no CUDA device: measured no GPU; running the Triton interpreter checks on CPU instead")
        if args.tests != "none":
            rows.append(run_tests(CPU_TESTS, None))
        rows.append({"section": "gpu", "name": "none", "note": "no CUDA device: measured no GPU"})
        write_csv(args.csv, rows)
        return 0 if all(r["note"].startswith(("passed", "no CUDA")) for r in rows) else 1
    name = torch.cuda.get_device_name()
    spec, used = gpu_spec(name, args.peak_gbps)
    peak = args.peak_gbps * 1e9 if args.peak_gbps else (spec.hbm_bandwidth if spec else None)
    log(f"GPU: {name}; peak used: {used}")
    rows.append({"section": "gpu", "name": name, "peak_gb_per_s": peak / 1e9 if peak else "", "note": used})
    tests_ok = True
    if args.tests == "cuda":
        rows.append(run_tests(CUDA_TESTS, "cuda"))
        tests_ok = rows[-1]["note"].startswith("passed")
    for context in args.contexts:
        if time.perf_counter() - start > BUDGET_S - 60:
            rows.append({"section": "decode", "context": context, "note": "skipped: time budget spent"})
            continue
        log(f"decode attention, B={SHAPE['batch']} Hq={SHAPE['q_heads']} Hkv={SHAPE['kv_heads']} "
            f"D={SHAPE['head_dim']} bf16, T={context}")
        rows += decode_rows(context, args.repeats, peak)
        torch.cuda.empty_cache()
    log("pinned copies")
    rows += copy_rows(max(5, args.repeats // 2), spec.host_link_bandwidth if spec else None)
    if time.perf_counter() - start < BUDGET_S - 60:
        log("serving engine vs transformers generate")
        rows += engine_rows()
    else:
        rows.append({"section": "engine", "note": "skipped: time budget spent"})
    log(f"done in {time.perf_counter() - start:.0f} s")
    write_csv(args.csv, rows)
    return 0 if tests_ok else 1


if __name__ == "__main__":
    sys.exit(main())
