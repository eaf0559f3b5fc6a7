"""The scheduler's step rule pinned on hand-counted steps: grants, block tables, preemptions, counters.

Each test drives :class:`~kvcore.sched.scheduler.Scheduler` directly, ``schedule()`` then
``update_from_output()``, on 2-token blocks and pools of a few blocks, and asserts every number of every
step. ``test_step_counters_match_a_direct_count`` checks the step's cost-model inputs against a brute-force
count over a pressured random workload.
"""

from __future__ import annotations

import re

import pytest

from kvcore.sched import FittedCost, Request, SimConfig, Workload, prefill_pairs, simulate
from kvcore.sched.request import VOCAB_SIZE, RequestState
from kvcore.sched.scheduler import STATIC_BUDGET, Scheduler, SchedulerOutput

ONE_SECOND = FittedCost("one second per step", intercept_s=1.0)
V = VOCAB_SIZE  # the i-th sampled token of every request is V + i



def exactly(message: str) -> str:
    """A ``pytest.raises`` pattern that matches the whole message, not a part of it."""
    return f"^{re.escape(message)}$"


def make(policy: str = "continuous", num_blocks: int = 8, **kw) -> Scheduler:
    """A scheduler on ``num_blocks`` blocks of 2 tokens, 4 seats and a 16-token budget unless told otherwise."""
    kw = {"block_size": 2, "max_num_seqs": 4, "max_num_batched_tokens": 16} | kw
    return Scheduler(SimConfig(ONE_SECOND, policy=policy, num_blocks=num_blocks, **kw), num_blocks)


def req(index: int, prompt: list[int], output: int, **kw) -> RequestState:
    return RequestState.new(Request(index, 0.0, len(prompt), output), list(prompt), **kw)


def grants(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(r.rid, n) for r, n in out.scheduled]


def rids(states) -> list[str]:
    return [r.rid for r in states]


def counters(out: SchedulerOutput) -> tuple[int, ...]:
    """(new_tokens, attn_pairs, kv_tokens_read, prefill_tokens, decode_tokens, swap_tokens, kv_blocks_used)."""
    return (out.new_tokens, out.attn_pairs, out.kv_tokens_read, out.prefill_tokens, out.decode_tokens,
            out.swap_tokens, out.kv_blocks_used)


def run_step(s: Scheduler) -> tuple[SchedulerOutput, list[str]]:
    out = s.schedule()
    return out, rids(s.update_from_output(out))


# ------------------------------------------------------------------------------------------ continuous
def test_two_requests_prefill_decode_and_the_last_admitted_is_preempted_and_recomputed():
    """4 blocks of 2 tokens; two 3-token prompts that each sample 3 tokens need 3 blocks apiece."""
    s = make(num_blocks=4)
    r0, r1 = req(0, [1, 2, 3], 3), req(1, [4, 5, 6], 3)
    s.add_request(r0)
    s.add_request(r1)
    assert s.has_requests()

    # Step 0: both prompts are admitted whole (3 + 3 of 16 tokens): blocks 0 1 and 2 3; both sample.
    out, done = run_step(s)
    assert (out.step, grants(out), rids(out.admitted), rids(out.sampling), done) == (
        0, [("r0", 3), ("r1", 3)], ["r0", "r1"], ["r0", "r1"], [])
    assert counters(out) == (6, 2 * prefill_pairs(3, 0), 0, 6, 0, 0, 4)
    assert s.manager.block_table("r0") == [0, 1]
    assert s.manager.block_table("r1") == [2, 3]
    assert (r0.output_ids, r0.num_tokens, r0.in_prefill, r0.prefix_hit_tokens) == ([V], 4, False, 0)

    # Step 1: one decode each; position 3 fits the second block of each. Attention: context 3 + itself.
    out, done = run_step(s)
    assert (out.step, grants(out), out.admitted, done) == (1, [("r0", 1), ("r1", 1)], [], [])
    assert counters(out) == (2, 2 * (3 + 1), 6, 0, 2, 0, 4)
    assert s.manager.token_ids("r0") == [1, 2, 3, V]

    # Step 2: r0's position 4 needs a third block and none is free: r1 (last admitted) is preempted, its
    # blocks 3 2 go to the tail, r0 takes block 3 from the head; the running loop ends (r1 is gone).
    out, done = run_step(s)
    assert (grants(out), rids(out.preempted), rids(out.sampling), done) == ([("r0", 1)], ["r1"], ["r0"], ["r0"])
    assert counters(out) == (1, 4 + 1, 4, 0, 1, 0, 3)
    assert (r1.num_computed_tokens, r1.in_prefill, r1.num_preemptions, s.num_preemptions) == (0, True, 1, 1)
    assert rids(s.waiting) == ["r1"]
    assert (rids(s.running), s.seats) == ([], 0)  # r0 finished after its third sample
    assert s.manager.free_block_queue() == [2, 3, 1, 0]

    # Step 3: r1 recomputes its 5 tokens (prompt + 2 samples) in blocks 2 3 1 and samples its third.
    out, done = run_step(s)
    assert (grants(out), rids(out.admitted), done) == ([("r1", 5)], ["r1"], ["r1"])
    assert counters(out) == (5, prefill_pairs(5, 0), 0, 5, 0, 0, 3)
    assert r1.output_ids == [V, V + 1, V + 2]
    assert r1.readmit_hit_tokens == 0
    assert not s.has_requests()
    assert s.step == 4
    assert s.manager.num_free_blocks == 4


