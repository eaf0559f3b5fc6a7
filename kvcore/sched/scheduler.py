"""The step rule of the serving scheduler: grant tokens under a budget, running requests first (vLLM v1).

One ``schedule`` call is one engine step (``vllm/v1/core/sched/scheduler.py``, ``Scheduler.schedule``):

1. Running requests, in admission order, each get ``num_tokens - num_computed_tokens`` tokens (cut to
   what is left of the token budget). Their KV slots come from ``KVCacheManager.append``; when it fails,
   the lowest-priority running request (the last admitted) is preempted and the append retried; if the
   request itself was the last, it is preempted and the step stops taking running requests.
2. Only if nobody was preempted, waiting requests (preempted ones first) are admitted while the budget
   lasts and fewer than ``max_num_seqs`` run: prefix-cache lookup, then ``KVCacheManager.allocate``;
   a failed allocation stops admission (no preemption for new work).

The three policies are this rule with different limits:

* ``continuous`` (Orca, Yu et al. 2022; vLLM): a prompt is admitted only when it fits the budget whole.
* ``chunked`` (Sarathi-Serve, Agrawal et al. 2024): a prompt takes what is left of the budget and the rest
  in later steps. Running requests come first and a partial prefill is always the last admitted, so
  decodes are scheduled before prefill chunks, as Sarathi's stall-free batching asks.
* ``static`` (request-level batching, FasterTransformer-style): a batch of up to ``max_num_seqs`` waiting
  requests is admitted only when the previous one has ended (no joins) and prefilled in one step (no
  token budget); it reserves KV for every member's prompt + output up front, and finished members keep
  their blocks until the batch ends. Padding compute of finished members is not charged,
  which flatters static batching.

Preemption (vLLM ``_preempt_request``): free the blocks and put the request at the head of the waiting
queue. ``recompute`` resets ``num_computed_tokens`` to 0 (prompt and generated tokens are prefilled again;
the prefix cache may give some back). ``swap`` keeps them: the KV goes to host memory and comes back on
admission, each way costing KV bytes / host link bandwidth, added to that step's time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvcore.paged import KVCacheManager
from kvcore.sched.config import SimConfig
from kvcore.sched.cost import prefill_pairs
from kvcore.sched.request import VOCAB_SIZE, RequestState

# Static batching has no token budget: a batch is max_num_seqs requests whose KV fits, prefilled at once.
STATIC_BUDGET = 1 << 62


@dataclass(slots=True)
class StepWork:
    """What one step computes and moves (inputs of ``CostModel.step_time``), and what it changed.

    new_tokens / attn_pairs / kv_tokens_read: cost-model inputs. prefill_tokens / decode_tokens: the split of
    new_tokens. sampled_tokens: output tokens produced. swap_tokens: KV tokens copied over the host link
    (out + in). kv_blocks_used: blocks held during the step. prefill_done / finished: requests whose prefill /
    generation ended at this step's end.
    """

    new_tokens: int = 0
    attn_pairs: int = 0
    kv_tokens_read: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    sampled_tokens: int = 0
    swap_tokens: int = 0
    preemptions: int = 0
    kv_blocks_used: int = 0
    prefill_done: list[RequestState] = field(default_factory=list)
    finished: list[RequestState] = field(default_factory=list)


class Scheduler:
    """Running / waiting queues over a ``KVCacheManager``; ``schedule`` runs one step.

    step_end_s: end time of each past step, shared with the simulator (it appends one per step).
    phases: (request index, phase, start_s, end_s) intervals, appended as requests change phase.
    itl_gaps: time from a request's previous token to the start of the step that samples its next one;
    the simulator adds the step's duration.
    """

    def __init__(self, config: SimConfig, num_blocks: int) -> None:
        self.config = config
        self.manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching, log_events=False)
        self.num_blocks = num_blocks
        self.running: list[RequestState] = []
        self.waiting: deque[RequestState] = deque()
        self.held: list[RequestState] = []  # static: finished members whose blocks wait for the batch end
        self.step_end_s: list[float] = []
        self.phases: list[tuple[int, str, float, float]] = []
        self.itl_gaps: list[float] = []
        self.host_blocks_used = 0
        self.num_preemptions = 0
        self.swap_fallbacks = 0
        self._now = 0.0
        self._step = 0

    # ------------------------------------------------------------------------------------------ one step
    def schedule(self, now: float, step: int) -> StepWork:
        """Grant tokens for one step starting at ``now``: allocate KV, advance every scheduled request."""
        work = StepWork()
        self._now, self._step = now, step
        if self.config.policy == "static" and not self.running and self.held:
            for r in self.held:  # the batch has ended: its finished members release their blocks now
                self.manager.free(r.rid)
            self.held.clear()
        budget = self._schedule_running(self.config.max_num_batched_tokens, work)
        if not work.preemptions:
            self._schedule_waiting(budget, work)
        work.kv_blocks_used = self.num_blocks - self.manager.num_free_blocks
        if work.finished:
            self._retire(work.finished)
        return work

    def _schedule_running(self, budget: int, work: StepWork) -> int:
        running, append = self.running, self.manager.append
        ends, itl_append, finished = self.step_end_s, self.itl_gaps.append, work.finished
        now, step = self._now, self._step
        decode = kv_read = 0  # decode aggregates kept in locals: this loop runs once per generated token
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            c = r.num_computed_tokens
            if r.num_tokens - c == 1 and not r.in_prefill:  # a decode, the hot path: kept inline
                p = r.prompt_len
                if append(r.rid, [r.prompt_ids[c] if c < p else VOCAB_SIZE + c - p]) is None:
                    if self._preempt_for(r, work):
                        break
                    continue
                decode += 1
                kv_read += c
                r.num_computed_tokens = c + 1
                r.num_tokens = c + 2  # the token sampled at the end of this step
                g = r.num_generated = r.num_generated + 1
                itl_append(now - ends[r.last_token_step])
                r.last_token_step = step
                if g == r.output_len:
                    finished.append(r)
                budget -= 1
            else:
                n = min(r.num_tokens - c, budget)
                if append(r.rid, r.token_ids(c + n)[c:]) is None:
                    if self._preempt_for(r, work):
                        break
                    continue
                self._advance(r, n, work)
                budget -= n
            i += 1
        work.new_tokens += decode
        work.decode_tokens += decode
        work.sampled_tokens += decode
        work.attn_pairs += kv_read + decode  # a decode at context c attends to c cached keys and itself
        work.kv_tokens_read += kv_read
        return budget

    def _schedule_waiting(self, budget: int, work: StepWork) -> None:
        config, waiting, running = self.config, self.waiting, self.running
        static = config.policy == "static"
        if static:
            if running:
                return  # no joins: the batch runs until its last member ends
            budget = STATIC_BUDGET  # the whole batch is prefilled in one pass, padded (FasterTransformer)
        reserve = self.manager.num_free_blocks
        bs = config.block_size
        while waiting and budget > 0 and len(running) < config.max_num_seqs:
            r = waiting[0]
            if static:  # the whole batch's KV (prompt + output) must fit before it starts
                need = -(-(r.req.prompt_tokens + r.req.output_tokens) // bs)
                if need > reserve:
                    break
                reserve -= need
            n = self._admit(r, budget, work)
            if n is None:
                break
            waiting.popleft()
            running.append(r)
            self._advance(r, n, work)
            budget -= n

    def _admit(self, r: RequestState, budget: int, work: StepWork) -> int | None:
        """Allocate a waiting request's blocks; return the tokens it computes this step, or None (no change)."""
        manager = self.manager
        tokens = r.token_ids(r.num_tokens)
        computed = r.num_computed_tokens if r.swapped else 0
        if self.config.enable_prefix_caching and not r.swapped:
            computed = manager.get_computed_blocks(tokens)[1]
        n = r.num_tokens - computed
        if n > budget:
            if not self.config.chunked:
                return None  # without chunked prefill a prompt must fit the budget whole
            n = budget
        if manager.allocate(r.rid, tokens[:computed + n]) is None:
            return None
        hit = manager.num_cached_tokens(r.rid)
        if r.swapped:  # swap in what the prefix cache does not still hold
            work.swap_tokens += max(0, computed - hit)
            self.host_blocks_used -= -(-computed // self.config.block_size)
            r.swapped = False
        else:
            r.num_computed_tokens = hit
            if r.admitted:
                r.readmit_hit_tokens += hit
            else:
                r.prefix_hit_tokens = hit
        if not r.admitted:
            r.admitted = True
            r.first_scheduled_s = self._now
        self.set_phase(r, "prefill" if r.in_prefill else "decode", self._now)
        return n

    def _advance(self, r: RequestState, n: int, work: StepWork) -> None:
        """Account ``n`` granted tokens of ``r`` (slots already allocated); sample a token if it caught up."""
        c = r.num_computed_tokens
        work.new_tokens += n
        work.attn_pairs += prefill_pairs(n, c)
        work.kv_tokens_read += c
        if r.in_prefill:
            work.prefill_tokens += n
        else:
            work.decode_tokens += n
        r.num_computed_tokens = c + n
        if r.num_computed_tokens < r.num_tokens:
            return
        r.num_tokens += 1
        r.num_generated += 1
        work.sampled_tokens += 1
        if r.num_generated > 1:
            self.itl_gaps.append(self._now - self.step_end_s[r.last_token_step])
        r.last_token_step = self._step
        if r.in_prefill:
            r.in_prefill = False
            work.prefill_done.append(r)
        if r.num_generated == r.output_len:
            work.finished.append(r)

    # ------------------------------------------------------------------------------------- preemption
    def _preempt_for(self, r: RequestState, work: StepWork) -> bool:
        """Preempt the last running request to make room for ``r``; True if ``r`` itself was preempted."""
        victim = self.running.pop()
        self._preempt(victim, work)
        return victim is r

    def _preempt(self, r: RequestState, work: StepWork) -> None:
        self.manager.free(r.rid)
        r.num_preemptions += 1
        work.preemptions += 1
        self.num_preemptions += 1
        blocks = -(-r.num_computed_tokens // self.config.block_size)
        host = self.config.host_kv_blocks
        if self.config.preemption == "swap" and (host is None or self.host_blocks_used + blocks <= host):
            r.swapped = True
            self.host_blocks_used += blocks
            work.swap_tokens += r.num_computed_tokens
        else:
            if self.config.preemption == "swap":
                self.swap_fallbacks += 1
            r.swapped = False
            r.num_computed_tokens = 0
            r.in_prefill = True
        self.set_phase(r, "preempted", self._now)
        self.waiting.appendleft(r)

    # ----------------------------------------------------------------------------------------- helpers
    def _retire(self, finished: list[RequestState]) -> None:
        done = set(map(id, finished))
        self.running = [r for r in self.running if id(r) not in done]
        if self.config.policy == "static":
            self.held.extend(finished)
        else:
            for r in finished:
                self.manager.free(r.rid)

    def set_phase(self, r: RequestState, phase: str, t: float) -> None:
        """Close ``r``'s current phase interval at ``t`` (kept if not empty) and open ``phase``."""
        if t > r.phase_start_s:
            self.phases.append((r.req.index, r.phase, r.phase_start_s, t))
        r.phase = phase
        r.phase_start_s = t
