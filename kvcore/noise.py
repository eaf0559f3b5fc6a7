"""The noise of a measured number: bootstrap intervals over independent units, and repeated timings.

A number the lab compares carries its noise (DESIGN, habit 14). Two kinds are measured here:

* **Sampling noise of a mean** (a perplexity, a perplexity ratio, a rank correlation): a percentile
  bootstrap (Efron & Tibshirani 1993) over *independent units*. Per-token NLLs are not independent (a
  token's loss depends on the tokens around it), so the units are blocks of consecutive scored tokens
  (:data:`BLOCK_TOKENS` each, never crossing a window: a block bootstrap, Kunsch 1989) or whole windows.
  Comparisons of two runs on the same tokens resample the *same* units for both (paired), which removes
  the text's own difficulty from the difference.
* **Timing noise**: a call is warmed up, repeated, and reported as the median with the interquartile
  range and the 1-minute load average of the machine at the time (:func:`time_repeats`).

A difference is "within noise" when its interval includes no difference; pages then neither colour nor
rank it. Everything is seeded, so the same inputs give the same interval.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

LEVEL = 0.95  # confidence level of every interval
RESAMPLES = 2000  # bootstrap resamples
BLOCK_TOKENS = 16  # consecutive scored tokens per bootstrap unit
# Fewer independent units than this and a bootstrap interval is too narrow to trust (64 scored tokens, 4 blocks,
# called kivi-2 "better" than fp16 with a -2% interval that 256 tokens did not reproduce): nothing is called.
MIN_UNITS = 8
WITHIN_NOISE = "within noise"


@dataclass(slots=True, frozen=True)
class Interval:
    """A point estimate and its ``level`` confidence interval [low, high] from ``units`` independent units."""

    estimate: float
    low: float
    high: float
    level: float = LEVEL
    units: int = 0

    def __post_init__(self) -> None:
        if self.low > self.high:  # NaN ends (nothing measurable) pass
            raise ValueError(f"an interval needs low <= high, got [{self.low}, {self.high}]")

    def includes(self, value: float) -> bool:
        """Whether ``value`` lies inside the interval (a difference of ``value`` cannot be ruled out)."""
        return self.low <= value <= self.high

    @property
    def trusted(self) -> bool:
        """Whether enough independent units back the interval (:data:`MIN_UNITS`; 0 = not a bootstrap)."""
        return self.units == 0 or self.units >= MIN_UNITS

    def versus(self, value: float, below: str = "lower", above: str = "higher") -> str:
        """``below`` when the whole interval is under ``value``, ``above`` when over it, else "within noise"
        (also when too few units back it to tell)."""
        if not self.trusted:
            return WITHIN_NOISE
        if self.high < value:
            return below
        if self.low > value:
            return above
        return WITHIN_NOISE

    def format(self, spec: str = ".3f") -> str:
        """``"1.012 [0.998, 1.027]"``."""
        return f"{self.estimate:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"

    def map(self, fn: Callable[[float], float]) -> Interval:
        """The interval through an increasing function (``math.exp`` turns a mean NLL into a perplexity)."""
        return Interval(fn(self.estimate), fn(self.low), fn(self.high), self.level, self.units)


def _array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def resample_indices(units: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """``[resamples, units]`` indices drawn with replacement (seeded): one bootstrap sample per row."""
    if units < 1 or resamples < 1:
        raise ValueError(f"need units >= 1 and resamples >= 1, got {units} and {resamples}")
    return np.random.default_rng(seed).integers(0, units, size=(resamples, units))


def _percentiles(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = (1 - level) / 2 * 100
    return np.percentile(samples, tail, axis=0), np.percentile(samples, 100 - tail, axis=0)


def bootstrap_ratios(sums, counts=None, *, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Bootstrap samples of ``sum(sums) / sum(counts)`` over units (rows), every column resampled alike.

    sums: ``[units]`` or ``[units, M]`` per-unit totals of M quantities measured on the same units (so
    columns stay paired). counts: ``[units]`` weights (tokens per unit); None = 1 each (a plain mean).
    Returns ``[resamples, M]`` (``[resamples]`` for 1-D ``sums``).
    """
    s = _array(sums)
    c = np.ones(s.shape[0]) if counts is None else _array(counts)
    if s.shape[0] != c.shape[0] or s.shape[0] < 1:
        raise ValueError(f"sums and counts need the same number of units (>= 1), got {s.shape[0]} and {c.shape[0]}")
    idx = resample_indices(s.shape[0], resamples, seed)  # [R, n]
    totals = c[idx].sum(axis=1)  # [R]
    picked = s[idx]  # [R, n] or [R, n, M]
    return picked.sum(axis=1) / (totals if s.ndim == 1 else totals[:, None])


