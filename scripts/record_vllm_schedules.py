"""Record what vLLM 0.33's v1 scheduler does on small traces, as JSON fixtures for the lab's simulator.

vLLM's own ``Scheduler`` (synchronous engine) and ``AsyncScheduler`` (``async_scheduling=True``) run on
CPU with no weights: ``ModelConfig`` reads a folder holding only the ``config.json`` of a tiny Llama
(2 layers, hidden 64, 4 heads, vocab 40000), the tokenizer is skipped, and the KV cache is one full-attention
group of ``num_blocks`` blocks, built the way vLLM's unit tests build it (``tests/v1/core/utils.py``:
``create_scheduler`` / ``create_requests``). A fake model runner samples exactly one token for every request
whose prefill is complete in a step; the i-th output token (0-based) of every request has id ``32000 + i``
(prompt ids lie in [0, 32000)), so a replay hashes the same blocks. Requests finish by length
(``max_tokens``, ``ignore_eos``). The engine loop is the engine core's own: ``EngineCore.step`` for the
synchronous scheduler, ``EngineCore.step_with_batch_queue`` with a queue of two batches for the asynchronous
one (``vllm/v1/engine/core.py``): step k+1 is scheduled before step k's output is processed.

    python3 -m venv /tmp/vllm-env
    /tmp/vllm-env/bin/pip install vllm==0.33.0
    /tmp/vllm-env/bin/python scripts/record_vllm_schedules.py

writes ``tests/fixtures/vllm/<trace>-<sync|async>.json`` (``--out DIR`` elsewhere, ``--trace NAME`` for one
trace). ``tests/fixtures/vllm/README.md`` describes the format and the vLLM rules the fixtures show.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

# Set before vLLM is imported. Pin the model runner a GPU engine picks by default (V2), so the run does not depend
# on the machine (the V1 runner gives the same schedules; only SchedulerOutput's layout of re-admissions differs).
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import torch
import vllm
from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "tests" / "fixtures" / "vllm"
OUTPUT_TOKEN_BASE = 32000  # i-th output token of every request has id OUTPUT_TOKEN_BASE + i
VOCAB_SIZE = 40000
BLOCK_SIZE = 16
MAX_STEPS = 2000  # a trace that runs longer is a bug in the trace or the loop

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


@dataclass(slots=True)
class TraceRequest:
    """One request of a trace: its prompt ids, its output length and the step before which it arrives."""

    prompt: list[int]
    max_tokens: int
    arrival_step: int = 0


@dataclass(slots=True)
class Trace:
    """A workload and the scheduler settings it runs under (``num_blocks`` counts vLLM's null block)."""

    name: str
    description: str
    requests: list[TraceRequest]
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    enable_prefix_caching: bool
    num_blocks: int
    max_model_len: int = 2048
    block_size: int = BLOCK_SIZE

    def settings(self) -> dict:
        return {
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "enable_chunked_prefill": self.enable_chunked_prefill,
            "enable_prefix_caching": self.enable_prefix_caching,
            "block_size": self.block_size,
            "num_blocks": self.num_blocks,
            "max_model_len": self.max_model_len,
        }


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(OUTPUT_TOKEN_BASE) for _ in range(n)]


def trace_no_sharing() -> Trace:
    rng = random.Random(1)
    lengths = [40, 95, 130, 64, 200, 17, 150, 81]
    outputs = [12, 8, 20, 16, 10, 24, 6, 14]
    return Trace(
        "no-sharing",
        "distinct prompts, more requests than max_num_seqs, no KV pressure",
        [TraceRequest(random_ids(rng, n), m) for n, m in zip(lengths, outputs, strict=True)],
        max_num_seqs=4,
        max_num_batched_tokens=512,
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
        num_blocks=128,
    )


def trace_shared_prefix() -> Trace:
    rng = random.Random(2)
    system = random_ids(rng, 100)  # 6 full blocks + 4 tokens
    suffixes = [30, 12, 60, 5, 44, 28, 0, 17]
    prompts = [system + random_ids(rng, n) for n in suffixes]
    prompts[6] = list(prompts[1])  # an exact repeat: a full hit stops one token short
    prompts.append(system[:64])  # a block-aligned prompt that is a prefix of every other one
    outputs = [10, 6, 12, 8, 5, 9, 7, 11, 4]
    return Trace(
        "shared-prefix",
        "a 100-token system prefix shared by every prompt, an exact repeat, a block-aligned prefix prompt",
        [TraceRequest(p, m) for p, m in zip(prompts, outputs, strict=True)],
        max_num_seqs=3,
        max_num_batched_tokens=512,
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
        num_blocks=64,
    )


