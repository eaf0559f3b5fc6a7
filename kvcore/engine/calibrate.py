"""The simulator fitted to the engine: a step-time model measured on this machine, then predictions checked.

As Vidur (Agrawal et al., MLSys 2024) profiles a serving engine's operators and simulates from the fit, the
engine's measured steps give a linear step time ``a + b * new_tokens + c * attention_pairs + d * kv_read``
(least squares with coefficients >= 0, every subset of features tried: four unknowns). The simulator then
serves the same requests with the engine's own scheduler settings and that cost model; its throughput,
TTFT and TPOT are compared with what the engine measured.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd

from kvcore.engine.engine import LLMEngine
from kvcore.engine.experiment import EngineSettings
from kvcore.engine.params import SamplingParams
from kvcore.engine.workload import ServeWorkload
from kvcore.sched.cost import FittedCost
from kvcore.sched.metrics import SimResult
from kvcore.sched.simulate import simulate
from kvcore.sched.workload import Workload

FEATURES = ("batch_tokens", "attn_pairs", "kv_tokens_read")  # the simulator's cost inputs, per step
COMPARED = ("output_tok_per_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99", "makespan_s", "steps")


def fit_step_time(timeline: pd.DataFrame, name: str = "this machine's engine") -> FittedCost:
    """Fit ``step_s`` of the timeline's steps to an intercept plus :data:`FEATURES`, all coefficients >= 0.

    Every subset of the three features is solved by least squares; the best fit whose coefficients are all
    >= 0 wins (a non-negative least squares by enumeration). r2 is measured on the same steps.
    """
    steps = timeline[timeline["batch_tokens"] > 0]
    if len(steps) < len(FEATURES) + 1:
        raise ValueError(f"fitting a step time needs at least {len(FEATURES) + 1} steps, got {len(steps)}")
    y = steps["step_s"].to_numpy(dtype=float)
    X = np.column_stack([np.ones(len(steps)), *(steps[f].to_numpy(dtype=float) for f in FEATURES)])  # [N, 4]
    best, best_err = np.zeros(X.shape[1]), np.inf
    for size in range(1, X.shape[1] + 1):
        for columns in itertools.combinations(range(X.shape[1]), size):
            coef = np.linalg.lstsq(X[:, columns], y, rcond=None)[0]
            if (coef < 0).any():
                continue
            err = float(((y - X[:, columns] @ coef) ** 2).sum())
            if err < best_err:
                best, best_err = np.zeros(X.shape[1]), err
                best[list(columns)] = coef
    total = float(((y - y.mean()) ** 2).sum())
    return FittedCost(name, *(float(c) for c in best), r2=1.0 - best_err / total if total > 0 else float("nan"))


def simulate_engine(engine: LLMEngine, prompts: Sequence[Sequence[int]], outputs: Sequence[int],
                    cost: FittedCost) -> SimResult:
    """The simulator serving the requests (all arriving at once) with the engine's settings and ``cost``."""
    workload = Workload.from_prompts([list(p) for p in prompts], list(outputs), name="engine workload")
    return simulate(workload, replace(engine.config, cost=cost))


def prediction_table(measured: SimResult, predicted: SimResult) -> pd.DataFrame:
    """One row per metric: measured on the engine, predicted by the simulator, and the error in %."""
    m, p = measured.summary.iloc[0], predicted.summary.iloc[0]
    rows = [{"metric": k, "measured": float(m[k]), "predicted": float(p[k]),
             "error_pct": (float(p[k]) - float(m[k])) / float(m[k]) * 100 if float(m[k]) else float("nan")}
            for k in COMPARED]
    return pd.DataFrame(rows)


def coefficients_table(cost: FittedCost, num_steps: int) -> pd.DataFrame:
    """The fit as a table: each coefficient in microseconds per unit, r2 and the steps it was fitted on."""
    return pd.DataFrame([{"fit": cost.name, "steps": num_steps, "intercept_us": cost.intercept_s * 1e6,
                          "per_token_us": cost.per_token_s * 1e6, "per_attention_pair_ns": cost.per_pair_s * 1e9,
                          "per_kv_token_read_ns": cost.per_kv_token_s * 1e9, "r2": cost.r2}])


def calibrate(model, tokenizer, workload: ServeWorkload | None = None, settings: EngineSettings | None = None,
              name: str = "this machine's engine") -> FittedCost:
    """Serve a short workload on the engine and fit the simulator's step time to its steps (the Continuous
    batching page's "calibrated to this machine's engine"); the fit carries the model's KV bytes per token."""
    workload = workload or ServeWorkload(num_requests=32, prompt_max=400, output_max=48)
    settings = settings or EngineSettings(num_blocks=512)
    prompts, outputs = workload.build(tokenizer)
    engine = settings.engine(model)
    engine.generate(prompts, [SamplingParams(max_tokens=o, ignore_eos=True) for o in outputs])
    fit = fit_step_time(engine.stats.timeline, name)
    per_token = engine.kv_bytes / (settings.num_blocks * settings.block_size)
    return replace(fit, kv_bytes_per_token=per_token)
