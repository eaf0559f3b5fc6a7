"""kvcore.noise: bootstrap intervals over independent units, rank correlations, repeated timings.

Each case is small enough to check by hand or against a brute-force reference; every bootstrap is seeded.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvcore.noise import (
    MIN_UNITS,
    WITHIN_NOISE,
    Interval,
    Timing,
    block_sums,
    bootstrap_interval,
    bootstrap_rank_correlation,
    bootstrap_ratios,
    load_note,
    paired_difference,
    rank_correlation,
    resample_indices,
    time_repeats,
)


def test_block_sums_cut_each_row_without_crossing_it():
    values = np.arange(10.0).reshape(2, 5)  # two windows of 5 scored tokens
    sums, counts = block_sums(values, block=2)
    assert sums.tolist() == [0 + 1, 2 + 3, 4, 5 + 6, 7 + 8, 9]
    assert counts.tolist() == [2, 2, 1, 2, 2, 1]
    with pytest.raises(ValueError, match="block"):
        block_sums(values, block=0)


def test_a_constant_has_no_noise_and_the_estimate_is_the_ratio_of_sums():
    interval = bootstrap_interval(np.full(12, 6.0), np.full(12, 3.0))
    assert (interval.estimate, interval.low, interval.high, interval.units) == (2.0, 2.0, 2.0, 12)
    exp = bootstrap_interval(np.full(12, 6.0), np.full(12, 3.0), transform=math.exp)
    assert exp.estimate == pytest.approx(math.exp(2.0))


def test_the_seed_chooses_the_resamples_and_every_unit_can_be_drawn():
    """Seeded (the same URL shows the same interval), and the seed is used: another seed moves the ends.
    Each row is one bootstrap sample of all 7 units, drawn with replacement from all of them."""
    x = np.random.default_rng(1).normal(size=40)
    assert bootstrap_interval(x, seed=3) == bootstrap_interval(x, seed=3)
    assert bootstrap_interval(x, seed=3) != bootstrap_interval(x, seed=4)
    idx = resample_indices(7, 2000, seed=0)
    assert idx.shape == (2000, 7)
    assert sorted(set(idx.ravel().tolist())) == list(range(7))  # unit 0 and unit 6 included, nothing else
    assert (resample_indices(7, 5, seed=0) != resample_indices(7, 5, seed=1)).any()
    counts = np.bincount(idx.ravel(), minlength=7) / idx.size
    assert np.abs(counts - 1 / 7).max() < 0.01  # uniform over the units


def test_the_interval_of_a_mean_is_about_four_standard_errors_wide():
    x = np.random.default_rng(0).normal(10.0, 2.0, size=400)
    interval = bootstrap_interval(x)
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert interval.includes(x.mean())
    assert interval.high - interval.low == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_paired_columns_are_resampled_alike():
    rng = np.random.default_rng(2)
    hard = rng.normal(0, 5, size=30)  # each unit's difficulty, shared by both runs
    samples = bootstrap_ratios(np.stack([hard, hard + 1.0], axis=1))
    assert np.allclose(samples[:, 1] - samples[:, 0], 1.0)  # the shared difficulty cancels in every resample


def test_a_paired_difference_sees_a_small_shift_that_unpaired_intervals_would_hide():
    rng = np.random.default_rng(4)
    difficulty = rng.normal(3.0, 1.0, size=32)
    a, b = difficulty + 0.05 + rng.normal(0, 0.01, 32), difficulty
    diff = paired_difference(a, b)
    assert diff.low > 0
    assert diff.versus(0.0) == "higher"
    assert bootstrap_interval(a).includes(b.mean())  # unpaired, b's mean sits inside a's interval
    same = paired_difference(b + rng.normal(0, 0.01, 32), b)
    assert same.versus(0.0) == WITHIN_NOISE
    with pytest.raises(ValueError, match="paired"):
        paired_difference(a, b[:5])


def test_too_few_units_never_call_a_difference():
    clear = Interval(2.0, 1.5, 2.5, units=MIN_UNITS - 1)
    assert not clear.trusted
    assert clear.versus(1.0) == WITHIN_NOISE
    assert Interval(2.0, 1.5, 2.5, units=MIN_UNITS).versus(1.0) == "higher"
    assert Interval(0.5, 0.4, 0.6).versus(1.0, below="holds") == "holds"
    assert Interval(1.0, 0.9, 1.1).format(".1f") == "1.0 [0.9, 1.1]"
    with pytest.raises(ValueError, match="low <= high"):
        Interval(1.0, 2.0, 0.5)


def test_rank_correlation_by_hand_with_ties():
    # x ranks 1, 2.5, 2.5, 4; y ranks 1, 2, 3, 4: Pearson of the ranks
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4])
    want = np.corrcoef(rx, ry)[0, 1]
    assert rank_correlation([1.0, 5.0, 5.0, 9.0], [10, 20, 30, 40]) == pytest.approx(want)
    assert rank_correlation([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))


def test_block_bootstrap_correlation_equals_the_rank_correlation_of_duplicated_columns():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(2, 24)), rng.normal(size=(2, 24))
    per_row, interval = bootstrap_rank_correlation(x, y, block=4, resamples=200)
    assert per_row.tolist() == pytest.approx([rank_correlation(x[i], y[i]) for i in range(2)])
    assert interval.estimate == pytest.approx(per_row.mean())
    assert interval.low <= interval.estimate <= interval.high
    assert interval.units == 6
    # a resample that takes block 0 twice and drops block 5 is the plain correlation of that resampled sample
    from kvcore.noise import _weighted_rank_correlation

    weights = np.ones(24)
    weights[:4], weights[20:] = 2, 0
    orders = (np.argsort(x, axis=1, kind="stable"), np.argsort(y, axis=1, kind="stable"))
    cols = [*range(4), *range(20)]
    brute = [rank_correlation(x[i, cols], y[i, cols]) for i in range(2)]
    assert _weighted_rank_correlation(orders, weights).tolist() == pytest.approx(brute)


def test_a_strong_relation_has_an_interval_on_its_side():
    x = np.arange(64.0)[None, :].repeat(3, axis=0)
    noise = np.random.default_rng(6).normal(0, 5, size=x.shape)
    _, up = bootstrap_rank_correlation(x, x + noise, block=4)
    _, down = bootstrap_rank_correlation(x, -x + noise, block=4)
    assert up.versus(0.0) == "higher"
    assert down.versus(0.0) == "lower"
    _, few = bootstrap_rank_correlation(x, x + noise, block=16)  # 4 blocks: too few units to call anything
    assert few.units == 4
    assert few.versus(0.0) == WITHIN_NOISE


def test_timing_reports_median_quartiles_and_what_else_ran():
    t = Timing.of([5.0, 1.0, 3.0, 2.0, 4.0], warmup=1, load_1min=1.25)
    assert (t.median, t.q1, t.q3, t.minimum, t.maximum, t.repeats) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert "IQR 2-4 over 5 calls after 1 warm-up" in t.describe()
    assert "1-min load 1.2" in t.describe() or "1-min load 1.3" in t.describe()
    slow = Timing.of([10.0, 11.0, 12.0], load_1min=0.0)
    assert t.versus(slow) == "faster"
    assert slow.versus(t) == "slower"
    assert t.versus(Timing.of([3.5, 4.5], load_1min=0.0)) == WITHIN_NOISE
    assert load_note(float("nan")) == "load average not reported by this OS"
    with pytest.raises(ValueError, match="at least one"):
        Timing.of([])


def test_time_repeats_warms_up_then_times_each_call():
    calls = []
    result, timing = time_repeats(lambda: calls.append(1) or len(calls), repeats=4, warmup=2)
    assert len(calls) == 6
    assert result == 6
    assert (timing.repeats, timing.warmup) == (4, 2)
    assert 0 <= timing.minimum <= timing.median <= timing.maximum
    with pytest.raises(ValueError, match="repeats"):
        time_repeats(lambda: None, repeats=0)


def test_paired_means_remove_the_texts_own_difficulty():
    import torch

    from kvcore.noise import paired_means

    g = torch.Generator().manual_seed(0)
    text = torch.rand(4, 64, generator=g) * 6  # [W, n]: hard and easy tokens, shared by every run
    shifted = text + 0.25  # the same tokens, 0.25 nats worse each
    jitter = text + 0.02 * torch.randn(4, 64, generator=g)
    means, diffs = paired_means([text, shifted, jitter], base=0)
    assert means[0].estimate == pytest.approx(float(text.double().mean()))
    assert (means[0].low, means[0].high) != (means[0].estimate, means[0].estimate)  # the text's spread ...
    assert diffs[1].low == pytest.approx(0.25)  # ... cancels in a paired difference: a constant shift is exact
    assert diffs[1].high == pytest.approx(0.25)
    assert (diffs[0].estimate, diffs[0].low, diffs[0].high) == (0.0, 0.0, 0.0)
    assert diffs[2].includes(0.0) or abs(diffs[2].estimate) < 0.01
    assert diffs[1].units == 16  # 4 windows x 4 blocks of 16 tokens
    ratio = diffs[1].map(math.exp)
    assert ratio.versus(1.0, below="better", above="worse") == "worse"
    again = paired_means([text, shifted, jitter], base=0)
    assert again[1][2] == diffs[2]  # seeded
    with pytest.raises(ValueError, match="same tokens"):
        paired_means([text, text[:, :32]])
    with pytest.raises(ValueError, match="base"):
        paired_means([text], base=1)
