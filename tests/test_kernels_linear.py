"""The C linear kernel over half-width weights (csrc/linear.c) and where the engine's step uses it.

Weights that are all fp16 values, or all bf16 values, are packed at that width; every row count the kernel has
its own register layout for (1-16 rows, then chunks of 16), with and without a bias, on one thread and on two,
must equal ``x @ W.T + b`` computed in fp64 to fp32 rounding. Weights exact in neither width never reach it.
"""

import ctypes
import platform

import pytest
import torch

from kvcore.engine import forward
from kvcore.engine.runner import model_parts
from kvcore.kernels import native, native_linear
from kvcore.kernels.native_linear import HalfWidthLinear, exact_width
from kvcore.models import load_model

BUILDABLE = native.enabled() and native.compiler() is not None
needs_native = pytest.mark.skipif(not BUILDABLE, reason="no C compiler here (or KVLAB_NATIVE=0)")
ROWS = (1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 33, 40)


def weight_of(width: torch.dtype, outputs: int = 48, inputs: int = 40, seed: int = 0) -> torch.Tensor:
    """fp32 weights that are all values of ``width`` (some below fp16's normal range, as trained weights have)."""
    w = torch.randn(outputs, inputs, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0, :4] = torch.tensor([3e-5, -1e-6, 0.0, 70.0])
    return w.to(width).float()


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ w.double().T
    return (out if b is None else out + b.double()).float()


@needs_native
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("width", [torch.float16, torch.bfloat16])
def test_every_row_count_equals_the_fp32_product(width, with_bias, workers, monkeypatch):
    monkeypatch.setattr(native_linear, "PARALLEL_WORK", 0 if workers > 1 else 1 << 62)
    monkeypatch.setattr(torch, "get_num_threads", lambda: workers)
    w = weight_of(width)
    b = torch.randn(48) if with_bias else None
    layer = HalfWidthLinear.of(w, b)
    assert layer is not None
    assert layer.panels.dtype == width
    for rows in ROWS:
        x = torch.randn(rows, 40, generator=torch.Generator().manual_seed(rows))
        torch.testing.assert_close(layer(x), reference(x, w, b), atol=1e-5, rtol=1e-5, msg=f"{rows} rows")


@needs_native
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("fused", ["norm", "gated", "residual", "norm+residual"])
def test_what_the_step_does_around_a_projection_runs_in_the_same_pass(fused, workers, monkeypatch):
    """RMSNorm of the rows (LlamaRMSNorm), SiLU(gate) * up of [gate | up] rows (LlamaMLP) and a residual added to the
    outputs give what torch's ops around the projection give."""
    monkeypatch.setattr(native_linear, "PARALLEL_WORK", 0 if workers > 1 else 1 << 62)
    monkeypatch.setattr(torch, "get_num_threads", lambda: workers)
    w, b = weight_of(torch.float16), torch.randn(48)
    layer = HalfWidthLinear.of(w, b)
    norm, eps = torch.rand(40) + 0.5, 1e-5
    for rows in ROWS:
        g = torch.Generator().manual_seed(rows)
        x = torch.randn(rows, 80 if fused == "gated" else 40, generator=g) * 3
        residual = torch.randn(rows, 48, generator=g) if "residual" in fused else None
        if fused == "gated":
            gate, up = x.chunk(2, dim=-1)
            expected, got = reference(torch.nn.functional.silu(gate) * up, w, b), layer(x, gated=True)
        else:
            inputs = torch.nn.functional.rms_norm(x, (40,), norm, eps) if "norm" in fused else x
            expected = reference(inputs, w, b) + (0 if residual is None else residual)
            got = layer(x, *((norm, eps) if "norm" in fused else ()), residual=residual)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5, msg=f"{rows} rows")


@needs_native
def test_rows_of_the_wrong_width_are_refused():
    layer = HalfWidthLinear.of(weight_of(torch.float16))
    with pytest.raises(ValueError, match="40 inputs"):
        layer(torch.randn(2, 41))
    with pytest.raises(ValueError, match="gated: twice"):
        layer(torch.randn(2, 40), gated=True)
    with pytest.raises(ValueError, match="stride"):
        layer(torch.randn(40, 2).t())


@needs_native
def test_the_panels_hold_the_weights_exactly_at_half_the_bytes():
    w = weight_of(torch.float16, outputs=64, inputs=24)
    layer = HalfWidthLinear.of(w)
    assert layer.panels.shape == (4, 24, 16)
    assert layer.panels.nbytes * 2 == w.nbytes
    torch.testing.assert_close(layer.panels.float().transpose(1, 2).reshape(64, 24), w, atol=0, rtol=0)


def test_weights_exact_in_neither_width_are_not_packed():
    w = torch.randn(32, 16)  # random fp32: neither fp16 nor bf16 holds them
    assert exact_width(w) is None
    assert HalfWidthLinear.of(w) is None
    assert exact_width(w.half().float()) == torch.float16
    assert exact_width(w.to(torch.bfloat16).float()) == torch.float16  # bf16's 8 bits fit fp16's 11, in its range
    w[0, 0] = 1e-9  # below fp16's range, a bf16 value keeps 8 significant bits
    assert exact_width(w.to(torch.bfloat16).float()) == torch.bfloat16


