"""How a run manages its KV cache: a :class:`CachePlan`, and the one forward step every loop uses.

A plan says where the cache's entries live (``layer_factory``: full precision, a quantized layer, a
layer shared across layers) and what happens after each forward (``hook``: evict down to a budget,
say), plus how positions continue after eviction. Streaming perplexity
(:mod:`kvcore.models.perplexity`), generation (:mod:`kvcore.models.generate`) and the eviction runner
all call :func:`run_step`, so a plan behaves the same in each. This module knows no policy: the
eviction and quantization packages build plans, and :mod:`kvcore.plans` gathers them by name.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from kvcore.models.cache import POSITION_MODES, LabCache, LayerFactory, new_cache
from kvcore.models.capture import QueryCapture
from kvcore.models.runtime import attention_implementation


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

    @property
    def num_new(self) -> int:
        """Tokens fed in this step."""
        return self.position_ids.shape[-1]


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


def run_step(model, cache: LabCache, input_ids: torch.Tensor, plan: CachePlan = FULL,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Feed ``input_ids`` ``[B, n]`` at the cache's next positions, run the plan's hook; return logits ``[B, n, V]``.

    attention_mask: an additive mask ``[B, Hq, n, T_cache]`` passed to the model as is (None: causal).
    A plan that needs attention probabilities runs the step with eager attention (the one that returns them).
    """
    position_ids = cache.next_position_ids(input_ids.shape[-1], input_ids.device)  # [1, n]
    capture = QueryCapture(model) if plan.needs_queries else nullcontext()
    eager = attention_implementation(model, "eager") if plan.needs_attentions else nullcontext()
    with capture, eager:
        out = model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True,
                    output_attentions=plan.needs_attentions, attention_mask=attention_mask)
    if plan.hook is not None:
        queries = list(capture.queries) if plan.needs_queries else None
        plan.hook(StepState(cache, position_ids, queries, out.attentions if plan.needs_attentions else None))
    return out.logits
