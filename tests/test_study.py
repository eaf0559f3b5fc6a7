"""python -m kvcore study: every method on the bundled model, one results folder, an offline report, --resume.

The study here is tiny (8 prompt tokens, 6 new tokens, 40 scored tokens, a budget of 8) so it runs in seconds;
its numbers are checked against hand counts (KV bytes) and against an independent full-context perplexity.
"""

from __future__ import annotations

import json
import math
import re
from importlib import metadata

import numpy as np
import pandas as pd
import pytest

from kvcore.cli import main
from kvcore.models.loader import bundled_text, load_model
from kvcore.models.perplexity import token_nll
from kvcore.study import study as study_module
from kvcore.study.methods import METHODS, MethodSettings, gqa_default
from kvcore.study.names import TABLES
from kvcore.study.results import settings_difference
from kvcore.study.study import StudySettings, summary_table

TINY = ["--new-tokens", "6", "--prompt-tokens", "8", "--repeats", "2", "--warmup-tokens", "2", "--ppl-tokens", "40",
        "--budget", "8", "--no-progress"]
# the bundled model: 6 layers, 8 KV heads of 32 dims, float32 K and V
BYTES_PER_TOKEN = 6 * 2 * 8 * 32 * 4


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study") / "run"
    assert main(["study", *TINY, "--out", str(folder)]) == 0
    return folder, pd.read_csv(folder / "summary.csv").set_index("method")


def test_the_folder_holds_every_table_as_csv_and_json_the_settings_and_the_versions(study):
    folder, summary = study
    for table in TABLES:
        assert (folder / f"{table}.csv").is_file()
        records = json.loads((folder / f"{table}.json").read_text())
        assert len(records) == len(pd.read_csv(folder / f"{table}.csv"))
    record = json.loads((folder / "settings.json").read_text())
    assert record["settings"]["new_tokens"] == 6
    assert record["settings"]["method_budget"] == 8
    assert record["versions"]["torch"] == metadata.version("torch")
    assert {"python", "transformers", "commit", "device"} <= set(record["versions"])
    assert sorted(p.stem for p in (folder / "cells").glob("*.json")) == sorted(METHODS)
    assert list(summary.index) == list(METHODS)
    assert "error" not in summary.columns


def test_kv_bytes_are_the_hand_counted_ones(study):
    _, s = study
    held = 8 + 6 - 1  # the prompt and every generated token but the last, which is never fed back
    assert s.loc["full", "kv_tokens"] == held
    assert s.loc["full", "kv_bytes"] == held * BYTES_PER_TOKEN
    for name in ("streaming_llm", "sliding_window", "h2o"):  # evicted down to the budget of 8 entries
        assert s.loc[name, "kv_tokens"] == 8
        assert s.loc[name, "kv_bytes"] == 8 * BYTES_PER_TOKEN
    assert s.loc["gqa", "kv_bytes"] == held * BYTES_PER_TOKEN * 2 // 8  # 8 -> 2 KV heads
    assert s.loc["int4", "kv_bytes"] < s.loc["int8", "kv_bytes"] < s.loc["full", "kv_bytes"] / 3
    # MiniCache merges layers 3 and 4: one direction for both plus two magnitudes per token and head
    merged = held * 2 * 8 * (32 + 2) * 4
    assert s.loc["minicache", "kv_bytes"] == held * BYTES_PER_TOKEN * 4 // 6 + merged
    assert s.loc["full", "kv_vs_full"] == 1.0


def test_the_full_cache_perplexity_equals_the_full_context_one(study):
    _, s = study
    model, tokenizer = load_model(None)
    ids = tokenizer(bundled_text(), return_tensors="pt")["input_ids"][0][:41]
    reference = math.exp(float(token_nll(model, ids).double().mean()))
    assert s.loc["full", "perplexity"] == pytest.approx(reference, rel=1e-4)
    assert (s["ppl_low"] <= s["perplexity"]).all()
    assert (s["perplexity"] <= s["ppl_high"]).all()
    assert s.loc["full", ["ppl_vs_full", "ppl_vs_full_low", "ppl_vs_full_high"]].tolist() == [1.0, 1.0, 1.0]
    # eviction down to 8 entries changes what the model sees on a 40-token text; int8 barely does
    assert s.loc["sliding_window", "perplexity"] != pytest.approx(s.loc["full", "perplexity"], rel=1e-3)
    assert s.loc["int8", "perplexity"] == pytest.approx(s.loc["full", "perplexity"], rel=1e-2)


def test_agreement_and_timings(study):
    _, s = study
    assert s.loc["full", "agreement"] == 1.0
    assert pd.isna(s.loc["full", "first_divergence"])
    assert ((s["agreement"] >= 0) & (s["agreement"] <= 1)).all()
    assert (s["ms_q1"] <= s["ms_per_token"]).all()
    assert (s["ms_per_token"] <= s["ms_q3"]).all()
    assert (s["repeats"] == 2).all()
    assert (s["ms_per_token"] > 0).all()
    assert (s["peak_memory_bytes"] >= 0).all()


