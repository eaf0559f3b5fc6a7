"""The registry of KV cache compression methods: one small settings record per method, with its paper.

The Quantization page, ``python -m kvcore quant`` and :func:`kvcore.quant.evaluate.evaluate` all
iterate over :data:`METHODS`. A method says how keys and values are stored once they leave the fp16
window (a codec each), how many first tokens stay fp16 (sinks) and how many recent ones (residual).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcore.quant.codecs import Codec, Fp8Codec, Fp16Codec, IntCodec, LowRankCodec

KIVI_PAPER = "KIVI, Liu et al. 2024 (arXiv:2402.02750)"
KVQUANT_PAPER = "KVQuant, Hooper et al. 2024 (arXiv:2401.18079)"
FLEXGEN_PAPER = "FlexGen, Sheng et al. 2023 (arXiv:2303.06865)"
FP8_PAPER = "FP8 formats, Micikevicius et al. 2022 (arXiv:2209.05433); vLLM fp8_e4m3 KV cache"
PALU_PAPER = "Palu, Chang et al. 2024 (arXiv:2407.21118), as a plain per-head SVD"
STREAMING_PAPER = "StreamingLLM sinks, Xiao et al. 2023 (arXiv:2309.17453) + " + KVQUANT_PAPER

FAMILIES = ("baseline", "per-token", "per-channel", "grouped", "KIVI", "outliers", "fp8", "low-rank", "custom")


@dataclass(slots=True, frozen=True)
class QuantMethod:
    """How a KV cache stores keys and values.

    key, value: codecs for tokens that left the fp16 window. n_sink: first tokens kept fp16 forever.
    residual: most recent tokens kept fp16 (KIVI's R). family: one of FAMILIES (groups the chart).
    paper: the work it follows.
    """

    name: str
    key: Codec
    value: Codec
    n_sink: int = 0
    residual: int = 0
    family: str = "custom"
    paper: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a method needs a name")
        if self.n_sink < 0 or self.residual < 0:
            raise ValueError(f"n_sink and residual must be >= 0 tokens, got {self.n_sink} and {self.residual}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")

    def describe(self) -> str:
        """One line: K codec / V codec, fp16 sinks and window."""
        keep = [f"{self.n_sink} sink" if self.n_sink else "", f"{self.residual} recent" if self.residual else ""]
        kept = " + ".join(k for k in keep if k)
        return f"K: {self.key.describe()}; V: {self.value.describe()}" + (f"; fp16: {kept} tokens" if kept else "")


def kivi(bits: int, group_size: int = 32, residual: int = 128) -> QuantMethod:
    """KIVI-``bits``: keys per-channel over groups of ``group_size`` tokens, values per-token in groups of
    ``group_size`` channels, asymmetric, the last ``residual`` tokens fp16 (Liu et al. 2024)."""
    return QuantMethod(f"kivi-{bits}", IntCodec(bits, -2, group_size), IntCodec(bits, -1, group_size),
                       residual=residual, family="KIVI", paper=KIVI_PAPER)


def custom_method(bits: int, scheme: str = "kivi", group_size: int | None = 32, residual: int = 0,
                  n_sink: int = 0, outlier_fraction: float = 0.0, symmetric: bool = False) -> QuantMethod:
    """A method built from the page's settings.

    scheme: "per-token" (K and V per token), "per-channel" (K and V per channel, over groups of
    ``group_size`` tokens) or "kivi" (K per channel, V per token). group_size: channels per group for
    per-token codes, tokens per group for per-channel codes. outlier_fraction: share kept as sparse fp16.
    """
    schemes = ("per-token", "per-channel", "kivi")
    if scheme not in schemes:
        raise ValueError(f"scheme must be one of {schemes}, got {scheme!r}")
    if scheme != "per-token" and group_size is None:
        raise ValueError(f"the {scheme} scheme quantizes keys per channel and needs a token group_size")
    k_axis = -1 if scheme == "per-token" else -2
    v_axis = -2 if scheme == "per-channel" else -1
    key = IntCodec(bits, k_axis, group_size, symmetric, outlier_fraction)
    value = IntCodec(bits, v_axis, group_size, symmetric, outlier_fraction)
    return QuantMethod("custom", key, value, n_sink, residual, "custom", "settings chosen on the page")


def _both(name: str, codec: Codec, family: str, paper: str, **kw: int) -> QuantMethod:
    return QuantMethod(name, codec, codec, family=family, paper=paper, **kw)


def _registry() -> dict[str, QuantMethod]:
    methods = [_both("fp16", Fp16Codec(), "baseline", "uncompressed fp16 cache")]
    for bits in (8, 4, 3, 2):
        methods.append(_both(f"int{bits}-token", IntCodec(bits, -1), "per-token", FLEXGEN_PAPER))
    for bits in (8, 4, 3, 2):
        methods.append(_both(f"int{bits}-channel", IntCodec(bits, -2, 32), "per-channel", KIVI_PAPER + ", Fig. 2"))
    for bits in (8, 4, 3, 2):
        methods.append(_both(f"int{bits}-g16", IntCodec(bits, -1, 16), "grouped", FLEXGEN_PAPER))
    methods += [kivi(4, 32, 32), kivi(2, 32, 32)]
    methods += [
        _both("int2-sinks", IntCodec(2, -1), "outliers", STREAMING_PAPER, n_sink=4, residual=32),
        _both("int2-outliers", IntCodec(2, -1, outlier_fraction=0.01), "outliers", KVQUANT_PAPER,
              n_sink=4, residual=32),
        _both("int4-outliers", IntCodec(4, -1, outlier_fraction=0.01), "outliers", KVQUANT_PAPER,
              n_sink=4, residual=32),
        _both("fp8-token", Fp8Codec(per_token=True), "fp8", FP8_PAPER),
        _both("fp8-tensor", Fp8Codec(per_token=False), "fp8", FP8_PAPER),
        QuantMethod("svd-r16", LowRankCodec(16), Fp16Codec(), family="low-rank", paper=PALU_PAPER),
        QuantMethod("svd-r8", LowRankCodec(8), Fp16Codec(), family="low-rank", paper=PALU_PAPER),
    ]
    return {m.name: m for m in methods}


METHODS: dict[str, QuantMethod] = _registry()


@dataclass(slots=True, frozen=True)
class CustomSettings:
    """The settings of a custom method, as the Quantization page's widgets give them (a hashable cache key).

    outlier_percent: share of entries kept as sparse fp16, in percent. See :func:`custom_method`.
    """

    bits: int = 2
    scheme: str = "kivi"
    group_size: int | None = 32
    residual: int = 0
    n_sink: int = 0
    outlier_percent: float = 0.0
    symmetric: bool = False

    def method(self) -> QuantMethod:
        """The :class:`QuantMethod` these settings describe."""
        return custom_method(self.bits, self.scheme, self.group_size, self.residual, self.n_sink,
                             self.outlier_percent / 100, self.symmetric)


def method_named(name: str, custom: CustomSettings | None = None) -> QuantMethod:
    """The registered method ``name``, or for ``"custom"`` the one ``custom`` describes."""
    if name == "custom":
        return (custom or CustomSettings()).method()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)} or custom")
    return METHODS[name]
