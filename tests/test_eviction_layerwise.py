"""Decode-time eviction replayed layer by layer in one forward equals the token-by-token run, for every policy it
replays, both position modes and both budget kinds; it runs one forward where the token-by-token run runs one per
token, and the step timer runs exactly the steps it reports."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kvcore.eviction import POLICIES, make_policy
from kvcore.eviction.evaluate import TIMED_STEPS, EvictionConfig, RunSpec
from kvcore.eviction.layerwise import ROUNDING_DECIDES, replays, run_decode_layerwise, time_decode_steps
from kvcore.eviction.reference import reference_pass
from kvcore.eviction.runner import run_decode
from tests.conftest import Forwards

REPLAYED = [name for name in POLICIES if replays(make_policy(name))]


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=96)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny():
    model = llama()
    ids = torch.randint(0, 64, (1, 41), generator=torch.Generator().manual_seed(3))
    return model, reference_pass(model, ids)


def assert_same_run(fast, slow) -> None:
    assert (fast.policy, fast.budget, fast.positions, fast.mode, fast.scored_from) == (
        slow.policy, slow.budget, slow.positions, slow.mode, slow.scored_from)
    assert torch.allclose(fast.nll, slow.nll, atol=1e-4)
    assert torch.allclose(fast.mass, slow.mass, atol=1e-5)
    assert torch.allclose(fast.output_error, slow.output_error, atol=1e-4)
    assert (fast.lookups, fast.hits, fast.evictions, fast.kv_bytes_held) == (
        slow.lookups, slow.hits, slow.evictions, slow.kv_bytes_held)
    assert (fast.sinks_retained, fast.sinks_total) == (slow.sinks_retained, slow.sinks_total)
    assert (fast.visible == slow.visible).all()
    assert len(fast.step_ms) == 0


def test_the_full_cache_and_every_evicting_policy_but_the_rounding_ones_are_replayed():
    assert set(REPLAYED) == {n for n in POLICIES if not POLICIES[n].stores_all} - set(ROUNDING_DECIDES)
    assert {"full", "sliding_window", "streaming_llm", "h2o", "random", "tova", "snapkv"} <= set(REPLAYED)
    for name in ("attention_window", "knorm"):
        assert not replays(make_policy(name))
        with pytest.raises(ValueError, match="use run_decode"):
            run_decode_layerwise(None, None, make_policy(name), 8)
    assert not replays(make_policy("h2o"), mode="prefill")


@pytest.mark.parametrize("positions", ["original", "rerotate"])
@pytest.mark.parametrize("name", REPLAYED)
def test_one_forward_equals_the_token_by_token_run(tiny, name, positions):
    model, ref = tiny
    policy = make_policy(name)
    first = 1 if policy.keeps_all else 8  # the full cache decodes after its first token, as a sweep runs it
    with Forwards(model) as slow_forwards:
        slow = run_decode(model, ref, policy, 8, positions, full_prefill=1 if policy.keeps_all else None)
    with Forwards(model) as fast_forwards:
        fast = run_decode_layerwise(model, ref, policy, 8, positions)
    assert_same_run(fast, slow)
    assert slow_forwards.count == 1 + (ref.num_fed - first)  # the first tokens at once, then one per token
    assert fast_forwards.count == (0 if policy.keeps_all else 1)  # the full cache: read off the reference
    assert fast.lookups > 0


@pytest.mark.parametrize(("budget", "rule"), [(0.3, "round"), (0.3, "kvpress"), (40, "round"), (39, "round")])
def test_share_budgets_and_budgets_at_the_text_length_match_too(tiny, budget, rule):
    model, ref = tiny
    policy = make_policy("h2o")
    slow = run_decode(model, ref, policy, budget, budget_rule=rule)
    fast = run_decode_layerwise(model, ref, policy, budget, budget_rule=rule)
    assert_same_run(fast, slow)


def test_a_model_without_rope_is_replayed_too():
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    ref = reference_pass(model, torch.randint(0, 50, (1, 30), generator=torch.Generator().manual_seed(4)))
    for name in ("streaming_llm", "h2o", "snapkv"):
        policy = make_policy(name)
        assert_same_run(run_decode_layerwise(model, ref, policy, 6), run_decode(model, ref, policy, 6))


def test_a_budget_below_the_policys_minimum_is_refused_as_by_the_token_by_token_run(tiny):
    model, ref = tiny
    policy = make_policy("streaming_llm", n_sink=4)
    with pytest.raises(ValueError, match="needs a budget of at least 5 tokens"):
        run_decode(model, ref, policy, 3)
    with pytest.raises(ValueError, match="needs a budget of at least 5 tokens"):
        run_decode_layerwise(model, ref, policy, 3)


@pytest.mark.parametrize("name", ["full", "h2o", "attention_window"])
def test_the_step_timer_runs_one_forward_then_exactly_the_steps_it_times(tiny, name):
    model, ref = tiny
    with Forwards(model) as forwards:
        steps = time_decode_steps(model, ref.ids, make_policy(name), 8, steps=5)
    assert len(steps) == 6
    assert (steps > 0).all()
    assert forwards.count == 1 + 6


def test_a_sweeps_default_work_is_one_forward_per_evicting_run_plus_the_timed_steps(tiny):
    """The page's default view is bounded by counting: every default policy is replayed in one forward, the full
    cache is read off the reference, and each run is timed on TIMED_STEPS + 1 real steps after one forward."""
    model, ref = tiny
    specs = EvictionConfig(max_tokens=41).runs()
    with Forwards(model) as forwards:
        measured = [spec.measure(model, ref) for spec in specs]
    assert forwards.count == len(specs) - 1  # the full cache's run is the reference's
    assert all(len(m.step_ms) == 0 for m in measured)
    with Forwards(model) as forwards:
        timed = [spec.time_steps(model, ref.ids)[0] for spec in specs]
    assert forwards.count == len(specs) * (1 + TIMED_STEPS + 1)
    assert all(len(t) == TIMED_STEPS + 1 for t in timed)


def test_a_run_spec_measures_what_the_token_by_token_run_measures(tiny):
    model, ref = tiny
    for spec in (RunSpec("tova", (), 6), RunSpec("knorm", (), 6), RunSpec("random", (("seed", 3),), 0.25,
                                                                            positions="rerotate")):
        policy = spec.make_policy()
        slow = run_decode(model, ref, policy, spec.budget, spec.positions)
        assert_same_run(spec.measure(model, ref), slow)
    full = RunSpec("full", (), 1.0).measure(model, ref)
    assert torch.allclose(full.nll, ref.nll, atol=1e-5)
    assert full.hits == full.lookups > 0  # every query after the first measured, everything readable
    assert float(full.output_error.max()) < 1e-5


def test_many_steps_measured_at_once_equal_the_steps_measured_one_by_one(tiny):
    """The meter's batched sums (what the replay uses) against its one-query step, on random read sets."""
    from kvcore.eviction.metrics import AttentionMeter

    _, ref = tiny
    gen = torch.Generator().manual_seed(5)
    L, Hkv, m = ref.num_layers, ref.num_kv_heads, 6
    ts = list(range(10, ref.num_fed))

    def read(t: int) -> torch.Tensor:  # m - 1 earlier positions and the query itself
        return torch.cat([torch.randperm(t, generator=gen)[:m - 1], torch.tensor([t])])

    vis = torch.stack([torch.stack([torch.stack([read(t) for _ in range(Hkv)]) for _ in range(L)]) for t in ts])
    outputs = torch.randn(len(ts), L, ref.outputs.shape[-1], generator=gen)
    one, many = AttentionMeter(ref, 1.0), AttentionMeter(ref, 1.0)
    for i, t in enumerate(ts):
        one.step(t, vis[i], outputs[i])
    many.step_many(ts, vis, outputs)
    assert (many.lookups, many.hits, many.steps) == (one.lookups, one.hits, one.steps)
    assert torch.allclose(many.mass, one.mass, atol=1e-5)
    assert torch.allclose(many.error, one.error, rtol=1e-5)
    assert (many.visible == one.visible).all()


