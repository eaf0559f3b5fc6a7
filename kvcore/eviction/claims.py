"""Claims from the eviction literature, each shown with the measurement that tests it and that measurement's noise.

* StreamingLLM (Xiao et al. 2023): the first tokens are *attention sinks*, so a sliding window collapses
  once they leave it. Tested in two parts: whether this model has sinks at all (the one detector,
  :func:`kvcore.models.attention.detect_patterns`), and whether StreamingLLM beats a sliding window at
  equal budgets. A model without sinks cannot show the collapse, whatever the comparison says.
* H2O (Zhang et al. 2023) and later work: policies that read attention beat random eviction.
* Knorm (Devoto et al. 2024): keys with a low L2 norm receive more attention (its premise: the rank
  correlation between key norm and attention received is negative).

Every comparison of two runs is a paired block bootstrap over the same scored tokens
(:mod:`kvcore.noise`): a ratio of perplexities with its 95% interval. A comparison "holds" only when the
whole interval is on the claimed side, "does not hold" when it is wholly on the other, and is "within
noise" otherwise; a claim's verdict gathers its comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch

from kvcore.eviction import POLICIES
from kvcore.eviction.reference import Reference, received_vs_uniform
from kvcore.noise import WITHIN_NOISE, Interval, block_sums, bootstrap_interval, bootstrap_rank_correlation

ATTENTION_POLICIES = tuple(name for name, cls in POLICIES.items() if cls.needs_attention)
SINK_MODEL = "smollm2-135m"  # SmolLM2-135M-Instruct: loads with no model hub, token 0 a sink (StreamingLLM holds)
SINK_MODELS = "HuggingFaceTB/SmolLM2-135M or Qwen/Qwen2.5-0.5B"  # Hub models with sinks, when online
WHERE_SINKS_SHOW = (f"to see sinks, choose {SINK_MODEL} as the model (SmolLM2-135M-Instruct, offline: token 0 is a "
                    f"sink there; `python -m kvcore eviction --model {SINK_MODEL}` on the command line), or online "
                    f"a Hub model that has them ({SINK_MODELS})")
CANNOT_SHOW = "this model cannot show it"
COLUMNS = ("claim", "compared", "held", "against", "within_noise", "verdict", "evidence")


def perplexity_interval(nll: torch.Tensor, seed: int = 0) -> Interval:
    """Perplexity of scored tokens ``[n]`` with its block-bootstrap interval."""
    sums, counts = block_sums(nll)
    return bootstrap_interval(sums, counts, transform=math.exp, seed=seed)


def perplexity_ratio(a: torch.Tensor, b: torch.Tensor, seed: int = 0) -> Interval:
    """ppl(a) / ppl(b) of two runs scored on the same tokens ``[n]``, paired block bootstrap."""
    if a.shape != b.shape:
        raise ValueError(f"a paired comparison needs the same scored tokens, got {tuple(a.shape)} and {tuple(b.shape)}")
    sums, counts = block_sums(a.double() - b.double())
    return bootstrap_interval(sums, counts, transform=math.exp, seed=seed)


def outcome(ratio: Interval) -> str:
    """"holds" when the first run is better beyond the noise (ratio < 1), "does not hold" when worse."""
    return ratio.versus(1.0, below="holds", above="does not hold")


def _verdict(outcomes: list[str]) -> str:
    held, against = outcomes.count("holds"), outcomes.count("does not hold")
    if not outcomes:
        return "not measured"
    if held == len(outcomes):
        return "holds"
    if against == len(outcomes):
        return "does not hold"
    if held and against:
        return "mixed"
    if held:
        return "partly holds"
    return "partly fails" if against else WITHIN_NOISE


def _comparisons(claim: str, pairs: list[tuple[str, str, str]], nll: Mapping[str, torch.Tensor],
                 missing: str) -> dict[str, Any]:
    """A claim's row from (label, winner run key, loser run key) comparisons of per-token NLL."""
    outcomes, evidence = [], []
    for label, a, b in pairs:
        ratio = perplexity_ratio(nll[a], nll[b])
        outcomes.append(outcome(ratio))
        evidence.append(f"{label}: perplexity {perplexity_interval(nll[a]).format('.1f')} vs "
                        f"{perplexity_interval(nll[b]).format('.1f')}, ratio {ratio.format()} ({outcomes[-1]})")
    return {"claim": claim, "compared": len(pairs), "held": outcomes.count("holds"),
            "against": outcomes.count("does not hold"), "within_noise": outcomes.count(WITHIN_NOISE),
            "verdict": _verdict(outcomes), "evidence": "; ".join(evidence) or missing}