def bootstrap_interval(sums, counts=None, *, transform: Callable[[float], float] | None = None,
                       resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """Percentile-bootstrap interval of ``sum(sums) / sum(counts)`` over independent units.

    sums, counts: ``[units]`` per-unit totals and weights (counts None = a plain mean of ``sums``).
    transform: an increasing function applied to the estimate and both ends (``math.exp`` for a
    perplexity from NLL sums).
    """
    s = _array(sums)
    c = np.ones(s.shape[0]) if counts is None else _array(counts)
    samples = bootstrap_ratios(s, c, resamples=resamples, seed=seed)
    low, high = _percentiles(samples, level)
    estimate = float(s.sum() / c.sum())  # a skewed bootstrap can leave the estimate outside: widen to hold it
    interval = Interval(estimate, float(min(low, estimate)), float(max(high, estimate)), level, int(s.shape[0]))
    return interval.map(transform) if transform is not None else interval


def paired_difference(a, b, counts=None, *, transform: Callable[[float], float] | None = None,
                      resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """Interval of the mean of ``a - b`` over paired units (the same units resampled for both).

    a, b: ``[units]`` per-unit totals of two runs on the same units; counts: tokens per unit (None = 1).
    transform: e.g. ``math.exp`` turns a mean NLL difference into a perplexity ratio a / b.
    """
    a, b = _array(a), _array(b)
    if a.shape != b.shape:
        raise ValueError(f"paired units must match: {a.shape} vs {b.shape}")
    return bootstrap_interval(a - b, counts, transform=transform, resamples=resamples, level=level, seed=seed)


def paired_means(runs: Sequence, base: int = 0, *, block: int = BLOCK_TOKENS, resamples: int = RESAMPLES,
                 level: float = LEVEL, seed: int = 0) -> tuple[list[Interval], list[Interval]]:
    """Each run's mean and its difference from run ``base``, with intervals from one paired block bootstrap.

    runs: M runs' per-token values on the same tokens (e.g. NLL in nats), each ``[n]`` or ``[W, n]`` (W windows;
    a block never crosses one). Every run is resampled on the same blocks of ``block`` consecutive tokens, so
    a difference carries only the runs' own noise, not the text's. Returns (M mean intervals, M difference
    intervals; the base's is exactly 0). ``math.exp`` maps a mean NLL to a perplexity and a difference to a
    perplexity ratio (:meth:`Interval.map`).
    """
    if not runs or not 0 <= base < len(runs):
        raise ValueError(f"need at least one run and 0 <= base < {len(runs)}, got base {base}")
    units = [block_sums(run, block) for run in runs]
    if any(not np.array_equal(u[1], units[0][1]) for u in units):
        raise ValueError("paired runs must score the same tokens (the same shape)")
    counts = units[0][1]
    sums = np.stack([u[0] for u in units], axis=1)  # [units, M]
    samples = bootstrap_ratios(sums, counts, resamples=resamples, seed=seed).reshape(resamples, -1)  # [R, M]
    mean = sums.sum(axis=0) / counts.sum()  # [M]
    low, high = _percentiles(samples, level)
    d_low, d_high = _percentiles(samples - samples[:, [base]], level)
    n = len(counts)
    means = [Interval(float(m), float(min(lo, m)), float(max(hi, m)), level, n)
             for m, lo, hi in zip(mean, low, high, strict=True)]
    diffs = [Interval(float(d), float(min(lo, d)), float(max(hi, d)), level, n)
             for d, lo, hi in zip(mean - mean[base], d_low, d_high, strict=True)]
    return means, diffs


def block_sums(values, block: int = BLOCK_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit totals of ``values`` ``[n]`` or ``[rows, n]`` cut into blocks of ``block`` consecutive entries.

    A block never crosses a row (a window of text); a row's last block may be shorter. Returns
    (sums ``[units]``, counts ``[units]``), units ordered row by row.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    v = _array(values)
    rows = v.reshape(1, -1) if v.ndim == 1 else v
    sums, counts = [], []
    for row in rows:
        for start in range(0, len(row), block):
            part = row[start:start + block]
            sums.append(part.sum())
            counts.append(len(part))
    return np.asarray(sums), np.asarray(counts, dtype=np.float64)


def rank_correlation(x, y) -> float:
    """Spearman's rank correlation of two equal-length samples (ties get their mean rank); NaN if constant."""
    x, y = _array(x), _array(y)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need two 1-D samples of the same length, got {x.shape} and {y.shape}")
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    values, inverse = np.unique(x, return_inverse=True)
    if len(values) < len(x):  # average the ranks of ties
        ranks = np.bincount(inverse, weights=ranks)[inverse] / np.bincount(inverse)[inverse]
    return ranks


def _weighted_rank_correlation(orders: tuple[np.ndarray, np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Spearman correlation of the rows of two ``[rows, n]`` samples given their column ``orders`` (argsort),
    when column j appears ``weights[j]`` times (the copies tie and get their mean rank): ``[rows]``."""
    ranks = []
    for order in orders:
        w_sorted = weights[order]  # [rows, n]
        mid = np.cumsum(w_sorted, axis=1) - (w_sorted - 1) / 2  # mean rank of each column's copies
        r = np.empty_like(mid)
        np.put_along_axis(r, order, mid, axis=1)
        ranks.append(r)
    total = weights.sum()
    mx, my = ((r * weights).sum(axis=1, keepdims=True) / total for r in ranks)
    dx, dy = ranks[0] - mx, ranks[1] - my
    cov = (weights * dx * dy).sum(axis=1)
    var = np.sqrt((weights * dx * dx).sum(axis=1) * (weights * dy * dy).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 0, cov / np.where(var > 0, var, 1.0), np.nan)


def bootstrap_rank_correlation(x, y, block: int = BLOCK_TOKENS, *, resamples: int = 1000, level: float = LEVEL,
                               seed: int = 0) -> tuple[np.ndarray, Interval]:
    """Spearman correlation of ``x`` and ``y`` along the last axis, row by row, and the interval of its mean.

    x, y: ``[rows, n]`` (e.g. one row per layer and head, one column per token; columns with a NaN in any
    row are dropped). Units: blocks of ``block`` consecutive columns, resampled alike for every row.
    Returns (``[rows]`` correlations, Interval of their mean over rows).
    """
    x, y = np.atleast_2d(_array(x)), np.atleast_2d(_array(y))
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
    keep = np.isfinite(x).all(axis=0) & np.isfinite(y).all(axis=0)
    x, y = x[:, keep], y[:, keep]
    n = x.shape[1]
    if n < 3:
        raise ValueError(f"need at least 3 columns to correlate, got {n}")
    orders = (np.argsort(x, axis=1, kind="stable"), np.argsort(y, axis=1, kind="stable"))
    block_of = np.arange(n) // block  # [n]: the unit of each column
    units = int(block_of[-1]) + 1
    per_row = _weighted_rank_correlation(orders, np.ones(n))
    samples = np.array([np.nanmean(_weighted_rank_correlation(orders, np.bincount(idx, minlength=units)[block_of]
                                                              .astype(np.float64)))
                        for idx in resample_indices(units, resamples, seed)])
    samples = samples[np.isfinite(samples)]
    estimate = float(np.nanmean(per_row))
    low, high = _percentiles(samples, level)
    return per_row, Interval(estimate, float(min(low, estimate)), float(max(high, estimate)), level, units)


def bootstrap_statistic(units: int, statistic: Callable[[np.ndarray], float], *, resamples: int = 1000,
                        level: float = LEVEL, seed: int = 0) -> Interval:
    """Percentile-bootstrap interval of any ``statistic(indices)`` over ``units`` independent units.

    statistic: takes an index array (all units = ``np.arange(units)`` for the estimate, a resample
    otherwise) and returns a number; NaN resamples are dropped.
    """
    estimate = float(statistic(np.arange(units)))
    samples = np.array([statistic(idx) for idx in resample_indices(units, resamples, seed)], dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if not len(samples) or not math.isfinite(estimate):
        return Interval(float("nan"), float("nan"), float("nan"), level, units)
    low, high = _percentiles(samples, level)
    return Interval(estimate, float(min(low, estimate)), float(max(high, estimate)), level, units)


def load_average() -> float:
    """The machine's 1-minute load average (runnable processes; NaN where the OS does not report it)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return float("nan")


@dataclass(slots=True, frozen=True)
class Timing:
    """A repeated timing in milliseconds: the median, the interquartile range, min and max of ``repeats``
    calls made after ``warmup`` untimed ones, and the 1-minute load average when it was taken."""

    median: float
    q1: float
    q3: float
    minimum: float
    maximum: float
    repeats: int
    warmup: int
    load_1min: float
    cpus: int

    @classmethod
    def of(cls, samples_ms: Sequence[float], warmup: int = 0, load_1min: float | None = None) -> Timing:
        """A Timing from already measured samples (ms), e.g. the per-step times of a decode loop."""
        s = np.asarray(list(samples_ms), dtype=np.float64)
        if not len(s):
            raise ValueError("a timing needs at least one sample")
        q1, med, q3 = np.percentile(s, [25, 50, 75])
        return cls(float(med), float(q1), float(q3), float(s.min()), float(s.max()), len(s), warmup,
                   load_average() if load_1min is None else load_1min, os.cpu_count() or 1)

    def versus(self, other: Timing) -> str:
        """"faster" or "slower" than ``other`` when the interquartile ranges do not overlap, else "within noise"."""
        if self.q3 < other.q1:
            return "faster"
        if self.q1 > other.q3:
            return "slower"
        return WITHIN_NOISE

    def describe(self, what: str = "calls", load: bool = True) -> str:
        """``"0.53 ms (IQR 0.51-0.56 over 20 calls after 2 warm-ups; 1-min load 1.3 on 2 CPUs)"`` (the load left
        out when ``load`` is False)."""
        warm = f" after {self.warmup} warm-up{'s' if self.warmup != 1 else ''}" if self.warmup else ""
        tail = f"; {load_note(self.load_1min, self.cpus)}" if load else ""
        return f"{self.median:.3g} ms (IQR {self.q1:.3g}-{self.q3:.3g} over {self.repeats} {what}{warm}{tail})"


def load_note(load: float, cpus: int | None = None) -> str:
    """``"1-min load 1.3 on 2 CPUs"``: what else was running when a timing was taken."""
    cpus = cpus or os.cpu_count() or 1
    return f"1-min load {load:.1f} on {cpus} CPU{'s' if cpus != 1 else ''}" if math.isfinite(load) else \
        "load average not reported by this OS"


def time_repeats(fn: Callable[[], object], repeats: int = 20, warmup: int = 2,
                 sync: Callable[[], None] | None = None) -> tuple[object, Timing]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed one by one; (last result, Timing in ms).

    sync: called before each clock read (``torch.cuda.synchronize`` for GPU work), so asynchronous work is
    inside the call it belongs to.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    sync = sync or (lambda: None)
    out = None
    for _ in range(warmup):
        out = fn()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return out, Timing.of(samples, warmup)
