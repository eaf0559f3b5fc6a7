"""The simulator calibrated on a designed grid of engine steps, and its prediction of a run it never saw.

The grid, the features of a step and the non-negative fit are pinned by hand-counted cases; the whole
calibration runs at a small size on the bundled model and then predicts an unseen workload: the same steps
as the engine made (the scheduler is the same), finite times. How close the times come is measured by
benchmarks/engine.py on a quiet machine, never asserted here (wall time).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest

from kvcore.engine import grid
from kvcore.engine.calibrate import (
    calibrate_engine,
    coefficients_table,
    fit_nonnegative,
    held_out_errors,
    prediction_table,
    simulate_engine,
)
from kvcore.engine.experiment import EngineSettings, serve_engine
from kvcore.engine.grid import FEATURES, GridStep, design, largest_chunks, time_engine_run, time_grid
from kvcore.engine.runner import ModelRunner
from kvcore.engine.workload import ServeWorkload
from kvcore.models import load_model
from kvcore.sched.cost import FittedCost

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundled(one_thread):
    return load_model(None, "cpu")


def test_a_step_counts_its_work_as_the_simulator_does():
    step = GridStep("mixed", ((256, 1), (256, 1), (0, 64), (100, 8)))
    assert step.features() == {
        "new_tokens": 1 + 1 + 64 + 8, "sequences": 4, "prefill_seqs": 2,
        # decodes: 256 + 1 each; prefill of 64 from scratch: 64 * 65 / 2; 8 after 100: 8 * 100 + 8 * 9 / 2
        "attn_pairs": 2 * 257 + 64 * 65 // 2 + 8 * 100 + 36,
        "kv_tokens_read": 256 + 256 + 0 + 100,
        "small_tokens": 8,  # the first 8 rows: GEMMs over a few rows cost more per row
        "eager_steps": 1,  # a step with a prefill chunk is no pure decode step: no captured graph replays it
    }
    decode = GridStep("decode", ((40, 1),) * 3).features()
    assert decode["small_tokens"] == 3
    assert decode["eager_steps"] == 0


def test_a_bigger_model_times_smaller_prefill_chunks():
    assert largest_chunks(6_000_000) == (8, 32, 128, 256, 512)  # the bundled model: every chunk
    assert largest_chunks(135_000_000) == (8, 32, 128, 256)  # SmolLM2: 512 tokens would take seconds
    assert largest_chunks(10**12) == (8,)


def test_the_grid_covers_batches_contexts_chunks_and_mixed_steps():
    steps = design(max_seqs=4, contexts=(16, 64), prefills=(8, 32), max_kv_tokens=128)
    decode = [s.features() for s in steps if s.kind == "decode"]
    # batches 1, 2, 4 at contexts 16 and 64, except 4 x 64 = 256 tokens read (over 128)
    assert sorted((d["sequences"], d["kv_tokens_read"]) for d in decode) == [(1, 16), (1, 64), (2, 32), (2, 128),
                                                                            (4, 64)]
    prefill = [s.chunks for s in steps if s.kind == "prefill"]
    assert prefill == [((0, 8),), ((256, 8),), ((1024, 8),), ((0, 32),), ((256, 32),), ((1024, 32),),
                       ((0, 32),) * 2, ((0, 32),) * 4]  # several chunks in a step: up to max_seqs of them
    mixed = [s.chunks for s in steps if s.kind == "mixed"]
    assert mixed == [((256, 1),) * 3 + ((0, 32),)]


def test_the_fit_recovers_known_coefficients_and_never_goes_negative():
    rng = np.random.default_rng(0)
    X = np.column_stack([np.ones(40), rng.uniform(1, 100, 40), rng.uniform(0, 1000, 40)])
    y = X @ np.array([2e-3, 1e-4, 5e-6])
    coef, r2 = fit_nonnegative(X, y, relative=True)
    np.testing.assert_allclose(coef, [2e-3, 1e-4, 5e-6], rtol=1e-9)
    assert r2 == pytest.approx(1.0)
    # a column that only fits with a negative slope is left out instead
    y2 = 1.0 + 0.0 * X[:, 1] - 1e-4 * X[:, 2]
    coef2, _ = fit_nonnegative(X, y2)
    assert (coef2 >= 0).all()
    assert coef2[2] == 0.0


def test_held_out_steps_of_an_exactly_linear_grid_are_predicted_exactly():
    rng = np.random.default_rng(1)
    table = pd.DataFrame({f: rng.integers(1, 200, 24) for f in FEATURES})
    table["seconds"] = 1e-3 + 2e-4 * table["new_tokens"] + 3e-5 * table["sequences"] + 1e-7 * table["attn_pairs"]
    assert np.abs(held_out_errors(table)).max() < 1e-9


def test_a_fitted_step_time_adds_every_term():
    cost = FittedCost("hand", 1e-3, per_token_s=1e-4, per_pair_s=1e-8, per_kv_token_s=1e-7, per_seq_s=2e-4,
                      per_prefill_s=5e-4, per_small_token_s=3e-5, small_rows=8, per_eager_step_s=7e-4)
    # 20 new tokens, 300 pairs, 1000 tokens read, 5 sequences of which 1 a prefill chunk (an eager step); 8 small rows
    assert cost.step_time(20, 300, 1000, 5, 1) == pytest.approx(
        1e-3 + 2e-3 + 3e-6 + 1e-4 + 1e-3 + 5e-4 + 2.4e-4 + 7e-4)
    assert cost.step_time(20, 300, 1000, 5, 2) == pytest.approx(  # two chunks: one eager step still
        1e-3 + 2e-3 + 3e-6 + 1e-4 + 1e-3 + 2 * 5e-4 + 2.4e-4 + 7e-4)
    assert cost.step_time(3, 3, 0, 3, 0) == pytest.approx(1e-3 + 3e-4 + 3e-8 + 6e-4 + 9e-5)  # 3 small rows
    assert cost.step_time(0, 0, 0, 0, 0) == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        FittedCost("bad", 0.0, per_seq_s=-1.0)


def test_a_real_run_gives_every_step_its_work_and_time(bundled):
    model, _ = bundled
    steps = time_engine_run(model, max_seqs=4, requests=12)
    assert set(FEATURES) <= set(steps.columns)
    assert steps["sequences"].max() == 4
    assert (steps["prefill_seqs"] <= steps["sequences"]).all()
    assert (steps["seconds"] >= 0).all()


def test_a_real_run_calls_back_between_its_steps_off_its_clock(bundled):
    """An app's background thread pauses between the run's steps while a page runs: the pause is no step's time."""
    model, _ = bundled
    paused = []

    def pause() -> None:
        paused.append(1)
        time.sleep(0.02)

    steps = time_engine_run(model, max_seqs=4, requests=12, between_steps=pause)
    assert len(paused) == len(steps)  # once after every step
    assert steps["seconds"].median() < 0.02


