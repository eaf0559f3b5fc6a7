"""Runs of the Eviction page's needle section: the needle grid and the perplexity beside it, kept on disk.

Both are deterministic for their settings (seeded draws, greedy answers on known weights), so they are kept with
:mod:`ui.disk_cache` (keyed by :class:`NeedleSettings`, the model's weights and the code): a restarted server reads
them back. The section's default (:data:`DEFAULT`) is computed by the background warm-up on a copy of SmolLM2 of its
own (:func:`warm_default`), so the page never waits for it and the shared model's lock is never held for it; other
settings are computed when a visitor picks them, on the shared model under its lock. The page bounds a grid by the
haystack tokens it reads (:data:`PAGE_HAYSTACK_TOKENS`); the CLI has no limit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from kvcore.models.loader import SMOLLM2, model_name
from kvcore.needle import DEFAULT_METHODS, NeedleConfig, NeedleResults, perplexity_table, run_needle
from ui import disk_cache
from ui.models import SharedModel, private_model, shared_model
from ui.progress import Progress, progress_bar, steps

# Haystack tokens one page view may read. A SmolLM2 haystack costs about 2.5 s (128 tokens), 3.3 s (256) and 5 s
# (512) of one core with the default methods at two budgets (one read of the prompt, every answer in two batches):
# the default grid (2,304 tokens, 12 haystacks) about 35 s, the perplexity beside it 6 s; this limit about a minute.
PAGE_HAYSTACK_TOKENS = 4608
PPL_TOKENS = (128, 256, 512)
MODULES = ("kvcore.needle",)  # what a view executes (their import closure keys the disk cache)
GRID_SHARE = 0.85  # of the progress bar: the grid; the rest is the perplexity


@dataclass(slots=True, frozen=True)
class NeedleSettings:
    """What the section runs: a model (``smollm2-135m``, ``bundled``, a Hub name or folder), the needle grid, and
    the tokens of held-out text whose perplexity stands beside it (prefill mode compresses the first half)."""

    model: str
    config: NeedleConfig
    ppl_tokens: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", model_name(self.model))  # one cache entry however the URL spells it
        if self.ppl_tokens not in PPL_TOKENS:
            raise ValueError(f"ppl_tokens must be one of {PPL_TOKENS}, got {self.ppl_tokens!r}")
        if self.config.mode != "prefill":
            raise ValueError("the page runs prefill mode (compress once, as kvpress); decode mode streams every "
                             "token through every method: run it with `python -m kvcore needle --mode decode`")

    def check_cost(self, limit: int = PAGE_HAYSTACK_TOKENS) -> None:
        """Refuse a grid that reads more than ``limit`` haystack tokens, saying what to change."""
        tokens = self.config.prompt_tokens
        if tokens > limit:
            raise ValueError(
                f"this grid reads {tokens:,} haystack tokens ({self.config.haystacks} prompts); the page allows "
                f"{limit:,} so a view stays within about a minute: pick fewer lengths, depths or needles, or run "
                "it with `python -m kvcore needle` (no limit)")


# The section's default view (its widgets' defaults): SmolLM2, the default methods at a quarter and half of the
# context, two haystack lengths, three depths, two needles per cell.
DEFAULT = NeedleSettings(SMOLLM2.name, NeedleConfig(methods=DEFAULT_METHODS, budgets=(0.25, 0.5), lengths=(128, 256),
                                                     depths=(0.1, 0.5, 0.9), needles=2))


@dataclass(slots=True, frozen=True)
class NeedleView:
    """What the section shows: the needle grid's results and the perplexity at the same budgets."""

    results: NeedleResults
    perplexity: pd.DataFrame


def _measure(settings: NeedleSettings, model: SharedModel, report: Progress) -> NeedleView:
    total = settings.config.haystacks
    grid = steps(report, 0.0, GRID_SHARE)
    grid(0.0, f"Needle test on {settings.model}: reading haystack 1 of {total}...")
    with model.lock:
        results = run_needle(model.model, model.tokenizer, settings.config,
                             lambda done, _, label: grid(done / total, f"Needle test on {settings.model}: {done} of "
                                                                       f"{total} haystacks done ({label})"))
        ppl = steps(report, GRID_SHARE, 1.0)
        ppl(0.0, "Perplexity at the same budgets...")
        table = perplexity_table(model.model, model.tokenizer, settings.config, settings.ppl_tokens,
                                 progress=lambda done, n, label: ppl(done / n, f"Perplexity at the same budgets: "
                                                                               f"{label} ({done}/{n})"))
    return NeedleView(results, table)


def view(settings: NeedleSettings, model: SharedModel | None = None, progress: Progress | None = None) -> NeedleView:
    """The grid and its perplexity for ``settings``: from memory or disk, or computed now and kept.

    model: a copy of the settings' model to compute with (the warm-up's own, so it never holds the shared copy's
    lock); by default the shared one. Either gives the same numbers. A result another thread is computing is
    waited for, not computed twice."""
    def compute(report: Progress) -> NeedleView:
        return _measure(settings, model or shared_model(settings.model), report)

    return disk_cache.computed("needle-view", settings, MODULES, disk_cache.weights_key(settings.model), compute,
                               progress)


def shown(settings: NeedleSettings) -> NeedleView:
    """:func:`view` under a progress bar that says which haystack is being read (a visitor is waiting)."""
    with progress_bar() as bar:
        return view(settings, progress=bar)


def kept(settings: NeedleSettings) -> NeedleView | None:
    """The view when it is in memory or on disk (nothing is computed); else None."""
    return disk_cache.kept("needle-view", settings, MODULES, disk_cache.weights_key(settings.model))


def in_flight(settings: NeedleSettings) -> tuple[float, str] | None:
    """How far a thread computing the view has got, or None when none is."""
    return disk_cache.in_flight("needle-view", settings, MODULES, disk_cache.weights_key(settings.model))


def warm_default(load: Callable[[], SharedModel] | None = None) -> NeedleView:
    """The default view on a copy of its model of its own (the warm-up's step), loaded only when the view is not
    kept: by ``load``, else here (and dropped after)."""
    kept_view = kept(DEFAULT)
    return kept_view if kept_view is not None else view(DEFAULT, (load or (lambda: private_model(DEFAULT.model)))())
