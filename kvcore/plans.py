"""Every cache plan the lab offers by name: the full cache, each eviction policy, each KV quantizer.

The layer above :mod:`kvcore.eviction` and :mod:`kvcore.quant`: each of them builds its own plans
(:func:`~kvcore.eviction.hook.eviction_plan`, :func:`~kvcore.quant.hf_cache.quantized_plan`) on
:class:`~kvcore.models.plan.CachePlan`; this module only names them, for the Live model page and the CLI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from kvcore.eviction import POLICIES
from kvcore.eviction.hook import eviction_plan
from kvcore.models.plan import FULL, CachePlan
from kvcore.quant.hf_cache import quantized_plan
from kvcore.quant.methods import METHODS

PlanMaker = Callable[..., CachePlan]


def _evict(name: str) -> PlanMaker:
    def make(budget: int = 128, positions: str = "original", **hyperparameters) -> CachePlan:
        return eviction_plan(POLICIES[name](**hyperparameters), budget, positions)
    return make


def _quantize(name: str) -> PlanMaker:
    def make(**settings: int) -> CachePlan:
        """Settings may override the method's fp16 ``n_sink`` and ``residual`` windows."""
        unknown = set(settings) - {"n_sink", "residual"}
        if unknown:
            raise ValueError(f"quantized cache settings are n_sink and residual, got {sorted(unknown)}")
        return quantized_plan(replace(METHODS[name], **settings), f"quant:{name}")
    return make


def cache_plans() -> dict[str, PlanMaker]:
    """``"full"``, ``"evict:<policy>"`` for every policy that frees storage, ``"quant:<method>"`` for every method.

    Values build a plan from keyword settings (eviction: ``budget``, ``positions`` and hyperparameters).
    """
    evicting = {f"evict:{name}": _evict(name) for name, cls in POLICIES.items()
                if not (cls.keeps_all or cls.stores_all)}
    return {"full": lambda **_: FULL} | evicting | {f"quant:{name}": _quantize(name) for name in METHODS}


def make_plan(name: str, budget: int, positions: str) -> CachePlan:
    """The plan ``name`` of :func:`cache_plans` with the Live model page's settings (budget and positions
    apply to eviction plans only)."""
    plans = cache_plans()
    if name not in plans:
        raise ValueError(f"unknown cache plan {name!r}; choose from {', '.join(plans)}")
    if name.startswith("evict:"):
        return plans[name](budget=budget, positions=positions)
    return plans[name]()
