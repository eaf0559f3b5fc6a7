"""The one decode-time eviction loop: after every forward, observe the new tokens and evict back to a budget.

Follows StreamingLLM and H2O decoding (Xiao et al. 2023; Zhang et al. 2023): after each forward every
layer's :class:`~kvcore.eviction.base.EvictionState` records the new tokens (and, for attention-based
policies, the attention they gave, group-averaged per KV head); then every layer over budget keeps the
policy's choice. The Eviction page's streaming evaluation (:mod:`kvcore.eviction.runner`), generation
and streaming perplexity on the Live model page all run this hook through a
:class:`~kvcore.models.plan.CachePlan`, so a policy evicts the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvcore.eviction.base import EvictionPolicy, EvictionState, group_attention
from kvcore.models.cache import LabCache
from kvcore.models.plan import CachePlan, StepState


@dataclass(slots=True)
class EvictionHook:
    """Hold every layer of a :class:`~kvcore.models.cache.LabCache` at ``budget`` entries per KV head.

    policy: a ``kvcore.eviction`` policy. budget: entries kept per layer and KV head (>= 1).
    states: one per layer, aligned with the cache's token axis. evicted: KV entries (token x layer x
    KV head) removed so far. One hook serves runs one after another (its state restarts with each new
    cache), not two at once. A ``keeps_all`` policy never evicts; a ``stores_all`` one only limits what
    attention reads (:meth:`readable`), so the hook observes for it but never evicts.
    """

    policy: EvictionPolicy
    budget: int
    states: list[EvictionState] = field(default_factory=list)
    cache: LabCache | None = None  # the cache the states belong to; a new cache (a new run) starts afresh
    evicted: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.policy, EvictionPolicy):
            raise ValueError(f"EvictionHook needs a kvcore.eviction policy, got {type(self.policy).__name__}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"budget must be an integer >= 1 token, got {self.budget!r}")

    @property
    def evicts(self) -> bool:
        """Whether the policy frees storage (not the full cache, not an attention-only window)."""
        return not (self.policy.keeps_all or self.policy.stores_all)

    def __call__(self, step: StepState) -> None:
        self.observe(step)
        if self.evicts and step.cache.num_tokens(0) > self.budget:
            self.evict(step.cache)

    def observe(self, step: StepState) -> None:
        """Record the step's tokens in every layer's state and fold in their attention when the policy reads it."""
        cache = step.cache
        if cache is not self.cache or not self.states:
            B, Hkv = cache.layers[0].keys.shape[:2]
            device = cache.layers[0].keys.device
            self.cache, self.evicted = cache, 0
            self.states = [EvictionState.empty(B, Hkv, device, i) for i in range(len(cache))]
        for layer, state in enumerate(self.states):
            state.append(step.num_new)
            if self.policy.needs_attention:
                if step.attentions is None:
                    raise ValueError(f"{self.policy.label()} reads attention: its plan must need_attentions")
                self.policy.observe(state, group_attention(step.attentions[layer], state.positions.shape[1]))

    def choose(self, cache: LabCache) -> list[torch.Tensor]:
        """Per layer, the indices ``[B, Hkv, k]`` the policy keeps now (sorted; everything when under budget)."""
        return [self.policy.select(state, layer.keys, layer.values, self.budget)
                for state, layer in zip(self.states, cache.layers, strict=True)]

    def evict(self, cache: LabCache) -> None:
        """Keep the policy's choice in every layer: the cache and the policy states together."""
        for layer, (state, idx) in enumerate(zip(self.states, self.choose(cache), strict=True)):
            self.evicted += (state.length - idx.shape[-1]) * idx.shape[1] * idx.shape[0]
            cache.keep(layer, idx)
            state.keep(idx)

    def readable(self, cache: LabCache) -> torch.Tensor:
        """Original positions ``[Hkv, k]`` an attention-only policy lets the next query read (layer 0's choice,
        one mask serves every layer; batch row 0)."""
        layer = cache.layers[0]
        return self.states[0].positions[0].gather(-1, self.policy.select(self.states[0], layer.keys, layer.values,
                                                                         self.budget)[0])


def eviction_plan(policy: EvictionPolicy, budget: int, positions: str = "original") -> CachePlan:
    """A cache plan that holds the cache at ``budget`` entries with ``policy`` after every step (decode-time)."""
    return CachePlan(f"{policy.label()} @ {budget}", hook=EvictionHook(policy, budget), positions=positions,
                     needs_attentions=policy.needs_attention)