def test_an_empty_schedule_is_not_a_step():
    s = make()
    out = s.schedule()
    assert (out.step, out.scheduled, out.preempted, s.step) == (0, [], [], 0)
    assert counters(out) == (0, 0, 0, 0, 0, 0, 0)


def test_swap_preemption_keeps_the_computed_tokens_and_brings_them_back():
    s = make(num_blocks=4, preemption="swap")
    r0, r1 = req(0, [1, 2, 3], 3), req(1, [4, 5, 6], 3)
    s.add_request(r0)
    s.add_request(r1)
    run_step(s)
    run_step(s)
    # Step 2: r1 holds 4 computed tokens (2 blocks); they go to host memory instead of being dropped.
    out, _ = run_step(s)
    assert rids(out.preempted) == ["r1"]
    assert out.swap_tokens == 4
    assert (r1.swapped, r1.num_computed_tokens, r1.in_prefill, s.host_blocks_used, s.swap_fallbacks) == (
        True, 4, False, 2, 0)
    # Step 3: r1 comes back with its 4 tokens swapped in and computes only its newest token (a decode).
    out, done = run_step(s)
    assert (grants(out), rids(out.admitted), done) == ([("r1", 1)], ["r1"], ["r1"])
    assert counters(out) == (1, 4 + 1, 4, 0, 1, 4, 3)
    assert (r1.swapped, s.host_blocks_used) == (False, 0)


def test_a_full_host_pool_recomputes_instead():
    s = make(num_blocks=4, preemption="swap", host_kv_blocks=1)
    r0, r1 = req(0, [1, 2, 3], 3), req(1, [4, 5, 6], 3)
    s.add_request(r0)
    s.add_request(r1)
    for _ in range(3):
        out, _ = run_step(s)
    assert rids(out.preempted) == ["r1"]
    assert (out.swap_tokens, r1.swapped, r1.num_computed_tokens, r1.in_prefill) == (0, False, 0, True)
    assert (s.swap_fallbacks, s.host_blocks_used) == (1, 0)


def test_a_host_pool_that_fits_exactly_swaps():
    s = make(num_blocks=4, preemption="swap", host_kv_blocks=2)
    r0, r1 = req(0, [1, 2, 3], 3), req(1, [4, 5, 6], 3)
    s.add_request(r0)
    s.add_request(r1)
    for _ in range(3):
        out, _ = run_step(s)
    assert (out.swap_tokens, r1.swapped, s.swap_fallbacks, s.host_blocks_used) == (4, True, 0, 2)


def test_a_request_that_preempts_itself_ends_the_running_loop():
    """One request alone whose next block cannot be found is its own victim."""
    s = make(num_blocks=2)
    r0 = req(0, [1, 2, 3], 4)
    s.add_request(r0)
    run_step(s)  # blocks 0 1, samples V
    run_step(s)  # position 3 in block 1, samples V+1
    out, done = run_step(s)  # position 4 needs a third block: r0 is preempted, nothing is scheduled
    assert (grants(out), rids(out.preempted), done) == ([], ["r0"], [])
    assert out.step == 2
    assert s.step == 3  # a preemption alone counts as a step
    assert rids(s.waiting) == ["r0"]
    assert s.manager.num_free_blocks == 2


# ------------------------------------------------------------------------------------------ budget, seats
def test_continuous_admits_a_prompt_only_when_it_fits_the_budget_whole():
    s = make(max_num_batched_tokens=4)
    r0, r1 = req(0, [1, 2, 3], 2), req(1, [4, 5], 2)
    s.add_request(r0)
    s.add_request(r1)
    out, _ = run_step(s)  # 3 of 4 tokens; r1's 2 do not fit the 1 left: admission stops
    assert grants(out) == [("r0", 3)]
    assert rids(s.waiting) == ["r1"]
    out, _ = run_step(s)  # r0's decode (1) then r1's whole prompt (2): 3 of 4
    assert grants(out) == [("r0", 1), ("r1", 2)]
    assert counters(out)[:5] == (3, 4 + prefill_pairs(2, 0), 3, 2, 1)


def test_chunked_prefill_takes_what_is_left_of_the_budget():
    s = make("chunked", max_num_batched_tokens=4)
    r0, r1 = req(0, [1, 2, 3, 4, 5, 6], 1), req(1, [7, 8], 1)
    s.add_request(r0)
    s.add_request(r1)
    # Step 0: a 4-token chunk of r0 (blocks 0 1); no budget left for r1; r0 does not sample yet.
    out, _ = run_step(s)
    assert (grants(out), rids(out.sampling)) == ([("r0", 4)], [])
    assert counters(out) == (4, prefill_pairs(4, 0), 0, 4, 0, 0, 2)
    assert r0.num_computed_tokens == 4
    # Step 1: r0's last 2 prompt tokens (a chunk after 4 cached: 2*4 + 3 pairs), then r1 whole (2).
    out, done = run_step(s)
    assert (grants(out), rids(out.sampling), done) == ([("r0", 2), ("r1", 2)], ["r0", "r1"], ["r0", "r1"])
    assert counters(out) == (4, prefill_pairs(2, 4) + prefill_pairs(2, 0), 4, 4, 0, 0, 4)
    assert s.manager.num_free_blocks == 8


