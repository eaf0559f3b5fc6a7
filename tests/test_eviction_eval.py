"""The eviction evaluation: a sweep on a real model, its tables, the literature's claims and the CLI.

The bundled model runs inside the suite on a short text (seconds); the verdict logic is checked on
hand-written per-token losses so that it is computed from numbers and their noise, never assumed.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvcore.cli import main
from kvcore.eviction import DEFAULT_POLICIES, POLICIES, resolve_budget
from kvcore.eviction.claims import CANNOT_SHOW, knorm_claim, sink_claim, verdicts
from kvcore.eviction.cli import MODES, POSITIONS, coerce_hyperparameter, parse_hyperparameters
from kvcore.eviction.evaluate import (
    TIMED_STEPS,
    EvictionConfig,
    evaluate,
    evaluate_text,
    run_key,
    sample_text,
    summarize,
    with_speeds,
    with_timing,
)
from kvcore.eviction.reference import Reference, reference_pass
from kvcore.eviction.runner import MODES as RUNNER_MODES
from kvcore.eviction.steps import eviction_steps
from kvcore.models.attention import AttentionPatterns, detect_patterns
from kvcore.models.cache import POSITION_MODES
from kvcore.models.loader import BUNDLED_DIR, load_model

HAVE_BUNDLED = (BUNDLED_DIR / "model.safetensors").is_file() and (BUNDLED_DIR / "validation.jsonl").is_file()
needs_bundled = pytest.mark.skipif(not HAVE_BUNDLED, reason="the bundled model is not trained yet")


@pytest.fixture(scope="module")
def bundled():
    if not HAVE_BUNDLED:
        pytest.skip("the bundled model is not trained yet")
    return load_model(None, "cpu")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def small(**kw) -> EvictionConfig:
    return EvictionConfig(**({"policies": DEFAULT_POLICIES, "budgets": (8, 16), "max_tokens": 48} | kw))


# ---- the sweep -----------------------------------------------------------------------------------


def test_sweep_gives_one_row_per_policy_and_budget_plus_the_full_cache(tiny):
    ids = torch.randint(0, 96, (1, 60), generator=torch.Generator().manual_seed(0))
    seen = []
    results = evaluate(tiny, ids, small(), on_progress=lambda done, total, what: seen.append((done, total)))
    table = results.table
    assert table["policy"].tolist() == ["full"] + [p for p in DEFAULT_POLICIES for _ in (8, 16)]
    assert seen[-1] == (9, 9)
    full = table.iloc[0]
    assert full.ppl == pytest.approx(full.ppl_full)
    assert full.mass_retained == pytest.approx(1.0)
    assert full.output_error < 1e-4  # decoded token by token: the one-forward reference up to float rounding
    assert full.kv_bytes_held == full.kv_bytes_full
    assert full.vs_full == "baseline"
    assert full.ppl_vs_full == pytest.approx(1.0, abs=1e-4)
    assert (table["ppl_low"] <= table["ppl"]).all()
    assert (table["ppl"] <= table["ppl_high"]).all()
    evicting = table.iloc[1:]
    assert (evicting["kv_bytes_held"] < full.kv_bytes_full).all()
    assert (evicting["mass_retained"] < 1.0).all()
    assert (evicting["hits"] + evicting["misses"] == evicting["lookups"]).all()
    assert len(results.layers) == len(table) * 2
    assert set(results.visible) == {f"{p}@{b}" for p, b in zip(table["policy"], table["budget_tokens"], strict=True)}
    assert results.visible["sliding_window@8"].shape == (47, 47)


def test_same_config_same_numbers(tiny):
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(3))
    config = small(policies=("random", "h2o"), max_tokens=40)
    a, b = evaluate(tiny, ids, config).table, evaluate(tiny, ids, config).table
    timed = ["decode_ms", "decode_ms_q1", "decode_ms_q3", "tokens_per_s", "load_1min"]
    pd.testing.assert_frame_equal(a.drop(columns=timed), b.drop(columns=timed))


def test_speeds_timed_apart_fill_the_same_table_as_timed_runs(tiny):
    """The page keeps a sweep's summary without step times and fills its speed columns in later (with_speeds)."""
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(5))
    config = small(policies=("sliding_window", "h2o"), max_tokens=40)
    ref = reference_pass(tiny, ids)
    untimed = [spec.measure(tiny, ref) for spec in config.runs()]
    times = [(np.array([9.0, 1.0 + i, 2.0 + i, 3.0 + i]), 0.5 + i) for i in range(len(untimed))]  # made-up clock
    timed = summarize(ref, [with_timing(r, *t) for r, t in zip(untimed, times, strict=True)], config)
    filled = with_speeds(summarize(ref, untimed, config), {run_key(r): t for r, t in zip(untimed, times, strict=True)})
    pd.testing.assert_frame_equal(filled.table, timed.table)
    row = filled.table.iloc[-1]  # the first step is the warm-up: the median of the other three
    assert (row.decode_ms, row.decode_steps, row.load_1min) == (2.0 + len(untimed) - 1, 3, 0.5 + len(untimed) - 1)
    assert summarize(ref, untimed, config).table["decode_ms"].isna().all()  # untimed: no speed shown


