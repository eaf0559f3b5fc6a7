"""The fused C paged kernel: built wherever a C compiler exists, equal to the gather reference, else skipped.

Shapes cover every register layout (1, 2, 4, 8 and 16 query heads per KV head), block sizes 1, 3 and 16,
ragged lengths around the kernel's 128-token score tile, spans cut at chunk boundaries on one and three
worker threads, garbage in slots no sequence owns, and the calls it must leave to the torch kernel.
"""

import math

import pytest
import torch

from kvcore.kernels import (
    AttentionCheckConfig,
    check_paged_attention,
    make_paged_problem,
    native,
    paged_decode_attention,
    quantize_paged_cache,
    quantized_paged_decode_attention,
)
from kvcore.kernels.attention import KERNELS, _paged_decode_attention_gather
from kvcore.kernels.check import contiguous_reference
from kvcore.kernels.paged_native import GROUPS, LIBRARY, paged_attention_native, supports
from kvcore.kernels.quantized import native_supports

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
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize(("chunk_tokens", "workers"), [(512, 1), (32, 3)])
def test_native_kernel_equals_the_gather_reference(group, block_size, chunk_tokens, workers):
    p = make_paged_problem(LENGTHS, 2 * group, 2, 32, block_size, seed=group + block_size)
    assert supports(p.query, p.key_cache, p.value_cache)
    out = paged_attention_native(*inputs(p), scale=32 ** -0.5, chunk_tokens=chunk_tokens, workers=workers)
    assert out.shape == (len(LENGTHS), 2 * group, 32)
    torch.testing.assert_close(out, _paged_decode_attention_gather(*inputs(p)), atol=1e-5, rtol=0)


@needs_native
@pytest.mark.parametrize("head_dim", [16, 128])
def test_public_kernel_runs_native_and_matches_contiguous_attention(head_dim):
    p = make_paged_problem((200, 33, 1), 8, 2, head_dim, 16, seed=head_dim)
    assert supports(p.query, p.key_cache, p.value_cache)
    torch.testing.assert_close(paged_decode_attention(*inputs(p)), contiguous_reference(p), atol=1e-5, rtol=0)


@needs_native
def test_slots_no_sequence_owns_may_hold_nan():
    """Rows past a sequence's end are never read, even when a register group is padded past it."""
    lens, block_size = (13, 4, 30, 1), 4
    p = make_paged_problem(lens, 8, 2, 16, block_size, seed=1)
    spare = set(range(p.key_cache.shape[0])) - set(p.block_tables[p.block_tables >= 0].tolist())
    for cache in (p.key_cache, p.value_cache):
        cache[list(spare)] = math.nan
        for b, t in enumerate(lens):
            cache[p.block_tables[b, (t - 1) // block_size], t % block_size or block_size:] = math.nan
    out = paged_attention_native(*inputs(p), scale=0.25, chunk_tokens=8, workers=2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, contiguous_reference(p), atol=1e-5, rtol=0)


def quantized_problem(group, block_size, bits, group_size, symmetric, lengths=LENGTHS):
    p = make_paged_problem(lengths, 2 * group, 2, 64, block_size, seed=group + bits)
    k, v = (quantize_paged_cache(c, bits, group_size, symmetric=symmetric) for c in (p.key_cache, p.value_cache))
    return p, k, v


def dequantized_reference(p, k, v):
    return _paged_decode_attention_gather(p.query, k.dequantize(), v.dequantize(), p.block_tables, p.seq_lens)


@needs_native
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize(("bits", "group_size", "symmetric"), [(4, 32, False), (4, None, True), (2, 64, False),
                                                               (8, 16, True), (8, 64, False)])
def test_native_quantized_kernel_equals_attention_over_the_dequantized_cache(group, block_size, bits, group_size,
                                                                             symmetric):
    p, k, v = quantized_problem(group, block_size, bits, group_size, symmetric)
    assert native_supports(p.query, k, v)
    out = quantized_paged_decode_attention(p.query, k, v, p.block_tables, p.seq_lens, chunk_tokens=32, workers=3)
    torch.testing.assert_close(out, dequantized_reference(p, k, v), atol=1e-4, rtol=0)


@needs_native
def test_native_quantized_kernel_ignores_scales_no_sequence_owns():
    lens = (13, 4, 30, 1)
    p, k, v = quantized_problem(4, 4, 4, 32, False, lens)
    spare = sorted(set(range(k.codes.shape[0])) - set(p.block_tables[p.block_tables >= 0].tolist()))
    expected = dequantized_reference(p, k, v)
    for cache in (k, v):
        cache.scales[spare] = math.nan
        cache.zeros[spare] = math.nan
        for b, t in enumerate(lens):
            cache.scales[p.block_tables[b, (t - 1) // 4], t % 4 or 4:] = math.nan
    out = quantized_paged_decode_attention(p.query, k, v, p.block_tables, p.seq_lens, chunk_tokens=8)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_quantized_groups_the_kernel_cannot_run_fall_back_to_torch():
    """4-bit groups of 16 channels cover 8 bytes of a bit plane, less than one 16-lane vector."""
    p, k, v = quantized_problem(4, 4, 4, 16, False, (40, 7))
    assert not native_supports(p.query, k, v)
    out = quantized_paged_decode_attention(p.query, k, v, p.block_tables, p.seq_lens)
    torch.testing.assert_close(out, dequantized_reference(p, k, v), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim", "dtype"), [
    (8, 2, 8, torch.float32),  # head dim not a multiple of 16
    (6, 2, 16, torch.float32),  # 3 query heads per KV head
    (8, 2, 16, torch.float16),  # 16-bit cache
])
def test_calls_the_kernel_cannot_run_fall_back_to_torch(q_heads, kv_heads, head_dim, dtype):
    p = make_paged_problem((40, 7), q_heads, kv_heads, head_dim, 4, dtype=dtype)
    assert not supports(p.query, p.key_cache, p.value_cache)
    out = paged_decode_attention(*inputs(p))
    torch.testing.assert_close(out.float(), _paged_decode_attention_gather(*inputs(p)).float(), atol=2e-3, rtol=0)


def test_a_strided_cache_falls_back():
    p = make_paged_problem((20,), 4, 2, 16, 4)
    strided = torch.cat([p.key_cache, p.key_cache], dim=-1)[..., :16]  # same values, not contiguous
    assert not supports(p.query, strided, p.value_cache)
    out = paged_decode_attention(p.query, strided, p.value_cache, p.block_tables, p.seq_lens)
    torch.testing.assert_close(out, contiguous_reference(p), atol=1e-5, rtol=0)


@needs_native
def test_loading_the_kernel_keeps_subnormal_floats():
    """It is compiled with -ffast-math but not linked with it: the process must not flush to zero."""
    assert native.load(LIBRARY) is not None
    tiny = torch.tensor([1e-38]) / 100  # a subnormal float32
    assert tiny.item() > 0


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """An empty load cache and a private build folder."""
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_reasons", {})
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    return tmp_path


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


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_attention_check_names_the_kernel_that_ran(dtype):
    row = check_paged_attention(AttentionCheckConfig(8, 2, 32, (40, 9), dtype=dtype, repeats=1)).iloc[0]
    fused = BUILDABLE and dtype == "float32"
    assert row.kernel == KERNELS["fused" if fused else "torch"]
