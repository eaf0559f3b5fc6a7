"""The lab keeps exactly what kvpress 0.5.5's presses keep, replayed from recorded fixtures (no kvpress needed).

``tests/fixtures/kvpress/`` holds, for the bundled model (``mha``, 8 KV heads) and its GQA variant (``gqa``,
K/V projections mean-pooled 8 -> 2 heads), prompts of 100, 250 and 400 tokens and compression ratios 0.5
and 0.8, the positions each press kept per layer and KV head (``scripts/record_kvpress.py`` made them in
a separate environment with kvpress installed). Here the same prompts go through the same model with
transformers' attention interface capturing the post-RoPE queries and keys, every layer is compressed
by ``kvpress_compatible(press, **kwargs)`` at ``kvpress_budget(T, ratio)``, and the kept sets must be
identical, for every layer and head. Then the options that make the difference are pinned on tiny,
hand-counted tensors: TOVA's ``keep_last``, SnapKV's ``window_ties``, the observed-attention mean and
kvpress's truncated budget.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kvcore.eviction import (
    H2O,
    POLICIES,
    TOVA,
    EvictionState,
    KNorm,
    ObservedAttention,
    SlidingWindow,
    SnapKV,
    StreamingLLM,
    causal_attention,
    kvpress_budget,
    kvpress_compatible,
    make_policy,
)
from kvcore.models import BUNDLED_DIR, load_model
from kvcore.quant.model_kv import capture_qkv
from kvcore.sharing.convert import pool_kv_heads

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "kvpress"
PRESSES = ("streaming_llm", "knorm", "snapkv", "tova", "observed_attention")
VARIANTS = {"mha": 8, "gqa": 2}  # model variant -> KV heads
LENGTHS = (100, 250, 400)
RATIOS = (0.5, 0.8)

needs_bundled = pytest.mark.skipif(not (BUNDLED_DIR / "model.safetensors").is_file(), reason="bundled model missing")


def load_fixture(variant: str, press: str) -> dict:
    return json.loads((FIXTURES / f"{variant}_{press}.json").read_text(encoding="utf-8"))


CASES = [(variant, press, i) for variant in VARIANTS for press in PRESSES for i in range(len(LENGTHS) * len(RATIOS))]


def case_id(case: tuple[str, str, int]) -> str:
    variant, press, i = case
    return f"{variant}-{press}-{LENGTHS[i // len(RATIOS)]}-{RATIOS[i % len(RATIOS)]}"


@pytest.fixture(scope="module")
def models():
    """The bundled model and its GQA variant (consecutive K/V heads mean-pooled, as the recording did).

    One torch thread while the module runs, as the recording: a few hundred tokens gain nothing from
    more, and on a shared CPU extra threads only thrash.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, _ = load_model(device="cpu")
    yield {"mha": model, "gqa": pool_kv_heads(model, VARIANTS["gqa"])}
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def captured(models):
    """Post-RoPE queries, keys and values of every layer, per (variant, prompt length), captured once."""
    cache = {}

    def get(variant: str, ids: list[int]):
        key = (variant, len(ids))
        if key not in cache:
            cache[key] = capture_qkv(models[variant], torch.tensor(ids))
        return cache[key]

    return get


def kept_sets(policy, qkv, budget: int) -> list[list[list[int]]]:
    """Positions ``[layer][kv_head]`` the policy keeps of each layer's prompt cache."""
    out = []
    for q, k, v in zip(qkv.queries, qkv.keys, qkv.values, strict=True):
        idx = policy.compress(k, v, q, budget)[2][0]  # [Hkv, budget], sorted
        out.append(idx.tolist())
    return out


def differences(ours: list[list[list[int]]], theirs: list[list[list[int]]]) -> list[str]:
    return [f"layer {layer} head {h}: lab only {sorted(set(a) - set(b))}, kvpress only {sorted(set(b) - set(a))}"
            for layer, (la, lb) in enumerate(zip(ours, theirs, strict=True))
            for h, (a, b) in enumerate(zip(la, lb, strict=True)) if a != b]


# ---- the fixtures ----------------------------------------------------------------------------------------