def test_the_full_cache_is_timed_token_by_token_like_every_policy(tiny):
    """The defect: full was one parallel forward (2,708 tokens/s) against policies decoding one token a step."""
    ids = torch.randint(0, 96, (1, 60), generator=torch.Generator().manual_seed(0))
    table = evaluate(tiny, ids, small(policies=("sliding_window",), budgets=(8,))).table.set_index("policy")
    # Both time the same TIMED_STEPS + 1 real one-token steps at the end of the text (the first a warm-up): the full
    # cache holding every token, the window its 8
    assert table.loc["full", "decode_steps"] == table.loc["sliding_window", "decode_steps"] == TIMED_STEPS
    from kvcore.eviction.reference import reference_pass
    from kvcore.eviction.runner import run_decode

    with pytest.raises(ValueError, match=r"full_prefill must be in 1\.\.59"):
        run_decode(tiny, reference_pass(tiny, ids), POLICIES["full"](), 1.0, full_prefill=0)
    for row in table.itertuples():
        assert row.decode_ms_q1 <= row.decode_ms <= row.decode_ms_q3
        assert row.tokens_per_s == pytest.approx(1e3 / row.decode_ms)
        assert row.load_1min >= 0


def test_ratio_budgets_resolve_against_the_tokens(tiny):
    ids = torch.randint(0, 96, (1, 41), generator=torch.Generator().manual_seed(0))
    table = evaluate(tiny, ids, small(policies=("sliding_window",), budgets=(0.25,), max_tokens=41)).table
    assert table["budget_tokens"].tolist() == [40, 10]


def test_prefill_mode_scores_the_continuation(tiny):
    ids = torch.randint(0, 96, (1, 41), generator=torch.Generator().manual_seed(0))
    table = evaluate(tiny, ids, small(mode="prefill", budgets=(0.5,), max_tokens=41)).table
    assert (table["scored_tokens"] == 20).all()
    assert (table.loc[table["policy"] != "full", "budget_tokens"] == 10).all()
    assert table["decode_ms"].isna().all()  # no one-token steps to time in prefill mode


@pytest.mark.parametrize(("settings", "message"), [
    ({"policies": ()}, "at least one policy"), ({"policies": ("lfu",)}, "unknown policies"),
    ({"budgets": (0,)}, "budget"), ({"positions": "absolute"}, "positions"), ({"mode": "offline"}, "mode"),
    ({"max_tokens": 2}, "max_tokens"), ({"hyperparameters": {"h2o": {"recent_fraction": 2.0}}}, None),
])
def test_bad_settings_say_what_is_allowed(settings, message):
    with pytest.raises(ValueError, match=message):
        EvictionConfig(**settings).make_policies()


def test_cli_constants_match_the_runner():
    assert POSITIONS == POSITION_MODES
    assert MODES == RUNNER_MODES


def test_hyperparameters_are_typed_from_the_dataclass():
    assert parse_hyperparameters(["streaming_llm.n_sink=2", "tova.per_head=true", "h2o.recent_fraction=0.3"]) == {
        "streaming_llm": {"n_sink": 2}, "tova": {"per_head": True}, "h2o": {"recent_fraction": 0.3}}
    with pytest.raises(ValueError, match="no hyperparameter"):
        coerce_hyperparameter("knorm", "alpha", "1")
    with pytest.raises(ValueError, match="must be a int"):
        coerce_hyperparameter("snapkv", "window", "wide")


# ---- the claims are computed from the numbers and their noise ---------------------------------------------


def claims_table(rows: list[tuple[str, int]]) -> pd.DataFrame:
    return pd.DataFrame([{"policy": p, "budget_tokens": b, "budget_share": b / 100} for p, b in rows])