def trace_chunked_prefill() -> Trace:
    rng = random.Random(3)
    lengths = [700, 300, 520, 45, 410]
    outputs = [6, 10, 4, 12, 8]
    return Trace(
        "chunked-prefill",
        "long prompts under a 128-token budget: multi-chunk prefills sharing steps with decodes",
        [TraceRequest(random_ids(rng, n), m) for n, m in zip(lengths, outputs, strict=True)],
        max_num_seqs=4,
        max_num_batched_tokens=128,
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
        num_blocks=256,
    )


def pressure_requests() -> list[TraceRequest]:
    rng = random.Random(4)
    lengths = [60, 90, 40, 100, 75, 50, 85, 66]
    outputs = [100, 80, 120, 64, 90, 110, 70, 96]
    return [TraceRequest(random_ids(rng, n), m) for n, m in zip(lengths, outputs, strict=True)]


def trace_preempt(caching: bool) -> Trace:
    return Trace(
        "preempt-cached" if caching else "preempt-nocache",
        "decode growth overruns a 36-block pool: preemption and recompute, prefix caching "
        + ("on" if caching else "off"),
        pressure_requests(),
        max_num_seqs=8,
        max_num_batched_tokens=256,
        enable_chunked_prefill=True,
        enable_prefix_caching=caching,
        num_blocks=36,
    )


def trace_mixed() -> Trace:
    rng = random.Random(5)
    shape = [  # (prompt length, output length, arrival step)
        (900, 8, 0),
        (24, 16, 0),
        (37, 12, 0),
        (1000, 6, 0),
        (50, 20, 3),
        (800, 10, 5),
        (20, 30, 5),
        (45, 8, 12),
        (950, 5, 20),
        (33, 14, 20),
    ]
    return Trace(
        "mixed",
        "long (800-1000) and short (20-50) prompts, some arriving at later steps; a long prompt waits until "
        "its whole prompt fits the free blocks, and the pool runs out",
        [TraceRequest(random_ids(rng, n), m, a) for n, m, a in shape],
        max_num_seqs=6,
        max_num_batched_tokens=256,
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
        num_blocks=120,
    )


def trace_unchunked() -> Trace:
    rng = random.Random(6)
    lengths = [300, 500, 250, 400, 120, 610]
    outputs = [10, 6, 12, 8, 16, 5]
    return Trace(
        "unchunked",
        "chunked prefill off: a prompt waits until the whole of it fits the step's remaining budget",
        [TraceRequest(random_ids(rng, n), m) for n, m in zip(lengths, outputs, strict=True)],
        max_num_seqs=4,
        max_num_batched_tokens=1024,
        enable_chunked_prefill=False,
        enable_prefix_caching=True,
        num_blocks=160,
        max_model_len=1024,
    )


TRACES = {
    t.name: t
    for t in (
        trace_no_sharing(),
        trace_shared_prefix(),
        trace_chunked_prefill(),
        trace_preempt(caching=True),
        trace_preempt(caching=False),
        trace_mixed(),
        trace_unchunked(),
    )
}