def test_calibrated_once_the_simulator_predicts_a_run_it_never_saw(bundled):
    model, tokenizer = bundled
    turns: list[str] = []  # the model is taken step by step: an app's other users go between grid steps

    @contextmanager
    def turn():
        turns.append("in")
        yield
        turns.append("out")

    cost = calibrate_engine(model, max_seqs=4, repeats=1, turn=turn)
    assert turns == ["in", "out"] * (len(design(4)) + 1)  # one round of grid steps, then the engine run
    coefficients = [cost.intercept_s, cost.per_token_s, cost.per_seq_s, cost.per_prefill_s, cost.per_pair_s,
                    cost.per_kv_token_s]
    assert all(c >= 0 for c in coefficients)
    assert cost.intercept_s + cost.per_token_s + cost.per_seq_s > 0  # a step costs something
    assert cost.grid_steps == len(design(4))
    assert math.isfinite(cost.held_out_error)
    assert cost.kv_bytes_per_token == 2 * 6 * 8 * 32 * 4  # K and V, 6 layers x 8 heads x 32 dims, fp32
    table = coefficients_table(cost)
    assert table["steps"].iloc[0] == cost.grid_steps
    prompts, outputs = ServeWorkload(6, 5, 60, 4, 12, seed=7).build(tokenizer)
    settings = EngineSettings(256, 16, 3, 64)
    engine = serve_engine(model, prompts, outputs, settings).engine
    prediction = prediction_table(engine.result(), simulate_engine(settings.config(model), prompts, outputs, cost))
    rows = prediction.set_index("metric")
    assert rows.loc["steps", "measured"] == rows.loc["steps", "predicted"]  # the scheduler is the same
    assert np.isfinite(rows["predicted"]).all()


@pytest.mark.parametrize(("like_s", "runs"), [(0.0, 2), (60.0, grid.LIKE_STEPS_MAX + 1)], ids=["short", "long"])
def test_a_grid_step_is_timed_right_after_like_steps(bundled, monkeypatch, like_s, runs):
    """In a run a step follows many of nearly its shape, with the caches as they left them: each grid step runs
    again and again (at least once, for LIKE_STEPS_S, at most LIKE_STEPS_MAX times) before the timed run (no
    separate warm-up round)."""
    model, _ = bundled
    calls = []
    real = ModelRunner.execute

    def execute(self, chunks):
        calls.append(tuple((c.start, len(c.token_ids)) for c in chunks))
        return real(self, chunks)

    monkeypatch.setattr(ModelRunner, "execute", execute)
    monkeypatch.setattr(grid, "LIKE_STEPS_S", like_s)
    steps = design(2)
    table = time_grid(model, steps, repeats=2)
    assert len(calls) == runs * 2 * len(steps)
    groups = [calls[i:i + runs] for i in range(0, len(calls), runs)]
    assert all(len(set(group)) == 1 for group in groups)  # like steps, then the timed one
    assert (table["repeats"] == 2).all()
