"""Where perplexity and retrieval disagree: the eviction sweep's perplexity joined with the needle test.

Perplexity of running text rewards keeping the recent past; a needle test asks for one fact from anywhere in
the context (kvpress, SnapKV and RULER judge compression by retrieval for this reason). A method can be fine
on perplexity and still lose the needle: that is the disagreement this module finds, each side with its
noise. The perplexity is the eviction sweep's measurement at the needle test's budgets and mode
(:mod:`kvcore.needle.perplexity`, the same columns and intervals as :func:`kvcore.eviction.evaluate.result_row`).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from kvcore.needle.tables import BASELINE, LOSES, describe_rate
from kvcore.noise import MIN_UNITS

PPL_TOLERANCE = 0.10  # a perplexity ratio surely under 1 + this is "fine"; surely over it, "worse"
PPL_COLUMNS = ["ppl", "ppl_low", "ppl_high", "ppl_vs_full", "ppl_vs_full_low", "ppl_vs_full_high", "ppl_verdict",
               "ppl_tokens"]
FINE_LOST, WORSE_KEPT = "perplexity fine, needle lost", "perplexity worse, no needle lost beyond the noise"
TOO_FEW = f"too few haystacks to judge retrieval (fewer than {MIN_UNITS})"


def _key(frame: pd.DataFrame) -> pd.Series:
    return frame["method"].astype(str) + "@" + frame["budget"].map(lambda b: "" if b is None or b != b else repr(b))


def agreement(row: Any, tolerance: float = PPL_TOLERANCE) -> str:
    """What perplexity and retrieval say of one method at one budget, each beyond its noise or not (retrieval is
    judged only over :data:`~kvcore.noise.MIN_UNITS` haystacks or more)."""
    if row.method == "full":
        return BASELINE
    if not isinstance(row.ppl_vs_full, float) or math.isnan(row.ppl_vs_full):
        return "no perplexity run"
    if row.haystacks < MIN_UNITS:
        return TOO_FEW
    fine, worse = row.ppl_vs_full_high <= 1 + tolerance, row.ppl_vs_full_low > 1 + tolerance
    lost = row.verdict == LOSES
    if fine:
        return FINE_LOST if lost else "both fine"
    if worse:
        return "both worse" if lost else WORSE_KEPT
    return "perplexity within the tolerance band's noise"


def join_perplexity(summary: pd.DataFrame, ppl: pd.DataFrame, tolerance: float = PPL_TOLERANCE) -> pd.DataFrame:
    """The needle summary (one row per method x budget) with the perplexity table's columns beside it, and an
    ``agreement`` column (:func:`agreement`): perplexity "fine" means its ratio to the full cache is surely
    under ``1 + tolerance`` (the upper end of its interval), "worse" surely over it (the lower end)."""
    picked = ppl.assign(_key=_key(ppl)).rename(columns={"vs_full": "ppl_verdict", "scored_tokens": "ppl_tokens"})
    picked = picked[["_key", *PPL_COLUMNS]]
    joined = summary.assign(_key=_key(summary)).merge(picked, on="_key", how="left").drop(columns="_key")
    joined["agreement"] = [agreement(row, tolerance) for row in joined.itertuples()]
    return joined


def disagreements(joined: pd.DataFrame) -> pd.DataFrame:
    """The rows of :func:`join_perplexity` where the two measures disagree."""
    return joined[joined["agreement"].isin([FINE_LOST, WORSE_KEPT])]


def lessons(summary: pd.DataFrame) -> list[str]:
    """One sentence per method and budget, as measured: retrieval [interval] against the full cache, the verdict
    with the paired difference, bytes held, and perplexity when the summary was joined with it."""
    lines = []
    for row in summary.itertuples():
        found = f"{round(row.retrieved * row.haystacks)} of {row.haystacks} needles, {describe_rate(row)}"
        if row.method == "full":
            lines.append(f"full cache (the baseline): {found}.")
            continue
        at = "" if row.budget is None or row.budget != row.budget else f" @ {row.budget}"
        line = (f"{row.method}{at}: {found} vs {row.full:.2f} for the full cache: {row.verdict} "
                f"(difference {row.vs_full:+.2f} [{row.vs_full_low:+.2f}, {row.vs_full_high:+.2f}]); "
                f"{row.kv_share:.0%} of the full cache's bytes, {row.needle_kept:.0%} of the needle's entries kept "
                f"({row.value_kept:.0%} of its value's)")
        if "ppl_vs_full" in summary.columns and not math.isnan(row.ppl_vs_full):
            line += (f"; perplexity x{row.ppl_vs_full:.3f} [{row.ppl_vs_full_low:.3f}, {row.ppl_vs_full_high:.3f}]"
                     f" ({row.agreement})")
        lines.append(line + ".")
    return lines