def test_every_press_variant_length_and_ratio_was_recorded():
    for variant, kv_heads in VARIANTS.items():
        for press in PRESSES:
            fixture = load_fixture(variant, press)
            assert (fixture["press"], fixture["model_variant"]) == (press, variant)
            assert fixture["num_key_value_heads"] == kv_heads
            assert fixture["kvpress_version"] == "0.5.5"
            assert [(c["num_tokens"], c["compression_ratio"]) for c in fixture["cases"]] == [
                (n, r) for n in LENGTHS for r in RATIOS]
            for case in fixture["cases"]:
                ids = fixture["prompts"][str(case["num_tokens"])]
                assert len(ids) == case["num_tokens"]
                assert ids[0] == 1  # <bos> first
                assert len(case["kept"]) == 6
                assert all(len(layer) == kv_heads for layer in case["kept"])
                assert all(len(head) == case["num_kept"] for layer in case["kept"] for head in layer)


@needs_bundled
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_the_lab_keeps_what_kvpress_kept(captured, case):
    variant, press, i = case
    fixture = load_fixture(variant, press)
    recorded = fixture["cases"][i]
    budget = kvpress_budget(recorded["num_tokens"], recorded["compression_ratio"])
    assert budget == recorded["num_kept"]
    qkv = captured(variant, fixture["prompts"][str(recorded["num_tokens"])])
    ours = kept_sets(kvpress_compatible(press, **fixture["kwargs"]), qkv, budget)
    assert ours == recorded["kept"], "\n".join(differences(ours, recorded["kept"])[:10])


@needs_bundled
@pytest.mark.parametrize(("press", "lab_default"), [
    ("tova", TOVA()), ("snapkv", SnapKV(window=64)), ("observed_attention", H2O(recent_fraction=0.0)),
], ids=["tova-without-keep_last", "snapkv-newest-window-ties", "h2o-summed-attention"])
def test_without_the_options_the_lab_differs_from_kvpress(captured, press, lab_default):
    """The options earn their place: the lab's own rule keeps other tokens in some recorded case."""
    fixture = load_fixture("mha", press)
    differ = 0
    for recorded in fixture["cases"]:
        qkv = captured("mha", fixture["prompts"][str(recorded["num_tokens"])])
        differ += kept_sets(lab_default, qkv, recorded["num_kept"]) != recorded["kept"]
    assert differ > 0


# ---- kvpress_compatible and kvpress_budget ----------------------------------------------------------------


def test_compatible_policies_carry_the_presses_defaults():
    assert kvpress_compatible("streaming_llm") == StreamingLLM(n_sink=4)
    assert kvpress_compatible("streaming_llm", n_sink=2) == StreamingLLM(n_sink=2)
    assert kvpress_compatible("streaming_llm", n_sink=0) == SlidingWindow()
    assert kvpress_compatible("knorm") == KNorm()
    assert kvpress_compatible("snapkv") == SnapKV(window=64, kernel_size=5, pooling="avg", window_ties="topk")
    assert kvpress_compatible("snapkv", window_size=8, kernel_size=3) == SnapKV(8, 3, "avg", "topk")
    assert kvpress_compatible("tova") == TOVA(per_head=False, keep_last=True)
    assert kvpress_compatible("observed_attention") == ObservedAttention()
    with pytest.raises(ValueError, match="n_sink must be an integer"):
        kvpress_compatible("streaming_llm", n_sink=False)


