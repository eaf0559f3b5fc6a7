"""Streamlit-cached runs of the Eviction page's needle section: the needle grid and the perplexity beside it.

Both are deterministic for their settings (seeded draws, greedy answers), so they are cached by
:class:`NeedleSettings` with ``st.cache_data``; every use of the model holds its lock. The page bounds a grid by
the haystack tokens it reads (:data:`PAGE_HAYSTACK_TOKENS`); the CLI has no limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import streamlit as st

from kvcore.models.loader import model_name
from kvcore.needle import NeedleConfig, NeedleResults, perplexity_table, run_needle
from ui.models import shared_model
from ui.progress import with_progress

# Haystack tokens one page view may read. A SmolLM2 haystack costs about 2.5 s (128 tokens), 3.3 s (256) and 5 s
# (512) of one core with the default methods at two budgets (one read of the prompt, every answer in two batches):
# the default grid (2,304 tokens, 12 haystacks) about 35 s, the perplexity beside it 6 s; this limit about a minute.
PAGE_HAYSTACK_TOKENS = 4608
PPL_TOKENS = (128, 256, 512)


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


@st.cache_data(max_entries=16, show_spinner=False)
def needle_results(settings: NeedleSettings) -> NeedleResults:
    """The needle grid on the model, under a progress bar that says which haystack is being read."""
    shared = shared_model(settings.model)
    total = settings.config.haystacks

    def run(bar) -> NeedleResults:
        bar(0.0, f"Needle test on {settings.model}: reading haystack 1 of {total}...")
        return run_needle(shared.model, shared.tokenizer, settings.config,
                          lambda done, _, label: bar(done / total, f"Needle test on {settings.model}: {done} of "
                                                                   f"{total} haystacks done ({label})"))

    with shared.lock:
        return with_progress(f"Needle test on {settings.model}...", run)


@st.cache_data(max_entries=16, show_spinner=False)
def perplexity(settings: NeedleSettings) -> pd.DataFrame:
    """The eviction sweep's perplexity at the grid's budgets and mode (the page's perplexity-vs-retrieval view)."""
    shared = shared_model(settings.model)

    def run(bar) -> pd.DataFrame:
        return perplexity_table(shared.model, shared.tokenizer, settings.config, settings.ppl_tokens,
                                progress=lambda done, total, label: bar(done / total, f"{label} ({done}/{total})"))

    with shared.lock:
        return with_progress("Perplexity at the same budgets...", run)