def test_positional_policies_keep_the_same_tokens_whatever_the_keys_say():
    """A policy marked positional is replayed through one mask worked out on positions alone: check the mark."""
    from kvcore.eviction.base import EvictionState
    from kvcore.eviction.layerwise import positional_schedule

    marked = [name for name in POLICIES if POLICIES[name].positional]
    assert sorted(marked) == ["sliding_window", "streaming_llm"]
    gen = torch.Generator().manual_seed(3)
    for name in marked:
        policy = make_policy(name)
        state = EvictionState.empty(1, 2)
        state.append(20)
        keys, values = torch.randn(1, 2, 20, 8, generator=gen), torch.randn(1, 2, 20, 8, generator=gen)
        blank = torch.zeros(1, 2, 20, 1)
        assert torch.equal(policy.select(state, keys, values, 8), policy.select(state, blank, blank, 8))
    schedule = positional_schedule(make_policy("sliding_window"), 4, 10, 2)
    assert [r[0].tolist() for r in schedule.reads] == [[t - 4, t - 3, t - 2, t - 1, t] for t in range(4, 10)]
    assert schedule.kept[0, 0].tolist() == [6, 7, 8, 9]
    assert schedule.evicted == 6 * 2  # one entry per KV head per step
    with pytest.raises(ValueError, match="reads more than positions"):
        positional_schedule(make_policy("h2o"), 4, 10, 2)