def losses(shift: float = 0.0, jitter: float = 0.0, seed: int = 0, n: int = 160) -> torch.Tensor:
    """Per-token NLL of a text whose difficulty swings from token to token, plus a run's shift and own jitter."""
    difficulty = torch.rand(n, generator=torch.Generator().manual_seed(42)) * 6
    return difficulty + shift + torch.randn(n, generator=torch.Generator().manual_seed(seed)) * jitter


def test_verdicts_follow_the_measured_losses_and_their_noise():
    table = claims_table([("sliding_window", 16), ("streaming_llm", 16), ("sliding_window", 32),
                          ("streaming_llm", 32), ("random", 16), ("h2o", 16), ("tova", 16)])
    nll = {"sliding_window@16": losses(0.3), "streaming_llm@16": losses(0.0, 0.01, 1),
           "sliding_window@32": losses(0.0), "streaming_llm@32": losses(0.0, 0.02, 2),  # a tie: within noise
           "random@16": losses(0.1), "h2o@16": losses(0.0, 0.01, 3), "tova@16": losses(0.4, 0.01, 4)}
    stream, attention = verdicts(table, nll).itertuples()
    assert (stream.verdict, stream.held, stream.within_noise, stream.compared) == ("partly holds", 1, 1, 2)
    assert "streaming_llm vs sliding_window @ 16 tokens" in stream.evidence
    assert "(holds)" in stream.evidence
    assert "(within noise)" in stream.evidence
    assert (attention.verdict, attention.held, attention.against) == ("mixed", 1, 1)


def test_a_difference_inside_the_noise_is_never_a_verdict():
    """The defect: "StreamingLLM beats a sliding window: holds" on 219.3 vs 221.9."""
    table = claims_table([("sliding_window", 32), ("streaming_llm", 32)])
    nll = {"sliding_window@32": losses(0.012, 0.3, 5), "streaming_llm@32": losses(0.0, 0.3, 6)}
    row = verdicts(table, nll).iloc[0]
    assert math.exp(float(nll["streaming_llm@32"].mean())) < math.exp(float(nll["sliding_window@32"].mean()))
    assert row.verdict == "within noise"
    assert row.held == 0


def test_verdicts_hold_fail_or_are_not_measured():
    holds = verdicts(claims_table([("sliding_window", 16), ("streaming_llm", 16)]),
                     {"sliding_window@16": losses(1.0), "streaming_llm@16": losses(0.0, 0.01, 1)})
    assert holds.verdict.tolist() == ["holds", "not measured"]
    fails = verdicts(claims_table([("random", 16), ("snapkv", 16), ("lru", 16)]),
                     {"random@16": losses(0.0), "snapkv@16": losses(0.5, 0.01, 1), "lru@16": losses(0.6)})
    assert fails.verdict.tolist() == ["not measured", "does not hold"]
    assert "run streaming_llm and sliding_window" in fails.evidence[0]


def test_budgets_that_evict_nothing_are_not_compared():
    table = claims_table([("sliding_window", 100), ("streaming_llm", 100)])
    assert verdicts(table, {}).verdict[0] == "not measured"


def reference(attn: torch.Tensor, key_norms: torch.Tensor | None = None,
              thresholds: AttentionPatterns | None = None) -> Reference:
    """A reference of attention maps ``[L, Hq, T, T]`` only (what the model claims read)."""
    thresholds = thresholds or AttentionPatterns(min_distance=16)
    L, H, T, _ = attn.shape
    return Reference(ids=torch.zeros(1, T + 1, dtype=torch.long), nll=torch.zeros(T), attn=attn,
                     outputs=torch.zeros(L, T, 4), num_kv_heads=H, kv_bytes=0, seconds=0.0,
                     patterns=detect_patterns(attn.mean(dim=1), thresholds), key_norms=key_norms,
                     thresholds=thresholds)


def causal(weights: torch.Tensor) -> torch.Tensor:
    """Causal attention ``[T, T]`` in which every query spreads its mass by ``weights`` over the keys it sees."""
    T = len(weights)
    attn = torch.tril(torch.ones(T, T)) * weights[None, :]
    return attn / attn.sum(-1, keepdim=True)


