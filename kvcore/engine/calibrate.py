"""The simulator calibrated to the engine: a step-time model measured on this machine, then predictions checked.

As Vidur (Agrawal et al., MLSys 2024) profiles a serving engine's operators over a designed grid and simulates
from the fit, :func:`calibrate_engine` times the engine's model runner on a designed grid of steps
(:mod:`kvcore.engine.grid`: decode batches at short to long contexts, prefill chunks, mixed steps), then what
a real engine run of random prompts adds per step beyond the grid's model work (scheduling, blocks, sampling,
garbage collection, cold caches), and fits

    step time = a + b * new_tokens + c * sequences + d * prefill chunks + e * attention pairs + f * KV tokens read
                + g * min(new_tokens, 8)        (a step's first rows: GEMMs over a few rows cost more per row)
                + h * (1 if any prefill chunk)  (pure decode steps replay a captured graph, the others run eagerly)

with every coefficient >= 0 (least squares on relative error, every subset of terms tried), checked on grid
steps held out of the fit. The simulator then serves any workload with the engine's scheduler settings and
that cost model; :func:`prediction_table` compares its throughput, TTFT and TPOT with what the engine measured.
:func:`fit_step_time` is the older fit to one run's own steps (it predicts that run, not others).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace

import numpy as np
import pandas as pd

from kvcore.engine.engine import LLMEngine
from kvcore.engine.grid import FEATURES as GRID_FEATURES
from kvcore.engine.grid import SMALL_ROWS, block_bytes, design, largest_chunks, time_engine_run, time_grid
from kvcore.sched.config import SimConfig
from kvcore.sched.cost import FittedCost
from kvcore.sched.metrics import SimResult
from kvcore.sched.simulate import simulate
from kvcore.sched.workload import Workload

FEATURES = ("batch_tokens", "attn_pairs", "kv_tokens_read")  # the simulator's cost inputs, per step
COMPARED = ("output_tok_per_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99", "makespan_s", "steps")
OVERHEAD_FEATURES = ("new_tokens", "sequences", "eager_steps")
FOLDS = 4  # held-out check: each grid step is predicted by a fit on the other three quarters


def fit_nonnegative(X: np.ndarray, y: np.ndarray, relative: bool = False, scale: np.ndarray | None = None
                    ) -> tuple[np.ndarray, float]:
    """Least squares ``X @ coef ~ y`` with every coefficient >= 0, by trying every subset of columns (a
    non-negative least squares by enumeration; a handful of columns). relative: minimize errors relative to
    ``y`` (a 2 ms decode step counts as much as a 200 ms prefill); scale: relative to these values instead. Returns
    (coef, r2 on these rows)."""
    w = 1.0 / scale if scale is not None else 1.0 / y if relative else np.ones_like(y)
    best, best_err = np.zeros(X.shape[1]), np.inf
    for size in range(1, X.shape[1] + 1):
        for columns in itertools.combinations(range(X.shape[1]), size):
            cols = list(columns)
            coef = np.linalg.lstsq(X[:, cols] * w[:, None], y * w, rcond=None)[0]
            if (coef < 0).any():
                continue
            err = float((((y - X[:, cols] @ coef) * w) ** 2).sum())
            if err < best_err:
                best, best_err = np.zeros(X.shape[1]), err
                best[cols] = coef
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - X @ best) ** 2).sum()) / total if total > 0 else float("nan")
    return best, r2


def _design_matrix(table: pd.DataFrame, features: Sequence[str]) -> np.ndarray:
    return np.column_stack([np.ones(len(table)), *(table[f].to_numpy(dtype=float) for f in features)])


def held_out_errors(table: pd.DataFrame, folds: int = FOLDS) -> np.ndarray:
    """Relative error of each grid step's time as predicted by a fit that did not see it (``folds``-fold)."""
    X, y = _design_matrix(table, GRID_FEATURES), table["seconds"].to_numpy(dtype=float)
    errors = np.empty(len(y))
    for k in range(folds):
        held = np.arange(len(y)) % folds == k
        coef, _ = fit_nonnegative(X[~held], y[~held], relative=True)
        errors[held] = (X[held] @ coef - y[held]) / y[held]
    return errors


