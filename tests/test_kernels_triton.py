"""The Triton paged decode kernels equal contiguous attention; backends are chosen as documented; triton is optional.

Every case builds sequences of ragged lengths scattered over shuffled blocks (vLLM layout), fills every
slot no sequence owns with NaN (and, for quantized pools, NaN scales and zeros), and compares the
kernel with ``contiguous_decode_attention`` run per sequence on the same tokens (for quantized pools:
on the dequantized tokens). Cases cover GQA, MQA and MHA, head dims 64, 128 and 80, block sizes 1, 5
and 16, fp32, fp16 and bf16, 2/4/8-bit pools (asymmetric and symmetric), with and without split-K.

On CPU the kernels run in Triton's interpreter. Triton reads ``TRITON_INTERPRET`` when the kernels are
first imported, so the interpreter checks run in one child process started with ``TRITON_INTERPRET=1``
(this module run as ``python -m tests.test_kernels_triton``) that prints one JSON line of results: the
pytest process neither changes its environment nor imports interpreted kernels, so the rest of the suite
runs as before. With a CUDA device the same cases also run compiled, in process (``test_cuda_*``; run
them alone with ``-k cuda``).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from kvcore.kernels import (
    BACKENDS,
    choose_backend,
    contiguous_decode_attention,
    paged_decode_attention,
    quantize_paged_cache,
    quantized_paged_decode_attention,
)
from kvcore.kernels.native_paged import unsupported
from kvcore.kernels.paged_triton import kernels, paged_attention_triton, split_plan
from kvcore.paged.attention_check import DTYPES, contiguous_reference, make_paged_problem
from kvcore.quant import QuantizedTensor

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (requirements-dev.txt has it)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}  # max |kernel - reference|
CHILD_TIMEOUT_S = 300


@dataclass(frozen=True, slots=True)
class Case:
    """One kernel check: sequences, heads ``(Hq, Hkv)``, head dim, block size, dtype, split length
    (None: the planner's, which does not split on CPU), and for a quantized pool its bits and groups."""

    name: str
    seq_lens: tuple[int, ...]
    heads: tuple[int, int]
    head_dim: int
    block_size: int
    dtype: str
    split_tokens: int | None
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool = False
    strided: bool = False  # pools laid out block-minor (a non-contiguous view), plain pools only


RAGGED = (300, 1, 77, 130)
CASES = [
    Case("fp32-gqa-d64", RAGGED, (8, 2), 64, 16, "float32", None),
    Case("fp32-gqa-d64-split", RAGGED, (8, 2), 64, 16, "float32", 64),
    Case("bf16-gqa-d64-strided-split", RAGGED, (8, 2), 64, 16, "bfloat16", 64, strided=True),
    Case("fp32-mqa-d128-block5-split", (129, 64, 3), (8, 1), 128, 5, "float32", 64),
    Case("fp32-mha-d64-block1-split", (70, 2), (4, 4), 64, 1, "float32", 64),
    Case("fp32-g3-d80-split", (100, 33), (6, 2), 80, 16, "float32", 64),
    Case("fp32-mqa-d64-40-splits", (2560, 1, 700), (4, 1), 64, 16, "float32", 64),
    Case("fp16-gqa-d64-split", RAGGED, (8, 2), 64, 16, "float16", 64),
    Case("fp16-mqa-d128", (150, 20, 64), (8, 1), 128, 16, "float16", None),
    Case("bf16-gqa-d128-split", RAGGED, (8, 2), 128, 16, "bfloat16", 64),
    Case("bf16-mqa-d64", (150, 20, 64), (4, 1), 64, 16, "bfloat16", None),
    Case("int8-gqa-d64-split", RAGGED, (8, 2), 64, 16, "float32", 64, 8),
    Case("int4-mqa-d128-g32-split", (129, 64, 3), (8, 1), 128, 16, "float32", 64, 4, 32),
    Case("int4-sym-gqa-d64-g64", RAGGED, (8, 2), 64, 16, "float32", None, 4, 64, True),
    Case("int2-gqa-d64-g16-block5-split", (70, 9), (4, 2), 64, 5, "float32", 64, 2, 16),
    Case("int4-fp16-gqa-d128-g32-split", RAGGED, (8, 2), 128, 16, "float16", 64, 4, 32),
    Case("int8-bf16-mqa-d64", (150, 20, 64), (4, 1), 64, 16, "bfloat16", None, 8),
]


def owned_slots(tables: torch.Tensor, lens: torch.Tensor, num_blocks: int, block_size: int) -> torch.Tensor:
    """bool ``[num_blocks, block_size]``: True where a sequence's token lives."""
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for table, n in zip(tables.tolist(), lens.tolist(), strict=True):
        for i in range(-(-n // block_size)):
            owned[table[i], :min(block_size, n - i * block_size)] = True
    return owned


def contiguous_from_pools(query: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor,
                          tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """``contiguous_decode_attention`` per sequence over its tokens copied out of the pools: ``[B, Hq, D]``."""
    outs = []
    for b, n in enumerate(lens.tolist()):
        ids = tables[b, :-(-n // key_pool.shape[1])].long()

        def tokens(pool: torch.Tensor, ids: torch.Tensor = ids, n: int = n) -> torch.Tensor:
            # [n_blocks, block_size, Hkv, D] -> [n, Hkv, D] -> [1, Hkv, n, D]
            return pool[ids].reshape(-1, *pool.shape[2:])[:n].transpose(0, 1)[None]

        outs.append(contiguous_decode_attention(query[b:b + 1], tokens(key_pool), tokens(value_pool)))
    return torch.cat(outs)  # [B, Hq, D]


def quantized_to(q: QuantizedTensor, device: str) -> QuantizedTensor:
    zeros = None if q.zeros is None else q.zeros.to(device)
    return QuantizedTensor(q.codes.to(device), q.scales.to(device), zeros, q.bits, q.axis, q.group_size, q.shape,
                           q.dtype)


def run_case(case: Case, device: str) -> dict:
    """Run ``case`` with the Triton backend on ``device``; max |error| against the contiguous reference."""
    Hq, Hkv = case.heads
    p = make_paged_problem(case.seq_lens, Hq, Hkv, case.head_dim, case.block_size, DTYPES[case.dtype], "cpu")
    scale = case.head_dim ** -0.5
    owned = owned_slots(p.block_tables, p.seq_lens, p.key_cache.shape[0], case.block_size)
    to = {"device": device}
    if case.bits is None:
        expected = contiguous_from_pools(p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens)
        for pool in (p.key_cache, p.value_cache):
            pool[~owned] = float("nan")  # slots no sequence owns must never be read
        pools = (p.key_cache.to(**to), p.value_cache.to(**to))
        if case.strided:  # same values, strides (Hkv * D, num_blocks * Hkv * D, D, 1)
            pools = tuple(pool.transpose(0, 1).contiguous().transpose(0, 1) for pool in pools)
            assert not pools[0].is_contiguous()
    else:
        pools = tuple(quantize_paged_cache(c, case.bits, case.group_size, case.symmetric)
                      for c in (p.key_cache, p.value_cache))
        expected = contiguous_from_pools(p.query, *(q.dequantize() for q in pools), p.block_tables, p.seq_lens)
        for q in pools:  # garbage codes and NaN scales/zeros where no sequence owns a slot
            q.codes[~owned] = 255
            for t in (q.scales, q.zeros):
                if t is not None:
                    t[~owned] = float("nan")
        pools = tuple(quantized_to(q, device) for q in pools)
    args = (p.query.to(**to), *pools, p.block_tables.to(**to), p.seq_lens.to(**to))
    start = time.perf_counter()
    if case.split_tokens is None:  # the public entry points, backend forced
        public = paged_decode_attention if case.bits is None else quantized_paged_decode_attention
        out = public(*args, backend="triton")
    else:
        out = paged_attention_triton(*args, scale=scale, split_tokens=case.split_tokens)
    seconds = time.perf_counter() - start
    _, splits = split_plan(len(case.seq_lens), Hkv, max(case.seq_lens), torch.device(device), case.split_tokens)
    return {"name": case.name, "dtype": case.dtype, "seconds": seconds, "splits": splits,
            "out_dtype": str(out.dtype).removeprefix("torch."), "finite": bool(torch.isfinite(out).all()),
            "max_abs_err": float((out.cpu().float() - expected.float()).abs().max()),
            "kernel": choose_backend(*args[:3], backend="triton"), "default_kernel": choose_backend(*args[:3])}


def interpreter_checks() -> list[dict]:
    """Every case through Triton's interpreter; the child process's work."""
    module, reason = kernels()
    if module is None or not module.INTERPRETED:
        raise SystemExit(f"the interpreter checks need triton and TRITON_INTERPRET=1: {reason or 'not interpreted'}")
    results = []
    for case in CASES:  # one failing case must not hide the others' results
        try:
            results.append(run_case(case, "cpu"))
        except Exception:  # reported per case by the parent
            results.append({"name": case.name, "error": traceback.format_exc(limit=-4)})
    return results


@dataclass(frozen=True, slots=True)
class CompileCheck:
    """A kernel compiled ahead of time for a GPU architecture (``arch``: 80 = A100, 90 = H100/H200) with
    the bundled ptxas, no GPU needed: catches what the interpreter does not run (bf16 tensor-core dots,
    code generation, register and shared-memory limits)."""

    name: str
    kernel: str
    dtype: str
    arch: int
    constexprs: tuple[tuple[str, int | bool], ...]


TILES = (("G", 4), ("D", 128), ("BLOCK_G", 16), ("BLOCK_D", 128), ("BLOCK_N", 64))
COMPILE_CHECKS = [
    CompileCheck("paged-bf16-split-sm90", "paged_decode_kernel", "bfloat16", 90,
                 (*TILES, ("SPLIT", True), ("DOT_F32", False), ("QUANTIZED", False), ("BITS", 8), ("GROUP", 1),
                  ("SYMMETRIC", False))),
    CompileCheck("int4-fp16-split-sm90", "paged_decode_kernel", "float16", 90,
                 (*TILES, ("SPLIT", True), ("DOT_F32", False), ("QUANTIZED", True), ("BITS", 4), ("GROUP", 32),
                  ("SYMMETRIC", False))),
    CompileCheck("merge-bf16-sm90", "merge_splits_kernel", "bfloat16", 90, (("D", 128), ("BLOCK_S", 8),
                                                                            ("BLOCK_D", 128))),
]
TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def compile_signature(arg_names: list[str], dtype: str, constexprs: dict) -> dict[str, str]:
    """Triton's type string of each argument of a kernel in :mod:`kvcore.kernels.triton_decode`."""

    quantized = constexprs.get("QUANTIZED", False)

    def kind(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name.startswith("part_"):
            return "*fp32"
        if name in ("table_ptr", "lens_ptr"):
            return "*i32"
        if quantized and name in ("k_ptr", "v_ptr"):  # the codes
            return "*u8"
        if quantized and ("scales" in name or "zeros" in name):
            return "*fp16"
        if name.endswith("_ptr"):
            return f"*{TRITON_TYPES[dtype]}"
        return "fp32" if name == "scale" else "i32"

    return {name: kind(name) for name in arg_names}


def compile_checks() -> list[dict]:
    """Compile every :data:`COMPILE_CHECKS` kernel to a cubin; the second child process's work."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, reason = kernels()
    if module is None or module.INTERPRETED:
        raise SystemExit(f"the compile checks need triton without TRITON_INTERPRET: {reason or 'interpreted'}")
    results = []
    for check in COMPILE_CHECKS:
        fn, constexprs = getattr(module, check.kernel), dict(check.constexprs)
        start = time.perf_counter()
        try:
            source = ASTSource(fn, compile_signature(fn.arg_names, check.dtype, constexprs), constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", check.arch, 32), options={"num_warps": 4})
            results.append({"name": check.name, "cubin_bytes": len(compiled.asm["cubin"]),
                            "shared_bytes": compiled.metadata.shared, "seconds": time.perf_counter() - start})
        except Exception:  # reported per kernel by the parent
            results.append({"name": check.name, "error": traceback.format_exc(limit=-4)})
    return results


def assert_case(result: dict, case: Case) -> None:
    assert "error" not in result, result.get("error")
    assert result["finite"], result
    assert result["out_dtype"] == case.dtype
    assert result["max_abs_err"] <= TOLERANCE[case.dtype], result
    assert result["kernel"] == "triton"
    if case.split_tokens is not None:
        assert result["splits"] > 1, "the case must exercise split-K and the merge"


# --- Triton's interpreter on CPU (one child process) ------------------------------------------------

def start_child(mode: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.test_kernels_triton", mode], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def child_results(proc: subprocess.Popen) -> list[dict]:
    stdout, stderr = proc.communicate(timeout=CHILD_TIMEOUT_S)
    assert proc.returncode == 0, stderr[-4000:]
    return json.loads(stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def children(tmp_path_factory) -> dict[str, dict[str, dict]]:
    """Both children at once (one per core): the interpreter checks and the sm_80/sm_90 compile checks."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (requirements-dev.txt has it)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path_factory.mktemp("triton-cache")), "TRITON_DEFAULT_FP_FUSION": "1",
            "OMP_NUM_THREADS": "1"}  # one core each: two children on two cores, no thread contention
    start = time.perf_counter()
    procs = {"interpret": start_child("interpret", env | {"TRITON_INTERPRET": "1"}),
             "compile": start_child("compile", env)}
    results = {mode: {r["name"]: r for r in child_results(proc)} for mode, proc in procs.items()}
    print(f"triton children: {len(CASES)} interpreted cases, {len(COMPILE_CHECKS)} compiled kernels in "
          f"{time.perf_counter() - start:.1f} s")
    return results


@pytest.fixture(scope="module")
def interpreted(children) -> dict[str, dict]:
    return children["interpret"]


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_interpreted_kernel_matches_contiguous_attention(interpreted, case):
    assert_case(interpreted[case.name], case)


@needs_triton
@pytest.mark.parametrize("check", COMPILE_CHECKS, ids=[c.name for c in COMPILE_CHECKS])
def test_kernel_compiles_for_the_gpu_without_one(children, check):
    result = children["compile"][check.name]
    assert "error" not in result, result.get("error")
    assert result["cubin_bytes"] > 0
    assert result["shared_bytes"] <= 100 * 1024  # fits an A100's and an H100's shared memory


@needs_triton
def test_the_interpreter_is_never_the_default_on_cpu(interpreted):
    assert {r["default_kernel"] for r in interpreted.values()} <= {"native", "torch"}


# --- backend selection, in this process ---------------------------------------------------------------

def small_problem(dtype=torch.float32):
    return make_paged_problem((40, 7), 8, 2, 64, 16, dtype=dtype)


def inputs(p):
    return p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens


def test_every_backend_names_the_file_that_runs_it():
    """The pages show BACKENDS' descriptions: each names a file of the package that exists."""
    assert set(BACKENDS) == {"native", "triton", "torch"}
    for description in BACKENDS.values():
        path = description[description.index("(") + 1: description.index(")")]
        assert (ROOT / path).is_file(), description


def test_an_unknown_backend_is_refused():
    p = small_problem()
    with pytest.raises(ValueError, match="backend must be None"):
        paged_decode_attention(*inputs(p), backend="cuda")
    kq, vq = (quantize_paged_cache(c, 4, 32) for c in (p.key_cache, p.value_cache))
    with pytest.raises(ValueError, match="backend must be None"):
        quantized_paged_decode_attention(p.query, kq, vq, p.block_tables, p.seq_lens, backend="flash")


def test_forced_torch_backend_runs_the_batched_torch_path_on_cpu():
    p = small_problem()
    assert choose_backend(*inputs(p)[:3], backend="torch") == "torch"
    out = paged_decode_attention(*inputs(p), backend="torch")
    torch.testing.assert_close(out, contiguous_reference(p), atol=1e-5, rtol=0)


def test_forced_native_backend_names_why_it_cannot_run():
    p = small_problem(torch.bfloat16)
    with pytest.raises(ValueError, match=r"backend 'native' cannot run this call: .*fp32"):
        paged_decode_attention(*inputs(p), backend="native")
    p = small_problem()
    kq, vq = (quantize_paged_cache(c, 4, 16) for c in (p.key_cache, p.value_cache))  # groups too small for C
    with pytest.raises(ValueError, match=r"backend 'native' cannot run this call: .*group_size 16"):
        quantized_paged_decode_attention(p.query, kq, vq, p.block_tables, p.seq_lens, backend="native")


def test_forced_native_backend_runs_the_c_kernel_where_it_builds():
    p = small_problem()
    if unsupported(*inputs(p)[:3]):
        pytest.skip("the C kernel is not available here")
    assert choose_backend(*inputs(p)[:3], backend="native") == "native"
    torch.testing.assert_close(paged_decode_attention(*inputs(p), backend="native"), contiguous_reference(p),
                               atol=1e-5, rtol=0)


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in {"", "0"},
                    reason="this process was started with TRITON_INTERPRET set")
def test_triton_on_cpu_without_the_interpreter_names_the_variable():
    p = small_problem()
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run this call: .*TRITON_INTERPRET=1"):
        paged_decode_attention(*inputs(p), backend="triton")


NO_TRITON = """
import sys
sys.modules["triton"] = None  # as if triton were not installed
import torch
import kvcore.kernels
from kvcore.kernels import choose_backend, paged_decode_attention
from kvcore.paged.attention_check import make_paged_problem
p = make_paged_problem((40, 7), 8, 2, 64, 16)
args = (p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens)
paged_decode_attention(*args)
assert choose_backend(*args[:3]) in {"native", "torch"}
try:
    paged_decode_attention(*args, backend="triton")
except ValueError as e:
    print(e)
"""


def test_kvcore_kernels_work_without_triton():
    proc = subprocess.run([sys.executable, "-c", NO_TRITON], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backend 'triton' cannot run this call: triton is not installed" in proc.stdout


def test_split_plan_hand_counted(monkeypatch):
    cpu = torch.device("cpu")
    assert split_plan(16, 8, 16384, cpu) == (16384, 1)  # the interpreter never splits by itself
    assert split_plan(3, 2, 300, cpu, split_tokens=100) == (128, 3)  # whole 64-token tiles
    monkeypatch.setattr("kvcore.kernels.paged_triton._multiprocessors", lambda index: 132)  # an H100/H200
    gpu = torch.device("cuda", 0)
    # 4 x 132 = 528 programs wanted / (16 x 8) = 5 splits: 4096 / 5 = 820 -> 832 tokens (13 tiles)
    assert split_plan(16, 8, 4096, gpu) == (832, 5)
    assert split_plan(16, 8, 16384, gpu) == (3328, 5)
    assert split_plan(1, 8, 300, gpu) == (320, 1)  # under 2 x 256 tokens: not worth a merge
    assert split_plan(1, 1, 4096, gpu) == (256, 16)  # capped at 256-token splits
    assert split_plan(1, 1, 65536, gpu) == (1024, 64)  # capped at 64 splits


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the whole check")
def test_gpu_check_without_a_gpu_says_so_and_writes_its_csv(tmp_path):
    out = tmp_path / "gpu_check.csv"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--csv", str(out),
                           "--tests", "none"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "measured no GPU" in done.stdout
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["section"], r["note"]) for r in rows] == [("gpu", "no CUDA device: measured no GPU")]


# --- CUDA: the same cases compiled (skipped without a GPU) --------------------------------------------

@cuda
@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cuda_triton_kernel_matches_contiguous_attention(case):
    result = run_case(case, "cuda")
    assert_case(result, case)
    assert result["default_kernel"] == "triton"


@cuda
@needs_triton
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_long_contexts_are_split_by_the_planner(dtype):
    p = make_paged_problem((5000, 1200, 17), 32, 8, 128, 16, DTYPES[dtype], "cuda")
    assert split_plan(3, 8, 5000, p.query.device)[1] > 1
    out = paged_decode_attention(*inputs(p))
    expected = contiguous_reference(p)
    assert (out.float() - expected.float()).abs().max().item() <= TOLERANCE[dtype]


if __name__ == "__main__":  # a child process ("interpret" or "compile"): one JSON line of results
    print(json.dumps(interpreter_checks() if sys.argv[1:] == ["interpret"] else compile_checks()))