def test_the_sink_claim_says_when_a_model_cannot_show_it():
    T = 64
    flat = reference(causal(torch.ones(T))[None, None])
    row = sink_claim(flat)
    assert row["verdict"] == CANNOT_SHOW
    assert "token 0: 1.00x" in row["evidence"]
    assert "SmolLM2-135M" in row["evidence"]
    sink = torch.ones(T)
    sink[0] = 40.0  # every query gives the first token a large share
    assert sink_claim(reference(causal(sink)[None, None]))["verdict"] == "holds"


def test_knorms_premise_is_measured_not_assumed():
    T = 160  # 10 blocks of 16 keys: enough units to call a side
    norms = torch.linspace(1.0, 3.0, T)[torch.randperm(T, generator=torch.Generator().manual_seed(0))]
    low_norm_favoured = causal(1.0 / norms ** 4)[None, None]  # low-norm keys get more attention: the premise
    high_norm_favoured = causal(norms ** 4)[None, None]
    holds = knorm_claim(reference(low_norm_favoured, norms[None, None]))
    assert holds["verdict"] == "holds"
    assert "rank correlation of key norm with attention received -" in \
        holds["evidence"]
    fails = knorm_claim(reference(high_norm_favoured, norms[None, None]))
    assert fails["verdict"] == "does not hold"
    assert "LESS attention" in fails["evidence"]


def test_the_step_view_shows_what_each_policy_let_each_query_read(tiny):
    ids = torch.randint(0, 96, (1, 50), generator=torch.Generator().manual_seed(1))
    results = evaluate(tiny, ids, small(policies=("sliding_window", "h2o"), budgets=(8,), max_tokens=50))
    view = eviction_steps(results, 8, [5, 30, 48])
    assert list(view.held) == ["sliding_window", "h2o"]
    assert view.steps["query"].tolist() == [5, 30, 48]
    for row, q in enumerate([5, 30, 48]):
        assert np.isnan(view.attention[row, q + 1:]).all()
        assert np.nansum(view.attention[row]) == pytest.approx(1.0, abs=1e-3)  # one query's attention
        for name, held in view.held.items():
            assert held[row, :q + 1] == pytest.approx(results.visible[f"{name}@8"][q, :q + 1] / 255.0)
    window = view.held["sliding_window"][2]
    assert (window[:40] == 0).all()
    assert (window[41:49] == 1).all()
    with pytest.raises(ValueError, match="budget"):
        eviction_steps(results, 99, [5])


def test_the_step_view_checks_its_queries_names_its_columns_and_leaves_out_the_full_cache(tiny):
    from dataclasses import replace

    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(2))
    results = evaluate(tiny, ids, small(policies=("sliding_window", "full"), budgets=(8,), max_tokens=24))
    n = results.attention.shape[-1]
    assert "full@8" in results.visible or "full@23" in results.visible
    view = eviction_steps(results, 8, [0, n - 1])  # both ends are queries
    assert list(view.held) == ["sliding_window"]  # the full cache is the reference, not a row
    assert list(view.steps.columns[:3]) == ["step", "query", "query_token"]
    assert view.steps["query_token"].tolist() == [str(t) for t in results.tokens["token_id"].iloc[[0, n - 1]]]
    named = replace(results, tokens=results.tokens.assign(token=[f"<{i}>" for i in range(len(results.tokens))]))
    assert eviction_steps(named, 8, [3]).steps["query_token"].tolist() == ["<3>"]
    for bad in ([], [-1], [n], [0, n]):
        with pytest.raises(ValueError, match=rf"query positions must lie in 0\.\.{n - 1}, got \["):
            eviction_steps(results, 8, bad)
    with pytest.raises(ValueError, match="carry no attention maps"):
        eviction_steps(replace(results, attention=None), 8, [1])


# ---- on the bundled model ------------------------------------------------------------------------------


@needs_bundled
def test_bundled_model_sweep_runs_in_seconds(bundled):
    model, tokenizer = bundled
    results = evaluate_text(model, tokenizer, sample_text(), small(max_tokens=96, budgets=(24,),
                                                                   policies=tuple(POLICIES)))
    table = results.table.set_index("policy")
    assert len(table) == len(POLICIES)
    assert table.loc["attention_window", "kv_bytes_held"] == table.loc["full", "kv_bytes_held"]
    assert table.loc["sliding_window", "kv_share"] == pytest.approx(24 / 95)
    sinks = results.tokens.loc[results.tokens["sink"], "position"]
    if (sinks < 4).all():  # StreamingLLM keeps the first 4 tokens in every layer and head
        assert table.loc["streaming_llm", "sinks_retained"] == table.loc["streaming_llm", "sinks_total"]
    assert results.tokens["token"].str.len().sum() > 0
    claims = results.verdicts.set_index("claim")["verdict"]
    assert len(claims) == 4
    assert set(claims) <= {"holds", "partly holds", "does not hold", "partly fails", "mixed", "within noise",
                           CANNOT_SHOW, "not measured"}
    assert claims[claims.index.str.startswith("StreamingLLM: the first tokens")].iloc[0] == CANNOT_SHOW