def make_scheduler(trace: Trace, model_dir: str, async_scheduling: bool) -> Scheduler:
    """vLLM's scheduler for ``trace``, built as vLLM's ``tests/v1/core/utils.py::create_scheduler`` does."""
    model_config = ModelConfig(
        model=model_dir, skip_tokenizer_init=True, dtype="float32", seed=0, max_model_len=trace.max_model_len
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=trace.max_num_seqs,
        max_num_batched_tokens=trace.max_num_batched_tokens,
        max_model_len=trace.max_model_len,
        is_encoder_decoder=False,
        enable_chunked_prefill=trace.enable_chunked_prefill,
        async_scheduling=async_scheduling,
    )
    cache_config = CacheConfig(block_size=trace.block_size, enable_prefix_caching=trace.enable_prefix_caching)
    vllm_config = VllmConfig(
        scheduler_config=scheduler_config,
        model_config=model_config,
        cache_config=cache_config,
        device_config=DeviceConfig(device="cpu"),
    )
    check_config(vllm_config, trace, async_scheduling)
    spec = FullAttentionSpec(
        block_size=trace.block_size,
        num_kv_heads=TINY_LLAMA["num_key_value_heads"],
        head_size=TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"],
        dtype=torch.float32,
    )
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(TINY_LLAMA["num_hidden_layers"])]
    kv_cache_config = KVCacheConfig(
        num_blocks=trace.num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(layers, spec)]
    )
    cache_config.num_gpu_blocks = trace.num_blocks
    scheduler_cls = AsyncScheduler if async_scheduling else Scheduler
    return scheduler_cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=trace.block_size,
        hash_block_size=trace.block_size,
        log_stats=True,
    )


def check_config(vllm_config: VllmConfig, trace: Trace, async_scheduling: bool) -> None:
    """Fail loudly if vLLM's config resolution changed a setting the trace asked for."""
    sc, cc = vllm_config.scheduler_config, vllm_config.cache_config
    got = (sc.enable_chunked_prefill, cc.enable_prefix_caching, bool(sc.async_scheduling))
    want = (trace.enable_chunked_prefill, trace.enable_prefix_caching, async_scheduling)
    if got != want:
        raise RuntimeError(f"{trace.name}: vLLM resolved (chunked, caching, async) to {got}, asked {want}")
    if vllm_config.max_concurrent_batches != (2 if async_scheduling else 1):
        raise RuntimeError(f"{trace.name}: max_concurrent_batches {vllm_config.max_concurrent_batches}")
    if not vllm_config.use_v2_model_runner:
        raise RuntimeError(f"{trace.name}: the V1 model runner was picked")
    if sc.watermark or not sc.scheduler_reserve_full_isl or sc.long_prefill_token_threshold:
        raise RuntimeError(f"{trace.name}: unexpected scheduler defaults {sc}")


def make_request(index: int, req: TraceRequest, block_hasher) -> Request:
    """An engine request as ``create_requests`` makes them; id = the trace index, arrival time = the index."""
    params = SamplingParams(max_tokens=req.max_tokens, ignore_eos=True, temperature=0.0)
    return Request(
        request_id=str(index),
        prompt_token_ids=list(req.prompt),
        sampling_params=params,
        pooling_params=None,
        arrival_time=float(index),
        block_hasher=block_hasher,
    )


