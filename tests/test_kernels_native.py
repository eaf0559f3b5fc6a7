"""The C paged kernel: built once per machine wherever a C compiler exists, cached, and refused clearly.

Its numbers are checked with every other backend in tests/test_kernels.py; here: every register layout
(1 to 16 query heads per KV head, and more in subgroups) against contiguous attention around the kernel's
128-token score tile, the calls it must leave to the torch path, and the build cache.
"""

import sys

import pytest
import torch

from kvcore.kernels import native, native_paged, paged_decode_attention
from kvcore.kernels.native_paged import LIBRARY, unsupported
from kvcore.paged.attention_check import contiguous_reference, make_paged_problem

BUILDABLE = native.enabled() and native.compiler() is not None
needs_native = pytest.mark.skipif(not BUILDABLE, reason="no C compiler here (or KVLAB_NATIVE=0)")
LENGTHS = (1, 15, 16, 17, 127, 128, 129, 300)


def inputs(p):
    return p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens


def test_the_kernel_builds_wherever_a_compiler_exists():
    library = native.load(LIBRARY)
    if BUILDABLE:
        assert library is not None, native.unavailable_reason(LIBRARY)
    else:
        assert library is None
        assert native.unavailable_reason(LIBRARY)


@needs_native
@pytest.mark.parametrize("group", [*range(1, 17), 20, 33])
def test_every_query_group_runs_in_the_c_kernel(group):
    """R = 16 // G tokens per register group (16 // min(G, 16)); more than 16 heads run in subgroups."""
    p = make_paged_problem(LENGTHS, group, 1, 32, 5, seed=group)
    assert not unsupported(*inputs(p)[:3])
    out = paged_decode_attention(*inputs(p), backend="native")
    torch.testing.assert_close(out, contiguous_reference(p), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim", "dtype", "why"), [
    (8, 2, 8, torch.float32, "multiple of 16"),
    (8, 2, 16, torch.float16, "fp32 pools"),
])
def test_calls_the_kernel_cannot_run_fall_back_to_torch(q_heads, kv_heads, head_dim, dtype, why):
    p = make_paged_problem((40, 7), q_heads, kv_heads, head_dim, 4, dtype=dtype)
    assert why in unsupported(*inputs(p)[:3])
    out = paged_decode_attention(*inputs(p))
    torch.testing.assert_close(out.float(), contiguous_reference(p).float(), atol=2e-3, rtol=0)


def test_a_strided_cache_falls_back():
    p = make_paged_problem((20,), 4, 2, 16, 4)
    strided = torch.cat([p.key_cache, p.key_cache], dim=-1)[..., :16]  # same values, not contiguous
    assert "contiguous" in unsupported(p.query, strided, p.value_cache)
    out = paged_decode_attention(p.query, strided, p.value_cache, p.block_tables, p.seq_lens)
    torch.testing.assert_close(out, contiguous_reference(p), atol=1e-5, rtol=0)



@needs_native
def test_loading_the_kernel_keeps_subnormal_floats():
    """It is compiled with -ffast-math but not linked with it: the process must not flush to zero."""
    assert native.load(LIBRARY) is not None
    tiny = torch.tensor([1e-38]) / 100  # a subnormal float32
    assert tiny.item() > 0


