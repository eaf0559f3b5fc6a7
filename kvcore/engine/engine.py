"""The lab's serving engine: a real model served through the lab's own scheduler, blocks and kernels.

Follows vLLM's offline engine (``LLMEngine``, ``vllm/v1/engine``): every step the scheduler of
:mod:`kvcore.sched` (the class the simulator runs, with vLLM 0.33's rules) decides which requests get how
many tokens and ``kvcore.paged.KVCacheManager`` which blocks hold them; the model runner
(:mod:`kvcore.engine.runner`) feeds those tokens through the model's own modules with K/V only in paged
pools; the sampler picks each sampling request's token; the scheduler takes the samples, finishes and
frees. Parallel samples (``n > 1``) fork the prompt's blocks when its prefill is done (copy-on-write at
the first divergent write, vLLM v0); with a sliding window (Mistral, or a setting) blocks no query will
read again go back to the pool after each step (vLLM's ``SlidingWindowManager``).

Each step is timed (schedule + model + sampling + update) and recorded as the simulator records its
steps, so a run's tables (:meth:`LLMEngine.result`) read like a simulation's and the two compare directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from kvcore.device import torch_threads
from kvcore.engine.params import CompletionOutput, EngineStats, RequestOutput, SamplingParams
from kvcore.engine.runner import ModelRunner, SequenceChunk
from kvcore.models.runtime import max_positions
from kvcore.sched.config import SimConfig
from kvcore.sched.metrics import SimResult, build_result
from kvcore.sched.recorder import Recorder
from kvcore.sched.request import Request, RequestState
from kvcore.sched.scheduler import Scheduler, SchedulerOutput
from kvcore.sched.workload import Workload


def scheduler_config(model, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                     enable_prefix_caching: bool, enable_chunked_prefill: bool) -> SimConfig:
    """The scheduler settings an engine with these settings runs on ``model`` (vLLM 0.33's rules, no clock): the
    simulator predicts the engine with this config and a cost model."""
    return SimConfig.vllm(None, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          enable_chunked_prefill=enable_chunked_prefill, enable_prefix_caching=enable_prefix_caching,
                          block_size=block_size, num_blocks=num_blocks, max_model_len=max_positions(model))


@dataclass(slots=True, eq=False)
class EngineSequence(RequestState):
    """One sequence the engine runs (vLLM's ``Request``): the scheduler's state and how it samples.

    request_id: the request it belongs to (its n samples share it); index: which of the n it is;
    generator: its random stream (None: greedy).
    """

    request_id: str = ""
    index: int = 0
    params: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None

    @classmethod
    def of(cls, req: Request, prompt: list[int], stops: tuple[int, ...], params: SamplingParams, request_id: str,
           index: int, seed: int) -> EngineSequence:
        """Sample ``index`` of request ``request_id`` (the first one holds the request's n seats until it forks)."""
        seq = cls.new(req, prompt, stops, params.n if index == 0 else 1,
                      request_id if index == 0 else f"{request_id}/{index}")
        seq.request_id, seq.index, seq.params = request_id, index, params
        if params.temperature > 0:
            seq.generator = torch.Generator().manual_seed(hash((seed, index)) & 0x7FFFFFFF)
        return seq

    def draw(self, logits: torch.Tensor) -> int:
        """A draw from softmax(logits / temperature); logits ``[V]`` float32."""
        probs = torch.softmax(logits / self.params.temperature, dim=-1)  # [V]
        return int(torch.multinomial(probs, 1, generator=self.generator))


class LLMEngine:
    """Serve token-id prompts on a transformers causal LM (Llama family) with the lab's paged KV cache.

    num_blocks: KV blocks of ``block_size`` tokens, counted as vLLM's ``KVCacheConfig.num_blocks`` (block 0 is
    the null block). max_num_seqs / max_num_batched_tokens / enable_prefix_caching / enable_chunked_prefill:
    vLLM's scheduler settings. kv_bits: None keeps K/V in the model's dtype; 8 or 4 quantizes each token's
    K/V per head. sliding_window: tokens each query attends to (None: the model's own, e.g. Mistral's).
    threads: torch intra-op threads for each step (None: leave the process's setting); the C decode kernel
    runs on as many threads. backend: the decode kernels' backend (None: the best for the device). enforce_eager:
    run every step eagerly, never a captured decode graph (vLLM's setting; :mod:`kvcore.engine.graph`).
    """

    def __init__(self, model, *, num_blocks: int, block_size: int = 16, max_num_seqs: int = 16,
                 max_num_batched_tokens: int = 512, enable_prefix_caching: bool = True,
                 enable_chunked_prefill: bool = True, kv_bits: int | None = None,
                 sliding_window: int | None = None, threads: int | None = None, backend: str | None = None,
                 enforce_eager: bool = False) -> None:
        self.model = model
        self.threads = threads
        self.runner = ModelRunner(model, num_blocks, block_size, kv_bits, sliding_window, backend=backend,
                                  enforce_eager=enforce_eager)
        self.config = scheduler_config(model, num_blocks, block_size, max_num_seqs, max_num_batched_tokens,
                                       enable_prefix_caching, enable_chunked_prefill)
        self.vocab_size = self.runner.parts.embed.num_embeddings
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        self.stop_token_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))
        self._reset()

    # ------------------------------------------------------------------------------------------ requests
    def _reset(self) -> None:
        """A fresh run: empty pools' bookkeeping, queues, records and statistics (the pools are reused)."""
        self.scheduler = Scheduler(self.config, self.config.num_blocks, on_copy=self.runner.copy_block)
        self.recorder = Recorder()
        self.stats = EngineStats()
        self._start = time.perf_counter()
        self._outputs: dict[str, RequestOutput] = {}
        self._firsts: list[EngineSequence] = []  # every request's first sequence, in arrival order
        self._pending: dict[str, int] = {}  # request id -> samples still running

    def _now(self) -> float:
        return time.perf_counter() - self._start

    def check_request(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ValueError naming the problem when the engine could never serve this request."""
        if len(prompt_token_ids) == 0:
            raise ValueError("the prompt is empty: give at least one token id")
        bad = [t for t in prompt_token_ids if isinstance(t, bool) or not isinstance(t, int | np.integer)
               or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"unknown token ids {bad[:5]}: this model's vocabulary is 0..{self.vocab_size - 1}")
        config, total = self.config, len(prompt_token_ids) + params.max_tokens
        if params.n > config.max_num_seqs:
            raise ValueError(f"n={params.n} parallel samples exceed max_num_seqs={config.max_num_seqs}")
        if config.max_model_len is not None and total > config.max_model_len:
            raise ValueError(f"{len(prompt_token_ids)} prompt + {params.max_tokens} output tokens exceed this "
                             f"model's {config.max_model_len} positions")
        usable, need = config.num_blocks - 1, -(-total // config.block_size) * params.n
        if need > usable:
            raise ValueError(f"{len(prompt_token_ids)} prompt + {params.max_tokens} output tokens x {params.n} "
                             f"samples need {need} blocks of {config.block_size} tokens; the pool has {usable}")
        if not config.chunked and total > config.max_num_batched_tokens:
            raise ValueError(f"without chunked prefill a request ({total} tokens with its output, recomputed whole "
                             f"after a preemption) must fit max_num_batched_tokens={config.max_num_batched_tokens}")

    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_s: float | None = None) -> str:
        """Queue a request; returns its id. Bad input raises ValueError and changes nothing.

        arrival_s: when it arrived on the run's clock (None: now).
        """
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_token_ids]
        self.check_request(prompt, params)
        index = len(self._firsts)
        rid = request_id or f"r{index}"
        if rid in self._outputs:
            raise ValueError(f"request id {rid!r} is already in use")
        req = Request(index, self._now() if arrival_s is None else arrival_s, len(prompt), params.max_tokens)
        stops = () if params.ignore_eos else self.stop_token_ids
        first = EngineSequence.of(req, prompt, stops, params, rid, 0, index if params.seed is None else params.seed)
        self._firsts.append(first)
        self._outputs[rid] = RequestOutput(rid, prompt)
        self._pending[rid] = params.n
        self.scheduler.add_request(first)
        return rid

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_requests()

    # ---------------------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """One engine step: schedule, run the model, sample, update. Returns the requests that finished."""
        with torch_threads(self.threads):
            return self._step()

    def _step(self) -> list[RequestOutput]:
        start = self._now()
        out = self.scheduler.schedule()
        if not (out.scheduled or out.preempted):
            return []
        manager = self.scheduler.manager
        hits = sum(manager.num_cached_tokens(r.rid) for r in out.admitted)
        sampling = {id(r) for r in out.sampling}
        chunks = [SequenceChunk(r.rid, r.token_ids_between(r.num_computed_tokens - n, r.num_computed_tokens),
                                r.num_computed_tokens - n, manager.block_ids(r.rid), id(r) in sampling)
                  for r, n in out.scheduled]
        logits = self.runner.execute(chunks)  # [samplers, V]
        sampled, children = self._sample(out.sampling, logits)
        finished = self.scheduler.update_from_output(out, sampled)
        finished += self._start_children(children)
        self._release_window()
        end = self._now()
        self.recorder.scheduled(out, self.scheduler, start, end - start, 0.0)
        self.recorder.sampled(out, finished, end)
        self._count(out, hits)
        return self._collect(finished)

    def _sample(self, sampling: list[EngineSequence], logits: torch.Tensor
                ) -> tuple[dict[str, int], list[tuple[EngineSequence, int]]]:
        """Each sampler's token (every greedy row with one argmax and one host read); a request whose prompt is
        done forks its other samples, each drawing its first token from the same row. The argmax is numpy's (the same
        first-maximum rule as torch's): 4 us for 16 rows of 4,096 logits on one core, against 47 us for torch's."""
        tokens = logits.numpy().argmax(axis=-1).tolist()
        sampled, children = {}, []
        for i, r in enumerate(sampling):
            if r.generator is not None:
                tokens[i] = r.draw(logits[i])
            sampled[r.rid] = tokens[i]
            if r.seats > 1:
                kids = [self._child(r, j) for j in range(1, r.seats)]
                self.scheduler.fork(r, kids)
                children += [(kid, tokens[i] if kid.generator is None else kid.draw(logits[i])) for kid in kids]
        return sampled, children

    def _child(self, parent: EngineSequence, index: int) -> EngineSequence:
        """Sample ``index`` of ``parent``'s request: its own sequence over the same prompt, decoding from now."""
        seed = parent.req.index if parent.params.seed is None else parent.params.seed
        child = EngineSequence.of(parent.req, parent.prompt_ids, parent.stop_token_ids, parent.params,
                                  parent.request_id, index, seed)
        times = self.recorder.of(child)
        times.phase, times.phase_start_s = "decode", self._now()
        return child

    def _start_children(self, children: list[tuple[EngineSequence, int]]) -> list[EngineSequence]:
        """Give each new sample its first token; the ones that already end are finished."""
        done = []
        for child, token in children:
            child.in_prefill = False
            if child.append_output(token):
                self.scheduler.finish_request(child)
                done.append(child)
        return done

    def _release_window(self) -> None:
        """With one sliding window in every layer, give back blocks no query of a running sequence reads again."""
        window = self.runner.sliding_window
        if window is None:
            return
        manager = self.scheduler.manager
        for r in self.scheduler.running:
            manager.free_blocks_before(r.rid, r.num_computed_tokens - window + 1)

    def _count(self, out: SchedulerOutput, hits: int) -> None:
        stats = self.stats
        stats.steps += 1
        stats.preemptions += len(out.preempted)
        stats.model_tokens += out.new_tokens
        stats.prefix_cache_hit_tokens += hits
        stats.peak_blocks_used = max(stats.peak_blocks_used, out.kv_blocks_used)

    def _collect(self, finished: list[EngineSequence]) -> list[RequestOutput]:
        """Record finished samples in their requests' outputs; return the requests whose samples all ended."""
        done = []
        for r in finished:
            output = self._outputs[r.request_id]
            reason = "stop" if r.output_ids and r.output_ids[-1] in r.stop_token_ids else "length"
            output.outputs.append(CompletionOutput(r.index, list(r.output_ids), reason))
            if r.index == 0:
                output.num_cached_tokens = r.prefix_hit_tokens
            self._pending[r.request_id] -= 1
            if not self._pending[r.request_id]:
                output.outputs.sort(key=lambda c: c.index)
                output.finished = True
                done.append(output)
        return done

    # ------------------------------------------------------------------------------------------- offline
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 progress: Callable[[float], None] | None = None,
                 on_step: Callable[[LLMEngine], None] | None = None) -> list[RequestOutput]:
        """Serve every prompt (all arriving now) to the end; outputs in prompt order. Starts a fresh run, so
        :attr:`stats` and :meth:`result` describe this call. Nothing is queued when any request is bad.

        Every request arrives at the run's time 0. progress: called with the share of requests finished after
        each step that finishes some. on_step: called with the engine after every step (to read the block pool);
        the run's clock stops while it runs, so its latencies are the engine's alone.
        """
        params = params or SamplingParams()
        each = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(each) != len(prompts):
            raise ValueError(f"give one SamplingParams or one per prompt: {len(prompts)} prompts, {len(each)} params")
        for prompt, p in zip(prompts, each, strict=True):
            self.check_request(prompt, p)
        self._reset()
        ids = [self.add_request(prompt, p, arrival_s=0.0) for prompt, p in zip(prompts, each, strict=True)]
        done = 0
        while self.has_unfinished_requests():
            finished = self.step()
            if on_step is not None:
                paused = time.perf_counter()
                on_step(self)
                self._start += time.perf_counter() - paused  # not the engine's time
            if finished and progress is not None:
                done += len(finished)
                progress(done / len(ids))
        self.stats.timeline = pd.DataFrame(self.recorder.columns)
        return [self._outputs[rid] for rid in ids]

    def result(self) -> SimResult:
        """The last run as the simulator reports one: requests (TTFT, TPOT...), steps, phases and the summary,
        every time measured on this machine."""
        if not self._firsts:
            raise ValueError("nothing has run yet: call generate() first")
        firsts = self._firsts
        workload = Workload.from_prompts([s.prompt_ids for s in firsts], [s.output_len for s in firsts],
                                         [s.req.arrival_s for s in firsts], name="engine")
        itl = np.asarray(self.recorder.itl_s) if self.recorder.itl_s else np.empty(0)
        return build_result(workload, self.config, self.config.num_blocks, list(firsts), self.recorder,
                            self.scheduler, itl)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the paged pools, allocated once (codes + scales + zeros when quantized)."""
        return self.runner.kv_bytes
