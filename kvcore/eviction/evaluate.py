"""Eviction policies measured on a real model: a sweep over policies x budgets, tables, and the literature's claims.

Runs :mod:`kvcore.eviction.runner` for every policy and budget of an :class:`EvictionConfig` on one text
(the bundled offline model and its held-out sample by default) and gathers the results into
DataFrames: one row per run, one row per run and layer, one row per token. It also checks two
results from the literature *against the measured numbers* (never assumed):

* StreamingLLM (Xiao et al. 2023, Fig. 3): at an equal budget, keeping the first tokens as attention
  sinks gives lower perplexity than a pure sliding window once the first tokens are evicted;
* H2O (Zhang et al. 2023, Fig. 4) and later work: policies that read attention beat random eviction.

``python -m kvcore eviction ...`` (:mod:`kvcore.eviction.cli`) runs the same sweep headless.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
from kvcore.eviction.reference import Reference, reference_pass
from kvcore.eviction.runner import MODES, RunResult, run_policy
from kvcore.models.cache import POSITION_MODES
from kvcore.models.loader import bundled_text
from kvcore.models.runtime import text_ids

ATTENTION_POLICIES = tuple(name for name, cls in POLICIES.items() if cls.needs_attention)
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

    def run(self, model, ref: Reference, threads: int | None = 1) -> RunResult:
        """Run it on ``model`` against ``ref`` (:func:`~kvcore.eviction.runner.run_policy`)."""
        return run_policy(model, ref, self.make_policy(), self.budget, self.positions, self.mode, self.prompt_tokens,
                          self.hit_ratio, threads, self.budget_rule)


# Tokens (runs x tokens each) one page view may stream through the model: on a 2-core CPU one run of
# 1,024 tokens takes about 3 s with the bundled model, so this keeps a view near 30 s. The CLI has no limit.
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
    verdicts: the literature's claims checked on ``table``. visible: ``"policy@budget"`` -> ``[T-1, T-1]``
    uint8 map, row = query step, column = token, value = share (x255) of (layer, KV head) pairs that
    could read the token at that step.
    """

    table: pd.DataFrame
    layers: pd.DataFrame
    tokens: pd.DataFrame
    verdicts: pd.DataFrame
    visible: dict[str, np.ndarray]
    config: EvictionConfig


def sample_text() -> str:
    """The bundled model's held-out validation documents (the page's default text)."""
    try:
        return bundled_text("validation")
    except FileNotFoundError as exc:
        raise OSError("the bundled model's validation sample is missing; run scripts/train_bundled_model.py") from exc


def run_key(run: RunResult) -> str:
    """``"policy@budget"``, the key of a run's visibility map."""
    return f"{run.policy}@{run.budget}"


def result_row(ref: Reference, run: RunResult) -> dict[str, Any]:
    """One table row: perplexity vs the full cache, attention retained, counters, speed and bytes."""
    scored = ref.nll[run.scored_from - 1:]
    denominator = (run.scored_from - 1) if run.mode == "prefill" else ref.num_fed
    misses = run.lookups - run.hits
    return {
        "policy": run.policy, "label": run.label, "mode": run.mode, "positions": run.positions,
        "budget_tokens": run.budget, "budget_share": run.budget / max(1, denominator),
        "scored_tokens": len(run.nll),
        "ppl": math.exp(float(run.nll.double().mean())), "ppl_full": math.exp(float(scored.double().mean())),
        "mass_retained": float(run.mass.mean()), "output_error": float(run.output_error.mean()),
        "lookups": run.lookups, "hits": run.hits, "misses": misses,
        "hit_rate": run.hits / run.lookups if run.lookups else 1.0,
        "evictions": run.evictions, "sinks_retained": run.sinks_retained, "sinks_total": run.sinks_total,
        "tokens_per_s": ref.num_fed / run.seconds if run.seconds > 0 else float("nan"),
        "kv_bytes_held": run.kv_bytes_held, "kv_bytes_full": ref.kv_bytes,
        "kv_share": run.kv_bytes_held / ref.kv_bytes if ref.kv_bytes else float("nan"),
    }


def _pairs_verdict(claim: str, pairs: list[tuple[str, float, float]], missing: str) -> dict[str, Any]:
    """Summarise (evidence, winner ppl, loser ppl) comparisons: holds when the first ppl is lower."""
    held = sum(a < b for _, a, b in pairs)
    if not pairs:
        verdict = "not measured"
    elif held == len(pairs):
        verdict = "holds"
    else:
        verdict = "partly holds" if held else "does not hold"
    evidence = "; ".join(f"{what}: {a:.3f} vs {b:.3f}" for what, a, b in pairs) or missing
    return {"claim": claim, "compared": len(pairs), "held": held, "verdict": verdict, "evidence": evidence}


def verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """Check StreamingLLM > sliding window and attention-based > random on the measured perplexities.

    A comparison counts at one budget where both policies ran and tokens were evicted (budget below
    the tokens it applies to); "holds" means the first policy had lower perplexity at every such budget.
    """
    evicted = table[table["budget_share"] < 1.0]
    ppl = evicted.pivot_table(index="budget_tokens", columns="policy", values="ppl", aggfunc="first")

    def pairs(a: str, b: str) -> list[tuple[str, float, float]]:
        if a not in ppl or b not in ppl:
            return []
        both = ppl[[a, b]].dropna()
        return [(f"{a} vs {b} @ {budget} tokens", row[a], row[b]) for budget, row in both.iterrows()]

    attention = [p for p in ATTENTION_POLICIES if p in ppl]
    rows = [
        _pairs_verdict("StreamingLLM beats a sliding window at equal budget (Xiao et al. 2023)",
                       pairs("streaming_llm", "sliding_window"), "run streaming_llm and sliding_window"),
        _pairs_verdict("attention-based policies beat random eviction (Zhang et al. 2023)",
                       [pair for p in attention for pair in pairs(p, "random")],
                       f"run random and one of {', '.join(ATTENTION_POLICIES)}"),
    ]
    return pd.DataFrame(rows)


def token_table(ref: Reference, tokenizer=None) -> pd.DataFrame:
    """One row per fed token: its text (when a tokenizer is given) and the reference's sink / heavy-hitter flags."""
    table = ref.patterns.copy()
    ids = ref.ids[0, :ref.num_fed].tolist()
    table.insert(1, "token_id", ids)
    if tokenizer is not None:
        table.insert(2, "token", [tokenizer.decode([i]) for i in ids])
    return table


def summarize(ref: Reference, runs: Sequence[RunResult], config: EvictionConfig, tokenizer=None) -> EvictionResults:
    """Gather runs of one text into :class:`EvictionResults` (tables, verdicts, visibility maps)."""
    order = list(dict.fromkeys(["full", *config.policies]))
    runs = sorted(runs, key=lambda r: (order.index(r.policy) if r.policy in order else len(order), r.budget))
    table = pd.DataFrame([result_row(ref, r) for r in runs])
    layers = pd.DataFrame([
        {"policy": r.policy, "budget_tokens": r.budget, "layer": layer, "mass_retained": float(m),
         "output_error": float(e)}
        for r in runs for layer, (m, e) in enumerate(zip(r.mass, r.output_error, strict=True))
    ])
    return EvictionResults(table, layers, token_table(ref, tokenizer), verdicts(table),
                           {run_key(r): r.visible for r in runs}, config)


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
