"""Eviction policies measured on a real model: a sweep over policies x budgets, tables, and the literature's claims.

Runs :mod:`kvcore.eviction.runner` for every policy and budget of an :class:`EvictionConfig` on one text
(the bundled offline model and its held-out sample by default) and gathers the results into
DataFrames: one row per run, one row per run and layer, one row per token. Every perplexity carries a
block-bootstrap interval and its ratio to the full cache on the same tokens (paired); decode speed is the
median and interquartile range of real one-token steps, the cache at its budget, timed alike for every run
(:meth:`RunSpec.time_steps`), with the load average when they ran. Evicting policies are measured in one
forward replayed layer by layer (:mod:`kvcore.eviction.layerwise`), equal to their token-by-token runs.
It also checks claims from the literature *against the measured numbers*, each with its noise
(:mod:`kvcore.eviction.claims`): attention sinks (StreamingLLM), StreamingLLM vs a sliding window,
attention-based policies vs random (H2O), and Knorm's premise.

``python -m kvcore eviction ...`` (:mod:`kvcore.eviction.cli`) runs the same sweep headless.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from kvcore.eviction import (
    DEFAULT_BUDGETS,
    DEFAULT_POLICIES,
    POLICIES,
    Budget,
    EvictionPolicy,
    make_policy,
    resolve_budget,
)
from kvcore.eviction.claims import ATTENTION_POLICIES, claims, knorm_claim, run_noise, sink_claim, verdicts
from kvcore.eviction.layerwise import replays, run_decode_layerwise, time_decode_steps
from kvcore.eviction.reference import Reference, reference_pass
from kvcore.eviction.runner import MODES, RunResult, run_policy
from kvcore.models.attention import AttentionPatterns
from kvcore.models.cache import POSITION_MODES
from kvcore.models.loader import bundled_text
from kvcore.models.runtime import text_ids
from kvcore.noise import load_average

__all__ = ["ATTENTION_POLICIES", "EvictionConfig", "EvictionResults", "RunSpec", "evaluate", "evaluate_text",
           "model_claims", "run_all", "sample_text", "summarize", "verdicts"]
Progress = Callable[[int, int, str], None]


@dataclass(slots=True, frozen=True)
class RunSpec:
    """One run of a sweep: a policy with its hyperparameters at one budget, in one mode (a hashable key).

    hyperparameters: ``(field, value)`` pairs of the policy's dataclass. The other fields are those of
    :func:`~kvcore.eviction.runner.run_policy`.
    """

    policy: str
    hyperparameters: tuple[tuple[str, Any], ...]
    budget: Budget
    positions: str = "original"
    mode: str = "decode"
    prompt_tokens: int | None = None
    hit_ratio: float = 1.0
    budget_rule: str = "round"

    def make_policy(self) -> EvictionPolicy:
        """The policy instance."""
        return make_policy(self.policy, **dict(self.hyperparameters))

    @property
    def label(self) -> str:
        """``label @ budget`` for progress messages."""
        return f"{self.make_policy().label()} @ {self.budget}"

    def measure(self, model, ref: Reference, threads: int | None = 1) -> RunResult:
        """Everything the run measures but its step times: the same text and model give the same numbers.

        In decode mode the full cache and the evicting policies are replayed layer by layer in one forward
        (:func:`~kvcore.eviction.layerwise.run_decode_layerwise`, equal to the token-by-token run, the full cache
        decoded after its first token); the others run token by token (:func:`run_policy`)."""
        policy = self.make_policy()
        if self.mode == "decode" and replays(policy):
            return run_decode_layerwise(model, ref, policy, self.budget, self.positions, self.hit_ratio, threads,
                                        self.budget_rule)
        result = run_policy(model, ref, policy, self.budget, self.positions, self.mode, self.prompt_tokens,
                            self.hit_ratio, threads, self.budget_rule)
        return replace(result, step_ms=np.zeros(0))

    def time_steps(self, model, ids: torch.Tensor, threads: int | None = 1) -> tuple[np.ndarray, float]:
        """Wall time (ms) of :data:`TIMED_STEPS` + 1 real decode steps over the text ``ids`` ``[1, T]`` (the
        reference's), the cache at the budget (the full cache: the text's last steps;
        :func:`~kvcore.eviction.layerwise.time_decode_steps`; none in prefill mode) and the load average then."""
        if self.mode != "decode":
            return np.zeros(0), load_average()
        steps = time_decode_steps(model, ids, self.make_policy(), self.budget, self.positions, TIMED_STEPS, threads,
                                  self.budget_rule)
        return steps, load_average()

    def run(self, model, ref: Reference, threads: int | None = 1) -> RunResult:
        """:meth:`measure` with :meth:`time_steps`: every column of a table row."""
        return with_timing(self.measure(model, ref, threads), *self.time_steps(model, ref.ids, threads))


def with_timing(result: RunResult, step_ms: np.ndarray, load_1min: float) -> RunResult:
    """A measured run with its step times and the load average when they were taken."""
    return replace(result, step_ms=np.asarray(step_ms), load_1min=load_1min)


# Decode steps timed per run (after one warm-up step), the cache at the budget (the full cache: the text's last). Their
# median and interquartile range are a rough cost per policy, never ranked: a few steps say it, and on a 2-core CPU
# each costs a page view about 10 ms per run.
TIMED_STEPS = 8

# Tokens (runs x tokens each) one page view may stream through the model. On a 2-core CPU with the bundled model a
# run of 1,024 tokens takes about 1 s replayed layer by layer (H2O; a sliding window 0.6 s) and about 4 s token by
# token (Knorm, an attention-only window), so the heaviest view (token-by-token runs only) stays near half a minute.
# The CLI has no limit.
PAGE_STREAM_LIMIT = 8192

@dataclass(slots=True)
class EvictionConfig:
    """One sweep: which policies, at which budgets, in which mode, on how many tokens.

    policies: names from ``POLICIES`` (``"full"``, the reference, is always measured too).
    budgets: tokens (int >= 1) or ratios (float in (0, 1]) of the fed tokens (decode) or of the prompt
    (prefill). hyperparameters: ``{policy: {field: value}}`` overriding the dataclass defaults.
    positions: ``"original"`` or ``"rerotate"`` (StreamingLLM; RoPE models only). mode: ``"decode"``
    (cache held at the budget while streaming) or ``"prefill"`` (prompt compressed once).
    max_tokens: tokens of the text used (>= 4). prompt_tokens: prefill mode's prompt (default half).
    hit_ratio: lookup threshold of the counters, a multiple of the uniform attention share.
    seed: seeds the random policy unless its hyperparameters set one. threads: CPU threads (None: as is).
    budget_rule: how a share budget becomes a token count (``"round"``, or ``"kvpress"``'s truncation).
    """

    policies: tuple[str, ...] = DEFAULT_POLICIES
    budgets: tuple[Budget, ...] = DEFAULT_BUDGETS
    hyperparameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    positions: str = "original"
    mode: str = "decode"
    max_tokens: int = 256
    prompt_tokens: int | None = None
    hit_ratio: float = 1.0
    seed: int = 0
    threads: int | None = 1
    budget_rule: str = "round"

    def __post_init__(self) -> None:
        self.policies, self.budgets = tuple(self.policies), tuple(self.budgets)
        if not self.policies:
            raise ValueError("pick at least one policy")
        unknown = [p for p in (*self.policies, *self.hyperparameters) if p not in POLICIES]
        if unknown:
            raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
        if not self.budgets:
            raise ValueError("pick at least one budget")
        for budget in self.budgets:
            resolve_budget(budget, 1 << 30, self.budget_rule)  # raises on a bad budget or rule
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.max_tokens < 4:
            raise ValueError(f"max_tokens must be >= 4, got {self.max_tokens}")
        if not self.hit_ratio > 0:
            raise ValueError(f"hit_ratio must be > 0, got {self.hit_ratio}")

    def make_policies(self) -> list[EvictionPolicy]:
        """``full`` first, then each chosen policy with its hyperparameters (random seeded by ``seed``)."""
        names = ["full", *(p for p in dict.fromkeys(self.policies) if p != "full")]
        made = []
        for name in names:
            params = dict(self.hyperparameters.get(name, {}))
            if name == "random":
                params.setdefault("seed", self.seed)
            made.append(make_policy(name, **params))
        return made

    def runs(self) -> list[RunSpec]:
        """Every run of the sweep: each policy at each budget; ``full`` once (it ignores the budget)."""
        policies = self.make_policies()
        pairs = [(policies[0], 1.0)] + [(p, b) for p in policies[1:] for b in dict.fromkeys(self.budgets)]
        return [RunSpec(p.name, tuple(p.hyperparameters().items()), b, self.positions, self.mode, self.prompt_tokens,
                        self.hit_ratio, self.budget_rule) for p, b in pairs]

    def check_cost(self, limit: int = PAGE_STREAM_LIMIT) -> None:
        """Refuse a sweep that would stream more than ``limit`` tokens in all (runs x tokens)."""
        runs = len(self.runs())
        if runs * self.max_tokens > limit:
            raise ValueError(
                f"this sweep streams {runs * self.max_tokens:,} tokens ({runs} runs x {self.max_tokens:,} tokens); "
                f"the page allows {limit:,} so one view stays near half a minute of CPU: pick fewer policies "
                "or budgets, or fewer tokens (`python -m kvcore eviction` has no limit)")


@dataclass(slots=True)
class EvictionResults:
    """Everything one sweep measured.

    table: one row per run (policy x budget). layers: one row per run and layer (mass retained, output
    error). tokens: one row per fed token (text, accumulated attention, sink and heavy-hitter flags).
    verdicts: the literature's claims, each with its measurement and noise (:func:`~kvcore.eviction.claims.claims`).
    visible: ``"policy@budget"`` -> ``[T-1, T-1]`` uint8 map, row = query step, column = token, value =
    share (x255) of (layer, KV head) pairs that could read the token at that step. attention: ``[L, T-1, T-1]``
    full-cache attention of each layer, heads averaged (row = query; float16), for the step view.
    thresholds: the sink and heavy-hitter detector's settings the reference used.
    """

    table: pd.DataFrame
    layers: pd.DataFrame
    tokens: pd.DataFrame
    verdicts: pd.DataFrame
    visible: dict[str, np.ndarray]
    config: EvictionConfig
    attention: np.ndarray | None = None
    thresholds: AttentionPatterns = field(default_factory=AttentionPatterns)


def sample_text() -> str:
    """The bundled model's held-out validation documents (the page's default text)."""
    try:
        return bundled_text("validation")
    except FileNotFoundError as exc:
        raise OSError("the bundled model's validation sample is missing; run scripts/train_bundled_model.py") from exc


def run_key(run: RunResult) -> str:
    """``"policy@budget"``, the key of a run's visibility map."""
    return f"{run.policy}@{run.budget}"