def calibrate_engine(model, *, block_size: int = 16, threads: int | None = None, max_seqs: int = 32,
                     repeats: int = 3, name: str = "this machine's engine", progress: Callable[[float, str], None]
                     | None = None, turn: Callable[[], AbstractContextManager] = nullcontext) -> FittedCost:
    """Profile the engine on a designed grid of steps and fit the simulator's step time (Vidur-style).

    Grid: :func:`kvcore.engine.grid.design` up to ``max_seqs`` sequences, each step timed ``repeats`` times
    in shuffled rounds, each time right after a like step (:func:`kvcore.engine.grid.time_grid`), on ``threads``
    torch threads. Then one real engine run of random prompts
    (:func:`kvcore.engine.grid.time_engine_run`, never a workload it will predict): each of its steps' time
    beyond the grid fit's model time is fitted, relative to the step's time, to a per-step, per-token, per-sequence
    and per-eager-step cost and added. The
    fit's :attr:`~kvcore.sched.FittedCost.held_out_error` is the median relative error on grid steps held out
    of it; r2 is on every grid step. turn: entered around each grid step and around the engine run (an app's
    shared model lock: other users of the model go between them). progress is also called between the engine run's
    steps, off its clock (an app's background thread may pause there).
    """
    report = progress or (lambda fraction, label: None)
    steps = design(max_seqs, prefills=largest_chunks(sum(p.numel() for p in model.parameters())))
    grid = time_grid(model, steps, block_size, repeats, threads, progress=lambda f, label: report(0.85 * f, label),
                     turn=turn)
    runner, r2 = fit_nonnegative(_design_matrix(grid, GRID_FEATURES), grid["seconds"].to_numpy(float), relative=True)
    label = "timing a real engine run: what a step costs beyond its model work"
    report(0.85, label)
    with turn():
        run = time_engine_run(model, block_size, max_seqs, threads, between_steps=lambda: report(0.85, label))
    report(0.95, "fitting the step time")
    run = run[run["new_tokens"] > 0]
    beyond = run["seconds"].to_numpy(float) - _design_matrix(run, GRID_FEATURES) @ runner
    # relative to each step's time: a few steps that a garbage collection or a load spike made 10 ms longer would
    # otherwise set the per-step term of every step
    around, _ = fit_nonnegative(_design_matrix(run, OVERHEAD_FEATURES), beyond, scale=run["seconds"].to_numpy(float))
    terms = dict(zip(("intercept", *GRID_FEATURES), runner, strict=True))
    for term, value in zip(("intercept", *OVERHEAD_FEATURES), around, strict=True):
        terms[term] += value
    report(1.0, "calibrated")
    return FittedCost(name, terms["intercept"], terms["new_tokens"], terms["attn_pairs"], terms["kv_tokens_read"],
                      r2=r2, kv_bytes_per_token=block_bytes(model, block_size) / block_size,
                      per_seq_s=terms["sequences"], per_prefill_s=terms["prefill_seqs"],
                      held_out_error=float(np.median(np.abs(held_out_errors(grid)))), grid_steps=len(grid),
                      per_small_token_s=terms["small_tokens"], small_rows=SMALL_ROWS,
                      per_eager_step_s=terms["eager_steps"])


def fit_step_time(timeline: pd.DataFrame, name: str = "fitted to this run") -> FittedCost:
    """Fit ``step_s`` of one run's steps to an intercept plus :data:`FEATURES`, all coefficients >= 0 (a fit
    to the run it will predict; :func:`calibrate_engine` predicts runs it never saw). r2 on the same steps."""
    steps = timeline[timeline["batch_tokens"] > 0]
    if len(steps) < len(FEATURES) + 1:
        raise ValueError(f"fitting a step time needs at least {len(FEATURES) + 1} steps, got {len(steps)}")
    coef, r2 = fit_nonnegative(_design_matrix(steps, FEATURES), steps["step_s"].to_numpy(dtype=float))
    return FittedCost(name, *(float(c) for c in coef), r2=r2)


def simulate_engine(engine: LLMEngine | SimConfig, prompts: Sequence[Sequence[int]], outputs: Sequence[int],
                    cost: FittedCost) -> SimResult:
    """The simulator serving the requests (all arriving at once) with the engine's scheduler settings (an engine,
    or :meth:`kvcore.engine.experiment.EngineSettings.config`) and ``cost``."""
    workload = Workload.from_prompts([list(p) for p in prompts], list(outputs), name="engine workload")
    config = engine if isinstance(engine, SimConfig) else engine.config
    return simulate(workload, replace(config, cost=cost))


def prediction_table(measured: SimResult | pd.DataFrame, predicted: SimResult) -> pd.DataFrame:
    """One row per metric: measured on the engine (a run's result or its summary), predicted by the simulator,
    and the error in %."""
    m = (measured if isinstance(measured, pd.DataFrame) else measured.summary).iloc[0]
    p = predicted.summary.iloc[0]
    rows = [{"metric": k, "measured": float(m[k]), "predicted": float(p[k]),
             "error_pct": (float(p[k]) - float(m[k])) / float(m[k]) * 100 if float(m[k]) else float("nan")}
            for k in COMPARED]
    return pd.DataFrame(rows)


def coefficients_table(cost: FittedCost, num_steps: int | None = None) -> pd.DataFrame:
    """The fit as a table: each coefficient in microseconds (or ns) per unit, r2, the held-out error and the
    steps it was fitted on."""
    return pd.DataFrame([{"fit": cost.name, "steps": cost.grid_steps if num_steps is None else num_steps,
                          "intercept_us": cost.intercept_s * 1e6, "per_token_us": cost.per_token_s * 1e6,
                          "per_sequence_us": cost.per_seq_s * 1e6, "per_prefill_chunk_us": cost.per_prefill_s * 1e6,
                          "per_attention_pair_ns": cost.per_pair_s * 1e9,
                          "per_kv_token_read_ns": cost.per_kv_token_s * 1e9,
                          "per_small_step_token_us": cost.per_small_token_s * 1e6,
                          "per_eager_step_us": cost.per_eager_step_s * 1e6, "r2": cost.r2,
                          "held_out_error_pct": cost.held_out_error * 100}])