@pytest.mark.parametrize("weight", [torch.zeros(40, 16),  # 40 outputs: not whole panels of 16
                                    torch.zeros(32, 16, dtype=torch.float16)],  # the kernel takes fp32 weights
                         ids=["outputs", "dtype"])
def test_shapes_and_dtypes_it_cannot_take_are_not_packed(weight):
    assert HalfWidthLinear.of(weight) is None


def test_without_the_compiled_kernel_nothing_is_packed(monkeypatch):
    monkeypatch.setattr(native_linear, "kernel", lambda: None)
    assert HalfWidthLinear.of(weight_of(torch.float16)) is None


@needs_native
def test_the_kernel_reports_running_out_of_memory(monkeypatch):
    layer = HalfWidthLinear.of(weight_of(torch.float16))

    class NoMemory:
        def __call__(self, *args):
            return 1

    monkeypatch.setattr(native_linear, "kernel", lambda: NoMemory())
    with pytest.raises(MemoryError, match="out of memory"):
        layer(torch.randn(2, 40))


@needs_native
def test_the_bundled_models_projections_run_on_half_width_weights_only(monkeypatch):
    """The bundled model is stored in fp16: every projection is packed at that width, with no fp32 copy, and every
    step, decode or prefill, multiplies it; a model with fp32 weights keeps oneDNN's packed copy."""
    parts = model_parts(load_model(None, "cpu")[0], None, pack=True)
    projections = [p for layer in parts.layers for p in (layer.qkv, layer.o, layer.mlp.gate_up, layer.mlp.down)]
    assert all(p.narrow is not None and p.narrow.panels.dtype == torch.float16 for p in [*projections, parts.lm_head])
    assert all(p.packed is None for p in [*projections, parts.lm_head])
    calls = []
    monkeypatch.setattr(HalfWidthLinear, "__call__",
                        lambda self, x, *args, **kwargs: calls.append(len(x)) or torch.zeros(len(x), 1))
    for rows in (1, 16, 33, 512):
        parts.layers[0].qkv(torch.randn(rows, 256))
    assert calls == [1, 16, 33, 512]
    fp32 = forward.Projection.of(True, torch.nn.Linear(16, 32))
    assert fp32.narrow is None
    assert fp32.packed is not None


@needs_native
def test_an_activation_other_than_silu_is_applied_before_the_kernel():
    """The kernel's gated pass is SiLU's; another activation (GELU here) runs in torch, then the plain kernel."""
    w = weight_of(torch.float16, outputs=32, inputs=16)
    linear = torch.nn.Linear(16, 32, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    proj = forward.Projection.of(True, linear)
    assert proj.narrow is not None
    x, residual = torch.randn(3, 32), torch.randn(3, 32)
    gate, up = x.chunk(2, dim=-1)
    for act in (torch.nn.functional.gelu, torch.nn.functional.silu):
        expected = residual + reference(act(gate) * up, w, None)
        torch.testing.assert_close(proj(x, residual=residual, act=act), expected, atol=1e-5, rtol=1e-5)


@needs_native
def test_the_kernel_signature_matches_its_c_definition():
    """ctypes passes what the C function takes: pointers, floats and 64-bit integers where the source has them."""
    source = (native.SOURCES / f"{native_linear.LIBRARY}.c").read_text()
    start = source.index("int kvlab_linear(")
    params = [p.strip() for p in source[start + len("int kvlab_linear("):source.index(") {", start)].split(",")]
    kinds = [ctypes.c_void_p if "*" in p else ctypes.c_float if p.startswith("float") else ctypes.c_int64
             for p in params]
    assert native_linear.kernel().argtypes == kinds


@needs_native
@pytest.mark.skipif(platform.machine() not in {"x86_64", "AMD64"}, reason="x86 code paths")
@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx512f", "-mno-f16c")], ids=["f16c", "generic"])
def test_cpus_without_avx512_widen_fp16_the_same(flags, monkeypatch, fresh_loader):
    """The fp16 widening has an AVX-512 path, an F16C one (AVX2 machines) and a generic one: each gives the same."""
    monkeypatch.setattr(native, "COMPILE_FLAGS", (*native.COMPILE_FLAGS, *flags))
    native_linear.kernel.cache_clear()
    try:
        w = weight_of(torch.float16)
        layer = HalfWidthLinear.of(w)
        assert layer is not None, native.unavailable_reason(native_linear.LIBRARY)
        for rows in (1, 16, 33):
            x = torch.randn(rows, 40)
            torch.testing.assert_close(layer(x), reference(x, w, None), atol=1e-5, rtol=1e-5)
    finally:
        native_linear.kernel.cache_clear()


def test_only_silu_takes_the_gated_pass():
    from transformers.activations import SiLUActivation

    assert all(forward.is_silu(act) for act in (torch.nn.SiLU(), SiLUActivation(), torch.nn.functional.silu))
    assert not any(forward.is_silu(act) for act in (torch.nn.GELU(), torch.nn.functional.gelu, torch.tanh))
