"""Needle in a haystack: the prompt puts the needle where it says, the shared prefill compresses exactly as each
method's own plan does, the intervals are Wilson's, and on SmolLM2 the full cache retrieves while a window that
cannot hold the needle does not (through the core, the CLI and the study's column)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from kvcore.cli import build_parser, main
from kvcore.eviction import H2O, TOVA, FullCache, RandomEviction, SlidingWindow, SnapKV, StreamingLLM
from kvcore.eviction.evaluate import sample_text
from kvcore.eviction.hook import eviction_plan
from kvcore.eviction.reference import reference_pass
from kvcore.eviction.runner import run_policy
from kvcore.models.loader import bundled_text, load_model
from kvcore.models.plan import FULL, run_step
from kvcore.models.runtime import text_ids
from kvcore.needle import NEEDLES, NeedleConfig, build_prompt, draw_needles, prompt_template, run_needle
from kvcore.needle.answer import _step, greedy_answers
from kvcore.needle.compress import choose, kept_share, padded_cache, quantized_cache
from kvcore.needle.lesson import FINE_LOST, WORSE_KEPT, agreement, join_perplexity
from kvcore.needle.methods import method_named
from kvcore.needle.perplexity import prefill_perplexity
from kvcore.needle.prompt import SNAP_TOKENS, corpus_ids
from kvcore.needle.run import read_prefill
from kvcore.needle.tables import LOSES, summary_table, wilson_interval
from kvcore.quant.hf_cache import quantized_plan
from kvcore.quant.methods import METHODS
from kvcore.study.grid import grid_cells, read_grid
from kvcore.study.methods import MethodSettings, build_method
from kvcore.study.study import StudySettings, needle_probe, run_study
from kvcore.study.sweep import sweep

pytestmark = pytest.mark.usefixtures("one_thread")  # one-token steps: threads only thrash on a shared CPU


@pytest.fixture(scope="module")
def bundled():
    return load_model(None)


def _prompt(tokenizer, length=200, depth=0.5, question="compressed", index=0):
    corpus = corpus_ids(tokenizer, bundled_text("validation"))
    draw = draw_needles(index + 1, seed=3)[index]
    return build_prompt(tokenizer, prompt_template(tokenizer), corpus, draw, length, depth, question)


# --- the needles and the prompt ---------------------------------------------------------------------------------

def test_draws_are_seeded_five_digit_values_cycling_through_every_needle():
    draws = draw_needles(len(NEEDLES) * 2, seed=7)
    assert draws == draw_needles(len(NEEDLES) * 2, seed=7)
    assert draws[:3] == draw_needles(3, seed=7)  # a draw does not depend on how many are drawn
    assert [d.value for d in draws] != [d.value for d in draw_needles(len(NEEDLES) * 2, seed=8)]
    assert all(len(d.value) == 5 and d.value.isdigit() for d in draws)
    first, second = [d.needle for d in draws[:len(NEEDLES)]], [d.needle for d in draws[len(NEEDLES):]]
    assert sorted(n.name for n in first) == sorted(n.name for n in NEEDLES)
    assert first == second
    assert all(d.value in d.fact and d.fact.startswith(d.needle.answer_prefix) for d in draws)
    with pytest.raises(ValueError, match="integer >= 1"):
        draw_needles(0)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_the_needle_sits_at_its_depth_after_a_sentence_or_line_end(bundled, depth):
    _, tokenizer = bundled
    prompt = _prompt(tokenizer, 300, depth)
    start, stop = prompt.span
    ids = prompt.context[0].tolist()
    assert tokenizer.decode(ids[start:stop]) == "\n" + prompt.draw.fact + "\n"
    assert tokenizer.decode(ids[slice(*prompt.value_span)]) == " " + prompt.value
    assert start < prompt.value_span[0] < prompt.value_span[1] < stop
    head = len(prompt_template(tokenizer).head)
    assert prompt.needle_at == start - head
    filler = prompt.length - (stop - start)
    assert round(depth * filler) - SNAP_TOKENS <= prompt.needle_at <= round(depth * filler)
    if prompt.needle_at:
        assert tokenizer.decode(ids[start - 1:start]).endswith((".", "\n"))
    haystack_end = len(ids) - len(tokenizer(prompt_template(tokenizer).before_question + prompt.draw.needle.question,
                                            add_special_tokens=False)["input_ids"])
    assert haystack_end - head == prompt.length  # the haystack holds exactly `length` tokens, needle included


def test_the_question_is_compressed_or_fed_after_and_the_prompt_is_the_same(smollm2):
    _, tokenizer = smollm2
    inside, after = _prompt(tokenizer, question="compressed"), _prompt(tokenizer, question="after")
    assert torch.equal(torch.cat([inside.context, inside.tail], 1), torch.cat([after.context, after.tail], 1))
    assert after.context.shape[1] < inside.context.shape[1]
    question = inside.draw.needle.question
    assert tokenizer.decode(inside.context[0]).endswith(question)
    assert tokenizer.decode(after.tail[0]).lstrip().startswith(question)
    text = tokenizer.decode(torch.cat([inside.context, inside.tail], 1)[0])
    assert text.startswith("<|im_start|>system")  # SmolLM2-Instruct's chat template
    assert text.endswith("<|im_start|>assistant\n" + inside.draw.needle.answer_prefix)


def test_a_model_without_a_chat_template_gets_plain_question_and_answer(bundled):
    _, tokenizer = bundled
    prompt = _prompt(tokenizer, 120)
    assert not prompt_template(tokenizer).chat
    assert tokenizer.decode(prompt.tail[0]) == "\nAnswer: " + prompt.draw.needle.answer_prefix
    assert "\n\nQuestion: " + prompt.draw.needle.question in tokenizer.decode(prompt.context[0])


def test_a_haystack_too_short_for_its_needle_is_refused(bundled):
    with pytest.raises(ValueError, match="cannot hold"):
        _prompt(bundled[1], 8)


# --- settings and intervals ---------------------------------------------------------------------------------------

def test_config_puts_the_full_cache_first_and_names_what_is_wrong():
    config = NeedleConfig(methods=("sliding_window", "kivi-2", "kvpress:snapkv"), budgets=(1, 1.0))
    assert config.methods == ("full", "evict:sliding_window", "quant:kivi-2", "kvpress:snapkv")
    assert config.budgets == (1, 1.0)  # one token and everything are two budgets
    for bad, match in [({"methods": ("nope",)}, "unknown method 'nope'"), ({"budgets": (0,)}, ">= 1 token"),
                       ({"budgets": ()}, "at least one budget"), ({"depths": (1.5,)}, r"\[0, 1\]"),
                       ({"lengths": (8,)}, "32..32,768"), ({"needles": 0}, "1..64"), ({"mode": "x"}, "prefill"),
                       ({"question": "x"}, "compressed")]:
        with pytest.raises(ValueError, match=match):
            NeedleConfig(**bad)


def test_wilson_interval_matches_hand_computed_values():
    both = wilson_interval(2, 2)  # centre (1 + z^2/4) / (1 + z^2/2), half z sqrt(z^2/16) / (1 + z^2/2)
    z = 1.959963984540054
    assert both.estimate == 1.0
    assert both.high == 1.0
    assert both.low == pytest.approx((1 + z * z / 4 - z * z / 4) / (1 + z * z / 2))
    assert both.low == pytest.approx(0.3424, abs=1e-4)
    three = wilson_interval(3, 10)
    assert (three.low, three.high) == (pytest.approx(0.1078, abs=1e-4), pytest.approx(0.6032, abs=1e-4))
    assert wilson_interval(0, 5).low == 0.0
    assert wilson_interval(0, 5).high == pytest.approx(0.4345, abs=1e-4)
    with pytest.raises(ValueError, match="successes <= trials"):
        wilson_interval(3, 2)


def test_summary_calls_a_loss_only_beyond_the_noise():
    def runs(found_full, found):
        rows = [{"method": m, "budget": b, "label": m, "length": 64, "depth": 0.5, "needle": i, "retrieved": f,
                 "retrieved_full": ff, "kept_tokens": 8, "needle_kept": 0.0, "value_kept": 0.0, "kv_bytes": 1,
                 "kv_bytes_full": 4}
                for m, b, col in (("full", None, found_full), ("evict:x", 8, found))
                for i, (f, ff) in enumerate(zip(col, found_full, strict=True))]
        frame = pd.DataFrame(rows)
        frame["budget"] = pd.Series([r["budget"] for r in rows], dtype=object)
        return summary_table(frame).set_index("method")
    lost = runs([True] * 10, [False] * 10)
    assert lost.loc["evict:x", "verdict"] == LOSES
    assert lost.loc["full", "verdict"] == "baseline"
    assert lost.loc["evict:x", "vs_full"] == -1.0
    assert lost.loc["evict:x", "kv_share"] == 0.25
    assert runs([True] * 4, [False] * 4).loc["evict:x", "verdict"] == "within noise"  # 4 haystacks: too few
    assert runs([True] * 10, [True] * 9 + [False]).loc["evict:x", "verdict"] == "within noise"


def test_agreement_names_the_disagreements_each_beyond_its_noise():
    def row(ppl_low, ppl_high, verdict, haystacks=12):
        return pd.Series({"method": "evict:x", "ppl_vs_full": (ppl_low + ppl_high) / 2, "ppl_vs_full_low": ppl_low,
                          "ppl_vs_full_high": ppl_high, "verdict": verdict, "haystacks": haystacks})
    assert agreement(row(0.99, 1.05, LOSES)) == FINE_LOST
    assert agreement(row(1.3, 1.6, "within noise")) == WORSE_KEPT
    assert agreement(row(1.3, 1.6, LOSES)) == "both worse"
    assert agreement(row(0.99, 1.05, "within noise")) == "both fine"
    assert "band" in agreement(row(1.05, 1.2, LOSES))  # the interval straddles the tolerance: no call
    assert agreement(row(1.3, 1.6, "within noise", haystacks=3)).startswith("too few haystacks")


# --- one prefill, every method: the same as each method's own plan ---------------------------------------------------

POLICIES = [SnapKV(), H2O(), StreamingLLM(), TOVA(), SlidingWindow(), RandomEviction(seed=4), method_named(
    "kvpress:snapkv").policy()]


def test_shared_prefill_keeps_what_each_policys_own_plan_keeps(bundled):
    model, tokenizer = bundled
    prompt = _prompt(tokenizer, 160, 0.3)
    prefill, _ = read_prefill(model, prompt.context, True)
    k = 40
    kept = choose(prefill, POLICIES, [k] * len(POLICIES))
    for policy, choice in zip(POLICIES, kept, strict=True):
        plan = eviction_plan(policy, k)
        cache = plan.new_cache(model)
        with torch.inference_mode():
            run_step(model, cache, prompt.context, plan)  # the plan's hook evicts the prompt to k once
        for layer, state in enumerate(plan.hook.states):
            assert torch.equal(choice[layer], state.positions), (policy.label(), layer)
        assert kept_share(choice, prompt.span) == kept_share([s.positions for s in plan.hook.states], prompt.span)


def _alone(model, prefill, choice):
    """The reference: one row holding exactly the kept tokens (nothing padded, no mask)."""
    cache = FULL.new_cache(model)
    for layer, (keys, values) in enumerate(zip(prefill.keys, prefill.values, strict=True)):
        cache.update(keys, values, layer)
        cache.keep(layer, choice[layer])
    return cache


def test_padded_rows_answer_as_each_method_alone(bundled):
    model, tokenizer = bundled
    prompt = _prompt(tokenizer, 160, 0.7)
    prefill, _ = read_prefill(model, prompt.context, True)
    kept = choose(prefill, POLICIES[:3], [40, 25, 60])
    rows = [None, *kept]  # the full cache and three budgets in one batch
    with torch.inference_mode():
        cache, readable = padded_cache(model, prefill, rows)
        assert readable.sum(dim=1).tolist() == [prefill.num_tokens, 40, 25, 60]
        together, readable = _step(model, cache, prompt.tail.expand(4, -1), FULL, readable)
        picked = together.argmax(dim=-1)
        after, _ = _step(model, cache, picked[:, None], FULL, readable)  # the mask grows with every token fed
        for row, choice in enumerate(rows):
            alone = FULL.new_cache(model) if choice is None else _alone(model, prefill, choice)
            if choice is None:
                run_step(model, alone, prompt.context)
            first = run_step(model, alone, prompt.tail)[0, -1]
            assert torch.allclose(together[row], first, atol=1e-4), row
            second = run_step(model, alone, picked[row].view(1, 1))[0, -1]
            assert torch.allclose(after[row], second, atol=1e-4), row
        values = [prompt.value] * 4
        cache, readable = padded_cache(model, prefill, rows)
        batched = greedy_answers(model, tokenizer, cache, prompt.tail, values, 6, readable=readable)
        for row, choice in enumerate(rows[1:], start=1):
            assert batched[row] == greedy_answers(model, tokenizer, _alone(model, prefill, choice), prompt.tail,
                                                  values[:1], 6)[0]


def test_quantized_rows_store_the_prompt_as_each_methods_own_plan(bundled):
    model, tokenizer = bundled
    prompt = _prompt(tokenizer, 160, 0.7)
    prefill, _ = read_prefill(model, prompt.context, False)
    methods = [METHODS["kivi-2"], METHODS["int4-token"]]
    with torch.inference_mode():
        quantized, held = quantized_cache(model, prefill, methods)
        together = run_step(model, quantized, prompt.tail.expand(2, -1))[:, -1]
        for row, method in enumerate(methods):
            plan = quantized_plan(method)
            own = plan.new_cache(model)
            run_step(model, own, prompt.context, plan)  # the plan reads the context itself
            assert own.nbytes == held[row]
            assert torch.allclose(together[row], run_step(model, own, prompt.tail, plan)[0, -1], atol=1e-4)


# --- SmolLM2: the full cache retrieves, a window that cannot hold the needle does not --------------------------------

def test_smollm2_full_cache_retrieves_and_a_short_window_loses_the_needle(smollm2):
    model, tokenizer = smollm2
    config = NeedleConfig(methods=("sliding_window",), budgets=(32,), lengths=(256,), depths=(0.1, 0.9), needles=1)
    results = run_needle(model, tokenizer, config)
    runs = results.runs.set_index("method")
    assert runs.loc["full", "retrieved"].all(), runs.loc["full", "answer"].tolist()
    assert all(value in answer for value, answer in zip(runs.loc["full", "value"], runs.loc["full", "answer"],
                                                         strict=True))
    window = runs.loc["evict:sliding_window"]
    assert not window["retrieved"].any(), window["answer"].tolist()
    assert (window["needle_kept"] == 0).all()
    assert (window["value_kept"] == 0).all()
    assert (runs.loc["full", "needle_kept"] == 1).all()
    assert (window["kv_bytes"] * window["context_tokens"] == window["kv_bytes_full"] * 32).all()  # 32 of T, exactly
    cells = results.table
    assert len(cells) == 4
    assert {"method", "budget", "length", "depth", "retrieved", "retrieved_low", "retrieved_high",
                                "retrieved_full", "answer", "kv_bytes", "kv_share"} <= set(cells.columns)
    summary = results.summary.set_index("method")
    assert summary.loc["evict:sliding_window", "retrieved"] == 0
    assert summary.loc["full", "retrieved"] == 1
    assert summary.loc["evict:sliding_window", "verdict"] == "within noise"  # 2 haystacks cannot back a call


def test_cli_writes_one_row_per_method_budget_length_and_depth(tmp_path, capsys):
    out = tmp_path / "needle.csv"
    assert main(["needle", "--model", "bundled", "--methods", "sliding_window", "quant:int8-token", "--budgets", "16",
                 "0.5", "--lengths", "96", "--depths", "0", "1", "--needles", "2", "--csv", str(out)]) == 0
    table = pd.read_csv(out)
    assert len(table) == 2 * (1 + 2 + 1)  # depths x (full, window at two budgets, int8)
    assert table["method"].tolist()[:2] == ["full", "full"]
    assert set(table["budget"].dropna()) == {16, 0.5}
    assert table["retrieved"].between(0, 1).all()
    assert (table["retrieved_low"] <= table["retrieved"]).all()
    printed = capsys.readouterr().out
    assert "full cache (the baseline):" in printed
    assert "bundled 5.8M-parameter" in printed
    assert main(["needle", "--model", "bundled", "--methods", "bogus"]) == 2


def test_cli_summary_joins_the_eviction_sweeps_perplexity(tmp_path):
    out = tmp_path / "summary.csv"
    assert main(["needle", "--model", "bundled", "--methods", "sliding_window", "--budgets", "0.5", "--lengths", "64",
                 "--depths", "0.5", "--needles", "1", "--perplexity-tokens", "64", "--table", "summary",
                 "--csv", str(out)]) == 0
    summary = pd.read_csv(out).set_index("method")
    assert summary.loc["full", "ppl_vs_full"] == pytest.approx(1.0, abs=1e-6)
    assert summary.loc["full", "agreement"] == "baseline"
    window = summary.loc["evict:sliding_window"]
    assert window["ppl_vs_full_low"] <= window["ppl_vs_full"] <= window["ppl_vs_full_high"]
    assert window["ppl_tokens"] == 32  # prefill mode: the first 32 of 64 tokens compressed, the other 32 scored


def test_join_keys_each_budget_to_its_own_perplexity_row():
    summary = pd.DataFrame({"method": ["full", "evict:a", "evict:a"], "budget": pd.Series([None, 8, 0.5], dtype=object),
                            "verdict": ["baseline", LOSES, "within noise"], "haystacks": [12, 12, 12]})
    ppl = pd.DataFrame({"method": ["full", "evict:a", "evict:a"], "budget": pd.Series([None, 0.5, 8], dtype=object),
                        "ppl": [10.0, 11.0, 30.0], "ppl_low": [9.0, 10.0, 25.0], "ppl_high": [11.0, 12.0, 35.0],
                        "ppl_vs_full": [1.0, 1.1, 3.0], "ppl_vs_full_low": [1.0, 1.05, 2.5],
                        "ppl_vs_full_high": [1.0, 1.15, 3.5], "vs_full": ["baseline", "worse", "worse"],
                        "scored_tokens": [32, 32, 32]})
    joined = join_perplexity(summary, ppl).set_index(summary["budget"].map(repr))
    assert joined.loc["8", "ppl"] == 30.0
    assert joined.loc["0.5", "ppl"] == 11.0
    assert joined.loc["8", "agreement"] == "both worse"
    assert math.isnan(join_perplexity(summary.assign(method="quant:q"), ppl)["ppl"].iloc[0])


# --- the study's retrieval column ----------------------------------------------------------------------------------

def test_study_probe_finds_the_needle_with_the_full_cache_and_loses_it_in_a_short_window(smollm2):
    model, tokenizer = smollm2
    settings = StudySettings(model="smollm2-135m", needles=2, needle_tokens=160, method=MethodSettings(budget=16))
    full = needle_probe(build_method("full", model, settings.method), tokenizer, settings)
    window = needle_probe(build_method("sliding_window", model, settings.method), tokenizer, settings)
    assert [found for _, found in full] == [True, True], full
    assert [found for _, found in window] == [False, False], window


def test_study_summary_has_a_retrieval_column_with_its_interval(tmp_path):
    settings = StudySettings(methods=("full", "int8"), new_tokens=2, prompt_tokens=8, repeats=1, warmup_tokens=1,
                             ppl_tokens=16, needles=3, needle_tokens=64)
    result = run_study(settings, tmp_path)
    summary = result.tables["summary"].set_index("method")
    cells = pd.read_json(tmp_path / "cells" / "full.json", typ="series")
    found = list(cells["needle_found"])
    rate = wilson_interval(sum(found), len(found))
    assert summary.loc["full", "needles"] == 3
    assert (summary.loc["full", "retrieval"], summary.loc["full", "retrieval_low"],
            summary.loc["full", "retrieval_high"]) == (rate.estimate, rate.low, rate.high)
    assert summary.loc["int8", "retrieval_low"] <= summary.loc["int8", "retrieval"] <= summary.loc["int8",
                                                                                                    "retrieval_high"]


def test_a_needle_grid_runs_through_the_sweep(tmp_path):
    grid = tmp_path / "needle.toml"
    grid.write_text('experiment = "needle"\n[settings]\nmodel = "bundled"\nmethods = ["sliding_window"]\n'
                    'budgets = [16]\nlengths = [64]\ndepths = [0.5]\nneedles = 1\ntable = "summary"\n'
                    '[grid]\nquestion = ["compressed", "after"]\n')
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    done = sweep(grid_cells(read_grid(grid), sub.choices), engine="local", jobs=1)
    assert done.failed == 0
    assert done.table["cell"].tolist() == [0, 0, 1, 1]
    assert done.table["question"].tolist() == ["compressed", "compressed", "after", "after"]
    assert done.table["method"].tolist() == ["full", "evict:sliding_window"] * 2


def test_decode_mode_streams_the_context_through_a_cache_held_at_the_budget(bundled):
    model, tokenizer = bundled
    common = {"methods": ("sliding_window", "streaming_llm", "quant:int8-token"), "budgets": (40,), "lengths": (64,),
              "depths": (0.0, 1.0), "needles": 1, "question": "after"}
    decode = run_needle(model, tokenizer, NeedleConfig(mode="decode", **common)).runs.set_index(["method", "depth"])
    prefill = run_needle(model, tokenizer, NeedleConfig(mode="prefill", **common)).runs.set_index(["method", "depth"])
    for method in ("evict:sliding_window", "evict:streaming_llm"):  # recency policies keep the same tokens either way
        assert decode.loc[method, "needle_kept"].tolist() == prefill.loc[method, "needle_kept"].tolist()
        assert decode.loc[method, "kv_bytes"].tolist() == prefill.loc[method, "kv_bytes"].tolist()
    assert decode.loc[("evict:sliding_window", 0.0), "needle_kept"] == 0.0  # a needle at the start leaves the window
    assert decode.loc[("evict:sliding_window", 1.0), "needle_kept"] > 0.0
    assert decode.loc[("quant:int8-token", 0.0), "kv_bytes"] < decode.loc[("full", 0.0), "kv_bytes"]
    assert decode.loc[("full", 0.0), "answer"] == prefill.loc[("full", 0.0), "answer"]  # the same full cache


def test_prefill_perplexity_is_what_the_eviction_runner_measures(bundled):
    model, tokenizer = bundled
    config = NeedleConfig(methods=("snapkv", "h2o", "streaming_llm", "kvpress:snapkv", "quant:int8-token"),
                          budgets=(0.25, 12))
    ids = text_ids(model, tokenizer, sample_text(), 96)
    table = prefill_perplexity(model, ids, config)
    ref = reference_pass(model, ids)
    assert len(table) == 1 + 4 * 2 + 1
    for row in table.itertuples():
        method = method_named(row.method)
        if method.kind == "quant":
            assert row.ppl > 0
            continue
        run = run_policy(model, ref, method.policy() or FullCache(), 1.0 if row.budget is None else row.budget,
                         mode="prefill", budget_rule="kvpress" if method.kind == "kvpress" else "round")
        assert row.scored_tokens == len(run.nll) == 48  # 95 tokens fed: the first 47 compressed, 48 scored
        assert row.ppl == pytest.approx(math.exp(float(run.nll.double().mean())), rel=1e-4), (row.method, row.budget)