@pytest.mark.parametrize(("press", "kwargs", "message"), [
    ("h2o", {}, "unknown press 'h2o'"), ("snapkv", {"window": 8}, r"no kwargs \['window'\]"),
    ("tova", {"n_sink": 4}, "takes none"), ("knorm", {"compression_ratio": 0.5}, "kvpress_budget"),
    ("snapkv", {"kernel_size": 4}, "odd"), ("streaming_llm", {"n_sink": -1}, "n_sink"),
])
def test_unknown_presses_and_kwargs_say_what_is_wrong(press, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kvpress_compatible(press, **kwargs)


@pytest.mark.parametrize(("num_tokens", "ratio", "kept"), [
    (100, 0.5, 50), (100, 0.8, 19), (250, 0.8, 49), (400, 0.8, 79), (400, 0.5, 200), (10, 0.0, 10), (3, 0.9, 1),
    (7, 0.25, 5),
])
def test_budget_truncates_like_kvpress(num_tokens, ratio, kept):
    """int(n * (1 - ratio)): 1 - 0.8 is 0.19999999999999996, so 100 tokens keep 19; never fewer than one."""
    assert kvpress_budget(num_tokens, ratio) == kept
    assert kept == max(1, math.floor(num_tokens * (1 - ratio)))


@pytest.mark.parametrize(("num_tokens", "ratio"), [(0, 0.5), (10, 1.0), (10, -0.1), (10, float("nan")), (10, True),
                                                   (10.0, 0.5), (10, "0.5")])
def test_bad_budget_arguments_are_rejected(num_tokens, ratio):
    with pytest.raises(ValueError, match=r"num_tokens|compression_ratio"):
        kvpress_budget(num_tokens, ratio)


# ---- the options, hand-counted -----------------------------------------------------------------------------


def test_new_options_default_to_the_labs_behaviour():
    assert TOVA().keep_last is False
    assert SnapKV().window_ties == "newest"
    assert SnapKV().window == 16
    assert H2O().recent_fraction == 0.5


@pytest.mark.parametrize(("policy", "label"), [
    (TOVA(per_head=True), "tova(per_head=True)"),
    (TOVA(keep_last=True), "tova(per_head=False, keep_last=True)"),
    (SnapKV(), "snapkv(window=16, kernel_size=5, pooling=avg)"),
    (SnapKV(window=64, window_ties="topk"), "snapkv(window=64, kernel_size=5, pooling=avg, window_ties=topk)"),
])
def test_labels_name_the_new_options_only_when_they_are_on(policy, label):
    """Tables, legends and saved results of the lab's own settings read as before the options existed."""
    assert policy.label() == label
    assert make_policy(policy.name, **policy.hyperparameters()) == policy


def newest_query_prefers_oldest():
    """4 tokens, 1 head, D = 2: the newest query ``[1, 0]`` scores keys 3, 2, 1, -5 (token 3 least)."""
    keys = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [-5.0, 0.0]]).view(1, 1, 4, 2)  # [B, Hkv, T, D]
    queries = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)  # the newest query only: [B, Hq, 1, D]
    return keys, queries


def test_tova_keep_last_keeps_the_newest_token_the_paper_would_evict():
    keys, queries = newest_query_prefers_oldest()
    assert TOVA().compress(keys, keys, queries, 2)[2][0, 0].tolist() == [0, 1]
    assert TOVA(keep_last=True).compress(keys, keys, queries, 2)[2][0, 0].tolist() == [0, 3]
    assert TOVA(keep_last=True).compress(keys, keys, queries, 1)[2][0, 0].tolist() == [3]


def test_tova_keep_last_is_a_widget_toggle_and_rejects_non_booleans():
    field = next(f for f in TOVA.__dataclass_fields__.values() if f.name == "keep_last")
    assert field.metadata["help"]
    with pytest.raises(ValueError, match="keep_last"):
        TOVA(keep_last=1)


def snapkv_tensors():
    """6 tokens, 1 head, D = 2; window 2 (queries at positions 4, 5). Token 1 draws the window's attention."""
    keys = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 1.0]]).view(1, 1, 6, 2)
    queries = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2)  # the last 2 queries
    return keys, queries


@pytest.mark.parametrize("ties", ["newest", "topk"])
def test_snapkv_budget_above_the_window_keeps_the_window_and_the_best_old_token(ties):
    keys, queries = snapkv_tensors()
    policy = SnapKV(window=2, kernel_size=1, window_ties=ties)
    assert policy.compress(keys, keys, queries, 3)[2][0, 0].tolist() == [1, 4, 5]


def test_snapkv_topk_ties_score_the_window_one_above_the_best_old_score():
    keys, queries = snapkv_tensors()
    scores = SnapKV(window=2, kernel_size=1, window_ties="topk").score(keys, keys, queries)[0, 0]
    attn = causal_attention(queries, keys)[0, 0].mean(dim=0)  # mean window attention [6]
    assert torch.allclose(scores[:4], attn[:4])
    assert scores[4].item() == scores[5].item() == pytest.approx(attn[1].item() + 1.0)
    newest = SnapKV(window=2, kernel_size=1).score(keys, keys, queries)[0, 0]
    assert torch.allclose(newest[:4], attn[:4])  # the window's own score is unused: select() protects it