def test_chunked_prefill_cuts_a_waiting_prompt_to_the_budget_left():
    s = make("chunked", max_num_batched_tokens=5)
    r0, r1 = req(0, [1, 2], 3), req(1, [3, 4, 5, 6, 7, 8], 1)
    s.add_request(r0)
    s.add_request(r1)
    out, _ = run_step(s)
    assert grants(out) == [("r0", 2), ("r1", 3)]
    out, _ = run_step(s)  # r0 decodes first, then 3 more of r1's 6
    assert grants(out) == [("r0", 1), ("r1", 3)]
    assert rids(out.sampling) == ["r0", "r1"]


def test_seats_limit_admission():
    s = make(max_num_seqs=2, max_num_batched_tokens=16)
    for i in range(3):
        s.add_request(req(i, [10 * i + 1], 2))
    out, _ = run_step(s)
    assert grants(out) == [("r0", 1), ("r1", 1)]
    assert (s.seats, rids(s.waiting)) == (2, ["r2"])
    out, done = run_step(s)  # both finish; r2 waits one more step for a seat
    assert (grants(out), done, s.seats) == ([("r0", 1), ("r1", 1)], ["r0", "r1"], 0)
    out, _ = run_step(s)
    assert grants(out) == [("r2", 1)]


def test_a_failed_allocation_stops_admission_and_changes_nothing():
    s = make(num_blocks=3)
    r0, r1, r2 = req(0, [1, 2, 3, 4], 1), req(1, [5, 6, 7], 1), req(2, [9], 1)
    for r in (r0, r1, r2):
        s.add_request(r)
    out, _ = run_step(s)  # r0 takes 2 blocks; r1 needs 2 of the 1 left: admission stops, r2 waits behind it
    assert grants(out) == [("r0", 4)]
    assert (rids(s.waiting), r1.admitted, r2.admitted) == (["r1", "r2"], False, False)


# ------------------------------------------------------------------------------------------ static
def test_static_batch_reserves_prompt_plus_output_and_holds_blocks_to_its_end():
    s = make("static", num_blocks=6, max_num_seqs=2, max_num_batched_tokens=2)
    r0, r1, r2 = req(0, [1, 2], 1), req(1, [3, 4], 3), req(2, [5, 6], 1)
    for r in (r0, r1, r2):
        s.add_request(r)
    # Step 0: no token budget (2 would not even fit both prompts); 2 seats; r0 reserves 2 blocks, r1 3.
    out, done = run_step(s)
    assert (grants(out), done) == ([("r0", 2), ("r1", 2)], ["r0"])
    assert s.held == [r0]
    assert s.manager.has_request("r0")  # finished, but its blocks wait for the batch to end
    # Steps 1-2: r1 decodes alone; r2 may not join.
    out, _ = run_step(s)
    assert grants(out) == [("r1", 1)]
    assert out.kv_blocks_used == 1 + 2
    out, done = run_step(s)
    assert (grants(out), done) == ([("r1", 1)], ["r1"])
    assert rids(s.held) == ["r0", "r1"]
    # Step 3: the batch has ended: r0's and r1's blocks are freed before r2 is admitted (and held in turn).
    out, _ = run_step(s)
    assert grants(out) == [("r2", 2)]
    assert (rids(s.held), s.manager.request_ids()) == (["r2"], ["r2"])
    assert out.kv_blocks_used == 1


def test_static_admits_only_batches_whose_whole_kv_fits():
    """Whole blocks: r0 needs ceil(5 / 2) = 3, r1 ceil(7 / 2) = 4; 3 + 4 > 6 (2.5 + 3.5 would fit)."""
    s = make("static", num_blocks=6, max_num_seqs=4)
    r0, r1 = req(0, [1, 2], 3), req(1, [3, 4, 5], 4)
    s.add_request(r0)
    s.add_request(r1)
    out, _ = run_step(s)
    assert grants(out) == [("r0", 2)]
    assert rids(s.waiting) == ["r1"]
    assert STATIC_BUDGET == 1 << 62


def test_static_exact_fit():
    s = make("static", num_blocks=6, max_num_seqs=4)
    s.add_request(req(0, [1, 2], 4))
    s.add_request(req(1, [3, 4], 3))  # 3 + 3 = 6 blocks exactly
    out, _ = run_step(s)
    assert grants(out) == [("r0", 2), ("r1", 2)]


# ------------------------------------------------------------------------------------------ prefix cache
def test_admission_counts_prefix_hits_toward_the_budget_and_the_hit_rate():
    s = make(enable_prefix_caching=True, max_num_batched_tokens=5)
    r0 = req(0, [1, 2, 3, 4, 5], 1)
    s.add_request(r0)
    run_step(s)  # r0's 5 tokens; blocks 0 1 are cached; r0 finishes and frees them
    # r1 shares 4 tokens: 2 tokens are computed, so its 6 tokens fit a 5-token budget.
    r1 = req(1, [1, 2, 3, 4, 8, 9], 1)
    s.add_request(r1)
    out, _ = run_step(s)
    assert grants(out) == [("r1", 2)]
    assert (r1.prefix_hit_tokens, r1.readmit_hit_tokens, r1.num_computed_tokens) == (4, 0, 6)
    assert counters(out)[:5] == (2, prefill_pairs(2, 4), 4, 2, 0)


