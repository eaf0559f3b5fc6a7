"""kvcore.sharing: MHA/GQA/MQA bytes, MHA->GQA mean pooling, cross-layer sharing, tiny from-scratch training.

Small random Llama-family models (built here in milliseconds) stand in for trained ones wherever the
claim is about structure (exact reproduction, group means, bytes); the bundled tokenizer and text
feed the data-dependent checks.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pandas as pd
import pytest
import torch

from kvcore.cli import main as cli_main
from kvcore.models.cache import new_cache
from kvcore.models.loader import model_shape
from kvcore.models.training import ModelSpec, Schedule, TrainSettings, train
from kvcore.shapes import GPU_PRESETS, PRESETS, kv_bytes, tokens_that_fit
from kvcore.sharing.calc import divisors, fit_table, group_map, head_variants, kv_heads_table, with_kv_heads
from kvcore.sharing.convert import (
    ConvertSettings,
    convert_experiment,
    measured_kv_bytes_per_token,
    pool_kv_heads,
    valid_groups,
)
from kvcore.sharing.crosslayer import (
    MODES,
    CrossLayerSettings,
    cross_layer_plan,
    crosslayer_experiment,
    layer_roles,
    slerp,
    stream_nll,
    text_windows,
)
from kvcore.sharing.variants import bundled_tokenizer, data_streams, live_settings, shipped_results

HEADS, HEAD_DIM, LAYERS, VOCAB = 8, 8, 4, 97


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(kind: str = "llama", kv_heads: int = HEADS, layers: int = LAYERS, vocab: int = VOCAB):
    """A random decoder with ``HEADS`` query heads of dim ``HEAD_DIM`` (Qwen2 has K/V biases)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=HEADS * HEAD_DIM, n_layer=2, n_head=HEADS)).eval()
    cls, cfg = (LlamaForCausalLM, LlamaConfig) if kind == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    config = cfg(vocab_size=vocab, hidden_size=HEADS * HEAD_DIM, intermediate_size=96, num_hidden_layers=layers,
                 num_attention_heads=HEADS, num_key_value_heads=kv_heads, max_position_embeddings=256)
    model = cls._from_config(config, attn_implementation="eager").eval()
    if kind == "qwen2":  # random init leaves biases at zero: give them values so pooling them is tested
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))  # [B, T]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


# --- calculator -------------------------------------------------------------------------------------------------


def test_calculator_rows_follow_kv_bytes_for_every_divisor():
    shape, gpu = PRESETS["llama-2-7b"], GPU_PRESETS["H100 80GB"]
    table = kv_heads_table(shape, 4096, 8, 16, gpu)
    assert table["kv_heads"].tolist() == divisors(32) == [32, 16, 8, 4, 2, 1]
    assert table["attention"].tolist() == ["MHA", "GQA", "GQA", "GQA", "GQA", "MQA"]
    for row, variant in zip(table.itertuples(), head_variants(shape), strict=True):
        assert row.kv_bytes_per_token == kv_bytes(shape.with_kv_heads(row.kv_heads), 1)
        assert row.kv_bytes_total == kv_bytes(shape.with_kv_heads(row.kv_heads), 4096, 8)
        assert row.kv_vs_mha == pytest.approx(row.kv_heads / 32)
        assert row.tokens_fit_after_weights == tokens_that_fit(variant, gpu)
        assert row.max_batch_at_context == row.tokens_fit_after_weights // 4096


def test_fewer_kv_heads_also_drop_their_projection_weights():
    shape = PRESETS["llama-3-8b"]  # 8 KV heads: its MHA version has 24 more K and V heads per layer
    mha = with_kv_heads(shape, 32)
    assert mha.num_params - shape.num_params == 2 * 32 * 4096 * 24 * 128
    assert with_kv_heads(shape, 8).num_params == shape.num_params
    with pytest.raises(ValueError, match=r"must divide its 32 query heads; allowed \[32, 16, 8, 4, 2, 1\]"):
        with_kv_heads(shape, 5)