@needs_bundled
def test_the_bundled_model_has_no_sink_and_contradicts_knorms_premise(bundled):
    """The defects: the page tested StreamingLLM's sink claim on a model without sinks, and Knorm collapsed in
    decode mode (perplexity 1,004 vs 225 for random at budget 32) with nothing saying why."""
    from kvcore.eviction.reference import reference_pass
    from kvcore.models.runtime import text_ids

    model, tokenizer = bundled
    ref = reference_pass(model, text_ids(model, tokenizer, sample_text(), 256))
    sinks = sink_claim(ref)
    assert sinks["verdict"] == CANNOT_SHOW
    assert not ref.patterns.loc[ref.patterns["position"] < 4, "sink"].any()
    knorm = knorm_claim(ref)
    assert knorm["verdict"] == "does not hold"  # low-norm keys get less attention on this model
    assert "rank correlation of key norm with attention received +" in knorm["evidence"]


@needs_bundled
def test_bundled_model_rerotated_positions(bundled):
    model, tokenizer = bundled
    table = evaluate_text(model, tokenizer, sample_text(), small(max_tokens=64, budgets=(16,), positions="rerotate",
                                                                 policies=("streaming_llm",))).table
    assert table["positions"].tolist() == ["rerotate", "rerotate"]


@needs_bundled
def test_cli_writes_the_sweep_as_csv(tmp_path, capsys):
    out = tmp_path / "eviction.csv"
    assert main(["eviction", "--policies", "sliding_window", "streaming_llm", "--budgets", "16", "--max-tokens", "48",
                 "--param", "streaming_llm.n_sink=2", "--csv", str(out)]) == 0
    table = pd.read_csv(out)
    assert table["policy"].tolist() == ["full", "sliding_window", "streaming_llm"]
    assert "streaming_llm(n_sink=2)" in table["label"].tolist()
    assert "StreamingLLM beats a sliding window" in capsys.readouterr().out


def test_cli_bad_values_are_messages_not_tracebacks(capsys):
    assert main(["eviction", "--budgets", "0", "--model", "/nonexistent/folder"]) == 2
    assert "budget" in capsys.readouterr().err


def test_page_refuses_a_sweep_over_its_token_limit():
    config = EvictionConfig(policies=tuple(p for p in POLICIES if p != "full"), budgets=(16, 32, 64), max_tokens=1024)
    with pytest.raises(ValueError, match="pick fewer policies"):
        config.check_cost()
    EvictionConfig(max_tokens=256).check_cost()  # the page's default sweep fits


def test_the_kvpress_budget_rule_truncates_like_kvpress():
    from kvcore.eviction import kvpress_budget

    assert resolve_budget(0.2, 100, "kvpress") == 19 == kvpress_budget(100, 0.8)  # 100 * (1 - 0.8) = 19.99...
    assert resolve_budget(0.2, 100) == 20
    assert resolve_budget(0.25, 31, "kvpress") == 7
    with pytest.raises(ValueError, match="budget rule"):
        resolve_budget(0.5, 10, "floor")


def test_the_kvpress_preset_gives_each_press_its_options():
    from kvcore.eviction import kvpress_compatible, kvpress_hyperparameters

    preset = kvpress_hyperparameters(["snapkv", "tova", "h2o"])
    assert preset == {"snapkv": {"window": 64, "kernel_size": 5, "pooling": "avg", "window_ties": "topk"},
                      "tova": {"per_head": False, "keep_last": True}}  # h2o has no press of its name
    config = EvictionConfig(("snapkv", "tova"), (0.2,), preset, mode="prefill", max_tokens=64, budget_rule="kvpress")
    runs = config.runs()
    assert [r.budget_rule for r in runs] == ["kvpress"] * 3
    assert runs[1].make_policy() == kvpress_compatible("snapkv")
    assert runs[2].make_policy().label() == "tova(per_head=False, keep_last=True)"
