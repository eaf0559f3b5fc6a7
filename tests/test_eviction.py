"""Eviction policies, parametrized over the registry (kvpress tests/ style), on random tensors and a tiny random Llama.

Tensor level: each policy keeps exactly the budget, in original order, deterministically, with the
sinks and windows it promises, for MHA, GQA and MQA. Model level: a budget at or above the text
length reproduces the full-cache perplexity bit for bit, decode-time eviction holds every layer at
the budget after every step, and stateful policies keep their accumulators aligned with the kept tokens.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kvcore.eviction import POLICIES, EvictionState, causal_attention, group_attention, make_policy, resolve_budget
from kvcore.eviction.reference import reference_pass
from kvcore.eviction.runner import run_decode, run_prefill

NAMES = list(POLICIES)
EVICTING = [n for n, cls in POLICIES.items() if not (cls.keeps_all or cls.stores_all)]


def kvq(B=2, Hq=4, Hkv=2, T=40, D=8, seed=0):
    """Random keys, values ``[B, Hkv, T, D]`` and queries ``[B, Hq, T, D]``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g),
            torch.randn(B, Hq, T, D, generator=g))


@pytest.fixture(scope="module")
def tiny_llama():
    """2 layers, 4 query heads sharing 2 KV heads (GQA), RoPE; random weights, seeded."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny_ref(tiny_llama):
    ids = torch.randint(0, 128, (1, 49), generator=torch.Generator().manual_seed(1))
    return reference_pass(tiny_llama, ids)


# ---- tensor level -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_score_has_one_value_per_kv_head_and_token(name):
    keys, values, queries = kvq()
    assert POLICIES[name]().score(keys, values, queries).shape == (2, 2, 40)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("budget", [5, 16, 0.25])
def test_kept_count_equals_the_budget_and_indices_are_sorted_and_unique(name, budget):
    keys, values, queries = kvq()
    policy = POLICIES[name]()
    k_keys, k_values, idx = policy.compress(keys, values, queries, budget)
    expected = 40 if (policy.keeps_all or policy.stores_all) else resolve_budget(budget, 40)
    assert idx.shape == (2, 2, expected)
    assert k_keys.shape == k_values.shape == (2, 2, expected, 8)
    assert bool((idx[..., 1:] > idx[..., :-1]).all()), "kept tokens stay in original order, each once"
    assert torch.equal(k_keys, keys.gather(2, idx[..., None].expand(-1, -1, -1, 8)))


@pytest.mark.parametrize("name", NAMES)
def test_attention_reads_exactly_the_budget(name):
    """select() is what attention may read: the budget for every policy except the full cache."""
    keys, values, queries = kvq()
    policy = POLICIES[name]()
    idx = policy.select(policy.prefill_state(keys, queries), keys, values, 12)
    assert idx.shape[-1] == (40 if policy.keeps_all else 12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("budget", [40, 100, 1.0])
def test_budget_at_or_above_the_length_keeps_everything(name, budget):
    keys, values, queries = kvq()
    k_keys, _, idx = POLICIES[name]().compress(keys, values, queries, budget)
    assert torch.equal(idx[0, 0], torch.arange(40))
    assert torch.equal(k_keys, keys)


@pytest.mark.parametrize("name", NAMES)
def test_same_inputs_same_choice(name):
    keys, values, queries = kvq()
    first = POLICIES[name]().compress(keys, values, queries, 10)[2]
    again = POLICIES[name]().compress(keys.clone(), values.clone(), queries.clone(), 10)[2]
    assert torch.equal(first, again)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("Hq", "Hkv"), [(4, 4), (8, 2), (6, 1)], ids=["MHA", "GQA", "MQA"])
def test_gqa_and_mqa_inputs_work(name, Hq, Hkv):
    keys, values, queries = kvq(B=1, Hq=Hq, Hkv=Hkv, T=24)
    _, _, idx = POLICIES[name]().compress(keys, values, queries, 8)
    assert idx.shape[:2] == (1, Hkv)


def test_group_attention_averages_each_kv_heads_query_group():
    attn = torch.arange(2 * 4 * 1 * 3, dtype=torch.float32).view(2, 4, 1, 3)
    grouped = group_attention(attn, 2)  # query heads (0, 1) -> KV head 0, (2, 3) -> KV head 1
    assert torch.equal(grouped[:, 0], attn[:, :2].mean(dim=1))
    assert torch.equal(grouped[:, 1], attn[:, 2:].mean(dim=1))


def test_causal_attention_rows_sum_to_one_and_never_look_ahead():
    keys, _, queries = kvq(T=10)
    attn = causal_attention(queries[:, :, -4:], keys)  # the last 4 of 10 positions
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4, 4))
    assert float(attn[:, :, 0, 7:].abs().sum()) == 0.0  # query at position 6 sees keys 0..6


def test_sliding_window_keeps_the_newest():
    keys, values, queries = kvq()
    idx = POLICIES["sliding_window"]().compress(keys, values, queries, 10)[2]
    assert idx[0, 0].tolist() == list(range(30, 40))


@pytest.mark.parametrize("n_sink", [1, 4])
def test_streaming_llm_keeps_the_sinks_and_the_recent_window(n_sink):
    keys, values, queries = kvq()
    idx = make_policy("streaming_llm", n_sink=n_sink).compress(keys, values, queries, 10)[2]
    assert idx[1, 1].tolist() == list(range(n_sink)) + list(range(40 - (10 - n_sink), 40))


@pytest.mark.parametrize(("name", "params", "recent"), [
    ("h2o", {"recent_fraction": 0.5}, 6), ("h2o", {"recent_fraction": 0.25}, 3), ("snapkv", {"window": 4}, 4),
])
def test_policies_keep_the_window_they_promise(name, params, recent):
    keys, values, queries = kvq()
    idx = make_policy(name, **params).compress(keys, values, queries, 12)[2]
    tail = set(range(40 - recent, 40))
    assert all(tail <= set(row.tolist()) for row in idx.view(-1, 12))


def test_h2o_keeps_the_heavy_hitters():
    """A key every query attends to is kept even though it is old."""
    keys, values, queries = kvq(B=1, Hq=2, Hkv=2, T=30)
    keys[..., 3, :] = queries.mean(dim=2) * 20  # position 3 aligns with every query
    idx = make_policy("h2o", recent_fraction=0.5).compress(keys, values, queries, 6)[2]
    assert 3 in idx[0, 0].tolist()


def test_knorm_keeps_the_smallest_key_norms():
    keys, values, queries = kvq(B=1, Hkv=1, Hq=1, T=10)
    keys = keys / keys.norm(dim=-1, keepdim=True) * torch.arange(1, 11, dtype=torch.float32)[:, None]
    assert POLICIES["knorm"]().compress(keys, values, queries, 3)[2][0, 0].tolist() == [0, 1, 2]


def test_tova_heads_agree_unless_per_head():
    keys, values, queries = kvq(Hq=4, Hkv=4)
    shared = make_policy("tova").compress(keys, values, queries, 8)[2]
    assert all(torch.equal(shared[:, 0], shared[:, h]) for h in range(4))
    own = make_policy("tova", per_head=True).compress(keys, values, queries, 8)[2]
    assert not all(torch.equal(own[:, 0], own[:, h]) for h in range(4))


def test_random_depends_only_on_its_seed():
    keys, values, queries = kvq()
    a = make_policy("random", seed=1).compress(keys, values, queries, 10)[2]
    b = make_policy("random", seed=1).compress(keys, values, queries, 10)[2]
    c = make_policy("random", seed=2).compress(keys, values, queries, 10)[2]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(("name", "params", "message"), [
    ("streaming_llm", {"n_sink": 0}, "n_sink"), ("h2o", {"recent_fraction": 1.0}, "recent_fraction"),
    ("snapkv", {"kernel_size": 4}, "odd"), ("snapkv", {"pooling": "median"}, "pooling"),
    ("lru", {"threshold": 0.0}, "threshold"), ("random", {"seed": 1.5}, "seed"), ("tova", {"per_head": 1}, "per_head"),
    ("knorm", {"alpha": 1}, "bad hyperparameters"), ("nope", {}, "unknown policy"),
])
def test_bad_hyperparameters_say_what_is_allowed(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_policy(name, **params)


@pytest.mark.parametrize("budget", [0, -3, 0.0, 1.5, True, "8"])
def test_bad_budgets_are_rejected(budget):
    with pytest.raises(ValueError, match="budget"):
        resolve_budget(budget, 10)


def test_streaming_llm_needs_room_beyond_its_sinks():
    keys, values, queries = kvq()
    with pytest.raises(ValueError, match="at least 5"):
        make_policy("streaming_llm", n_sink=4).compress(keys, values, queries, 4)


def test_every_policy_is_a_slotted_dataclass_citing_its_source():
    for name, cls in POLICIES.items():
        assert dataclasses.is_dataclass(cls), name
        assert hasattr(cls, "__slots__"), name
        assert cls.name == name
        assert cls.paper, name
        assert cls.__doc__, name


# ---- stateful policies stay aligned with the kept tokens -------------------------------------------


def _stream_random_attention(policy, steps=30, budget=8, Hkv=2, seed=0):
    """Feed ``steps`` tokens one at a time with random attention rows, evicting to ``budget``.

    Returns the state and, per original position, the attention it received (brute force) and the
    last step it was used above the uniform share (LRU's rule with threshold 1).
    """
    g = torch.Generator().manual_seed(seed)
    state = EvictionState.empty(1, Hkv)
    received: dict[tuple[int, int], float] = {}
    last_use: dict[tuple[int, int], int] = {}
    keys = torch.zeros(1, Hkv, 0, 4)
    for t in range(steps):
        state.append(1)
        keys = torch.cat([keys, torch.randn(1, Hkv, 1, 4, generator=g)], dim=2)
        attn = torch.randn(1, Hkv, 1, state.length, generator=g).mul(3).softmax(-1)  # [1, Hkv, 1, T]
        policy.observe(state, attn)
        for h in range(Hkv):
            last_use[(h, t)] = t
            for i, pos in enumerate(state.positions[0, h].tolist()):
                received[(h, pos)] = received.get((h, pos), 0.0) + float(attn[0, h, 0, i])
                if float(attn[0, h, 0, i]) >= 1.0 / state.length:
                    last_use[(h, pos)] = t
        if state.length > budget:
            idx = policy.select(state, keys, keys, budget)
            keys = keys.gather(2, idx[..., None].expand(-1, -1, -1, 4))
            state.keep(idx)
    return state, received, last_use


def test_h2o_accumulators_follow_the_kept_tokens():
    state, received, _ = _stream_random_attention(make_policy("h2o"))
    for h in range(2):
        expected = [received[(h, p)] for p in state.positions[0, h].tolist()]
        assert torch.allclose(state.stats["acc"][0, h], torch.tensor(expected), atol=1e-5)


def test_lru_last_use_follows_the_kept_tokens():
    state, _, last_use = _stream_random_attention(make_policy("lru", threshold=1.0))
    for h in range(2):
        expected = [float(last_use[(h, p)]) for p in state.positions[0, h].tolist()]
        assert state.stats["last_use"][0, h].tolist() == expected


@pytest.mark.parametrize("name", ["h2o", "tova", "snapkv", "lru", "observed_attention"])
def test_observing_a_prompt_at_once_equals_observing_it_token_by_token(name):
    keys, _, queries = kvq(B=1, Hq=4, Hkv=2, T=20)
    attn = group_attention(causal_attention(queries, keys), 2)  # [1, 2, 20, 20]
    policy = POLICIES[name]()
    at_once = EvictionState.empty(1, 2)
    at_once.append(20)
    policy.observe(at_once, attn)
    stepwise = EvictionState.empty(1, 2)
    for t in range(20):
        stepwise.append(1)
        policy.observe(stepwise, attn[..., t:t + 1, :t + 1])
    for stat in at_once.stats:
        assert torch.allclose(at_once.stats[stat], stepwise.stats[stat], atol=1e-6), stat


# ---- on a real (tiny, random) model ------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("positions", ["original", "rerotate"])
def test_budget_above_the_length_reproduces_the_full_perplexity_exactly(tiny_llama, tiny_ref, name, positions):
    run = run_decode(tiny_llama, tiny_ref, POLICIES[name](), 64, positions)
    assert torch.equal(run.nll, tiny_ref.nll)
    assert run.evictions == 0
    assert float(run.mass.min()) == 1.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("positions", ["original", "rerotate"])
def test_decode_time_eviction_holds_every_layer_at_the_budget(tiny_llama, tiny_ref, name, positions):
    policy, sizes = POLICIES[name](), []
    run = run_decode(tiny_llama, tiny_ref, policy, 12, positions,
                     on_step=lambda t, cache: sizes.append((t, [cache.get_seq_length(i) for i in range(2)])))
    # the full cache takes the whole text in one forward; the others step once per token after the budget
    assert len(sizes) == (0 if policy.keeps_all else tiny_ref.num_fed - 12)
    for t, per_layer in sizes:
        held = t + 1 if policy.stores_all else 12
        assert per_layer == [held, held]
    if not (policy.keeps_all or policy.stores_all):
        assert run.evictions == (tiny_ref.num_fed - 12) * 2 * 2  # one token x 2 layers x 2 KV heads per step
        assert run.kv_bytes_held == tiny_ref.kv_bytes * 12 // tiny_ref.num_fed
    assert run.nll.shape == tiny_ref.nll.shape
    assert torch.isfinite(run.nll).all()


def test_attention_window_reads_like_a_sliding_window_but_frees_nothing(tiny_llama, tiny_ref):
    window = run_decode(tiny_llama, tiny_ref, POLICIES["attention_window"](), 10)
    sliding = run_decode(tiny_llama, tiny_ref, POLICIES["sliding_window"](), 10)
    assert torch.allclose(window.nll, sliding.nll, atol=1e-5)
    assert window.kv_bytes_held == tiny_ref.kv_bytes
    assert sliding.kv_bytes_held < tiny_ref.kv_bytes


def test_rerotating_a_contiguous_window_changes_nothing(tiny_llama, tiny_ref):
    """RoPE scores depend on relative positions only, so compact positions leave a sliding window exact."""
    original = run_decode(tiny_llama, tiny_ref, POLICIES["sliding_window"](), 10, "original")
    rerotated = run_decode(tiny_llama, tiny_ref, POLICIES["sliding_window"](), 10, "rerotate")
    assert torch.allclose(original.nll, rerotated.nll, atol=1e-4)


def test_rerotation_needs_rope():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=16, n_layer=1, n_head=2)).eval()
    ref = reference_pass(gpt2, torch.arange(20)[None])
    assert run_decode(gpt2, ref, POLICIES["streaming_llm"](), 8, "original").nll.shape == (19,)
    with pytest.raises(ValueError, match="RoPE"):
        run_decode(gpt2, ref, POLICIES["streaming_llm"](), 8, "rerotate")


@pytest.mark.parametrize("name", NAMES)
def test_prefill_compression_keeps_the_budget_of_the_prompt(tiny_llama, tiny_ref, name):
    policy = POLICIES[name]()
    run = run_prefill(tiny_llama, tiny_ref, policy, 8, prompt_tokens=24)
    assert run.budget == 8
    assert run.scored_from == 25
    assert run.nll.shape == (24,)
    stored = 24 if (policy.keeps_all or policy.stores_all) else 8
    assert run.kv_bytes_held == tiny_ref.kv_bytes * (stored + 24) // tiny_ref.num_fed
    if policy.keeps_all:
        assert torch.allclose(run.nll, tiny_ref.nll[24:], atol=1e-5)


# ---- one eviction loop --------------------------------------------------------------------------


@pytest.mark.parametrize("name", EVICTING)
@pytest.mark.parametrize("positions", ["original", "rerotate"])
def test_the_plan_hook_and_the_runner_are_one_loop(tiny_llama, tiny_ref, name, positions):
    """Streaming perplexity through an eviction plan (the Live model page's path) gives the runner's numbers."""
    from kvcore.eviction.hook import eviction_plan
    from kvcore.models.perplexity import streaming_nll

    budget = 12
    run = run_decode(tiny_llama, tiny_ref, make_policy(name), budget, positions)
    plan = eviction_plan(make_policy(name), budget, positions)
    nll = streaming_nll(tiny_llama, tiny_ref.ids, plan, prefill=budget)
    assert torch.allclose(nll, run.nll, atol=1e-5)
    assert plan.hook.evicted == run.evictions == (tiny_ref.num_fed - budget) * 2 * 2  # tokens x layers x KV heads


@pytest.mark.parametrize("positions", ["original", "rerotate"])
def test_generation_through_an_eviction_plan_holds_the_budget(tiny_llama, positions):
    from kvcore.eviction import StreamingLLM
    from kvcore.eviction.hook import eviction_plan
    from kvcore.models.generate import GenerationSettings, generate_stream

    plan = eviction_plan(StreamingLLM(n_sink=2), 10, positions)
    events = list(generate_stream(tiny_llama, None, torch.arange(3, 19), GenerationSettings(max_new_tokens=8), plan))
    assert [e.kv_tokens for e in events] == [10] * 8  # the 16-token prompt is evicted to 10 at once, then held
    sinks = plan.hook.states[0].positions[0, 0, :2].tolist()
    assert sinks == [0, 1]  # StreamingLLM's sinks survive every eviction
    assert plan.hook.states[0].positions[0, 0, -1].item() == 16 + 8 - 2  # the newest token fed is kept


def test_the_hook_refuses_what_is_not_a_policy():
    from kvcore.eviction.hook import EvictionHook

    with pytest.raises(ValueError, match=r"kvcore\.eviction policy"):
        EvictionHook(object(), 8)
    with pytest.raises(ValueError, match="budget"):
        EvictionHook(make_policy("h2o"), 0)
