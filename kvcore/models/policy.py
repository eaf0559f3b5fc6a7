"""How a run manages its KV cache: a :class:`CachePlan`, and the one forward step every loop uses.

A plan says where the cache's entries live (``layer_factory``: full precision, or a quantized layer)
and what happens after each forward (``hook``: e.g. evict down to a budget), plus how positions
continue after eviction. Streaming perplexity (:mod:`kvcore.models.perplexity`) and generation
(:mod:`kvcore.models.generate`) both call :func:`run_step`, so a plan behaves the same in both.

:func:`cache_plans` is the single place where eviction policies (``kvcore.eviction.POLICIES``) and KV
quantizers (``kvcore.quant.CACHE_LAYERS``) become plans the pages and the CLI can offer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from kvcore.models.cache import POSITION_MODES, LabCache, LayerFactory, new_cache
from kvcore.models.capture import QueryCapture


@dataclass(slots=True)
class StepState:
    """What a hook sees after one forward: the cache, the positions just fed, and optional captures.

    position_ids: ``[1, n]`` positions given to the ``n`` tokens just fed. queries: per layer
    ``[B, Hq, n, D]`` (when the plan ``needs_queries``). attentions: per layer ``[B, Hq, n, T_cache]``
    (when the plan ``needs_attentions``; eager attention).
    """

    cache: LabCache
    position_ids: torch.Tensor
    queries: list[torch.Tensor] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


Hook = Callable[[StepState], None]


@dataclass(slots=True)
class CachePlan:
    """A cache policy for one run: storage per layer, an after-step hook, and position handling.

    name: shown in tables. layer_factory: ``layer_idx -> cache layer`` (default full-precision
    :class:`~kvcore.models.cache.LabLayer`). hook: called after every forward with a :class:`StepState`.
    positions: ``"original"`` (next token at its true position) or ``"rerotate"`` (StreamingLLM compact
    positions; RoPE models only). needs_queries / needs_attentions: what the hook reads.
    """

    name: str = "full"
    layer_factory: LayerFactory | None = None
    hook: Hook | None = None
    positions: str = "original"
    needs_queries: bool = False
    needs_attentions: bool = False

    def __post_init__(self) -> None:
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")
        if not self.name:
            raise ValueError("a cache plan needs a name")

    def new_cache(self, model) -> LabCache:
        """An empty cache for ``model`` following this plan."""
        return new_cache(model, self.layer_factory, self.positions)


FULL = CachePlan()


def run_step(model, cache: LabCache, input_ids: torch.Tensor, plan: CachePlan = FULL) -> torch.Tensor:
    """Feed ``input_ids`` ``[1, n]`` at the cache's next positions, run the plan's hook; return logits ``[1, n, V]``."""
    position_ids = cache.next_position_ids(input_ids.shape[-1], input_ids.device)  # [1, n]
    capture = QueryCapture(model) if plan.needs_queries else nullcontext()
    with capture:
        out = model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True,
                    output_attentions=plan.needs_attentions)
    if plan.hook is not None:
        queries = list(capture.queries) if plan.needs_queries else None
        plan.hook(StepState(cache, position_ids, queries, out.attentions if plan.needs_attentions else None))
    return out.logits


@dataclass(slots=True)
class EvictionHook:
    """Hold every layer at ``budget`` entries with an eviction policy, after each step (decode-time eviction).

    Follows StreamingLLM / H2O decoding: after every forward each layer's policy state records the new
    tokens (and, for attention-based policies, their attention, group-averaged per KV head), then every
    layer over budget keeps the policy's choice. Works with ``kvcore.eviction`` policies (``select`` /
    ``observe`` / ``EvictionState``); any other object with ``compress(keys, values, queries, budget) ->
    (keys, values, kept_idx)`` is called with the last ``query_window`` queries instead (kvpress style).

    policy: the policy instance. budget: entries kept per layer and KV head. One hook can serve
    several runs one after another (its state restarts with each new cache), not two at once.
    """

    policy: Any
    budget: int
    query_window: int = 32
    states: list[Any] = field(default_factory=list)
    recent: list[torch.Tensor | None] = field(default_factory=list)
    cache: LabCache | None = None  # the cache the state belongs to; a new cache (a new run) starts afresh

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1 token, got {self.budget}")
        if self.query_window < 1:
            raise ValueError(f"query_window must be >= 1, got {self.query_window}")
        if not callable(getattr(self.policy, "select", None)) and not callable(getattr(self.policy, "compress", None)):
            raise ValueError(f"{type(self.policy).__name__} has neither select(state, keys, values, budget) nor "
                             "compress(keys, values, queries, budget)")

    @property
    def stateful(self) -> bool:
        """True for ``kvcore.eviction`` policies (decode-time state); False for compress-only objects."""
        return callable(getattr(self.policy, "select", None))

    def __call__(self, state: StepState) -> None:
        if state.cache is not self.cache:
            self.cache, self.states, self.recent = state.cache, [], []
        if self.stateful:
            self._decode_step(state)
        else:
            self._compress_step(state)

    def _decode_step(self, step: StepState) -> None:
        from kvcore.eviction.base import EvictionState, group_attention

        cache, n = step.cache, step.position_ids.shape[-1]
        if not self.states:
            B, Hkv = cache.layers[0].keys.shape[:2]
            self.states = [EvictionState.empty(B, Hkv, cache.layers[0].keys.device, i) for i in range(len(cache))]
        for layer_idx, st in enumerate(self.states):
            st.append(n)
            if getattr(self.policy, "needs_attention", False):
                if step.attentions is None:
                    raise ValueError(f"{type(self.policy).__name__} reads attention: the plan must need_attentions")
                st_attn = group_attention(step.attentions[layer_idx], st.positions.shape[1])  # [B, Hkv, n, T]
                self.policy.observe(st, st_attn)
        if cache.num_tokens(0) <= self.budget or getattr(self.policy, "keeps_all", False):
            return
        for layer_idx, st in enumerate(self.states):
            layer = cache.layers[layer_idx]
            idx = self.policy.select(st, layer.keys, layer.values, self.budget)  # [B, Hkv, budget]
            cache.keep(layer_idx, idx)
            st.keep(idx)

    def _compress_step(self, step: StepState) -> None:
        cache = step.cache
        if step.queries is not None:
            if not self.recent:
                self.recent = [None] * len(step.queries)
            for i, q in enumerate(step.queries):
                old = self.recent[i]
                q = q if old is None else torch.cat([old, q], dim=-2)
                self.recent[i] = q[..., -self.query_window:, :]  # [B, Hq, <=window, D]
        if cache.num_tokens(0) <= self.budget:
            return
        for layer_idx, layer in enumerate(cache.layers):
            queries = self.recent[layer_idx] if self.recent else None
            _, _, kept_idx = self.policy.compress(layer.keys, layer.values, queries, self.budget)
            cache.keep(layer_idx, kept_idx)


def _eviction_plans() -> dict[str, Callable[..., CachePlan]]:
    try:
        POLICIES = importlib.import_module("kvcore.eviction").POLICIES
    except (ImportError, AttributeError):
        return {}

    def maker(name, cls):
        def make(budget: int = 128, positions: str = "original", **params) -> CachePlan:
            policy = cls(**params)
            label = policy.label() if callable(getattr(policy, "label", None)) else name
            return CachePlan(f"{label} @ {budget}", hook=EvictionHook(policy, budget), positions=positions,
                             needs_attentions=bool(getattr(cls, "needs_attention", False)))
        return make

    return {f"evict:{name}": maker(name, cls) for name, cls in POLICIES.items()
            if not getattr(cls, "keeps_all", False) and not getattr(cls, "stores_all", False)}


def _quant_plans() -> dict[str, Callable[..., CachePlan]]:
    try:
        layers = importlib.import_module("kvcore.quant").CACHE_LAYERS  # name -> (**params) -> LayerFactory
    except (ImportError, AttributeError):
        return {}

    def maker(name, build):
        def make(**params) -> CachePlan:
            return CachePlan(f"quant:{name}", layer_factory=build(**params))
        return make

    return {f"quant:{name}": maker(name, build) for name, build in layers.items()}


def cache_plans() -> dict[str, Callable[..., CachePlan]]:
    """Every cache plan available now: ``"full"``, plus ``"evict:<policy>"`` and ``"quant:<method>"`` entries
    when ``kvcore.eviction`` / ``kvcore.quant`` provide them. Values build a plan from keyword settings."""
    return {"full": lambda **_: CachePlan()} | _eviction_plans() | _quant_plans()
