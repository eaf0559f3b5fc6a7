"""Properties of the scheduler simulator over random small workloads (hypothesis, derandomized profile)."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from kvcore.sched import Request, SimConfig, Workload, simulate
from tests.test_sched import COST, check_invariants

BLOCK_SIZES = (1, 2, 4, 8)


@st.composite
def workloads(draw) -> Workload:
    n = draw(st.integers(1, 10))
    gaps = draw(st.lists(st.floats(0, 0.05, allow_nan=False), min_size=n, max_size=n))
    arrivals = [sum(gaps[:i]) for i in range(n)]
    requests = tuple(
        Request(i, arrivals[i], draw(st.integers(1, 40)), draw(st.integers(1, 24)),
                draw(st.one_of(st.none(), st.integers(0, 1))))
        for i in range(n))
    return Workload(requests, prefix_tokens=draw(st.integers(0, 16)), seed=draw(st.integers(0, 3)))


@st.composite
def engines(draw, wl: Workload) -> SimConfig:
    block_size = draw(st.sampled_from(BLOCK_SIZES))
    longest = max(math.ceil((r.prompt_tokens + r.output_tokens) / block_size) for r in wl.requests)
    policy = draw(st.sampled_from(["static", "continuous", "chunked"]))
    max_num_seqs = draw(st.integers(1, 6))
    longest_tokens = max(r.prompt_tokens + r.output_tokens for r in wl.requests)
    low = max_num_seqs if policy == "chunked" else max(max_num_seqs, longest_tokens)
    return SimConfig(
        COST, policy=policy, block_size=block_size, max_num_seqs=max_num_seqs,
        num_blocks=draw(st.integers(longest, 3 * longest)),
        max_num_batched_tokens=draw(st.integers(low, low + 64)),
        preemption=draw(st.sampled_from(["recompute", "swap"])),
        host_kv_blocks=draw(st.one_of(st.none(), st.integers(0, 8))),
        enable_prefix_caching=draw(st.booleans()))


@settings(max_examples=100)
@given(st.data())
def test_any_workload_on_any_engine_keeps_the_invariants(data):
    wl = data.draw(workloads())
    cfg = data.draw(engines(wl))
    check_invariants(simulate(wl, cfg), wl)