def test_without_prefix_caching_the_same_prompt_does_not_fit():
    s = make(max_num_batched_tokens=5)
    s.add_request(req(0, [1, 2, 3, 4, 5], 1))
    run_step(s)
    r1 = req(1, [1, 2, 3, 4, 8, 9], 1)
    s.add_request(r1)
    out = s.schedule()
    assert out.scheduled == []
    assert rids(s.waiting) == ["r1"]


def test_a_readmitted_request_counts_its_own_hits_apart():
    """Recompute preemption with prefix caching: the request's own full blocks stay cached and hit again."""
    s = make(num_blocks=4, enable_prefix_caching=True)
    r0, r1 = req(0, [1, 2, 3], 3), req(1, [4, 5, 6], 3)
    s.add_request(r0)
    s.add_request(r1)
    run_step(s)
    run_step(s)
    # Step 2: r1 is preempted; its blocks 2 (4 5) and 3 (6 V), both full and cached, go to the tail in
    # reverse order (queue 3 2) and r0 pops block 3: that copy of (6 V) is evicted.
    out, _ = run_step(s)
    assert rids(out.preempted) == ["r1"]
    assert s.manager.free_block_queue() == [2, 3, 1, 0]  # r0 finished too: 2 is the one cached block left
    # Step 3: r1 is back with 5 tokens; block 2 (4 5) still hits, the other 3 tokens are computed in blocks
    # 3 and 1 (3 blocks in use), and r1 finishes.
    out, done = run_step(s)
    assert (grants(out), done) == ([("r1", 3)], ["r1"])
    assert (r1.prefix_hit_tokens, r1.readmit_hit_tokens) == (0, 2)
    assert counters(out) == (3, prefill_pairs(3, 2), 2, 3, 0, 0, 3)


def test_reserve_full_isl_admits_only_if_the_whole_sequence_fits():
    s = make("chunked", num_blocks=4, max_num_seqs=2, max_num_batched_tokens=2, scheduler_reserve_full_isl=True)
    r0 = req(0, [1, 2, 3, 4, 5, 6, 7, 8, 9], 1)  # 9 tokens: 5 blocks, the pool has 4
    s.add_request(r0)
    assert s.schedule().scheduled == []
    s2 = make("chunked", num_blocks=4, max_num_seqs=2, max_num_batched_tokens=2)  # without it a chunk goes in
    s2.add_request(req(0, [1, 2, 3, 4, 5, 6, 7, 8, 9], 1))
    assert grants(s2.schedule()) == [("r0", 2)]


# ------------------------------------------------------------------------------------------ fork, finish
def test_fork_shares_the_parent_blocks_and_children_run_right_after_it():
    copies = []
    s = Scheduler(SimConfig(ONE_SECOND, block_size=2, num_blocks=8, max_num_seqs=5, max_num_batched_tokens=16), 8,
                  on_copy=lambda src, dst: copies.append((src, dst)))
    assert s.num_blocks == 8
    other, parent, last = req(0, [7], 2), req(1, [1, 2, 3], 2, seats=3), req(2, [9], 2)
    for r in (other, parent, last):
        s.add_request(r)
    out = s.schedule()  # r0 in block 0; the parent in blocks 1 (1 2) and 2 (3, half full); r2 in block 3
    assert grants(out) == [("r0", 1), ("r1", 3), ("r2", 1)]
    assert s.seats == 5
    a, b = req(1, [1, 2, 3], 2, rid="r1.1"), req(1, [1, 2, 3], 2, rid="r1.2")
    s.fork(parent, [a, b])
    assert rids(s.running) == ["r0", "r1", "r1.1", "r1.2", "r2"]  # right after the parent
    assert (parent.seats, s.seats) == (1, 5)
    assert [s.manager.ref_cnt(x) for x in (0, 1, 2, 3)] == [1, 3, 3, 1]
    assert (a.num_computed_tokens, a.in_prefill, a.admitted, a.prefix_hit_tokens) == (3, False, True, 0)
    with pytest.raises(ValueError, match=exactly("fork needs a running parent holding 2 seats")):
        s.fork(parent, [req(1, [1, 2, 3], 2, rid="r1.3")])
    with pytest.raises(ValueError, match=exactly("fork needs a running parent holding 2 seats")):
        s.fork(req(5, [1], 1, seats=2), [a])  # not running
    # The parent's sample goes into shared, half-full block 2: it is copied to block 4 first.
    s.update_from_output(out)
    out = s.schedule()
    assert grants(out) == [("r0", 1), ("r1", 1), ("r2", 1)]  # the children have no sample of their own yet
    assert copies == [(2, 4)]
    assert s.manager.block_table("r1") == [1, 4]
    assert s.manager.block_table("r1.1") == [1, 2]


