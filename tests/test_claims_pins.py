"""Pins for the eviction claims (kvcore.eviction.claims), each found by a mutant that the tests let live.

The verdict logic is tested in test_eviction_eval.py on hand-made losses; these pin what those tests left
free: token-weighted and seeded intervals, every mix of outcomes, the exact evidence a page shows, and the
sink claim's boundaries.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvcore.eviction.claims import (
    ATTENTION_POLICIES,
    CANNOT_SHOW,
    COLUMNS,
    _verdict,
    knorm_claim,
    norm_attention_correlation,
    perplexity_interval,
    perplexity_ratio,
    run_noise,
    sink_claim,
    verdicts,
)
from kvcore.noise import WITHIN_NOISE, block_sums, bootstrap_interval
from tests.test_eviction_eval import causal, claims_table, losses, reference

STREAM_CLAIM = "StreamingLLM beats a sliding window at equal budget (Xiao et al. 2023)"
RANDOM_CLAIM = "attention-based policies beat random eviction (Zhang et al. 2023)"


def test_intervals_are_token_weighted_seeded_and_paired():
    a, b = losses(0.2, 0.3, 1, n=165), losses(0.0, 0.3, 2, n=165)  # 10 blocks of 16 and one of 5: unequal weights
    ratio = perplexity_ratio(a, b)
    assert ratio.estimate == pytest.approx(math.exp(float((a.double() - b.double()).mean())))
    assert ratio == perplexity_ratio(a, b, seed=0)  # the default seed is 0: the same URL, the same numbers
    sums, counts = block_sums(a.double() - b.double())
    assert perplexity_ratio(a, b, seed=7) == bootstrap_interval(sums, counts, transform=math.exp, seed=7)
    assert perplexity_ratio(a, b, seed=7) != ratio
    ppl = perplexity_interval(a)
    assert ppl.estimate == pytest.approx(math.exp(float(a.double().mean())))
    assert ppl == perplexity_interval(a, seed=0)
    sums, counts = block_sums(a)
    assert perplexity_interval(a, seed=7) == bootstrap_interval(sums, counts, transform=math.exp, seed=7)
    assert perplexity_interval(a, seed=7) != ppl
    with pytest.raises(ValueError, match=r"the same scored tokens, got \(165,\) and \(164,\)"):
        perplexity_ratio(a, b[:164])


@pytest.mark.parametrize(("outcomes", "verdict"), [
    ([], "not measured"),
    (["holds", "holds"], "holds"),
    (["does not hold", "does not hold"], "does not hold"),
    (["holds", "does not hold", WITHIN_NOISE], "mixed"),
    (["holds", WITHIN_NOISE], "partly holds"),
    (["does not hold", WITHIN_NOISE], "partly fails"),
    ([WITHIN_NOISE, WITHIN_NOISE], WITHIN_NOISE),
])
def test_each_mix_of_outcomes_has_its_verdict(outcomes, verdict):
    assert _verdict(outcomes) == verdict


def test_evidence_reads_every_comparison_with_both_perplexities():
    table = claims_table([("sliding_window", 16), ("streaming_llm", 16), ("sliding_window", 32),
                          ("streaming_llm", 32)])
    nll = {"sliding_window@16": losses(0.3), "streaming_llm@16": losses(0.0, 0.01, 1),
           "sliding_window@32": losses(0.2), "streaming_llm@32": losses(0.0, 0.01, 2)}
    rows = verdicts(table, nll)
    assert list(rows.columns) == list(COLUMNS)
    assert rows["claim"].tolist() == [STREAM_CLAIM, RANDOM_CLAIM]
    expected = []
    for budget in (16, 32):
        a, b = nll[f"streaming_llm@{budget}"], nll[f"sliding_window@{budget}"]
        expected.append(f"streaming_llm vs sliding_window @ {budget} tokens: perplexity "
                        f"{perplexity_interval(a).format('.1f')} vs {perplexity_interval(b).format('.1f')}, "
                        f"ratio {perplexity_ratio(a, b).format()} (holds)")
    assert rows["evidence"][0] == "; ".join(expected)
    assert rows["evidence"][1] == f"run random and one of {', '.join(ATTENTION_POLICIES)}"
    assert rows["evidence"][1].count(", ") == len(ATTENTION_POLICIES) - 1
    empty = verdicts(claims_table([("h2o", 100)]), {})
    assert list(empty.columns) == list(COLUMNS)
    assert empty["evidence"][0] == "run streaming_llm and sliding_window"


def test_the_sink_claim_looks_at_the_first_four_tokens_and_says_what_it_found():
    T = 64
    late = torch.ones(T)
    late[4] = 40.0  # a sink, but the fifth token: not one StreamingLLM keeps by default
    row = sink_claim(reference(causal(late)[None, None]))
    assert list(row) == list(COLUMNS)
    assert row["claim"] == ("StreamingLLM: the first tokens are attention sinks and a window collapses without "
                            "them (Xiao et al. 2023)")
    assert (row["verdict"], row["compared"], row["held"], row["against"], row["within_noise"]) == \
        (CANNOT_SHOW, 1, 0, 1, 0)
    assert "No sink among the first 4 tokens (sinks elsewhere: [4]), so a window cannot collapse" in row["evidence"]
    assert "a sink needs 5x from at least" in row["evidence"]
    assert "token 4:" not in row["evidence"]  # only the first four are listed
    assert sink_claim(reference(causal(late)[None, None]), n_sink=5)["verdict"] == "holds"
    flat = sink_claim(reference(causal(torch.ones(T))[None, None]))
    assert "No sink among the first 4 tokens nor anywhere else, so" in flat["evidence"]
    short = sink_claim(reference(causal(torch.ones(12))[None, None]))  # no query is 16 positions after a key
    assert (short["verdict"], short["compared"], short["against"]) == ("not measured", 0, 0)
    assert short["evidence"].endswith("too few far queries to judge; stream more tokens")


def test_a_runs_noise_columns_are_its_interval_and_its_paired_ratio_to_the_full_cache():
    full = losses(0.0)
    worse, better, same = losses(0.5, 0.01, 1), losses(-0.5, 0.01, 2), losses(0.0, 0.01, 3)
    row = run_noise(worse, full)
    ppl, ratio = perplexity_interval(worse), perplexity_ratio(worse, full)
    assert row == {"ppl_low": ppl.low, "ppl_high": ppl.high, "ppl_vs_full": ratio.estimate,
                   "ppl_vs_full_low": ratio.low, "ppl_vs_full_high": ratio.high, "vs_full": "worse"}
    assert run_noise(better, full)["vs_full"] == "better"
    assert run_noise(same, full)["vs_full"] == WITHIN_NOISE
    assert run_noise(full, full, baseline=True)["vs_full"] == "baseline"
    assert run_noise(worse * 1.02, worse)["vs_full"] == "worse"  # 2% worse on every token is beyond the noise


def test_knorms_row_counts_one_comparison_on_its_side():
    T = 160
    norms = torch.linspace(1.0, 3.0, T)[torch.randperm(T, generator=torch.Generator().manual_seed(0))]
    holds = knorm_claim(reference(causal(1.0 / norms ** 4)[None, None], norms[None, None]))
    assert list(holds) == list(COLUMNS)
    assert holds["claim"] == "Knorm: keys with a low L2 norm receive more attention (Devoto et al. 2024)"
    assert [holds[k] for k in ("compared", "held", "against", "within_noise")] == [1, 1, 0, 0]
    fails = knorm_claim(reference(causal(norms ** 4)[None, None], norms[None, None]))
    assert [fails[k] for k in ("compared", "held", "against", "within_noise")] == [1, 0, 1, 0]
    per_layer, corr = norm_attention_correlation(reference(causal(norms ** 4)[None, None], norms[None, None]))
    assert f"per layer {per_layer['rank_correlation'][0]:+.2f}):" in fails["evidence"]
    assert corr.format("+.2f") in fails["evidence"]