def test_kvlab_native_0_turns_compiled_kernels_off(fresh_loader, monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    assert native.load(LIBRARY) is None
    assert native.DISABLE_ENV in native.unavailable_reason(LIBRARY)
    assert not list(fresh_loader.iterdir())


@needs_native
def test_a_source_that_does_not_compile_gives_a_reason(fresh_loader, monkeypatch, tmp_path):
    sources = tmp_path / "csrc"
    sources.mkdir()
    (sources / "broken.c").write_text("int f(void) { return }\n")
    monkeypatch.setattr(native, "SOURCES", sources)
    assert native.load("broken") is None
    assert "did not compile" in native.unavailable_reason("broken")


@pytest.fixture
def fresh_functions():
    """The kernel's entry points looked up again now, and again after the test."""
    native_paged.functions.cache_clear()
    yield
    native_paged.functions.cache_clear()


@needs_native
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's memory map")
def test_the_kernel_runs_its_workers_on_the_openmp_runtime_torch_loaded(fresh_loader, fresh_functions):
    """Built with OpenMP (its parallel region calls GOMP_parallel), and the process still holds one OpenMP runtime:
    the kernel's worker threads are torch's own pool, not a second set fighting it for the cores."""
    assert native.load(LIBRARY) is not None
    (built,) = fresh_loader.glob(f"{LIBRARY}-*.so")
    assert b"GOMP_parallel" in built.read_bytes()
    p = make_paged_problem((300, 257, 40), 8, 8, 32, 16)
    out = paged_decode_attention(*inputs(p), backend="native", workers=2)
    torch.testing.assert_close(out, contiguous_reference(p), atol=1e-5, rtol=0)
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


@needs_native
def test_a_compiler_without_openmp_still_builds_the_kernel(fresh_loader, fresh_functions, monkeypatch):
    """The OpenMP flag is refused (as Apple's clang refuses -fopenmp): the kernel is built without it and runs every
    span on the calling thread, with the same result."""
    monkeypatch.setattr(native, "OPENMP", "-fno-such-openmp-flag")
    assert native.load(LIBRARY) is not None, native.unavailable_reason(LIBRARY)
    (built,) = fresh_loader.glob(f"{LIBRARY}-*.so")
    assert b"GOMP_parallel" not in built.read_bytes()
    p = make_paged_problem((300, 257, 40), 8, 8, 32, 16)
    out = paged_decode_attention(*inputs(p), backend="native", workers=2)
    torch.testing.assert_close(out, contiguous_reference(p), atol=1e-5, rtol=0)


@needs_native
def test_a_build_is_made_once_and_reused(fresh_loader, monkeypatch):
    assert native.load(LIBRARY) is not None
    built = sorted(fresh_loader.glob(f"{LIBRARY}-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_loaded", {})
    assert native.load(LIBRARY) is not None
    assert built[0].stat().st_mtime_ns == stamp
    assert sorted(fresh_loader.glob(f"{LIBRARY}-*.so")) == built


def test_without_a_writable_home_builds_go_to_a_private_temp_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(native.CACHE_ENV, raising=False)
    not_a_folder = tmp_path / "home"
    not_a_folder.write_text("")  # ~/.cache cannot be made under a file
    monkeypatch.setattr(native.Path, "home", staticmethod(lambda: not_a_folder))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path))
    folder = native._cache_dir()
    assert folder.parent == tmp_path
    assert folder.stat().st_mode & 0o777 == 0o700
    folder.chmod(0o777)  # as if another user had made it open to all
    with pytest.raises(OSError, match="not private"):
        native._cache_dir()


@needs_native
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(8, 8), (9, 3), (4, 1)])
def test_rope_and_cache_equals_rotating_then_writing(q_heads, kv_heads):
    """One pass of the C kernel gives what the engine's torch path gives: RoPE on queries and keys, then K/V rows
    into their slots, other slots untouched."""
    from kvcore.engine.forward import rotate

    T, D, gen = 5, 32, torch.Generator().manual_seed(q_heads)
    qkv = torch.randn(T, q_heads + 2 * kv_heads, D, generator=gen)
    angles = torch.randn(T, 1, D // 2, generator=gen).repeat(1, 1, 2)
    cos, sin = angles.cos(), angles.sin()
    signed_sin = torch.cat((-sin[..., :D // 2], sin[..., D // 2:]), dim=-1)
    slots = torch.tensor([7, 0, 12, 3, 9])
    keys, values = torch.full((4, 4, kv_heads, D), -1.0), torch.full((4, 4, kv_heads, D), -1.0)
    expected_k, expected_v = keys.clone().view(16, kv_heads, D), values.clone().view(16, kv_heads, D)
    rotated = rotate(qkv[:, :q_heads + kv_heads], cos, signed_sin)
    expected_k[slots], expected_v[slots] = rotated[:, q_heads:], qkv[:, q_heads + kv_heads:]
    assert native_paged.rope_and_cache(qkv, q_heads, cos, signed_sin, slots, keys, values)
    torch.testing.assert_close(qkv[:, :q_heads], rotated[:, :q_heads], atol=1e-6, rtol=0)
    torch.testing.assert_close(keys.view(16, kv_heads, D), expected_k, atol=1e-6, rtol=0)
    torch.testing.assert_close(values.view(16, kv_heads, D), expected_v, atol=0, rtol=0)


def test_rope_and_cache_leaves_what_it_cannot_take_to_torch():
    qkv, cos = torch.randn(2, 3, 16), torch.ones(2, 1, 16)
    slots, pool = torch.tensor([0, 1]), torch.zeros(1, 4, 1, 16)
    assert not native_paged.rope_and_cache(qkv.half(), 1, cos, cos, slots, pool, pool)
    assert not native_paged.rope_and_cache(qkv, 1, cos, cos, slots.int(), pool, pool)
    assert not native_paged.rope_and_cache(torch.randn(2, 16, 3).transpose(1, 2), 1, cos, cos, slots, pool, pool)
    with pytest.raises(ValueError, match="3 heads"):
        native_paged.rope_and_cache(qkv, 2, cos, cos, slots, pool, pool)