def test_the_vllm_rules_reach_the_block_manager():
    """null_block: block 0 is never handed out; prepend_unhashed_free_blocks: a finished request's partial
    block is the next one handed out."""
    s = make(num_blocks=5, null_block=True, prepend_unhashed_free_blocks=True, enable_prefix_caching=True)
    assert s.manager.null_block is s.manager.blocks[0]
    s.add_request(req(0, [1, 2, 3], 1))
    out, done = run_step(s)
    assert (grants(out), done, out.kv_blocks_used) == ([("r0", 3)], ["r0"], 2)
    assert s.manager.free_block_queue() == [2, 3, 4, 1]  # block 2 (3, unhashed) first; block 1 (1 2) last
    plain = make(num_blocks=5, enable_prefix_caching=True)
    plain.add_request(req(0, [1, 2, 3], 1))
    run_step(plain)
    assert plain.manager.null_block is None
    assert plain.manager.free_block_queue() == [2, 3, 4, 1, 0]


def _async_preemption() -> tuple[Scheduler, RequestState, SchedulerOutput, SchedulerOutput]:
    """vLLM's AsyncScheduler on 4 blocks, two 3-token prompts that sample 3 tokens each: step 2 is scheduled
    once step 0's output is in, and r0's position 4 needs a block, so r1 (the last admitted) is preempted
    while step 1's sample for it is still in flight. Returns the scheduler, r1, step 1 and step 2."""
    s = make(num_blocks=4, async_scheduling=True)
    r0, r1 = req(0, [1, 2, 3], 3), req(1, [4, 5, 6], 3)
    s.add_request(r0)
    s.add_request(r1)
    step0 = s.schedule()
    step1 = s.schedule()
    s.update_from_output(step0)
    step2 = s.schedule()
    assert (grants(step2), rids(step2.preempted), s.manager.num_free_blocks) == ([("r0", 1)], ["r1"], 1)
    return s, r1, step1, step2


def test_async_preemption_takes_the_in_flight_sample_then_recomputes():
    """r1's step-1 sample still arrives after its preemption (its token is kept, no placeholder is filled)
    and r1 later recomputes everything."""
    s, r1, step1, step2 = _async_preemption()
    assert (r1.num_stale, r1.num_placeholders, r1.num_computed_tokens) == (1, 0, 0)
    s.update_from_output(step1)  # step 1's sample for r1 arrives: no longer stale
    assert (r1.output_ids, r1.num_stale, r1.num_in_flight) == ([V, V + 1], 0, 0)
    step3 = s.schedule()  # r0's last sample is in flight; r1 waits for blocks
    assert (step3.scheduled, rids(s.waiting)) == ([], ["r1"])
    assert rids(s.update_from_output(step2)) == ["r0"]
    step4 = s.schedule()  # r1 recomputes its prompt and both samples
    assert grants(step4) == [("r1", 5)]
    s.update_from_output(step3)
    assert rids(s.update_from_output(step4)) == ["r1"]
    assert r1.output_ids == [V, V + 1, V + 2]


def test_a_stale_request_at_the_head_of_the_queue_is_skipped_not_waited_on():
    """vLLM skips a preempted request whose sample is still in flight and goes on down the waiting queue.
    Step 3 (no preemption, so admissions are open) comes before step 1's output: r1 is still stale, and
    r2 (one token) is admitted into the one free block, ahead of it."""
    s, r1, _, _ = _async_preemption()
    s.add_request(req(2, [7], 1))
    step3 = s.schedule()
    assert (grants(step3), rids(step3.admitted), s.manager.num_free_blocks) == ([("r0", 1), ("r2", 1)], ["r2"], 0)
    assert (rids(s.waiting), r1.num_stale) == (["r1"], 1)  # r1 keeps its place at the head


def test_a_stale_request_keeps_its_place_when_the_next_one_does_not_fit():
    """As above, but r2 (three tokens, two blocks) does not fit the one free block: admission stops there,
    and the skipped r1 goes back in front of it."""
    s, r1, _, _ = _async_preemption()
    s.add_request(req(2, [7, 8, 9], 1))
    step3 = s.schedule()
    assert (grants(step3), rids(step3.admitted), s.manager.num_free_blocks) == ([("r0", 1)], [], 1)
    assert (rids(s.waiting), r1.num_stale) == (["r1", "r2"], 1)


def test_finishing_a_waiting_request_frees_nothing():
    s = make()
    r0 = req(0, [1, 2], 2)
    s.add_request(r0)
    s.finish_request(r0)
    assert (r0.finished, list(s.waiting), s.seats) == (True, [], 0)
    assert s.manager.request_ids() == []


def test_a_stop_token_finishes_early_and_engine_samples_are_used():
    s = make()
    r0 = req(0, [1, 2], 5, stop_token_ids=(42,))
    s.add_request(r0)
    out = s.schedule()
    assert rids(s.update_from_output(out, {"r0": 7})) == []
    out = s.schedule()
    assert rids(s.update_from_output(out, {"r0": 42})) == ["r0"]
    assert r0.output_ids == [7, 42]
    assert s.manager.request_ids() == []