@dataclass(slots=True)
class Recorder:
    """Everything a fixture keeps, filled in as the engine loop runs."""

    scheduler: Scheduler
    steps: list[dict] = field(default_factory=list)
    admissions: dict[int, list[list[int]]] = field(default_factory=dict)
    finish_step: dict[int, int] = field(default_factory=dict)
    tables: dict[int, list[int]] = field(default_factory=dict)
    num_sampled: dict[int, int] = field(default_factory=dict)

    def record_schedule(self, output, running_before: list[str]) -> dict:
        """One step's line: what vLLM scheduled, in SchedulerOutput order, and what it preempted."""
        sched = self.scheduler
        step = len(self.steps)
        scheduled = [[int(rid), n] for rid, n in output.num_scheduled_tokens.items()]
        # Victims are popped from the tail of the running list one by one (FCFS policy).
        preempted = sorted(output.preempted_req_ids, key=running_before.index, reverse=True)
        admitted = [(new.req_id, new.num_computed_tokens) for new in output.scheduled_new_reqs]
        cached = output.scheduled_cached_reqs  # re-admissions land here with the V1 model runner only
        admitted += [(r, cached.num_computed_tokens[cached.req_ids.index(r)]) for r in cached.resumed_req_ids]
        for rid, num_computed in sorted(admitted, key=lambda a: list(output.num_scheduled_tokens).index(a[0])):
            self.admissions.setdefault(int(rid), []).append([step, num_computed])
            self.tables[int(rid)] = []
        for rid in preempted:
            self.tables.pop(int(rid), None)
        alloc = []
        for rid in output.num_scheduled_tokens:
            table = list(sched.kv_cache_manager.get_block_ids(rid)[0])
            old = self.tables.get(int(rid), [])
            if table[: len(old)] != old:
                raise RuntimeError(f"step {step}: block table of request {rid} is not append-only")
            if len(table) > len(old):
                alloc.append([int(rid), table[len(old) :]])
            self.tables[int(rid)] = table
        line = {
            "step": step,
            "sched": scheduled,
            "preempted": [int(r) for r in preempted],
            "alloc": alloc,
            "free": sched.kv_cache_manager.block_pool.get_num_free_blocks(),
        }
        self.steps.append(line)
        return line

    def runner_output(self, output, async_scheduling: bool) -> ModelRunnerOutput:
        """The fake model runner: one token for each request whose prefill this step completes."""
        req_ids = list(output.num_scheduled_tokens)
        sampled: list[list[int]] = []
        for rid in req_ids:
            request = self.scheduler.requests[rid]
            if request.is_prefill_chunk:
                sampled.append([])
                continue
            index = self.num_sampled.get(int(rid), 0)
            pending = request.num_output_placeholders - 1 if async_scheduling else 0
            if index != request.num_output_tokens + pending:
                raise RuntimeError(f"request {rid}: sample {index}, vLLM expects {request.num_output_tokens + pending}")
            self.num_sampled[int(rid)] = index + 1
            sampled.append([OUTPUT_TOKEN_BASE + index])
        self.steps[-1]["sampled"] = [int(r) for r, s in zip(req_ids, sampled, strict=True) if s]
        return ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)}, sampled_token_ids=sampled
        )

    def update(self, step: int, output, runner_output: ModelRunnerOutput) -> None:
        """``Scheduler.update_from_output`` for ``step``; notes which requests it finished."""
        self.scheduler.update_from_output(output, runner_output)
        for rid in output.num_scheduled_tokens:
            if int(rid) not in self.finish_step and rid not in self.scheduler.requests:
                self.finish_step[int(rid)] = step
                self.tables.pop(int(rid), None)