def test_fit_table_and_group_map():
    table = fit_table(PRESETS["mistral-7b"], GPU_PRESETS["A100 80GB"], contexts=[1024, 4096])
    mqa = table[(table.kv_heads == 1) & (table.context == 1024)].iloc[0]
    assert mqa.max_batch == tokens_that_fit(with_kv_heads(PRESETS["mistral-7b"], 1), GPU_PRESETS["A100 80GB"]) // 1024
    assert table.groupby("context")["max_batch"].apply(lambda s: s.is_monotonic_increasing).all()
    groups = group_map(8, 2)
    assert groups["kv_head"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # consecutive query heads share, as repeat_kv
    with pytest.raises(ValueError, match="must divide"):
        group_map(8, 3)


# --- MHA -> GQA conversion --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_pooling_to_every_kv_head_reproduces_the_model(kind, ids):
    model = tiny(kind)
    same = pool_kv_heads(model, HEADS)
    assert same is not model
    torch.testing.assert_close(logits(same, ids), logits(model, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_pooled_weights_are_group_means_and_the_original_is_untouched(kind):
    model = tiny(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gqa = pool_kv_heads(model, 2)  # 8 heads -> 2 groups of 4 consecutive heads
    assert gqa.config.num_key_value_heads == 2
    assert model.config.num_key_value_heads == HEADS
    for name in ("k_proj", "v_proj"):
        src = getattr(model.model.layers[1].self_attn, name)
        dst = getattr(gqa.model.layers[1].self_attn, name)
        w = src.weight.view(HEADS, HEAD_DIM, -1)  # [H, D, hidden]
        torch.testing.assert_close(dst.weight[:HEAD_DIM], w[0:4].mean(0))
        torch.testing.assert_close(dst.weight[HEAD_DIM:], w[4:8].mean(0))
        if kind == "qwen2":
            b = src.bias.view(HEADS, HEAD_DIM)  # [H, D]
            torch.testing.assert_close(dst.bias, torch.cat([b[0:4].mean(0), b[4:8].mean(0)]))
    q_new, q_old = (m.model.layers[0].self_attn.q_proj.weight for m in (gqa, model))
    torch.testing.assert_close(q_new, q_old)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mqa_pooling_shrinks_the_real_cache_by_the_head_count(ids):
    model = tiny()
    mqa = pool_kv_heads(model, 1)
    full_bytes, mqa_bytes = (measured_kv_bytes_per_token(m, ids) * ids.numel() for m in (model, mqa))
    assert full_bytes == HEADS * mqa_bytes
    cache = new_cache(mqa)
    with torch.inference_mode():
        mqa(input_ids=ids, cache=cache, use_cache=True)
    assert list(cache.layers[0].keys.shape) == [2, 1, ids.shape[1], HEAD_DIM]  # [B, Hkv=1, T, D]
    assert mqa_bytes == kv_bytes(model_shape(mqa), ids.shape[1], ids.shape[0], bits=32)
    assert kv_bytes(model_shape(model), 1) == HEADS * kv_bytes(model_shape(mqa), 1)


def test_bad_group_counts_and_unsupported_models_raise_clear_errors():
    model = tiny()
    assert valid_groups(model) == [8, 4, 2, 1]
    for bad in (3, 0, 16):
        with pytest.raises(ValueError, match=r"must divide the model's 8 KV heads: allowed \[8, 4, 2, 1\]"):
            pool_kv_heads(model, bad)
    with pytest.raises(ValueError, match="separate k_proj / v_proj"):
        pool_kv_heads(tiny("gpt2"), 1)
    assert pool_kv_heads(pool_kv_heads(model, 4), 2).config.num_key_value_heads == 2  # GQA pools further


def test_convert_experiment_measures_every_group_and_uptrains_with_a_control():
    tokenizer = bundled_tokenizer()
    model = tiny(vocab=len(tokenizer))
    streams = data_streams(tokenizer, "bundled")
    settings = ConvertSettings(groups=(8, 2, 1), context=32, eval_windows=2, uptrain_steps=2, uptrain_batch=2)
    result = convert_experiment(model, tokenizer, settings, streams=streams)
    table = result.table
    assert table["kv_heads"].tolist() == [8, 2, 1]
    assert (table["kv_bytes_per_token"] == table["kv_bytes_per_token_measured"]).all()
    assert table.loc[0, "ppl_vs_original"] == 1.0
    assert math.isnan(table.loc[0, "gap_closed"])
    assert table[["perplexity", "perplexity_uptrained"]].notna().all().all()
    assert sorted(result.curves["kv_heads"].unique()) == [1, 2, 8]
    assert len(result.curves) == 6
    with pytest.raises(ValueError, match="uptrain_steps must be in"):
        ConvertSettings(uptrain_steps=5000)
    with pytest.raises(ValueError, match=r"data must be one of \('bundled', 'corpus'\)"):
        ConvertSettings(data="web")


# --- cross-layer sharing ----------------------------------------------------------------------------------------


def test_no_shared_layers_equals_the_model(ids):
    model = tiny()
    plan = cross_layer_plan(model, CrossLayerSettings("merge-slerp", start_layer=LAYERS))
    nll, nbytes = stream_nll(model, ids, plan)
    expected = torch.nn.functional.cross_entropy(logits(model, ids)[:, :-1].transpose(1, 2), ids[:, 1:],
                                                 reduction="none")
    torch.testing.assert_close(nll, expected, atol=1e-5, rtol=1e-5)
    assert nbytes == kv_bytes(model_shape(model), ids.shape[1] - 1, ids.shape[0], bits=32)


def test_share_stores_only_the_lower_layer_and_one_forward_equals_decoding(ids):
    model = tiny()
    plan = cross_layer_plan(model, CrossLayerSettings("share", start_layer=0))  # pairs (0, 1), (2, 3)
    one, nbytes = stream_nll(model, ids, plan, one_shot=True)
    stepped, stepped_bytes = stream_nll(model, ids, plan)
    torch.testing.assert_close(one, stepped, atol=1e-5, rtol=1e-5)
    stored = replace(model_shape(model), num_layers=LAYERS // 2)
    assert nbytes == stepped_bytes == kv_bytes(stored, ids.shape[1] - 1, ids.shape[0], bits=32)


def test_merged_pairs_store_one_entry_per_pair_plus_magnitudes(ids):
    model = tiny()
    table = crosslayer_experiment(model, ids, [CrossLayerSettings(m, 2, 0.6) for m in MODES]).table
    assert table["mode"].tolist() == ["none", *MODES]
    per_layer = 2 * HEADS * HEAD_DIM * 4  # K and V, fp32
    full, share, linear, slerp_bytes = table["kv_bytes_per_token"]
    assert full == LAYERS * per_layer
    assert share == linear == (LAYERS - 1) * per_layer
    assert slerp_bytes == (LAYERS - 2) * per_layer + 2 * HEADS * (HEAD_DIM + 2) * 4  # direction + 2 norms, K and V
    assert (table["perplexity"].iloc[1:] != table["perplexity"].iloc[0]).all()  # sharing changes predictions


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1) for _ in range(2))
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    torch.testing.assert_close(slerp(a, a, 0.3), a)
    torch.testing.assert_close(slerp(a, b, 0.4).norm(dim=-1), torch.ones(5))


def test_text_windows_start_with_bos_and_refuse_too_little_text():
    stream = torch.arange(10, 50)  # [40]
    windows = text_windows(stream, bos=1, windows=3, length=8)
    assert windows.shape == (3, 8)
    assert windows[:, 0].tolist() == [1, 1, 1]
    assert windows[1, 1:].tolist() == list(range(18, 25))
    with pytest.raises(ValueError, match="need 48 tokens; the text has 40"):
        text_windows(stream, 1, 6, 8)


def test_cross_layer_settings_are_validated():
    with pytest.raises(ValueError, match="mode must be one of"):
        CrossLayerSettings("fuse")
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
        CrossLayerSettings("merge-linear", 2, 1.5)
    with pytest.raises(ValueError, match=r"start_layer must be in \[0, 4\]"):
        CrossLayerSettings(start_layer=9).pairs(4)
    assert CrossLayerSettings(start_layer=1).pairs(6) == [(1, 2), (3, 4)]  # the odd last layer keeps its own
    roles = layer_roles(CrossLayerSettings("share", 2), 4)
    assert roles.loc[3, "stores"] == "nothing"
    assert "layer 2" in roles.loc[3, "reads"]


# --- training ---------------------------------------------------------------------------------------------------


def test_training_is_deterministic_under_a_seed():
    tokenizer = bundled_tokenizer()
    train_ids, val_ids, val_bytes = data_streams(tokenizer, "bundled")
    spec = ModelSpec(layers=1, hidden=32, heads=4, kv_heads=2, ffn=64)
    settings = TrainSettings(steps=3, batch=2, context=16, warmup=1, eval_every=3, eval_windows=2)

    def losses() -> list[float]:
        torch.manual_seed(0)
        rows = train(spec.build(tokenizer), train_ids, val_ids, val_bytes, tokenizer.bos_token_id, settings)
        return [r["train_loss"] for r in rows[1:]] + [rows[-1]["val_bits_per_byte"]]

    first = losses()
    assert first == losses()
    assert all(math.isfinite(x) for x in first)


def test_schedule_warms_up_then_decays_to_its_floor():
    s = Schedule(peak_lr=1e-3, warmup=10, total_steps=110, min_lr_ratio=0.1)
    assert s.lr(0) == pytest.approx(1e-4)
    assert s.lr(9) == pytest.approx(1e-3)
    assert s.lr(10) == pytest.approx(1e-3)
    assert s.lr(110) == pytest.approx(1e-4)
    assert s.lr(60) == pytest.approx(0.55e-3)
    with pytest.raises(ValueError, match="warmup must be in"):
        Schedule(warmup=20, total_steps=10)
    with pytest.raises(ValueError, match=r"kv_heads \(3\) must divide heads \(8\)"):
        ModelSpec(kv_heads=3)


def test_live_settings_are_small_and_shipped_results_are_complete():
    live = live_settings()
    assert live.steps <= 100
    assert [s.kv_heads for s in live.specs] == [8, 4, 2, 1]
    shipped = shipped_results()
    if shipped is None:
        pytest.skip("no shipped results yet (scripts/train_kv_head_variants.py)")
    assert sorted(shipped.summary["kv_heads"]) == sorted(shipped.curves["kv_heads"].unique())
    assert (shipped.summary["kv_vs_mha"] == shipped.summary["kv_heads"] / shipped.summary["q_heads"]).all()


def test_cli_calc_writes_the_table(tmp_path, capsys):
    out = tmp_path / "sharing.csv"
    assert cli_main(["sharing", "--experiment", "calc", "--preset", "llama-3-8b", "--csv", str(out)]) == 0
    table = pd.read_csv(out)
    assert table["kv_heads"].tolist() == divisors(32)
    assert "MQA" in capsys.readouterr().out
    assert cli_main(["sharing", "--experiment", "calc", "--tokens", "0"]) == 2


# --- noise of the compared numbers --------------------------------------------------------------------------------


def test_cross_layer_rows_carry_paired_intervals_against_the_full_cache(ids):
    model = tiny()
    table = crosslayer_experiment(model, ids, [CrossLayerSettings(m, 2, 0.6) for m in MODES]).table
    assert table["vs_full"].iloc[0] == "baseline"
    assert (table.loc[0, ["ppl_vs_full", "ppl_vs_full_low", "ppl_vs_full_high"]] == 1.0).all()
    assert (table["perplexity_low"] <= table["perplexity"]).all()
    assert (table["perplexity"] <= table["perplexity_high"]).all()
    assert set(table["vs_full"].iloc[1:]) <= {"worse", "better", "within noise"}
    assert table["t"].isna().tolist() == [True, True, False, False]  # the full cache and share merge nothing
    assert table.loc[2, "t"] == 0.6
    ratio = table["perplexity"] / table["perplexity"].iloc[0]
    assert table["ppl_vs_full"].to_numpy() == pytest.approx(ratio.to_numpy())


def test_conversion_rows_carry_paired_intervals_and_say_what_uptraining_did():
    tokenizer = bundled_tokenizer()
    model = tiny(vocab=len(tokenizer))
    streams = data_streams(tokenizer, "bundled")
    settings = ConvertSettings(groups=(8, 1), context=32, eval_windows=4, uptrain_steps=2, uptrain_batch=2)
    table = convert_experiment(model, tokenizer, settings, streams=streams).table
    assert table["vs_original"].tolist()[0] == "original"
    mqa = table.iloc[-1]
    assert mqa.ppl_vs_original_low <= mqa.ppl_vs_original <= mqa.ppl_vs_original_high
    assert mqa.ppl_vs_original == pytest.approx(mqa.perplexity / table.iloc[0].perplexity)
    assert mqa.perplexity_uptrained_low <= mqa.perplexity_uptrained <= mqa.perplexity_uptrained_high
    assert mqa.uptrained_vs_pooled == pytest.approx(mqa.perplexity_uptrained / mqa.perplexity)
    assert set(table["uptraining"]) <= {"better", "worse", "within noise"}
    # the perplexity is evaluate()'s, per token: the same windows give the same mean
    from kvcore.models.training import evaluate
    from kvcore.sharing.convert import pool_kv_heads

    val_ids, val_bytes = streams[1], streams[2]
    direct = evaluate(pool_kv_heads(model, 1), val_ids, 32, tokenizer.bos_token_id, val_bytes, max_windows=4)
    assert mqa.perplexity == pytest.approx(math.exp(direct["val_nats_per_token"]), rel=1e-5)
    assert mqa.bits_per_byte == pytest.approx(direct["val_bits_per_byte"], rel=1e-5)


def test_a_speed_is_faster_only_when_the_interquartile_ranges_part():
    from kvcore.sharing.variants import decode_columns, speed_versus

    rows = pd.DataFrame(decode_columns([[500, 520, 540, 560, 580], [900, 950, 1000, 1050, 1100],
                                        [500, 550, 700, 800, 1200], [900], [2000]]))
    mha, mqa, wide, once, once_fast = (rows.iloc[i] for i in range(5))
    assert mha.decode_tokens_per_s == 540
    assert (mha.decode_tokens_per_s_q1, mha.decode_tokens_per_s_q3) == (520, 560)
    assert speed_versus(mqa, mha) == "faster"
    assert speed_versus(mha, mqa) == "slower"
    assert speed_versus(wide, mha) == "within noise"  # a higher median, but its IQR (550-800) overlaps 520-560
    assert speed_versus(once_fast, once) == "within noise"  # one round each: no spread to tell
    shipped = pd.Series({"decode_tokens_per_s": 538.0})
    assert speed_versus(shipped, shipped) == "no spread measured"