# ------------------------------------------------------------------------------------------ async
def test_async_scheduling_schedules_the_next_token_before_the_sample_is_known():
    """vLLM's AsyncScheduler, in the engine's order: a step is scheduled before the previous step's output is
    taken, with a placeholder slot for the sample in flight; a block is hashed once its ids are known and its
    KV is computed."""
    s = make(async_scheduling=True, enable_prefix_caching=True)
    r0 = req(0, [1, 2, 3], 3)
    s.add_request(r0)
    step0 = s.schedule()  # the prompt; r0 samples and holds a placeholder for it
    assert (grants(step0), rids(step0.sampling), r0.num_placeholders, r0.num_in_flight) == ([("r0", 3)], ["r0"], 1, 3)
    step1 = s.schedule()  # position 3 (step 0's sample, id unknown) is computed next
    assert grants(step1) == [("r0", 1)]
    assert s.manager.token_ids("r0") == [1, 2, 3, None]
    assert s.manager.block(1).block_hash is None  # full of slots, one without its id
    assert (r0.num_computed_tokens, r0.num_placeholders, r0.num_in_flight) == (4, 2, 4)
    assert rids(s.update_from_output(step0)) == []  # V fills position 3, whose KV step 1 has not delivered yet
    assert s.manager.token_ids("r0") == [1, 2, 3, V]
    assert s.manager.block(1).block_hash is None
    assert (r0.output_ids, r0.num_placeholders, r0.num_in_flight) == ([V], 1, 1)
    step2 = s.schedule()  # position 4; the sample it gives (V+2) is r0's last
    assert grants(step2) == [("r0", 1)]
    assert s.manager.token_ids("r0") == [1, 2, 3, V, None]
    assert rids(s.update_from_output(step1)) == []  # step 1 is done: block 1 (3 V) is known and computed
    assert s.manager.block(1).block_hash is not None
    step3 = s.schedule()  # r0's last sample is in flight: it is skipped but keeps its seat and blocks
    assert (step3.scheduled, s.seats, s.manager.num_free_blocks) == ([], 1, 5)
    assert rids(s.update_from_output(step2)) == ["r0"]
    assert r0.output_ids == [V, V + 1, V + 2]
    assert (r0.num_placeholders, r0.num_in_flight) == (0, 0)
    assert s.manager.num_free_blocks == 8


def test_a_request_that_preempts_itself_keeps_the_steps_earlier_decodes():
    """r0 decodes in its half-full block; r1 needs a new block, none is free, and r1 is the last admitted."""
    s = make(num_blocks=3)
    r0, r1 = req(0, [1, 2, 3], 3), req(1, [4, 5], 3)
    s.add_request(r0)
    s.add_request(r1)
    run_step(s)  # r0 in blocks 0 1 (half), r1 in block 2 (full)
    out, _ = run_step(s)
    assert (grants(out), rids(out.preempted)) == ([("r0", 1)], ["r1"])
    assert counters(out) == (1, 3 + 1, 3, 0, 1, 0, 2)
    assert (s.seats, r1.num_preemptions, s.num_preemptions) == (1, 1, 1)


def test_the_last_token_of_the_budget_is_granted():
    s = make(max_num_seqs=2, max_num_batched_tokens=2)
    s.add_request(req(0, [1], 3))
    s.add_request(req(1, [2], 3))
    out, _ = run_step(s)  # r0's 1-token prompt leaves 1 token: r1's 1-token prompt takes it
    assert grants(out) == [("r0", 1), ("r1", 1)]
    out, _ = run_step(s)  # r0's decode leaves 1 token: r1's decode takes it
    assert grants(out) == [("r0", 1), ("r1", 1)]


def test_positions_from_max_model_len_minus_one_are_never_computed():
    """vLLM caps a step at max_model_len - 1 - num_computed_tokens tokens: with max_model_len 4, requests
    with 3 computed tokens get nothing more, and the requests after each of them are still served."""
    s = make(max_model_len=4)
    r0, r1, r2 = req(0, [1, 2, 3], 3), req(1, [7], 3), req(2, [4, 5, 6], 3)
    for r in (r0, r1, r2):
        s.add_request(r)
    out, _ = run_step(s)
    assert grants(out) == [("r0", 3), ("r1", 1), ("r2", 3)]
    out, _ = run_step(s)  # r0, r2: 4 - 3 - 1 = 0 tokens; r1: min(1, 4 - 1 - 1) = 1
    assert grants(out) == [("r1", 1)]
    out, done = run_step(s)
    assert (grants(out), done) == ([("r1", 1)], ["r1"])
    out = s.schedule()
    assert (out.scheduled, out.preempted, s.step) == ([], [], 3)


def test_chunks_are_cut_at_max_model_len():
    s = make("chunked", max_num_batched_tokens=4, max_model_len=7)
    r0 = req(0, [1, 2, 3, 4, 5, 6, 7, 8], 1)
    s.add_request(r0)
    out, _ = run_step(s)
    assert grants(out) == [("r0", 4)]
    out, _ = run_step(s)  # 4 more would reach position 7; the cap allows 7 - 4 - 1 = 2
    assert grants(out) == [("r0", 2)]


def test_swap_with_prefix_caching_swaps_in_only_what_the_cache_lost():
    """As the swap test above, with prefix caching: r0 takes r1's block 3 (6 V) from the head, so of r1's
    4 swapped tokens only the 2 in block 2 (4 5) are still cached; 2 come back over the host link."""
    s = make(num_blocks=4, preemption="swap", enable_prefix_caching=True)
    r0, r1 = req(0, [1, 2, 3], 3), req(1, [4, 5, 6], 3)
    s.add_request(r0)
    s.add_request(r1)
    run_step(s)
    run_step(s)
    out, _ = run_step(s)
    assert (rids(out.preempted), out.swap_tokens, s.host_blocks_used) == (["r1"], 4, 2)
    out, done = run_step(s)
    assert (grants(out), done) == ([("r1", 1)], ["r1"])
    assert counters(out) == (1, 4 + 1, 4, 0, 1, 2, 3)
    assert (r1.prefix_hit_tokens, r1.readmit_hit_tokens, s.host_blocks_used) == (0, 0, 0)