def test_the_report_is_one_offline_file_with_every_figure(study):
    folder, _ = study
    page = (folder / "report.html").read_text()
    assert "plotly.js v" in page  # the bundle is inlined...
    assert re.search(r"<(script|link)[^>]*(src|href)=", page) is None  # nothing is fetched
    assert page.count('class="fig"') == 8
    for name in METHODS:
        assert f"<summary>{name}</summary>" in page


def test_resume_runs_only_what_the_folder_lacks(study, monkeypatch):
    folder, summary = study
    ran = []
    real = study_module.run_method

    def spy(name, *args, **kwargs):
        ran.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(study_module, "run_method", spy)
    assert main(["study", *TINY, "--out", str(folder), "--resume", "--no-report"]) == 0
    assert ran == []
    pd.testing.assert_frame_equal(pd.read_csv(folder / "summary.csv").set_index("method"), summary)
    (folder / "cells" / "gqa.json").unlink()
    assert main(["study", *TINY, "--out", str(folder), "--resume", "--no-report", "--methods", "gqa"]) == 0
    assert ran == ["gqa"]


def test_resume_refuses_a_folder_made_with_other_settings(study, capsys):
    folder, _ = study
    assert main(["study", *TINY, "--new-tokens", "7", "--out", str(folder), "--resume"]) == 2
    assert "new_tokens" in capsys.readouterr().err


def test_summary_of_hand_made_records_counts_agreement_from_the_first_difference():
    def record(name, tokens, nll, kv):
        return {"method": name, "family": "x", "label": name, "tokens": tokens, "decode_ms": [1.0, 2.0, 3.0],
                "prefill_ms": [5.0], "peak_bytes": 10, "kv_bytes": kv, "kv_tokens": 4, "nll_sums": nll,
                "nll_counts": [16.0] * len(nll)}

    full = record("full", [1, 2, 3, 4], [16.0, 32.0], 400)
    other = record("int4", [1, 2, 9, 4], [32.0, 48.0], 100)
    s = summary_table([full, other, {"method": "gqa", "family": "heads", "label": "gqa", "error": "no"}])
    row = s.set_index("method").loc["int4"]
    assert row["agreement"] == 0.75
    assert row["first_divergence"] == 2
    assert row["kv_vs_full"] == 0.25
    assert row["ms_per_token"] == 2.0
    assert row["perplexity"] == pytest.approx(math.exp(80 / 32))
    assert row["ppl_vs_full"] == pytest.approx(math.exp(1.0))  # the mean NLL is one nat higher on every block
    assert s.set_index("method").loc["gqa", "error"] == "no"


@pytest.mark.parametrize(("heads", "groups"), [(8, 2), (32, 8), (12, 3), (6, 1), (1, 1), (4, 1), (16, 4)])
def test_gqa_keeps_a_quarter_of_the_heads_rounded_down_to_a_divisor(heads, groups):
    assert gqa_default(heads) == groups
    assert heads % gqa_default(heads) == 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dtype": "int8"}, "dtype"),
    ({"methods": ("full", "magic")}, "magic"),
    ({"new_tokens": 1}, "new_tokens"),
    ({"repeats": 0}, "repeats"),
    ({"max_weight_gb": 0}, "max_weight_gb"),
])
def test_bad_settings_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StudySettings(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"budget": 0}, "budget"),
    ({"positions": "compact"}, "positions"),
    ({"minicache_t": 1.5}, "minicache_t"),
    ({"minicache_start": -1}, "minicache_start"),
    ({"gqa_groups": 0}, "gqa_groups"),
])
def test_bad_method_settings_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MethodSettings(**kwargs)


def test_full_is_always_the_first_method_and_settings_differences_are_named():
    assert StudySettings(methods=("h2o",)).methods == ("full", "h2o")
    a, b = StudySettings(), StudySettings(new_tokens=8)
    assert settings_difference(a.record(), b.record()) == ["new_tokens"]
    assert a.folder_name() == StudySettings(methods=("int4",)).folder_name() != b.folder_name()


def test_half_precision_weights_run_a_method(tmp_path):
    out = tmp_path / "bf16"
    assert main(["study", *TINY, "--dtype", "bfloat16", "--methods", "full", "int8", "--out", str(out),
                 "--no-report"]) == 0
    s = pd.read_csv(out / "summary.csv").set_index("method")
    assert s.loc["full", "kv_bytes"] == (8 + 6 - 1) * BYTES_PER_TOKEN // 2  # bfloat16 K and V: 2 bytes each
    assert np.isfinite(s["perplexity"]).all()
