"""A step's linear layers on CPU over half-width weights, with the C kernel ``csrc/linear.c``.

A decode step multiplies a few rows by every weight of the model, so on a CPU it is bound by reading the weights
(and, at 16 rows, by the FMAs oneDNN leaves idle at that shape); a prefill chunk of hundreds of rows runs here too,
5-11% slower than oneDNN's fp32 GEMM at 512 rows, so that the packed weights are one half-width copy. Weights that
are all fp16 values (a model stored in fp16, such as the bundled one) or all bf16 values (most Hub checkpoints) are
packed once into fp16 or bf16 panels of 16 outputs: half the bytes, widened to the same fp32 weights in registers,
with fp32 products and sums (the same math as fp32 weights, in another summation order). Weights that are not exact
in either stay in fp32 and never come here. As gpt-fast and llama.cpp keep a decode step's weights at their stored
width.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

import torch

from kvcore.kernels import native

LIBRARY = "linear"
PANEL = 16  # outputs per panel: outputs must be a multiple of this
PARALLEL_WORK = 1 << 18  # multiply-adds (rows x outputs x inputs) below which one thread runs a call
WIDTHS = (torch.float16, torch.bfloat16)  # tried in this order; the first that holds every weight exactly
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {"kvlab_linear": [_P, _I, _I, _I, _P, _F, _I, _P, _I, _P, _P, _P, _I, _I]}


@cache
def kernel() -> ctypes._CFuncPtr | None:
    """``kvlab_linear``, typed; None when the library cannot be built or loaded (looked up once)."""
    functions = native.entry_points(LIBRARY, SIGNATURES)
    return None if functions is None else functions["kvlab_linear"]


def exact_width(weight: torch.Tensor) -> torch.dtype | None:
    """fp16 or bf16 if every element of the fp32 ``weight`` is a value of that type (widening gives it back), else
    None."""
    return next((dtype for dtype in WIDTHS if torch.equal(weight.to(dtype).float(), weight)), None)


@dataclass(slots=True, frozen=True)
class HalfWidthLinear:
    """``x @ weight.T + bias`` for fp32 rows ``x [M, K]`` over weights packed as panels ``[N / 16, K, 16]`` of fp16 or
    bf16; build with :meth:`of`."""

    panels: torch.Tensor
    bias: torch.Tensor | None
    outputs: int

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> HalfWidthLinear | None:
        """Packed ``weight [N, K]`` (fp32, CPU), or None where the kernel cannot take it: other devices or dtypes,
        N not a multiple of 16, weights exact in neither fp16 nor bf16, or no compiled kernel."""
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.shape[0] % PANEL:
            return None
        weight = weight.detach()
        width = exact_width(weight)
        if width is None or kernel() is None:
            return None
        N, K = weight.shape
        panels = weight.reshape(N // PANEL, PANEL, K).transpose(1, 2).contiguous().to(width)  # [N / 16, K, 16]
        return cls(panels, None if bias is None else bias.detach().float().contiguous(), N)

    def __call__(self, x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0, gated: bool = False,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """``[M, N]`` fp32 for fp32 rows on the CPU, with what the step does around a projection done in the same pass
        (vLLM fuses the same steps into its kernels): the rows ``x [M, K]``, or RMSNorm of them with weight ``norm
        [K]`` and ``eps`` (transformers' ``LlamaRMSNorm``), or, gated, ``SiLU(gate) * up`` of ``x = [gate | up]``
        ``[M, 2K]`` (``LlamaMLP``); plus ``residual [M, N]`` when given."""
        y = torch.empty(x.shape[0], self.outputs)
        if kernel()(*self.arguments(x, y, norm, eps, gated, None if residual is None else residual.contiguous())):
            raise MemoryError("linear.c: out of memory")
        return y

    def arguments(self, x: torch.Tensor, y: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
                  gated: bool = False, residual: torch.Tensor | None = None) -> tuple:
        """``kvlab_linear``'s arguments for :meth:`__call__` into ``y [M, N]`` (contiguous; it may be ``residual``
        itself: each output is read from it before it is written), checked here, once."""
        M, K = x.shape[0], self.panels.shape[1]
        if x.dtype != torch.float32 or x.stride(-1) != 1 or x.shape[1] != (2 * K if gated else K):
            raise ValueError(f"{x.dtype} rows of {x.shape[1]} inputs (stride {x.stride(-1)}) for a layer of {K} inputs"
                             f"{' (gated: twice that)' if gated else ''}")
        if y.shape != (M, self.outputs) or not y.is_contiguous() or (residual is not None and (
                residual.shape != y.shape or not residual.is_contiguous())):
            raise ValueError(f"outputs (and residual) must be contiguous [{M}, {self.outputs}]")
        workers = torch.get_num_threads() if M * self.outputs * K >= PARALLEL_WORK else 1
        return (x.data_ptr(), M, K, x.stride(0), None if norm is None else norm.data_ptr(), eps, int(gated),
                self.panels.data_ptr(), int(self.panels.dtype == torch.float16),
                None if self.bias is None else self.bias.data_ptr(), None if residual is None else residual.data_ptr(),
                y.data_ptr(), self.outputs, workers)