def test_swapped_tokens_still_cached_are_not_moved():
    """r1 (4 prompt tokens in 2 full, cached blocks) preempts itself; nobody reuses its blocks, so all 4
    swapped tokens are hits when it comes back: nothing crosses the host link on the way in."""
    s = make(num_blocks=3, preemption="swap", enable_prefix_caching=True)
    r0, r1 = req(0, [1], 2), req(1, [4, 5, 6, 7], 3)
    s.add_request(r0)
    s.add_request(r1)
    run_step(s)  # r0 in block 0, r1 in blocks 1 2
    out, done = run_step(s)  # r0 decodes in block 0 and finishes; r1's position 4 needs a 4th block
    assert (grants(out), rids(out.preempted), done, out.swap_tokens) == ([("r0", 1)], ["r1"], ["r0"], 4)
    out, _ = run_step(s)
    assert grants(out) == [("r1", 1)]
    assert (out.swap_tokens, s.host_blocks_used) == (0, 0)


def test_host_blocks_are_whole_blocks():
    """r1 holds 3 computed tokens (2 blocks) when r0 preempts it: 2 host blocks, 3 tokens each way."""
    s = make(num_blocks=3, preemption="swap")
    r0, r1 = req(0, [1, 2], 3), req(1, [4, 5, 6], 3)
    s.add_request(r0)
    s.add_request(r1)
    run_step(s)  # r0 in block 0, r1 in blocks 1 2
    out, _ = run_step(s)  # r0's position 2 needs a block: r1 (3 computed) is swapped out
    assert (rids(out.preempted), out.swap_tokens, s.host_blocks_used) == (["r1"], 3, 2)
    out, done = run_step(s)  # r0 finishes; r1 needs 2 blocks and only 1 is free
    assert (grants(out), done, rids(s.waiting)) == ([("r0", 1)], ["r0"], ["r1"])
    out, _ = run_step(s)
    assert (grants(out), out.swap_tokens, s.host_blocks_used) == ([("r1", 1)], 3, 0)


def async_steps(s: Scheduler, samples: list[dict[str, int] | None], n: int) -> list[list[tuple[str, int]]]:
    """Drive ``s`` as the asynchronous engine does: schedule step k + 1 before taking step k's output."""
    outs, seen = [s.schedule()], []
    for k in range(n):
        outs.append(s.schedule())
        s.update_from_output(outs[k], samples[k] if k < len(samples) else None)
        seen.append(grants(outs[k]))
    return seen


def test_async_skips_a_request_whose_last_sample_is_in_flight_and_serves_the_rest():
    s = make(async_scheduling=True)
    r0, r1, r2 = req(0, [1], 4), req(1, [2], 2), req(2, [3], 4)
    for r in (r0, r1, r2):
        s.add_request(r)
    seen = async_steps(s, [], 5)
    assert seen == [
        [("r0", 1), ("r1", 1), ("r2", 1)],  # the prompts
        [("r0", 1), ("r1", 1), ("r2", 1)],  # step 0's samples, ids unknown
        [("r0", 1), ("r2", 1)],  # r1's last sample (from step 1) is in flight: skipped, still seated
        [("r0", 1), ("r2", 1)],
        [],  # r0 and r2 wait for their last samples
    ]
    assert [r.output_ids for r in (r0, r1, r2)] == [[V, V + 1, V + 2, V + 3], [V, V + 1], [V, V + 1, V + 2, V + 3]]
    assert [r.num_placeholders for r in (r0, r1, r2)] == [0, 0, 0]
    assert [r.num_in_flight for r in (r0, r1, r2)] == [0, 0, 0]


def test_async_a_request_stopped_while_its_next_step_is_in_flight():
    s = make(async_scheduling=True)
    r0, r1, r2 = req(0, [1], 3), req(1, [2], 3, stop_token_ids=(99,)), req(2, [3], 3)
    for r in (r0, r1, r2):
        s.add_request(r)
    seen = async_steps(s, [{"r0": 10, "r1": 99, "r2": 30}, {"r0": 11, "r1": 12, "r2": 31}], 3)
    # r1 stops on step 0's sample while step 1 (which scheduled it) is in flight: step 1's output skips it
    assert seen[:2] == [[("r0", 1), ("r1", 1), ("r2", 1)]] * 2
    assert (r1.output_ids, r1.finished) == ([99], True)
    assert (r0.output_ids[:2], r2.output_ids[:2]) == ([10, 11], [30, 31])
    assert r1.num_in_flight == 0