def decode_speed(run: RunResult, warmup: int = 1) -> dict[str, float]:
    """Median and interquartile range (ms) of a run's one-token decode steps, the first ``warmup`` left out as
    warm-up; tokens/s from the median; the load average when it ran. NaN in prefill mode (no decode steps)."""
    return step_speed(run.step_ms, run.load_1min, warmup)


def step_speed(step_ms: np.ndarray, load_1min: float, warmup: int = 1) -> dict[str, float]:
    """:func:`decode_speed` of step times (ms) taken under a load average of ``load_1min``."""
    steps = np.asarray(step_ms, dtype=np.float64)[warmup:]
    if not len(steps):
        nan = float("nan")
        return {"decode_ms": nan, "decode_ms_q1": nan, "decode_ms_q3": nan, "decode_steps": 0, "tokens_per_s": nan,
                "load_1min": load_1min}
    q1, median, q3 = np.percentile(steps, [25, 50, 75])
    return {"decode_ms": float(median), "decode_ms_q1": float(q1), "decode_ms_q3": float(q3),
            "decode_steps": len(steps), "tokens_per_s": 1e3 / float(median) if median > 0 else float("nan"),
            "load_1min": load_1min}


def with_speeds(results: EvictionResults, speeds: Mapping[str, tuple[np.ndarray, float]]) -> EvictionResults:
    """``results`` with the decode speeds of runs timed apart from their measurement: ``run_key`` -> (step times in
    ms, load average then) fills that run's speed columns (:func:`step_speed`); everything else is shared. Equal to
    :func:`summarize` of the runs :func:`with_timing` those times (a test checks it)."""
    table = results.table.copy()
    keys = table["policy"].astype(str) + "@" + table["budget_tokens"].astype(str)
    for row, key in zip(table.index, keys, strict=True):
        if key in speeds:
            for column, value in step_speed(*speeds[key]).items():
                table.loc[row, column] = value
    return replace(results, table=table)