def run_trace(trace: Trace, model_dir: str, async_scheduling: bool) -> dict:
    """Drive vLLM's scheduler over ``trace`` with the engine core's loop; return the fixture."""
    sched = make_scheduler(trace, model_dir, async_scheduling)
    hasher = None
    if trace.enable_prefix_caching:  # the engine core hashes blocks only when caching is on
        hash_fn = get_hash_fn_by_name(sched.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        hasher = get_request_block_hasher(trace.block_size, hash_fn)
    rec = Recorder(sched)
    pending = deque(sorted(range(len(trace.requests)), key=lambda i: (trace.requests[i].arrival_step, i)))
    batch_queue: deque = deque()  # (step, scheduler output, runner output), newest on the left
    while pending or sched.has_unfinished_requests() or batch_queue:
        if len(rec.steps) > MAX_STEPS:
            raise RuntimeError(f"{trace.name}: no end after {MAX_STEPS} steps")
        while pending and trace.requests[pending[0]].arrival_step <= len(rec.steps):
            i = pending.popleft()
            sched.add_request(make_request(i, trace.requests[i], hasher))
        if pending and not sched.has_requests() and not batch_queue:
            raise RuntimeError(f"{trace.name}: the engine idles before step {len(rec.steps)}")
        if async_scheduling:
            step_with_batch_queue(rec, batch_queue)
        else:
            step(rec)
    steps = rec.steps
    while steps and not steps[-1]["sched"]:  # the engine's trailing empty schedule() that clears state
        steps.pop()
    return fixture(trace, async_scheduling, rec)


def schedule(rec: Recorder, async_scheduling: bool):
    running_before = [r.request_id for r in rec.scheduler.running]
    output = rec.scheduler.schedule()
    rec.record_schedule(output, running_before)
    return output, rec.runner_output(output, async_scheduling)


def step(rec: Recorder) -> None:
    """``EngineCore.step``: schedule, execute, update, all in one engine step."""
    if not rec.scheduler.has_requests():
        return
    output, runner_output = schedule(rec, async_scheduling=False)
    rec.steps[-1]["done"] = len(rec.steps) - 1
    rec.update(len(rec.steps) - 1, output, runner_output)


def step_with_batch_queue(rec: Recorder, batch_queue: deque, size: int = 2) -> None:
    """``EngineCore.step_with_batch_queue`` with async scheduling's two batches in flight.

    Schedule a new batch if the scheduler has requests; return without processing an output while the queue
    has room and there was work; otherwise process the oldest batch's output.
    """
    assert len(batch_queue) < size
    sched = rec.scheduler
    line = None
    if sched.has_requests():
        output, runner_output = schedule(rec, async_scheduling=True)
        line = rec.steps[-1]
        model_executed = output.total_num_scheduled_tokens > 0
        batch_queue.appendleft((len(rec.steps) - 1, output, runner_output))
        if len(batch_queue) < size and (model_executed or sched.has_requests()):
            line["done"] = None
            return
    elif not batch_queue:
        return
    done, output, runner_output = batch_queue.pop()
    if line is not None:
        line["done"] = done
    else:  # an engine step that only processed an output: note it on the last scheduled step
        rec.steps[-1].setdefault("done_after", []).append(done)
    rec.update(done, output, runner_output)


def fixture(trace: Trace, async_scheduling: bool, rec: Recorder) -> dict:
    requests = []
    for i, req in enumerate(trace.requests):
        admissions = rec.admissions.get(i, [])
        requests.append(
            {
                "prompt_token_ids": req.prompt,
                "max_tokens": req.max_tokens,
                "arrival_step": req.arrival_step,
                "admitted_step": admissions[0][0],
                "num_cached_tokens": admissions[0][1],
                "readmissions": admissions[1:],
                "finish_step": rec.finish_step[i],
            }
        )
    steps = rec.steps
    return {
        "vllm_version": vllm.__version__,
        "mode": "async" if async_scheduling else "sync",
        "trace": trace.name,
        "description": trace.description,
        "settings": trace.settings(),
        "engine": {
            "scheduler": "AsyncScheduler" if async_scheduling else "Scheduler",
            "loop": "EngineCore.step_with_batch_queue" if async_scheduling else "EngineCore.step",
            "max_concurrent_batches": 2 if async_scheduling else 1,
            "model_runner": "v2",
            "policy": "fcfs",
        },
        "output_token_rule": f"the i-th output token (0-based) of every request has id {OUTPUT_TOKEN_BASE} + i",
        "summary": {
            "num_steps": len(steps),
            "num_preemptions": sum(len(s["preempted"]) for s in steps),
            "prefix_hit_tokens": sum(r["num_cached_tokens"] for r in requests),
            "readmission_hit_tokens": sum(h for r in requests for _, h in r["readmissions"]),
            "scheduled_tokens": sum(n for s in steps for _, n in s["sched"]),
        },
        "requests": requests,
        "steps": steps,
    }


def dump(fx: dict) -> str:
    """JSON with one request and one step per line."""
    head = {k: v for k, v in fx.items() if k not in ("requests", "steps")}
    lines = ["{"]
    lines += [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    lines.append('  "requests": [')
    lines.append(",\n".join(f"    {json.dumps(r)}" for r in fx["requests"]))
    lines.append("  ],")
    lines.append('  "steps": [')
    lines.append(",\n".join(f"    {json.dumps(s)}" for s in fx["steps"]))
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder for the JSON fixtures")
    parser.add_argument("--trace", choices=sorted(TRACES), action="append", help="only these traces")
    args = parser.parse_args(argv)
    if vllm.__version__ != "0.33.0":
        print(f"warning: vllm {vllm.__version__} installed, the fixtures are meant for 0.33.0", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as model_dir:
        (Path(model_dir) / "config.json").write_text(json.dumps(TINY_LLAMA))
        for name in args.trace or list(TRACES):
            for async_scheduling in (False, True):
                fx = run_trace(TRACES[name], model_dir, async_scheduling)
                path = args.out / f"{name}-{fx['mode']}.json"
                path.write_text(dump(fx))
                s = fx["summary"]
                print(
                    f"{path.name:28s} steps {s['num_steps']:4d}  preemptions {s['num_preemptions']:3d}  "
                    f"prefix hits {s['prefix_hit_tokens']:5d}  re-admission hits {s['readmission_hit_tokens']:5d}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