def snapkv_press_choice(keys, queries, window: int, kernel: int, budget: int) -> list[list[int]]:
    """kvpress's ``SnapKVPress.score`` + ``topk``, written out: per-query-head window attention over the older
    tokens, mean over the window, avg pool, mean over the query group, window padded with max + 1."""
    B, Hkv, T, _ = keys.shape
    Hq = queries.shape[1]
    attn = causal_attention(queries[:, :, -window:], keys)[..., :-window]  # [B, Hq, w, T - w]
    scores = F.avg_pool1d(attn.mean(dim=-2), kernel, padding=kernel // 2, stride=1)  # [B, Hq, T - w]
    scores = scores.view(B, Hkv, Hq // Hkv, T - window).mean(2)
    scores = F.pad(scores, (0, window), value=scores.max().item() + 1)
    return scores.topk(budget, dim=-1).indices.sort(dim=-1).values[0].tolist()


@pytest.mark.parametrize("budget", [3, 7, 10, 20])
def test_snapkv_topk_ties_follow_the_press_below_and_above_the_window(budget):
    g = torch.Generator().manual_seed(3)
    keys, queries = torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 4, 40, 8, generator=g)
    ours = SnapKV(window=10, kernel_size=3, window_ties="topk").compress(keys, keys, queries, budget)[2][0].tolist()
    assert ours == snapkv_press_choice(keys, queries, 10, 3, budget)
    if budget < 10:  # only window tokens, as the press
        assert all(p >= 30 for head in ours for p in head)


def test_snapkv_newest_ties_keep_the_newest_window_tokens():
    g = torch.Generator().manual_seed(3)
    keys, queries = torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 4, 40, 8, generator=g)
    idx = SnapKV(window=10, kernel_size=3).compress(keys, keys, queries, 4)[2][0]
    assert idx.tolist() == [[36, 37, 38, 39]] * 2


def test_snapkv_window_ties_reject_unknown_rules():
    with pytest.raises(ValueError, match="window_ties"):
        SnapKV(window_ties="oldest")
    assert make_policy("snapkv", window_ties="topk").window_ties == "topk"


def observed(policy, attn_rows: list[list[float]]) -> EvictionState:
    """A state of ``len(attn_rows[0])`` tokens after one head observed the given attention rows (the newest last)."""
    attn = torch.tensor(attn_rows).view(1, 1, len(attn_rows), -1)  # [B, Hkv, Tq, T]
    state = EvictionState.empty(1, 1)
    state.append(attn.shape[-1])
    policy.observe(state, attn)
    return state


# Causal rows of 3 queries: token 0 receives 1 + 0.5 + 0.2 = 1.7 from 3 queries (mean 0.567), token 1
# 0.5 + 0.2 = 0.7 from 2 (0.35), token 2 0.6 from 1 (0.6).
ROWS = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.2, 0.6]]


def test_observed_attention_means_over_the_queries_that_saw_each_token():
    policy = ObservedAttention()
    state = observed(policy, ROWS)
    keys = torch.zeros(1, 1, 3, 2)
    assert torch.allclose(policy.score_tokens(state, keys, keys)[0, 0], torch.tensor([1.7 / 3, 0.7 / 2, 0.6]))
    assert policy.select(state, keys, keys, 1)[0, 0].tolist() == [2]
    assert policy.select(state, keys, keys, 2)[0, 0].tolist() == [0, 2]
    h2o = H2O(recent_fraction=0.0)  # summed attention: token 1 (0.7) beats token 2 (0.6)
    assert h2o.select(observed(h2o, ROWS), keys, keys, 2)[0, 0].tolist() == [0, 1]


def test_observed_attention_counts_only_the_queries_it_was_given():
    """Two of three queries observed: tokens 0 and 1 were seen by 2 queries, token 2 by 1."""
    policy = ObservedAttention()
    state = observed(policy, ROWS[1:])
    assert state.stats["seen"][0, 0].tolist() == [2.0, 2.0, 1.0]
    assert torch.allclose(state.stats["acc"][0, 0], torch.tensor([0.7, 0.7, 0.6]))


def test_observed_attention_counts_the_queries_that_saw_each_token_and_follows_evictions():
    g = torch.Generator().manual_seed(0)
    keys, queries = torch.randn(1, 2, 20, 8, generator=g), torch.randn(1, 4, 20, 8, generator=g)
    policy = ObservedAttention()
    state = policy.prefill_state(keys, queries)
    assert state.stats["seen"][0, 0].tolist() == [float(20 - j) for j in range(20)]
    idx = policy.select(state, keys, keys, 5)
    state.keep(idx)
    assert torch.equal(state.stats["seen"], (20 - idx).float())


def test_observed_attention_is_registered():
    assert POLICIES["observed_attention"] is ObservedAttention
    assert "ObservedAttentionPress" in ObservedAttention.__doc__
    assert "H2O" in ObservedAttention.__doc__