def result_row(ref: Reference, run: RunResult) -> dict[str, Any]:
    """One table row: perplexity (with its interval and its ratio to the full cache), attention retained,
    counters, decode speed (median and IQR of the one-token steps) and bytes."""
    scored = ref.nll[run.scored_from - 1:]
    denominator = (run.scored_from - 1) if run.mode == "prefill" else ref.num_fed
    misses = run.lookups - run.hits
    return {
        "policy": run.policy, "label": run.label, "mode": run.mode, "positions": run.positions,
        "budget_tokens": run.budget, "budget_share": run.budget / max(1, denominator),
        "scored_tokens": len(run.nll),
        "ppl": math.exp(float(run.nll.double().mean())), **run_noise(run.nll, scored, run.policy == "full"),
        "ppl_full": math.exp(float(scored.double().mean())),
        "mass_retained": float(run.mass.mean()), "output_error": float(run.output_error.mean()),
        "lookups": run.lookups, "hits": run.hits, "misses": misses,
        "hit_rate": run.hits / run.lookups if run.lookups else 1.0,
        "evictions": run.evictions, "sinks_retained": run.sinks_retained, "sinks_total": run.sinks_total,
        **decode_speed(run), "kv_bytes_held": run.kv_bytes_held, "kv_bytes_full": ref.kv_bytes,
        "kv_share": run.kv_bytes_held / ref.kv_bytes if ref.kv_bytes else float("nan"),
    }


