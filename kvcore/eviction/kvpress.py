"""Policies that keep exactly the prompt tokens kvpress 0.5.5's presses keep, and kvpress's kept-token count.

kvpress (NVIDIA, 2024) compresses a prompt's cache once, at prefill, keeping ``n_kept`` tokens per layer
and KV head. :func:`kvpress_compatible` maps a press name and its kwargs (named as the press names them)
to the lab's policy with the options that reproduce the press; :func:`kvpress_budget` is the press's
``n_kept``. So ``kvpress_compatible(press, **kw).compress(keys, values, queries, kvpress_budget(T, ratio))``
keeps what ``Press(compression_ratio=ratio, **kw)`` keeps (``tests/test_kvpress_agreement.py`` checks
it against kvpress's own choices on the bundled model). Keys are post-RoPE; queries are every prompt
query, RoPE applied (SnapKV reads the last ``window_size``, TOVA the last, observed attention all).

What each press needs beyond the lab's defaults:

* ``streaming_llm``: nothing (``n_sink=0`` is a sliding window).
* ``knorm``: nothing.
* ``snapkv``: the press's window (64, the lab's default is 16) and ``window_ties="topk"``: the press
  scores every window token ``max + 1``, so below the window's size ``torch.topk`` picks among them.
* ``tova``: ``keep_last=True``: the press scores the newest token above every other.
* ``observed_attention``: the lab's :class:`ObservedAttention` (mean, not summed, attention; no window).

Same sets, not the same layout: kvpress gathers the kept tokens in top-k order (best score first), the
lab in original order (RoPE is applied before caching, so attention over them is the same). A float
budget is the lab's kept share, rounded; pass :func:`kvpress_budget`'s count to truncate like kvpress.
StreamingLLM needs a budget above ``n_sink`` here (ValueError); the press, given ``n_sink`` or fewer,
keeps only sinks (which ones, below ``n_sink``, by top-k's order among equal scores).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from kvcore.eviction.base import EvictionPolicy
from kvcore.eviction.knorm import KNorm
from kvcore.eviction.observed_attention import ObservedAttention
from kvcore.eviction.sliding_window import SlidingWindow
from kvcore.eviction.snapkv import SnapKV
from kvcore.eviction.streaming_llm import StreamingLLM
from kvcore.eviction.tova import TOVA


def _streaming_llm(n_sink: int) -> EvictionPolicy:
    # n_sink=0: the press zeroes the oldest tokens and keeps the newest, a sliding window
    return SlidingWindow() if n_sink == 0 and not isinstance(n_sink, bool) else StreamingLLM(n_sink=n_sink)


def _snapkv(window_size: int, kernel_size: int) -> EvictionPolicy:
    return SnapKV(window=window_size, kernel_size=kernel_size, pooling="avg", window_ties="topk")


# press name -> (the press's kwargs and their kvpress 0.5.5 defaults, the policy built from them)
PRESSES: dict[str, tuple[dict[str, Any], Callable[..., EvictionPolicy]]] = {
    "streaming_llm": ({"n_sink": 4}, _streaming_llm),
    "knorm": ({}, KNorm),
    "snapkv": ({"window_size": 64, "kernel_size": 5}, _snapkv),
    "tova": ({}, lambda: TOVA(per_head=False, keep_last=True)),
    "observed_attention": ({}, ObservedAttention),
}


def kvpress_compatible(press: str, **press_kwargs: Any) -> EvictionPolicy:
    """The lab policy that keeps what kvpress 0.5.5's press ``press`` keeps, given kvpress's budget.

    press: ``"streaming_llm"``, ``"knorm"``, ``"snapkv"``, ``"tova"`` or ``"observed_attention"``.
    press_kwargs: the press's own kwargs (``n_sink``; ``window_size``, ``kernel_size``), defaulting to
    kvpress's. The compression ratio is not a policy setting: pass ``kvpress_budget(T, ratio)`` as the
    budget. Unknown presses, unknown kwargs and values the lab cannot take raise ValueError.
    """
    if press not in PRESSES:
        raise ValueError(f"unknown press {press!r}; choose from {', '.join(PRESSES)}")
    defaults, build = PRESSES[press]
    if "compression_ratio" in press_kwargs:
        raise ValueError("compression_ratio is not a policy setting: pass kvpress_budget(num_tokens, "
                         "compression_ratio) as the budget of compress()")
    unknown = sorted(set(press_kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"press {press!r} has no kwargs {unknown}; it takes {', '.join(defaults) or 'none'}")
    return build(**(defaults | press_kwargs))


def kvpress_budget(num_tokens: int, compression_ratio: float) -> int:
    """Tokens kvpress 0.5.5 keeps of ``num_tokens`` at ``compression_ratio`` (the share removed, in [0, 1)).

    ``max(1, int(num_tokens * (1 - compression_ratio)))``, kvpress's ``compute_n_kept``: the product is
    truncated, not rounded, so float error can drop a token (``100`` at ``0.8`` keeps 19, not 20).
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be an integer >= 1, got {num_tokens!r}")
    if (isinstance(compression_ratio, bool) or not isinstance(compression_ratio, int | float)
            or not math.isfinite(compression_ratio) or not 0.0 <= compression_ratio < 1.0):
        raise ValueError(f"compression_ratio (the share of tokens removed) must lie in [0, 1), got "
                         f"{compression_ratio!r}")
    return max(1, int(num_tokens * (1 - compression_ratio)))


def kvpress_hyperparameters(policies: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The kvpress-compatible preset: for each of ``policies`` that has a press of the same name, the
    hyperparameters of :func:`kvpress_compatible` with the press's defaults (for ``EvictionConfig``)."""
    return {name: kvpress_compatible(name).hyperparameters() for name in policies
            if name in PRESSES and kvpress_compatible(name).name == name}
