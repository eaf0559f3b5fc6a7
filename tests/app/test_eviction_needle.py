"""Eviction page, needle section: SmolLM2 by default, the full cache as the baseline, a window that cannot hold the
needle loses it, settings in the URL, and a grid too large for a page view refused with the command that runs it."""

from __future__ import annotations

# The page's own sweep and the needle grid kept to seconds: one 128-token haystack, the window against the full cache.
SMALL = {"ntok": "64", "budgets": ["16"], "nd_lengths": ["128"], "nd_depths": ["0.5"], "nd_needles": "1",
         "nd_methods": ["evict:sliding_window"], "nd_budgets": ["0.25"]}


def _summary(at):
    return next(frame.value for frame in at.dataframe if "verdict" in frame.value.columns)


def test_section_shows_smollm2_retrieval_against_the_full_cache(page, smollm2):
    at = page("eviction", SMALL)
    assert any("needle in a haystack" in header.value.lower() for header in at.header)
    captions = " ".join(c.value for c in at.caption)
    assert "Model: SmolLM2-135M-Instruct" in captions
    assert "Baseline: the full cache retrieved 1 of 1 needles" in captions
    assert "python -m kvcore needle" in captions
    summary = _summary(at).set_index("method")
    assert list(summary.index) == ["full", "evict:sliding_window"]
    assert summary.loc["full", "retrieved"] == 1.0
    assert summary.loc["evict:sliding_window", "retrieved"] == 0.0
    assert summary.loc["evict:sliding_window", "budget"] == 0.25
    assert summary.loc["evict:sliding_window", "needle_kept"] == 0.0
    assert summary.loc["evict:sliding_window", "retrieved_low"] == 0.0
    assert summary.loc["evict:sliding_window", "retrieved_high"] > 0.5  # one haystack: a wide interval, said as such
    assert {"ppl_vs_full", "ppl_vs_full_low", "ppl_vs_full_high", "agreement"} <= set(summary.columns)
    cells = next(frame.value for frame in at.dataframe if {"depth", "answer"} <= set(frame.value.columns))
    assert cells["length"].tolist() == [128, 128]
    assert smollm2 is not None  # the fixture loaded (or skipped on) SmolLM2 before the page did


def test_a_grid_too_large_for_a_page_view_is_refused_with_the_command(page):
    at = page("eviction", SMALL | {"nd_lengths": ["1024"], "nd_depths": ["0.1", "0.5", "0.9"], "nd_needles": "4"})
    errors = [e.value for e in at.error]
    assert any("reads 12,288 haystack tokens" in e and "python -m kvcore needle" in e for e in errors), errors