def token_table(ref: Reference, tokenizer=None) -> pd.DataFrame:
    """One row per fed token: its text (when a tokenizer is given) and the reference's sink / heavy-hitter flags."""
    table = ref.patterns.copy()
    ids = ref.ids[0, :ref.num_fed].tolist()
    table.insert(1, "token_id", ids)
    if tokenizer is not None:
        table.insert(2, "token", [tokenizer.decode([i]) for i in ids])
    return table


def model_claims(ref: Reference) -> list[dict[str, Any]]:
    """The claims measured on the full-cache reference alone: attention sinks and Knorm's premise."""
    return [sink_claim(ref), knorm_claim(ref)]


def summarize(ref: Reference, runs: Sequence[RunResult], config: EvictionConfig, tokenizer=None,
              measured: list[dict[str, Any]] | None = None) -> EvictionResults:
    """Gather runs of one text into :class:`EvictionResults` (tables, claims, visibility maps).

    measured: :func:`model_claims` of ``ref`` when already computed (the page caches them with the reference).
    """
    order = list(dict.fromkeys(["full", *config.policies]))
    runs = sorted(runs, key=lambda r: (order.index(r.policy) if r.policy in order else len(order), r.budget))
    table = pd.DataFrame([result_row(ref, r) for r in runs])
    layers = pd.DataFrame([
        {"policy": r.policy, "budget_tokens": r.budget, "layer": layer, "mass_retained": float(m),
         "output_error": float(e)}
        for r in runs for layer, (m, e) in enumerate(zip(r.mass, r.output_error, strict=True))
    ])
    nll = {run_key(r): r.nll for r in runs}
    found = claims(ref, table, nll, measured)
    attention = ref.attn.mean(dim=1).numpy().astype(np.float16)  # [L, T-1, T-1]
    return EvictionResults(table, layers, token_table(ref, tokenizer), found, {run_key(r): r.visible for r in runs},
                           config, attention, ref.thresholds)


def run_all(runs: Sequence[RunSpec], run: Callable[[RunSpec], RunResult],
            on_progress: Progress | None = None) -> list[RunResult]:
    """``run(spec)`` for every spec in order; ``on_progress(done, total, label)`` after each."""
    results = []
    for i, spec in enumerate(runs):
        results.append(run(spec))
        if on_progress is not None:
            on_progress(i + 1, len(runs), spec.label)
    return results


def evaluate(model, ids: torch.Tensor, config: EvictionConfig | None = None, tokenizer=None,
             on_progress: Progress | None = None) -> EvictionResults:
    """Run the whole sweep on token ids ``[1, T]`` (``T <= config.max_tokens`` are used).

    on_progress: called as ``on_progress(done, total, label)`` after each run.
    """
    config = config or EvictionConfig()
    ref = reference_pass(model, ids[:, :config.max_tokens], threads=config.threads)
    runs = run_all(config.runs(), lambda spec: spec.run(model, ref, config.threads), on_progress)
    return summarize(ref, runs, config, tokenizer)


def evaluate_text(model, tokenizer, text: str | None = None, config: EvictionConfig | None = None,
                  on_progress: Progress | None = None) -> EvictionResults:
    """:func:`evaluate` on a text (default: the bundled model's held-out sample)."""
    config = config or EvictionConfig()
    ids = text_ids(model, tokenizer, sample_text() if text is None else text, config.max_tokens)
    return evaluate(model, ids, config, tokenizer, on_progress)
