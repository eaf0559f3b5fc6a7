"""The eviction evaluation: a sweep on a real model, its tables, the literature's claims and the CLI.

The bundled model runs inside the suite on a short text (seconds); the verdict logic is checked on
hand-written tables so that it is computed from numbers, never assumed.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvcore.cli import main
from kvcore.eviction import DEFAULT_POLICIES, POLICIES, resolve_budget
from kvcore.eviction.cli import MODES, POSITIONS, coerce_hyperparameter, parse_hyperparameters
from kvcore.eviction.evaluate import EvictionConfig, evaluate, evaluate_text, sample_text, verdicts
from kvcore.eviction.runner import MODES as RUNNER_MODES
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
    assert full.mass_retained == 1.0
    assert full.kv_bytes_held == full.kv_bytes_full
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
    pd.testing.assert_frame_equal(a.drop(columns="tokens_per_s"), b.drop(columns="tokens_per_s"))


def test_ratio_budgets_resolve_against_the_tokens(tiny):
    ids = torch.randint(0, 96, (1, 41), generator=torch.Generator().manual_seed(0))
    table = evaluate(tiny, ids, small(policies=("sliding_window",), budgets=(0.25,), max_tokens=41)).table
    assert table["budget_tokens"].tolist() == [40, 10]


def test_prefill_mode_scores_the_continuation(tiny):
    ids = torch.randint(0, 96, (1, 41), generator=torch.Generator().manual_seed(0))
    table = evaluate(tiny, ids, small(mode="prefill", budgets=(0.5,), max_tokens=41)).table
    assert (table["scored_tokens"] == 20).all()
    assert (table.loc[table["policy"] != "full", "budget_tokens"] == 10).all()


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


# ---- the claims are computed from the numbers ------------------------------------------------------------


def claims_table(rows: list[tuple[str, int, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"policy": p, "budget_tokens": b, "budget_share": b / 100, "ppl": v} for p, b, v in rows])


def test_verdicts_follow_the_measured_perplexities():
    table = claims_table([
        ("full", 100, 10.0), ("sliding_window", 16, 40.0), ("streaming_llm", 16, 12.0),
        ("sliding_window", 32, 30.0), ("streaming_llm", 32, 31.0),
        ("random", 16, 20.0), ("h2o", 16, 15.0), ("tova", 16, 25.0),
    ])
    stream, attention = verdicts(table).itertuples()
    assert (stream.verdict, stream.held, stream.compared) == ("partly holds", 1, 2)
    assert "streaming_llm vs sliding_window @ 16 tokens: 12.000 vs 40.000" in stream.evidence
    assert (attention.verdict, attention.held, attention.compared) == ("partly holds", 1, 2)


def test_verdicts_hold_fail_or_are_not_measured():
    holds = verdicts(claims_table([("sliding_window", 16, 40.0), ("streaming_llm", 16, 12.0)]))
    assert holds.verdict.tolist() == ["holds", "not measured"]
    fails = verdicts(claims_table([("random", 16, 10.0), ("snapkv", 16, 11.0), ("lru", 16, 12.0)]))
    assert fails.verdict.tolist() == ["not measured", "does not hold"]
    assert "run streaming_llm and sliding_window" in fails.evidence[0]


def test_budgets_that_evict_nothing_are_not_compared():
    table = claims_table([("sliding_window", 100, 10.0), ("streaming_llm", 100, 10.0)])
    assert verdicts(table).verdict[0] == "not measured"


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
    assert set(results.verdicts["verdict"]) <= {"holds", "partly holds", "does not hold"}


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