def verdicts(table: pd.DataFrame, nll: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """StreamingLLM > sliding window and attention-based > random, each comparison with its interval.

    table: one row per run (``policy``, ``budget_tokens``, ``budget_share``). nll: ``"policy@budget"`` ->
    the run's scored NLL (the same tokens for every run). A comparison counts at a budget where both
    policies ran and tokens were evicted (budget below the tokens it applies to).
    """
    evicted = table[table["budget_share"] < 1.0]
    ran = set(zip(evicted["policy"], evicted["budget_tokens"], strict=True))

    def pairs(a: str, b: str) -> list[tuple[str, str, str]]:
        budgets = sorted({budget for p, budget in ran if p == a} & {budget for p, budget in ran if p == b})
        return [(f"{a} vs {b} @ {budget} tokens", f"{a}@{budget}", f"{b}@{budget}") for budget in budgets]

    rows = [
        _comparisons("StreamingLLM beats a sliding window at equal budget (Xiao et al. 2023)",
                     pairs("streaming_llm", "sliding_window"), nll, "run streaming_llm and sliding_window"),
        _comparisons("attention-based policies beat random eviction (Zhang et al. 2023)",
                     [pair for p in ATTENTION_POLICIES for pair in pairs(p, "random")], nll,
                     f"run random and one of {', '.join(ATTENTION_POLICIES)}"),
    ]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def sink_claim(ref: Reference, n_sink: int = 4) -> dict[str, Any]:
    """Does this model have attention sinks among its first ``n_sink`` tokens (what StreamingLLM keeps)?"""
    table = ref.patterns
    first = table[table["position"] < n_sink]
    judged = first["received_vs_uniform"].dropna()
    rule = ref.thresholds
    threshold = f"a sink needs {rule.sink_ratio:g}x from at least {rule.min_queries} such queries"
    measured = ", ".join(f"token {int(p)}: {r:.2f}x" for p, r in zip(first["position"], first["received_vs_uniform"],
                                                                       strict=True) if not math.isnan(r))
    sinks = first.loc[first["sink"], "position"].tolist()
    base = (f"attention from queries {rule.min_distance}+ positions later, over the uniform share (largest over "
            f"layers; {threshold}): {measured or 'too few far queries to judge'}")
    if sinks:
        verdict, evidence = "holds", f"{base}; sinks at {sinks}"
    elif len(judged):
        others = table.loc[table["sink"], "position"].tolist()
        verdict = CANNOT_SHOW
        evidence = (f"{base}. No sink among the first {n_sink} tokens" + (f" (sinks elsewhere: {others})" if others
                                                                          else " nor anywhere else")
                    + f", so a window cannot collapse for losing them here; {WHERE_SINKS_SHOW}")
    else:
        verdict, evidence = "not measured", f"{base}; stream more tokens"
    return {"claim": "StreamingLLM: the first tokens are attention sinks and a window collapses without them "
                     "(Xiao et al. 2023)", "compared": int(bool(len(judged))), "held": int(bool(sinks)),
            "against": int(not sinks and bool(len(judged))), "within_noise": 0, "verdict": verdict,
            "evidence": evidence}


def norm_attention_correlation(ref: Reference) -> tuple[pd.DataFrame, Interval]:
    """Spearman correlation between each key's L2 norm and the attention it receives (over the uniform share,
    from every later query), per layer (KV heads averaged), and the interval of its mean over layers and
    heads (block bootstrap over key positions). Knorm's premise is a negative correlation."""
    if ref.key_norms is None:
        raise ValueError("the reference has no key norms")
    norms, received = ref.key_norms.float(), received_vs_uniform(ref)  # [L, Hkv, T-1] each
    L, H, _ = norms.shape
    per_row, interval = bootstrap_rank_correlation(norms.reshape(L * H, -1).numpy(),
                                                   received.reshape(L * H, -1).numpy(), resamples=500)
    per_layer = pd.DataFrame({"layer": range(L), "rank_correlation": per_row.reshape(L, H).mean(axis=1)})
    return per_layer, interval


def knorm_claim(ref: Reference) -> dict[str, Any]:
    """Knorm's premise checked on this model: do low-norm keys receive more attention?"""
    per_layer, corr = norm_attention_correlation(ref)
    side = corr.versus(0.0, below="holds", above="does not hold")
    layers = ", ".join(f"{v:+.2f}" for v in per_layer["rank_correlation"])
    meaning = {"holds": "low-norm keys do get more attention here",
               "does not hold": "on this model low-norm keys get LESS attention, the reverse of Knorm's premise, so "
                                "keeping them drops the keys attention reads",
               WITHIN_NOISE: "no relation beyond the noise"}[side]
    return {"claim": "Knorm: keys with a low L2 norm receive more attention (Devoto et al. 2024)",
            "compared": 1, "held": int(side == "holds"), "against": int(side == "does not hold"),
            "within_noise": int(side == WITHIN_NOISE), "verdict": side,
            "evidence": f"rank correlation of key norm with attention received {corr.format('+.2f')} (mean over "
                        f"layers and KV heads; per layer {layers}): {meaning}"}


def claims(ref: Reference, table: pd.DataFrame, nll: Mapping[str, torch.Tensor],
           measured: list[dict[str, Any]] | None = None) -> pd.DataFrame:
    """Every claim with its measurement: sinks, StreamingLLM vs a window, attention vs random, Knorm's premise.

    measured: the sink and Knorm rows when already computed for ``ref`` (they depend on it alone).
    """
    sink, knorm = measured or (sink_claim(ref), knorm_claim(ref))
    compared = verdicts(table, nll)
    return pd.DataFrame([sink, *compared.to_dict("records"), knorm], columns=list(COLUMNS))


def run_noise(nll: torch.Tensor, full: torch.Tensor, baseline: bool = False) -> dict[str, float | str]:
    """A run's perplexity interval and its ratio to the full cache on the same tokens (paired); vs_full says
    "worse" or "better" only beyond the noise ("baseline" for the full cache's own run)."""
    ppl, ratio = perplexity_interval(nll), perplexity_ratio(nll, full)
    return {"ppl_low": ppl.low, "ppl_high": ppl.high, "ppl_vs_full": ratio.estimate, "ppl_vs_full_low": ratio.low,
            "ppl_vs_full_high": ratio.high,
            "vs_full": "baseline" if baseline else ratio.versus(1.0, below="better", above="worse")}
