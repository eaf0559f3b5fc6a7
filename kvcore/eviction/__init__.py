"""KV cache eviction policies (one file each) and their evaluation on a real model.

``POLICIES`` maps a name to a policy dataclass whose fields are its hyperparameters; every policy
scores cached tokens and :class:`~kvcore.eviction.base.EvictionPolicy` does the top-k + gather
(see ``base.py``). ``kvcore.eviction.evaluate`` measures them on a transformers causal LM.
"""

from kvcore.eviction.attention_window import AttentionWindow
from kvcore.eviction.base import (
    BUDGET_RULES,
    Budget,
    EvictionPolicy,
    EvictionState,
    causal_attention,
    gather_kv,
    group_attention,
    resolve_budget,
)
from kvcore.eviction.full import FullCache
from kvcore.eviction.h2o import H2O
from kvcore.eviction.knorm import KNorm
from kvcore.eviction.kvpress import kvpress_budget, kvpress_compatible, kvpress_hyperparameters
from kvcore.eviction.lru import LRU
from kvcore.eviction.observed_attention import ObservedAttention
from kvcore.eviction.random_policy import RandomEviction
from kvcore.eviction.sliding_window import SlidingWindow
from kvcore.eviction.snapkv import SnapKV
from kvcore.eviction.streaming_llm import StreamingLLM
from kvcore.eviction.tova import TOVA

POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls
    for cls in (FullCache, SlidingWindow, StreamingLLM, H2O, TOVA, SnapKV, KNorm, LRU, RandomEviction,
                AttentionWindow, ObservedAttention)
}

# What the page, the CLI and ``EvictionConfig`` run when nothing is chosen: the two claims' policies, two budgets.
DEFAULT_POLICIES: tuple[str, ...] = ("sliding_window", "streaming_llm", "h2o", "random")
DEFAULT_BUDGETS: tuple[Budget, ...] = (32, 64)


def make_policy(name: str, **hyperparameters: object) -> EvictionPolicy:
    """An instance of ``POLICIES[name]``; unknown names and bad hyperparameters raise ValueError."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    try:
        return POLICIES[name](**hyperparameters)
    except TypeError as exc:
        raise ValueError(f"bad hyperparameters for {name!r}: {exc}") from exc


__all__ = [
    "BUDGET_RULES",
    "DEFAULT_BUDGETS",
    "DEFAULT_POLICIES",
    "H2O",
    "LRU",
    "POLICIES",
    "TOVA",
    "AttentionWindow",
    "Budget",
    "EvictionPolicy",
    "EvictionState",
    "FullCache",
    "KNorm",
    "ObservedAttention",
    "RandomEviction",
    "SlidingWindow",
    "SnapKV",
    "StreamingLLM",
    "causal_attention",
    "gather_kv",
    "group_attention",
    "kvpress_budget",
    "kvpress_compatible",
    "kvpress_hyperparameters",
    "make_policy",
    "resolve_budget",
]
