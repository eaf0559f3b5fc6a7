"""The serving scheduler: grant tokens under a budget, running requests first (vLLM v1), then take the samples.

Two calls per step, as vLLM's ``Scheduler``: :meth:`Scheduler.schedule` decides (``vllm/v1/core/sched/
scheduler.py``, ``Scheduler.schedule``) and :meth:`Scheduler.update_from_output` takes the step's sampled
tokens. The simulator and the lab's serving engine both drive this one class:

1. Running requests, in admission order, each get ``num_tokens - num_computed_tokens`` tokens (cut to
   what is left of the token budget). Their KV slots come from ``KVCacheManager.append``; when it fails,
   the lowest-priority running request (the last admitted) is preempted and the append retried; if the
   request itself was the last, it is preempted and the step stops taking running requests.
2. Only if nobody was preempted, waiting requests (preempted ones first) are admitted while the budget
   lasts and seats remain under ``max_num_seqs``: prefix-cache lookup, then ``KVCacheManager.allocate``;
   a failed allocation stops admission (no preemption for new work).
3. A request whose granted tokens complete all its known tokens samples one token; ``update_from_output``
   appends it, finishes requests that reached their length (or end-of-sequence) and frees their blocks.

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

With ``async_scheduling`` (vLLM's ``AsyncScheduler``) a sampling request gets a placeholder: its next
token is scheduled before its id is known; one whose last token is in flight is skipped but keeps its seat
and blocks until that output is processed; a slot's block is hashed once its token id arrives.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kvcore.paged import KVCacheManager
from kvcore.sched.config import SimConfig
from kvcore.sched.cost import prefill_pairs
from kvcore.sched.request import VOCAB_SIZE, RequestState

# Static batching has no token budget: a batch is max_num_seqs requests whose KV fits, prefilled at once.
STATIC_BUDGET = 1 << 62


@dataclass(slots=True)
class SchedulerOutput:
    """One step's decisions (vLLM's ``SchedulerOutput``) and what the step computes and moves.

    scheduled: ``(request, tokens)`` in vLLM's order: running requests, then the admitted ones. admitted:
    waiting requests admitted this step (new or back from preemption). preempted: in preemption order.
    sampling: requests whose tokens this step complete all their known tokens, so they sample one.
    new_tokens / attn_pairs / kv_tokens_read: the cost model's inputs; prefill_tokens / decode_tokens: the
    split of new_tokens; prefill_seqs: requests granted prefill tokens (each a chunk); swap_tokens: KV tokens
    copied over the host link (out + in); kv_blocks_used: blocks held when the step runs.
    """

    step: int
    scheduled: list[tuple[RequestState, int]] = field(default_factory=list)
    admitted: list[RequestState] = field(default_factory=list)
    preempted: list[RequestState] = field(default_factory=list)
    sampling: list[RequestState] = field(default_factory=list)
    new_tokens: int = 0
    attn_pairs: int = 0
    kv_tokens_read: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_seqs: int = 0
    swap_tokens: int = 0
    kv_blocks_used: int = 0

    def grant(self, r: RequestState, n: int) -> None:
        """Record ``n`` tokens for ``r`` (whose KV slots are allocated) and their cost."""
        c = r.num_computed_tokens
        self.scheduled.append((r, n))
        self.new_tokens += n
        self.attn_pairs += prefill_pairs(n, c)  # a decode at context c attends to c cached keys and itself
        self.kv_tokens_read += c
        if r.in_prefill:
            self.prefill_tokens += n
            self.prefill_seqs += 1
        else:
            self.decode_tokens += n


class Scheduler:
    """Running / waiting queues over a ``KVCacheManager``: :meth:`schedule`, then :meth:`update_from_output`.

    num_blocks: the pool, counted as the manager counts it (the null block included when the config has it).
    on_copy: the block manager's copy-on-write callback (a real engine copies the block's K/V there).
    """

    def __init__(self, config: SimConfig, num_blocks: int, on_copy: Callable[[int, int], None] | None = None
                 ) -> None:
        self.config = config
        self.manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching, log_events=False,
                                      null_block=config.null_block,
                                      prepend_unhashed=config.prepend_unhashed_free_blocks, on_copy=on_copy)
        self.num_blocks = num_blocks
        self.running: list[RequestState] = []
        self.waiting: deque[RequestState] = deque()
        self.held: list[RequestState] = []  # static: finished members whose blocks wait for the batch end
        self.seats = 0  # running seats taken (a request with unforked parallel samples takes several)
        self.host_blocks_used = 0
        self.num_preemptions = 0
        self.swap_fallbacks = 0
        self.step = 0

    def add_request(self, r: RequestState) -> None:
        """A request arrives: it waits for admission."""
        self.waiting.append(r)

    def has_requests(self) -> bool:
        """True while some request is running or waiting."""
        return bool(self.running or self.waiting)

    # ------------------------------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        """Grant tokens for one step: allocate KV, advance ``num_computed_tokens``, mark who samples.

        A call that neither grants nor preempts anything does not count as a step (``step`` stays).
        """
        out = SchedulerOutput(self.step)
        if self.config.policy == "static" and not self.running and self.held:
            for r in self.held:  # the batch has ended: its finished members release their blocks now
                self.manager.free(r.rid)
            self.held.clear()
        budget = self._schedule_running(self.config.max_num_batched_tokens, out)
        if not out.preempted:
            self._schedule_waiting(budget, out)
        out.kv_blocks_used = self.manager.num_usable_blocks - self.manager.num_free_blocks
        self._after_schedule(out)
        if out.scheduled or out.preempted:
            self.step += 1
        return out

    def _schedule_running(self, budget: int, out: SchedulerOutput) -> int:
        running, limit, append = self.running, self.config.max_model_len, self.manager.append
        scheduled = out.scheduled
        decodes = decode_context = 0  # the decode hot path (one token per running request) counts in locals
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            c, ph = r.num_computed_tokens, r.num_placeholders
            if ph and c + 2 - ph >= r.prompt_len + r.output_len:
                i += 1  # its last token is in flight: it finishes when that output is processed
                continue
            n = min(r.num_tokens + ph - c, budget)
            if limit is not None:
                n = min(n, limit - c - 1)
            if n <= 0:
                i += 1
                continue
            if n == 1 and not r.in_prefill:
                p, outputs = r.prompt_len, r.output_ids
                ids = [r.prompt_ids[c] if c < p else outputs[c - p] if c - p < len(outputs) else None]
                if append(r.rid, ids) is None and not self._reserve(r, ids, out):
                    break  # r itself was preempted: the running loop ends for this step
                scheduled.append((r, 1))
                decodes += 1
                decode_context += c
            else:
                if not self._reserve(r, r.token_ids_between(c, c + n), out):
                    break
                out.grant(r, n)
            budget -= n
            i += 1
        out.new_tokens += decodes
        out.decode_tokens += decodes
        out.attn_pairs += decode_context + decodes  # a decode at context c attends to c cached keys and itself
        out.kv_tokens_read += decode_context
        return budget

    def _reserve(self, r: RequestState, ids: list[int | None], out: SchedulerOutput) -> bool:
        """Append ``r``'s slots, preempting the last running request until they fit; False if ``r`` was the one."""
        while self.manager.append(r.rid, ids) is None:
            victim = self.running.pop()
            self._preempt(victim, out)
            if victim is r:
                return False
        return True

    def _schedule_waiting(self, budget: int, out: SchedulerOutput) -> None:
        config, waiting, running = self.config, self.waiting, self.running
        static = config.policy == "static"
        if static:
            if running:
                return  # no joins: the batch runs until its last member ends
            budget = STATIC_BUDGET  # the whole batch is prefilled in one pass, padded (FasterTransformer)
        reserve, bs = self.manager.num_free_blocks, config.block_size
        skipped: list[RequestState] = []
        while waiting and budget > 0 and self.seats + waiting[0].seats <= config.max_num_seqs:
            r = waiting[0]
            if r.num_stale:  # preempted with a sample still in flight: not before that output is in (vLLM)
                skipped.append(waiting.popleft())
                continue
            if static:  # the whole batch's KV (prompt + output) must fit before it starts
                need = -(-(r.req.prompt_tokens + r.req.output_tokens) // bs)
                if need > reserve:
                    break
                reserve -= need
            n = self._admit(r, budget, out)
            if n is None:
                break
            waiting.popleft()
            running.append(r)
            self.seats += r.seats
            out.grant(r, n)
            budget -= n
        waiting.extendleft(reversed(skipped))

    def _admit(self, r: RequestState, budget: int, out: SchedulerOutput) -> int | None:
        """Allocate a waiting request's blocks; return the tokens it computes this step, or None (no change)."""
        manager, config = self.manager, self.config
        tokens = r.token_ids(r.num_tokens)
        computed = r.num_computed_tokens if r.swapped else 0
        if config.enable_prefix_caching and not r.swapped:
            computed = manager.get_computed_blocks(tokens)[1]
        n = r.num_tokens - computed
        if n > budget:
            if not config.chunked:
                return None  # without chunked prefill a prompt must fit the budget whole
            n = budget
        fit = r.num_tokens if config.scheduler_reserve_full_isl else None
        if manager.allocate(r.rid, tokens[:computed + n], fit_tokens=fit) is None:
            return None
        hit = manager.num_cached_tokens(r.rid)
        if r.swapped:  # swap in what the prefix cache does not still hold
            out.swap_tokens += max(0, computed - hit)
            self.host_blocks_used -= -(-computed // config.block_size)
            r.swapped = False
        else:
            r.num_computed_tokens = hit
            if r.admitted:
                r.readmit_hit_tokens += hit
            else:
                r.prefix_hit_tokens = hit
        r.admitted = True
        out.admitted.append(r)
        return n

    def _after_schedule(self, out: SchedulerOutput) -> None:
        """Advance every scheduled request; one whose known tokens are all computed samples (vLLM
        ``_update_after_schedule``; asynchronously, with a placeholder for the sample in flight)."""
        placeholders = self.config.async_scheduling
        for r, n in out.scheduled:
            r.num_computed_tokens += n
            r.num_in_flight += n
            if r.num_computed_tokens >= r.num_tokens + r.num_placeholders:
                out.sampling.append(r)
                r.num_placeholders += placeholders

    # ------------------------------------------------------------------------------------------ outputs
    def update_from_output(self, out: SchedulerOutput, sampled: Mapping[str, int] | None = None
                           ) -> list[RequestState]:
        """Take a step's samples: append each sampling request's token, finish and free the ones that ended.

        sampled: request id -> token id (the engine's samples); None gives the i-th output token of every
        request the id ``VOCAB_SIZE + i`` (a simulation). Returns the requests that finished.
        """
        sampling = {id(r) for r in out.sampling}
        finished = []
        for r, n in out.scheduled:
            r.num_in_flight -= n
            stale = r.num_stale > 0
            if stale:
                r.num_stale -= n
            if r.finished or id(r) not in sampling:
                continue
            token = VOCAB_SIZE + len(r.output_ids) if sampled is None else sampled[r.rid]
            done = r.append_output(token)
            r.in_prefill = False
            if not stale and r.num_placeholders:
                r.num_placeholders -= 1
                self._cache_sampled(r, token)
            if done:
                finished.append(r)
                self.finish_request(r)
        return finished

    def _cache_sampled(self, r: RequestState, token: int) -> None:
        """An in-flight sample's id is known: fill its slot and hash what its output completes (vLLM's
        ``cache_blocks(request, num_computed_tokens - num_in_flight_tokens)``)."""
        manager, position = self.manager, r.num_tokens - 1
        if not manager.has_request(r.rid):
            return
        if position < manager.num_tokens(r.rid):
            manager.fill(r.rid, position, [token])
        manager.cache_blocks(r.rid, r.num_computed_tokens - r.num_in_flight)

    def finish_request(self, r: RequestState) -> None:
        """End ``r``: it leaves its queue and its blocks are freed (static batching: held to the batch's end)."""
        r.finished = True
        if r in self.waiting:  # preempted while its last token was in flight: it holds no blocks
            self.waiting.remove(r)
            return
        self.running.remove(r)
        self.seats -= r.seats
        if self.config.policy == "static":
            self.held.append(r)
        else:
            self.manager.free(r.rid)

    def fork(self, parent: RequestState, children: Sequence[RequestState]) -> None:
        """Parallel sampling: each child shares every block of ``parent`` (ref counts; copy-on-write at the first
        divergent write, vLLM v0) and runs right after it. The parent's extra seats pass to the children.
        Call it when the parent's prefill has just been computed, before its sample is taken."""
        if parent not in self.running or parent.seats != len(children) + 1:
            raise ValueError(f"fork needs a running parent holding {len(children) + 1} seats")
        at = self.running.index(parent) + 1
        for child in children:
            self.manager.fork(parent.rid, child.rid)
            child.num_computed_tokens, child.in_prefill, child.admitted = parent.num_computed_tokens, False, True
            child.prefix_hit_tokens = parent.prefix_hit_tokens
        self.running[at:at] = list(children)
        parent.seats = 1

    # ------------------------------------------------------------------------------------- preemption
    def _preempt(self, r: RequestState, out: SchedulerOutput) -> None:
        self.manager.free(r.rid)
        self.seats -= r.seats
        r.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(r)
        r.num_stale, r.num_placeholders = r.num_in_flight, 0
        blocks = -(-r.num_computed_tokens // self.config.block_size)
        host = self.config.host_kv_blocks
        if self.config.preemption == "swap" and (host is None or self.host_blocks_used + blocks <= host):
            r.swapped = True
            self.host_blocks_used += blocks
            out.swap_tokens += r.num_computed_tokens
        else:
            if self.config.preemption == "swap":
                self.swap_fallbacks += 1
            r.swapped = False
            r.num_computed_tokens = 0
            r.in_prefill = True
        self.waiting.appendleft(r)