# ------------------------------------------------------------------------------------------ brute force
def test_step_counters_match_a_direct_count():
    """Every step of a pressured workload (preemptions, chunks, prefix hits): the cost-model inputs equal a
    direct count over the step's grants, and the blocks in use equal the pool minus the free queue."""
    prompts = [[1, 2, 3, 4] + [10 + i] * (3 + i % 5) for i in range(12)]
    wl = Workload.from_prompts(prompts, [2 + i % 4 for i in range(12)], [0.1 * (i // 3) for i in range(12)])
    config = SimConfig(ONE_SECOND, policy="chunked", block_size=2, num_blocks=14, max_num_seqs=5,
                       max_num_batched_tokens=9, enable_prefix_caching=True)
    steps = []

    def check(out: SchedulerOutput, sched: Scheduler) -> None:
        before = [(r, n, r.num_computed_tokens - n) for r, n in out.scheduled]  # computed before the step
        assert out.new_tokens == sum(n for _, n, _ in before)
        assert out.attn_pairs == sum(prefill_pairs(n, c) for _, n, c in before)
        assert out.kv_tokens_read == sum(c for _, _, c in before)
        assert out.prefill_tokens == sum(n for r, n, _ in before if r.in_prefill)
        assert out.decode_tokens == sum(n for r, n, _ in before if not r.in_prefill)
        assert out.kv_blocks_used == sched.manager.num_usable_blocks - len(sched.manager.free_block_queue())
        assert rids(out.sampling) == [r.rid for r, _, _ in before if r.num_computed_tokens >= r.num_tokens]
        assert out.new_tokens <= 9
        steps.append((len(out.scheduled), len(out.preempted)))

    result = simulate(wl, config, on_step=check)
    assert sum(p for _, p in steps) == result.summary["preemptions"].iloc[0] > 0
    assert (result.requests["generated_tokens"] == result.requests["output_tokens"]).all()


@pytest.mark.parametrize("policy", ["continuous", "chunked"])
def test_preemption_bookkeeping_matches_a_direct_count(policy):
    """Swap preemption into a 6-block host pool, prefix caching, a pressured pool: after every step the seats,
    host blocks, preemption counts, fallbacks and swapped tokens equal what a direct count over the requests
    gives, and the workload is hard enough that each of them is exercised more than once."""
    prompts = [[1, 2, 3, 4] + [10 + i] * (1 + i % 4) for i in range(14)]
    wl = Workload.from_prompts(prompts, [3 + i % 9 for i in range(14)])
    config = SimConfig(ONE_SECOND, policy=policy, block_size=2, num_blocks=12, max_num_seqs=6,
                       max_num_batched_tokens=24, preemption="swap", host_kv_blocks=6, enable_prefix_caching=True)
    seen = {"fallbacks": 0, "most_swapped_in_one_step": 0, "most_swapped_at_once": 0, "decodes_with_swap_ins": 0}
    hits: dict[str, int] = {}

    known: dict[str, RequestState] = {}
    away: dict[str, str] = {}  # preempted request -> how it left

    def check(out: SchedulerOutput, sched: Scheduler) -> None:
        known.update((r.rid, r) for r in [*sched.running, *sched.waiting, *(r for r, _ in out.scheduled)])
        assert sched.seats == sum(r.seats for r in sched.running)
        assert sched.host_blocks_used == sum(-(-r.num_computed_tokens // 2) for r in sched.waiting if r.swapped)
        swapped_out = [r for r in out.preempted if r.swapped]
        seen["fallbacks"] += len(out.preempted) - len(swapped_out)
        assert sched.swap_fallbacks == seen["fallbacks"]
        seen["most_swapped_in_one_step"] = max(seen["most_swapped_in_one_step"], len(swapped_out))
        seen["most_swapped_at_once"] = max(seen["most_swapped_at_once"], sum(r.swapped for r in sched.waiting))
        swap_in = 0
        for r, n in out.scheduled:
            if r in out.admitted and r.rid in away:  # back from a preemption
                hit = sched.manager.num_cached_tokens(r.rid)
                if away.pop(r.rid) == "swap":  # only what the prefix cache no longer holds comes back
                    swap_in += max(0, r.num_computed_tokens - n - hit)
                else:
                    hits[r.rid] = hits.get(r.rid, 0) + hit
        away.update((r.rid, "swap" if r.swapped else "recompute") for r in out.preempted)
        assert out.swap_tokens == sum(r.num_computed_tokens for r in swapped_out) + swap_in
        assert out.decode_tokens == sum(n for r, n in out.scheduled if not r.in_prefill)
        assert out.prefill_tokens == sum(n for r, n in out.scheduled if r.in_prefill)
        swapped_back = [r for r, _ in out.scheduled if r in out.admitted and not r.in_prefill]
        running_decodes = [r for r, _ in out.scheduled if r not in out.admitted and not r.in_prefill]
        seen["decodes_with_swap_ins"] += bool(swapped_back and running_decodes)
        for r in known.values():
            assert r.readmit_hit_tokens == hits.get(r.rid, 0)
        assert sched.num_preemptions == sum(r.num_preemptions for r in known.values())

    result = simulate(wl, config, on_step=check)
    assert seen["fallbacks"] >= 2
    assert seen["most_swapped_in_one_step"] >= 2
    assert seen["most_swapped_at_once"] >= 2
    assert seen["decodes_with_swap_ins"] >= 1  # a step that decodes running requests and swaps one back in
    assert result.requests["preemptions"].max() >= 2
    assert (result.requests["generated_tokens"] == result.requests["output_tokens"]).all()
