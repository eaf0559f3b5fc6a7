"""The needle test's tables: retrieval rates with their intervals, per cell and per method, judged against the
full cache on the same haystacks.

A retrieval rate is a share of independent yes/no trials (needles and haystacks), so its interval is Wilson's
score interval (Wilson 1927), which stays honest with few trials (two of two retrieved: [0.34, 1.00], never
[1, 1]). A method is compared with the full cache on the same haystacks by the paired difference of their
outcomes, with a seeded bootstrap interval over haystacks (:func:`kvcore.noise.paired_difference`); it "loses
the needle" only when the whole interval lies below zero and enough haystacks back it
(:data:`kvcore.noise.MIN_UNITS`), otherwise the difference is "within noise".
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from kvcore.noise import LEVEL, WITHIN_NOISE, Interval, paired_difference

HAYSTACK = ["length", "depth", "needle"]
KEY = ["method", "budget"]
LOSES, GAINS, BASELINE = "loses the needle", "finds more than the full cache", "baseline"


def wilson_interval(successes: int, trials: int, level: float = LEVEL) -> Interval:
    """Wilson's score interval of a rate ``successes / trials`` (``trials`` independent yes/no outcomes)."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return Interval(p, max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)), level, trials)


def _groups(runs: pd.DataFrame, by: list[str]):
    return runs.groupby(by, sort=False, dropna=False)


def _rate(outcomes: pd.Series, prefix: str = "retrieved") -> dict[str, float]:
    found = wilson_interval(int(outcomes.sum()), len(outcomes))
    return {prefix: found.estimate, f"{prefix}_low": found.low, f"{prefix}_high": found.high}


def _bytes(group: pd.DataFrame) -> dict[str, Any]:
    held, full = float(group["kv_bytes"].mean()), float(group["kv_bytes_full"].mean())
    return {"kv_bytes": held, "kv_bytes_full": full, "kv_share": held / full if full else float("nan")}


def cell_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per method x budget x length x depth: the share of needles retrieved with its interval, the full
    cache's share on the same needles, the first needle's answer, the needle's entries kept (its sentence's and its
    value's, over layers and KV heads), bytes held."""
    rows = []
    for (method, budget, length, depth), group in _groups(runs, [*KEY, "length", "depth"]):
        rows.append({"method": method, "budget": budget, "length": length, "depth": depth,
                     "needles": len(group), **_rate(group["retrieved"]),
                     "retrieved_full": float(group["retrieved_full"].mean()), "answer": group["answer"].iloc[0],
                     "kept_tokens": round(float(group["kept_tokens"].mean())),
                     "needle_kept": float(group["needle_kept"].mean()),
                     "value_kept": float(group["value_kept"].mean()), **_bytes(group)})
    return pd.DataFrame(rows)


def versus_full(outcomes: np.ndarray, full: np.ndarray, seed: int = 0) -> Interval:
    """The paired difference of retrieval (method minus full cache) over the same haystacks, with its interval."""
    return paired_difference(outcomes.astype(float), full.astype(float), seed=seed)


def summary_table(runs: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """One row per method x budget over every haystack: retrieval rate [interval], the full cache's, the paired
    difference and its verdict, the needle's entries kept, bytes held (and their share of the full cache's)."""
    rows = []
    for (method, budget), group in _groups(runs, KEY):
        outcomes, full = group["retrieved"].to_numpy(), group["retrieved_full"].to_numpy()
        diff = versus_full(outcomes, full, seed)
        verdict = BASELINE if method == "full" else diff.versus(0.0, below=LOSES, above=GAINS)
        rows.append({"method": method, "budget": budget, "label": group["label"].iloc[0],
                     "haystacks": len(group), **_rate(group["retrieved"]), **_rate(group["retrieved_full"], "full"),
                     "vs_full": diff.estimate, "vs_full_low": diff.low, "vs_full_high": diff.high,
                     "verdict": verdict, "kept_tokens": round(float(group["kept_tokens"].mean())),
                     "needle_kept": float(group["needle_kept"].mean()),
                     "value_kept": float(group["value_kept"].mean()), **_bytes(group)})
    return pd.DataFrame(rows)


def describe_rate(row: Any) -> str:
    """``"0.83 [0.55, 0.95]"`` from a row's ``retrieved`` and its interval."""
    return f"{row.retrieved:.2f} [{row.retrieved_low:.2f}, {row.retrieved_high:.2f}]"


def within_noise(verdict: str) -> bool:
    """Whether a verdict says the difference is inside the noise."""
    return verdict == WITHIN_NOISE
