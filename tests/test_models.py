"""kvcore.models: the bundled model, the cache adapter (keep, re-rotation, bytes), perplexity, generation, loading.

The bundled model is loaded once per module, offline (tests/conftest.py sets HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from kvcore.cli import main as cli_main
from kvcore.models import loader
from kvcore.models.attention import (
    AttentionPatterns,
    capture_attention,
    detect_patterns,
    far_attention_ratio,
    layer_summary,
)
from kvcore.models.cache import LabCache, new_cache
from kvcore.models.generate import (
    GenerationSettings,
    PhaseTiming,
    generate_stream,
    generate_table,
    time_generation,
)
from kvcore.models.live import attention_map, run_live, step_view
from kvcore.models.perplexity import bits_per_byte, perplexity, streaming_nll, token_nll
from kvcore.models.plan import CachePlan, run_step
from kvcore.models.rope import rope_inv_freq, rotate
from kvcore.noise import Timing
from kvcore.plans import cache_plans, make_plan
from kvcore.shapes import kv_bytes

PROMPT = "The import statement"
UNCACHED = "kv-cache-lab-tests/no-such-model"  # never in a local Hugging Face cache


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundled(one_thread):
    torch.manual_seed(0)
    return loader.load_model(None, "cpu")


@pytest.fixture(scope="module")
def text_ids(bundled):
    _, tokenizer = bundled
    return tokenizer(loader.bundled_text(max_chars=4000))["input_ids"][:160]


def test_bundled_model_is_a_small_offline_llama_with_eight_kv_heads(bundled, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = bundled
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_attention_heads == cfg.num_key_value_heads == 8  # MHA, so GQA/MQA can be derived from it
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "eager"
    assert 4e6 <= sum(p.numel() for p in model.parameters()) <= 7e6
    assert (loader.BUNDLED_DIR / "model.safetensors").stat().st_size < 20e6
    assert tokenizer(PROMPT)["input_ids"][0] == tokenizer.bos_token_id  # <bos> first, as in training


def test_greedy_generation_is_deterministic(bundled):
    model, tokenizer = bundled
    settings = GenerationSettings(max_new_tokens=12, stop_at_eos=False)
    first = generate_table(model, tokenizer, PROMPT, settings)
    again = generate_table(model, tokenizer, PROMPT, settings)
    assert first["token_id"].tolist() == again["token_id"].tolist()
    assert first["phase"].tolist() == ["prefill"] + ["decode"] * 11


def test_adapter_generates_exactly_the_tokens_of_transformers_generate(bundled):
    model, tokenizer = bundled
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    reference = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = generate_table(model, tokenizer, PROMPT, GenerationSettings(max_new_tokens=16, stop_at_eos=False))
    assert ours["token_id"].tolist() == reference[0, ids.shape[1]:].tolist()
    # transformers' own generate also runs on a LabCache (it is a DynamicCache).
    through_lab = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 cache=new_cache(model))
    assert through_lab.tolist() == reference.tolist()


def test_kv_bytes_follow_the_one_memory_formula(bundled):
    model, tokenizer = bundled
    table = generate_table(model, tokenizer, PROMPT, GenerationSettings(max_new_tokens=5, stop_at_eos=False))
    shape = loader.model_shape(model)
    # The cache holds every fed token: the prompt, then one more per decode step (fp32 = 32 bits).
    assert table["kv_bytes"].tolist() == [kv_bytes(shape, int(n), bits=32) for n in table["kv_tokens"]]
    assert table["kv_tokens"].diff().iloc[1:].eq(1).all()


def _filled_cache(model, ids: list[int], positions: str = "original") -> LabCache:
    cache = new_cache(model, positions=positions)
    with torch.inference_mode():
        run_step(model, cache, torch.tensor([ids]))
    return cache


def test_keep_keeps_exactly_the_requested_entries(bundled, text_ids):
    model, _ = bundled
    cache = _filled_cache(model, text_ids[:20])
    keys, values = cache.layers[1].keys.clone(), cache.layers[1].values.clone()  # [1, 8, 20, D]
    per_head = torch.stack([torch.randperm(20, generator=torch.Generator().manual_seed(h))[:6] for h in range(8)])
    cache.keep(1, per_head[None])  # [1, Hkv, 6], unsorted on purpose
    expected = per_head.sort(dim=-1).values[None]  # kept in original order
    gather = expected[..., None].expand(-1, -1, -1, keys.shape[-1])
    assert torch.equal(cache.layers[1].keys, keys.gather(2, gather))
    assert torch.equal(cache.layers[1].values, values.gather(2, gather))
    assert torch.equal(cache.positions[1], expected)
    cache.keep(0, torch.tensor([0, 1, 19]))  # one index list for every head
    assert cache.num_tokens(0) == 3
    assert cache.positions[0][0, 0].tolist() == [0, 1, 19]
    assert cache.next_position_ids(1).tolist() == [[20]]  # original positions continue after eviction
    for bad in (torch.tensor([0, 0, 1]), torch.tensor([0, 25]), torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match="keep_idx"):
            cache.keep(1, bad)


def test_rerotated_key_equals_the_key_rotated_directly(bundled):
    model, _ = bundled
    inv_freq = rope_inv_freq(model)
    key = torch.randn(1, 8, 5, 2 * inv_freq.numel(), generator=torch.Generator().manual_seed(0))
    p, q = torch.tensor([3, 17, 40, 100, 511]), torch.tensor([0, 1, 2, 3, 4])
    rerotated = rotate(rotate(key, p, inv_freq), q - p, inv_freq)
    torch.testing.assert_close(rerotated, rotate(key, q, inv_freq), rtol=1e-5, atol=1e-5)


def test_rerotate_cache_matches_the_model_keys_at_compact_positions(bundled, text_ids):
    model, _ = bundled
    ids = text_ids[:12]
    cache = _filled_cache(model, ids, positions="rerotate")
    kept = [0, 1, 9, 10, 11]
    cache.keep(0, torch.tensor(kept))
    # The same tokens fed at positions 0..4 give the keys the re-rotated cache must hold (pre-RoPE keys of a
    # token depend on its context only through layer 0's input, which is the token embedding).
    direct = new_cache(model)
    with torch.inference_mode():
        model(input_ids=torch.tensor([[ids[i] for i in kept]]), cache=direct, use_cache=True)
    torch.testing.assert_close(cache.layers[0].keys, direct.layers[0].keys, rtol=1e-4, atol=1e-5)
    assert cache.next_position_ids(1).tolist() == [[5]]


def test_rerotation_needs_rope():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="rotary"):
        rope_inv_freq(gpt2)


def test_streaming_with_the_full_cache_equals_full_context(bundled, text_ids):
    model, tokenizer = bundled
    full = token_nll(model, text_ids)
    chunked = token_nll(model, text_ids, chunk_size=37)
    streamed = streaming_nll(model, text_ids)
    assert full.shape == streamed.shape == (len(text_ids) - 1,)
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(streamed, full, rtol=1e-4, atol=1e-4)
    assert perplexity(streamed) == pytest.approx(perplexity(full), rel=1e-4)
    text = tokenizer.decode(text_ids, skip_special_tokens=True)
    assert 0 < bits_per_byte(full, text) < 8


def test_a_hook_sees_every_step_with_the_positions_it_fed(bundled, text_ids):
    model, _ = bundled
    seen = []
    plan = CachePlan("watched", hook=lambda step: seen.append((step.position_ids.tolist(), step.num_new,
                                                               step.cache.num_tokens(0))))
    streaming_nll(model, text_ids[:10], plan, prefill=4)
    assert seen == [([[0, 1, 2, 3]], 4, 4)] + [([[t]], 1, t + 1) for t in range(4, 9)]


def test_cache_plans_always_offer_full():
    plans = cache_plans()
    assert "full" in plans
    assert plans["full"]().name == "full"
    with pytest.raises(ValueError, match="positions"):
        CachePlan(positions="compact")


def test_attention_capture_is_causal_and_normalised(bundled, text_ids):
    model, _ = bundled
    attn = capture_attention(model, torch.tensor(text_ids[:40]))
    assert attn.shape == (model.config.num_hidden_layers, 8, 40, 40)
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]), rtol=1e-4, atol=1e-4)
    assert attn.triu(diagonal=1).abs().max() == 0
    summary = layer_summary(attn, min_query=8)
    assert summary["uniform_share"].iloc[0] == pytest.approx(sum(1 / (t + 1) for t in range(8, 40)) / 32)


def test_uniform_attention_scores_as_its_own_baseline():
    T = 80
    uniform = (torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1).unsqueeze(1)).expand(2, 3, T, T)
    summary = layer_summary(uniform, min_query=16)
    assert summary["pos0_vs_uniform"].tolist() == pytest.approx([1.0, 1.0])
    assert summary["top_keys_share"].tolist() == pytest.approx(summary["top_keys_uniform"].tolist())
    assert summary["accumulated_top_share"].tolist() == pytest.approx(summary["accumulated_top_uniform"].tolist())


def test_detect_patterns_flags_a_planted_sink():
    T = 64
    attn = torch.tril(torch.ones(T, T))
    attn[:, 0] += 20.0  # every query looks at key 0
    attn = attn / attn.sum(-1, keepdim=True)
    table = detect_patterns(attn, AttentionPatterns(sink_ratio=5.0, heavy_fraction=0.05, min_distance=16))
    assert table.loc[table["sink"], "position"].tolist() == [0]
    assert table.loc[0, "heavy_hitter"]
    assert table["heavy_hitter"].sum() == math.ceil(0.05 * T)
    with pytest.raises(ValueError, match="sink_ratio"):
        AttentionPatterns(sink_ratio=0.5)
    with pytest.raises(ValueError, match="min_queries"):
        AttentionPatterns(min_queries=0)


def test_recent_keys_that_neighbours_attend_to_are_not_sinks():
    """The defect: keys 38, 39 and 42 of 44 were called sinks from a handful of later queries (local attention)."""
    T = 44
    attn = torch.tril(torch.ones(T, T))
    for j in (38, 39, 42):
        attn[j:, j] += 30.0  # every query from j on gives key j a big share: a local favourite, not a sink
    attn = attn / attn.sum(-1, keepdim=True)
    table = detect_patterns(attn, AttentionPatterns.for_length(T))  # min_distance 11, at least 8 far queries
    assert not table["sink"].any()
    assert table.loc[[38, 39, 42], "received_vs_uniform"].isna().all()  # too few far queries to judge
    assert table.loc[0, "far_queries"] == T - 11
    assert table.loc[T - 11, "far_queries"] == 0
    # the old rule (mean over queries at or past max(key, min_query), any count) flagged them
    q = torch.arange(T)
    old = [float((attn[q >= max(j, 11), j] * (q[q >= max(j, 11)] + 1)).mean()) for j in (38, 39, 42)]
    assert min(old) >= 5.0


def test_far_attention_ratio_matches_a_loop():
    attn = torch.rand(3, 20, 20).tril()
    attn = attn / attn.sum(-1, keepdim=True)
    got = far_attention_ratio(attn, min_distance=4, min_queries=3)
    for layer in range(3):
        for j in range(20):
            far = [t for t in range(20) if t - j >= 4]
            if len(far) < 3:
                assert math.isnan(got[layer, j])
            else:
                want = sum(float(attn[layer, t, j]) * (t + 1) for t in far) / len(far)
                assert float(got[layer, j]) == pytest.approx(want, rel=1e-5)


def test_the_eviction_reference_uses_the_same_detector(bundled, text_ids):
    from kvcore.eviction.reference import reference_pass

    model, _ = bundled
    ref = reference_pass(model, torch.tensor([text_ids[:120]]))
    per_layer = ref.attn.mean(dim=1)  # [L, T, T]
    pd.testing.assert_frame_equal(ref.patterns, detect_patterns(per_layer, ref.thresholds))
    assert ref.key_norms.shape == (model.config.num_hidden_layers, model.config.num_key_value_heads, 119)


def test_bundled_text_ships_the_validation_split():
    docs = loader.bundled_documents("validation")
    assert len(docs) > 5
    assert all(docs)
    assert loader.bundled_text(max_chars=100) == "\n\n".join(docs)[:100]
    with pytest.raises(ValueError, match="split"):
        loader.bundled_text("test")


def test_hub_model_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="bundled model works offline"):
        loader.load_model(UNCACHED)
    with pytest.raises(ValueError, match="neither a local folder nor"):
        loader.load_model("not a model name!")


def test_hub_model_without_network_or_too_big_is_refused_before_download(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(loader, "hub_offline", lambda: False)

    def no_network(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    with pytest.raises(OSError, match="cannot reach the Hugging Face Hub to download 'gpt2': no network"):
        loader.load_model("gpt2")

    def huge(*args, **kwargs):
        files = [SimpleNamespace(rfilename="model.safetensors", size=3_000_000_000)]
        return SimpleNamespace(siblings=files, config={"model_type": "llama"})

    monkeypatch.setattr(huggingface_hub, "model_info", huge)
    with pytest.raises(ValueError, match=r"3\.00 GB of weights, over this lab's limit of 1\.50 GB"):
        loader.load_model("someone/big-model")


def test_cli_generate_prints_and_writes_the_per_token_table(tmp_path, capsys):
    out = tmp_path / "gen.csv"
    assert cli_main(["generate", "--prompt", PROMPT, "--max-new-tokens", "4", "--csv", str(out)]) == 0
    table = pd.read_csv(out)
    assert len(table) <= 4
    assert {"token", "logprob", "ms", "kv_bytes"} <= set(table.columns)
    assert "kv_bytes" in capsys.readouterr().out
    assert cli_main(["generate", "--prompt", "x", "--model", UNCACHED]) == 2  # offline: a message, not a traceback


def test_generation_is_observed_before_every_step(bundled):
    model, tokenizer = bundled
    seen = []
    events = list(generate_stream(model, tokenizer, PROMPT, GenerationSettings(max_new_tokens=5),
                                  observe=lambda step, cache: seen.append((step, cache.num_tokens(0)))))
    prompt = len(tokenizer(PROMPT)["input_ids"])
    assert seen == [(s, 0 if s == 0 else prompt + s - 1) for s in range(len(events))]


@pytest.mark.parametrize(("plan_name", "positions"), [("evict:streaming_llm", "rerotate"), ("evict:h2o", "original")])
def test_the_step_view_shows_what_an_eviction_cache_held(bundled, plan_name, positions):
    model, tokenizer = bundled
    run = run_live(model, tokenizer, PROMPT, GenerationSettings(max_new_tokens=24), make_plan(plan_name, 8, positions))
    view = step_view(run, attention_map(model, run, 1, None), AttentionPatterns.for_length(len(run.ids)))
    held = view.held[run.plan]
    for s, q in enumerate(view.steps["query"]):
        assert np.isnan(held[s, q + 1:]).all()
        fed = run.prompt_len if s == 0 else 1
        # before the step the cache holds at most the budget per layer and head, plus the tokens fed now
        assert np.nansum(held[s]) == pytest.approx(min(q + 1, 8 + fed))
        assert np.nansum(view.attention[s]) == pytest.approx(1.0, abs=1e-4)
    if plan_name == "evict:streaming_llm":  # re-rotated positions still map to the original tokens
        last = held[-1]
        assert np.allclose(last[:4], 1.0)
        assert np.allclose(last[4:int(view.steps["query"].iloc[-1]) - 4], 0.0)
    assert view.steps["kv_tokens"].max() <= 8 + 1


def test_the_step_view_marks_what_a_quantized_cache_compressed(bundled):
    model, tokenizer = bundled
    run = run_live(model, tokenizer, PROMPT, GenerationSettings(max_new_tokens=48, stop_at_eos=False),
                   make_plan("quant:int4-token", 0, "original"))
    view = step_view(run, attention_map(model, run, 0, None), AttentionPatterns.for_length(len(run.ids)))
    compressed = view.compressed[run.plan]
    assert np.allclose(view.held[run.plan][~np.isnan(view.held[run.plan])], 1.0)  # quantizing drops nothing
    assert np.nansum(compressed[-1]) > 0  # int4-token stores every aged token compressed: K and V
    assert compressed[-1, -1] == 0  # the token fed in the step itself is read exact


def test_timing_is_warmed_up_repeated_and_interleaved(bundled):
    model, tokenizer = bundled
    run = run_live(model, tokenizer, PROMPT, GenerationSettings(max_new_tokens=6), make_plan("full", 0, "original"))
    calls = []
    handle = model.model.register_forward_hook(lambda module, args, kwargs, out: calls.append(
        kwargs["input_ids"].shape[1]), with_kwargs=True)

    @contextmanager
    def turn():  # a round's turn with the model: every forward of the round inside it
        calls.append("turn")
        yield
        calls.append("end")

    try:
        timing = time_generation(model, run.ids, run.prompt_len, repeats=3, warmup=1, decode_steps=4, turn=turn)
    finally:
        handle.remove()
    steps = min(4, len(run.ids) - run.prompt_len)
    assert calls == ["turn", run.prompt_len, *[1] * steps, "end"] * 4  # each round: a prefill, then its decode steps
    assert (timing.prefill.repeats, timing.prefill.warmup) == (3, 1)
    assert timing.decode.repeats == 3 * steps
    assert timing.decode.q1 <= timing.decode.median <= timing.decode.q3
    assert len(timing.ratios) == 3
    assert list(timing.phases()) == ["prefill", "decode"]
    alone = time_generation(model, run.ids[:run.prompt_len], run.prompt_len, repeats=1)
    assert alone.decode is None
    assert list(alone.phases()) == ["prefill"]
    assert alone.ratio() is None
    assert alone.within_noise()


def test_a_ratio_is_stated_only_when_the_rounds_agree_more_than_the_phases_differ():
    """The defect: a 4-token prefill read as 14 decode steps because a burst of load hit the prefills only."""
    t = Timing.of([1.0])
    noisy = PhaseTiming(t, t, np.array([0.6, 0.9, 1.1, 1.3, 14.0]))  # median 1.1, IQR 0.9-1.3: wider than 0.1
    assert noisy.ratio() == pytest.approx((1.1, 0.9, 1.3))
    assert noisy.within_noise()
    clear = PhaseTiming(t, t, np.array([3.4, 3.5, 3.5, 3.6, 9.0]))  # median 3.5, IQR 3.5-3.6: narrower than 2.5
    assert not clear.within_noise()
    assert not PhaseTiming(t, t, np.array([0.5, 0.5, 0.5])).within_noise()  # a prefill cheaper than a step, clearly


@pytest.mark.parametrize(("raw", "name"), [(None, "bundled"), ("", "bundled"), ("  ", "bundled"),
                                           ("bundled", "bundled"), (" gpt2 ", "gpt2"), ("owner/m", "owner/m")])
def test_a_model_has_one_spelling(raw, name):
    assert loader.model_name(raw) == name
