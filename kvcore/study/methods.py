"""The methods a study compares, each a model and a cache plan built from the lab's own pieces.

``full``            the full cache (the reference every other method is compared with)
``streaming_llm``   attention sinks + recent window at a budget (Xiao et al. 2023), :mod:`kvcore.eviction`
``sliding_window``  the most recent tokens at a budget (StreamingLLM's baseline)
``h2o``             heavy hitters + recent window at a budget (Zhang et al. 2023)
``minicache``       MiniCache-style merging of layer pairs from mid-depth: SLERP of directions, magnitudes kept
                    (Liu et al. 2024), :mod:`kvcore.sharing.crosslayer`
``int8`` / ``int4`` per-token integer K/V (FlexGen), :mod:`kvcore.quant`
``kivi-2``          KIVI 2-bit: keys per channel, values per token, a full-precision recent window (Liu et al. 2024)
``gqa``             the model's K/V heads mean-pooled into groups (GQA conversion, Ainslie et al. 2023, no
                    uptraining), :mod:`kvcore.sharing.convert`, with the full cache
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcore.checks import positive_ints
from kvcore.eviction import make_policy
from kvcore.eviction.hook import eviction_plan
from kvcore.models.cache import POSITION_MODES as POSITIONS
from kvcore.models.plan import FULL, CachePlan
from kvcore.models.runtime import num_kv_heads, text_config
from kvcore.quant.hf_cache import quantized_plan
from kvcore.quant.methods import METHODS as QUANT_METHODS
from kvcore.sharing.convert import pool_kv_heads, valid_groups
from kvcore.sharing.crosslayer import CrossLayerSettings, cross_layer_plan
from kvcore.study.names import EVICTION, METHODS, QUANTIZED

FAMILIES = {"full": "baseline", **dict.fromkeys(EVICTION, "eviction"), "minicache": "cross-layer",
            **dict.fromkeys(QUANTIZED, "quantization"), "gqa": "heads"}


@dataclass(slots=True, frozen=True)
class MethodSettings:
    """What the methods are tuned with.

    budget: KV entries per layer and head the eviction methods keep. n_sink: StreamingLLM's sink tokens.
    positions: ``"original"`` or ``"rerotate"`` (StreamingLLM's compact positions, RoPE models) after eviction.
    minicache_start: first merged layer (None = half the depth, as MiniCache merges from the middle).
    minicache_t: SLERP weight of the upper layer (MiniCache uses 0.6). gqa_groups: KV heads after pooling
    (None = a quarter of the model's, at least 1; must divide them).
    """

    budget: int = 128
    n_sink: int = 4
    positions: str = "original"
    minicache_start: int | None = None
    minicache_t: float = 0.6
    gqa_groups: int | None = None

    def __post_init__(self) -> None:
        positive_ints(self, "budget", "n_sink")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        start = self.minicache_start
        if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
            raise ValueError(f"minicache_start must be None (half the depth) or a layer >= 0, got {start!r}")
        if not 0.0 <= self.minicache_t <= 1.0:
            raise ValueError(f"minicache_t must be in [0, 1], got {self.minicache_t!r}")
        if self.gqa_groups is not None:
            positive_ints(self, "gqa_groups")


@dataclass(slots=True)
class Method:
    """A method ready to run: the model it runs on (a converted copy for ``gqa``), its plan, and a label."""

    name: str
    model: object
    plan: CachePlan
    label: str

    @property
    def family(self) -> str:
        return FAMILIES[self.name]


def build_method(name: str, model, settings: MethodSettings) -> Method:
    """The model and cache plan of method ``name`` (see the module doc); ValueError for an unknown name or
    settings the model cannot take."""
    if name not in METHODS:
        raise ValueError(f"unknown study method {name!r}; choose from {', '.join(METHODS)}")
    if name == "full":
        return Method(name, model, FULL, "full cache")
    if name in EVICTION:
        policy = make_policy(name, n_sink=settings.n_sink) if name == "streaming_llm" else make_policy(name)
        plan = eviction_plan(policy, settings.budget, settings.positions)
        return Method(name, model, plan, plan.name)
    if name in QUANTIZED:
        method = QUANT_METHODS[QUANTIZED[name]]
        return Method(name, model, quantized_plan(method), f"{method.name} ({method.describe()})")
    if name == "minicache":
        layers = text_config(model).num_hidden_layers
        start = layers // 2 if settings.minicache_start is None else settings.minicache_start
        cross = CrossLayerSettings("merge-slerp", start, settings.minicache_t)
        plan = cross_layer_plan(model, cross)
        return Method(name, model, plan, f"merge-slerp t={settings.minicache_t} from layer {start} of {layers}")
    heads = num_kv_heads(model)
    groups = settings.gqa_groups or gqa_default(heads)
    if groups not in valid_groups(model):
        raise ValueError(f"gqa_groups must divide the model's {heads} KV heads: allowed {valid_groups(heads)}, "
                         f"got {groups}")
    return Method(name, pool_kv_heads(model, groups), FULL, f"{heads} -> {groups} KV heads (mean-pooled)")


def gqa_default(heads: int) -> int:
    """A quarter of the KV heads, rounded down to a divisor (at least 1): 8 -> 2, 32 -> 8, 12 -> 3."""
    target = max(1, heads // 4)
    return max(g for g in range(1, target + 1) if heads % g == 0)
