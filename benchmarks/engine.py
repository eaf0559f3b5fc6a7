"""The serving engine measured on this machine: against transformers, with a shared prefix, against the simulator,
and with quantized pools.

    python benchmarks/engine.py [--requests 64] [--repeats 3] [--threads 1 2] [--csv engine.csv]

1. engine vs ``model.generate`` with static batching (batch = max_num_seqs) on the same mixed-length workload
   of real text (5-400 prompt tokens, 8-64 output tokens): the two run interleaved, ``--repeats`` times per
   thread count; medians and the per-repeat throughput ratio (median, min-max);
2. a workload whose requests share a 192-token prefix: TTFT with prefix caching on vs off;
3. the simulator's step time calibrated once on a grid of engine steps (its coefficients, held-out error and
   how long it took), then its prediction of five workloads it never saw (other request counts, lengths, batch
   limits, prefix sharing, prefill chunked or whole), error in %;
4. 8- and 4-bit pools: KV bytes vs the fp32 pools (and vs fp16), speed, greedy outputs still identical.
Every number is one run on a shared machine; the load average is printed next to each section.

    python benchmarks/engine.py --profile [--models bundled smollm2-135m] [--threads 1 2] [--repeats 5]

profiles a pure decode step instead (batch 16, 64-token prompts, 48 new tokens): the engine's decode steps
(replayed as a captured graph where the model allows, and eager), and transformers' ``generate`` steps (SDPA
attention, its default), interleaved ``--repeats`` times, each
with the median step time and its interquartile range, the torch ops and the host reads (``.item()``,
``.tolist()``, data-dependent shapes: a host-device sync on a GPU) of one step, and the ratio of the
medians per repeat (median, min-max).

    python benchmarks/engine.py --breakdown [--models bundled smollm2-135m] [--threads 1 2] [--repeats 3]

times the engine's part of the same decode steps by section (projections, attention kernel, norms, RoPE, K/V
writes, the rest of the forward, the step's plan, the step outside the model): microseconds per step, means. It
times the eager step: a replayed graph makes the same kernel calls with no Python between them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from unittest.mock import patch

import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvcore.device import torch_threads  # noqa: E402
from kvcore.engine import LLMEngine, forward  # noqa: E402
from kvcore.engine import runner as runner_module  # noqa: E402
from kvcore.engine.calibrate import (  # noqa: E402
    calibrate_engine,
    coefficients_table,
    prediction_table,
    simulate_engine,
)
from kvcore.engine.experiment import (  # noqa: E402
    EngineSettings,
    agreement,
    serve_engine,
    serve_transformers,
)
from kvcore.engine.params import SamplingParams  # noqa: E402
from kvcore.engine.pools import KVPools  # noqa: E402
from kvcore.engine.runner import ModelRunner  # noqa: E402
from kvcore.engine.workload import ServeWorkload  # noqa: E402
from kvcore.kernels import DecodeBatch  # noqa: E402
from kvcore.models import load_model  # noqa: E402
from kvcore.models.runtime import attention_implementation  # noqa: E402

METRICS = ("output_tok_per_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99", "peak_memory_MB",
           "kv_bytes_held", "kv_bytes_allocated")


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def versus_transformers(model, tokenizer, workload: ServeWorkload, settings: EngineSettings, repeats: int,
                        threads: int) -> list[dict]:
    """Engine and transformers interleaved ``repeats`` times; one row per system with medians and spreads."""
    prompts, outputs = workload.build(tokenizer)
    runs: dict[str, list[dict]] = {"engine": [], "transformers": []}
    for _ in range(repeats):
        runs["engine"].append(serve_engine(model, prompts, outputs, replace(settings, threads=threads)).summary)
        runs["transformers"].append(serve_transformers(model, prompts, outputs, settings.max_num_seqs,
                                                       tokenizer.pad_token_id or 0, threads=threads).summary)
    ratios = [e["output_tok_per_s"] / h["output_tok_per_s"] for e, h in zip(*runs.values(), strict=True)]
    rows = []
    for summaries in runs.values():
        row = {"section": "vs transformers", "system": summaries[0]["system"], "threads": threads,
               "repeats": repeats}
        for metric in METRICS:
            values = [s[metric] for s in summaries]
            row[metric] = statistics.median(values)
            row[f"{metric}_min"], row[f"{metric}_max"] = min(values), max(values)
        rows.append(row)
    rows[0] |= {"throughput_ratio_median": statistics.median(ratios), "throughput_ratio_min": min(ratios),
                "throughput_ratio_max": max(ratios)}
    return rows


def shared_prefix(model, tokenizer, settings: EngineSettings, repeats: int, requests: int) -> list[dict]:
    """TTFT with prefix caching off and on, a 192-token prefix shared by 3 in 4 requests."""
    prompts, outputs = ServeWorkload(requests, prompt_min=16, prompt_max=128, shared_prefix_tokens=192,
                                     shared_fraction=0.75, seed=2).build(tokenizer)
    rows = []
    for caching in (False, True):
        summaries = [serve_engine(model, prompts, outputs, replace(settings, enable_prefix_caching=caching)).summary
                     for _ in range(repeats)]
        rows.append({"section": "shared prefix", "system": f"engine, prefix caching {'on' if caching else 'off'}",
                     "repeats": repeats, **{m: statistics.median(s[m] for s in summaries) for m in METRICS[:5]}})
    saving = 1 - rows[1]["ttft_ms_p50"] / rows[0]["ttft_ms_p50"]
    rows[1]["ttft_p50_saving_pct"] = 100 * saving
    return rows


# Workloads the calibration never saw: requests, prompt and output lengths, batch limit, prefix sharing, chunking.
UNSEEN = {
    "48 mixed, 16 at a time": (ServeWorkload(48, 5, 400, 8, 64, seed=3), EngineSettings(1024, 16, 16, 512)),
    "40 long outputs, 8 at a time": (ServeWorkload(40, 20, 120, 64, 160, seed=1), EngineSettings(1024, 16, 8, 512)),
    "64 long prompts, 192-token prefix for 3 in 4, 32 at a time": (
        ServeWorkload(64, 200, 600, 8, 32, 192, 0.75, seed=2), EngineSettings(2048, 16, 32, 512)),
    "32 short chats, 4 at a time": (ServeWorkload(32, 5, 60, 16, 96, seed=4), EngineSettings(512, 16, 4, 256)),
    "24 prompts prefilled whole, 12 at a time": (ServeWorkload(24, 50, 300, 8, 48, seed=5),
                                                 EngineSettings(1024, 16, 12, 1024, False, False)),
}
COMPARED_SHOWN = ("output_tok_per_s", "ttft_ms_p50", "tpot_ms_p50")


def simulator(model, tokenizer, threads: int = 1, max_seqs: int = 32, max_requests: int | None = None
              ) -> tuple[list[dict], pd.DataFrame]:
    """Calibrate once on the grid of steps; predict every workload of :data:`UNSEEN` served by the engine
    (``max_requests`` caps their request counts, for a quick run)."""
    start = time.perf_counter()
    fit = calibrate_engine(model, threads=threads, max_seqs=max_seqs)
    seconds = time.perf_counter() - start
    tables = []
    for name, (workload, settings) in UNSEEN.items():
        if max_requests is not None and workload.num_requests > max_requests:
            workload, name = replace(workload, num_requests=max_requests), f"{name} (cut to {max_requests} requests)"
        prompts, outputs = workload.build(tokenizer)
        engine = serve_engine(model, prompts, outputs, replace(settings, threads=threads)).engine
        table = prediction_table(engine.result(), simulate_engine(engine, prompts, outputs, fit))
        tables.append(table.assign(section="simulator", system=name, load_1min=os.getloadavg()[0]))
    rows = [{"section": "simulator calibration", "calibration_s": seconds, **coefficients_table(fit).iloc[0]}]
    return rows, pd.concat(tables, ignore_index=True)


def quantized(model, tokenizer, workload: ServeWorkload, settings: EngineSettings) -> list[dict]:
    """fp32 pools vs 8- and 4-bit: bytes, speed and greedy agreement."""
    prompts, outputs = workload.build(tokenizer)
    full = serve_engine(model, prompts, outputs, settings)
    rows = [{"section": "quantized pools", **full.summary}]
    for bits in (8, 4):
        run = serve_engine(model, prompts, outputs, replace(settings, kv_bits=bits), system=f"engine kv{bits}")
        rows.append({"section": "quantized pools", **run.summary, **agreement(full.outputs, run.outputs),
                     "kv_vs_fp32": run.summary["kv_bytes_allocated"] / full.summary["kv_bytes_allocated"],
                     "kv_vs_fp16": run.summary["kv_bytes_allocated"] / (full.summary["kv_bytes_allocated"] / 2)})
    return rows


SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero", "aten.equal"}
PROFILE = {"batch": 16, "prompt": 64, "new": 48}


class OpCounter(TorchDispatchMode):
    """Counts torch ops and host reads (ops that need a value on the host, plus ``Tensor.tolist`` and
    ``Tensor.numpy``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.syncs += str(func.overloadpacket) in SYNC_OPS
        return func(*args, **(kwargs or {}))

    READS = ("tolist", "numpy")

    def __enter__(self):
        self._real = {name: getattr(torch.Tensor, name) for name in self.READS}
        for name, real in self._real.items():
            setattr(torch.Tensor, name, self._counted(real))
        return super().__enter__()

    def _counted(self, real: Callable) -> Callable:
        def read(tensor, *args, **kwargs):
            self.syncs += 1
            return real(tensor, *args, **kwargs)
        return read

    def __exit__(self, *exc):
        for name, real in self._real.items():
            setattr(torch.Tensor, name, real)
        return super().__exit__(*exc)


def _prompts(vocab: int) -> torch.Tensor:
    return torch.randint(10, min(vocab, 4000), (PROFILE["batch"], PROFILE["prompt"]),
                         generator=torch.Generator().manual_seed(0))


def engine_decode_steps(model, prompts: torch.Tensor, threads: int, after_prefill: Callable[[], None] | None = None,
                        eager: bool = False) -> tuple[list[float], OpCounter]:
    """Seconds of each pure decode step, and one mid-run decode step's op counts (after_prefill: called once the
    prefill step is done; eager: never replay a captured decode graph)."""
    engine = LLMEngine(model, num_blocks=prompts.shape[0] * 8 + 1, max_num_seqs=prompts.shape[0],
                       max_num_batched_tokens=2048, threads=threads, enforce_eager=eager)
    for p in prompts.tolist():
        engine.add_request(p, SamplingParams(max_tokens=PROFILE["new"], ignore_eos=True))
    counter, times = OpCounter(), []
    step = 0
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        if step == PROFILE["new"] // 2:
            with counter:
                engine.step()
        else:
            engine.step()
        if step > 0:  # step 0 is the prefill
            times.append(time.perf_counter() - start)
        elif after_prefill is not None:
            after_prefill()
        step += 1
    return times, counter


# Where a decode step's time goes: each of these is timed where the step calls it (nested in FORWARD, but PLAN).
PLAN, FORWARD = "step plan (positions, slots, tables, spans)", "model forward"
SECTIONS = {"projections (GEMMs, lm_head included)": ((forward.Projection, "__call__"),),
            "decode attention (C kernel)": ((DecodeBatch, "attend"),),
            "RMS norms (those not in a projection's pass)": ((forward, "rms_norm"),),
            "RoPE and K/V writes into the pools": ((KVPools, "rope_and_write"), (forward, "rotate"),
                                                   (KVPools, "write")),
            PLAN: ((ModelRunner, "plan"),), FORWARD: ((runner_module, "model_forward"),)}


def breakdown(models: list[str], thread_counts: list[int], repeats: int) -> pd.DataFrame:
    """Microseconds per pure decode step in each of :data:`SECTIONS` (a timer around each call, about 1 us of its
    own per call; a section called inside another counts for itself only), what the forward does besides them, and
    what the step does outside the model (scheduling, sampling, bookkeeping); means over ``repeats`` runs of the
    profile's decode steps."""
    rows = []
    for name in models:
        model, _ = load_model(None if name == "bundled" else name)
        prompts = _prompts(model.config.vocab_size)
        for threads in thread_counts:
            engine_decode_steps(model, prompts, threads, eager=True)  # warm-up
            live, spent, times = dict.fromkeys(SECTIONS, 0.0), dict.fromkeys(SECTIONS, 0.0), []
            with contextlib.ExitStack() as stack:
                for section, targets in SECTIONS.items():
                    for owner, attribute in targets:
                        timed = _timed(getattr(owner, attribute), section, live)
                        stack.enter_context(patch.object(owner, attribute, timed))
                restart = functools.partial(_zero, live)  # decode steps only: clocks restart after the prefill
                for _ in range(repeats):
                    times += engine_decode_steps(model, prompts, threads, after_prefill=restart, eager=True)[0]
                    spent = {k: v + live[k] for k, v in spent.items()}
            per_step = {k: v / len(times) * 1e6 for k, v in spent.items()}
            forward_us, plan_us = per_step.pop(FORWARD), per_step.pop(PLAN)
            step_us = statistics.mean(times) * 1e6
            rest = forward_us - sum(per_step.values())
            parts = {**per_step, "rest of the forward (elementwise ops, views, Python)": rest,
                     PLAN: plan_us,
                     "outside the model (schedule, sample, update)": step_us - forward_us - plan_us}
            rows += [{"model": name, "threads": threads, "section": k, "us_per_step": v, "share": v / step_us}
                     for k, v in parts.items()]
            rows.append({"model": name, "threads": threads, "section": "whole step (mean)", "us_per_step": step_us,
                         "share": 1.0})
            print(pd.DataFrame(rows[-len(parts) - 1:]).round(3).to_string(index=False), flush=True)
    return pd.DataFrame(rows)


def _zero(clocks: dict[str, float]) -> None:
    clocks.update(dict.fromkeys(clocks, 0.0))


_OPEN: list[float] = []  # for each timed call in progress, the time its timed callees took so far


def _timed(fn: Callable, section: str, spent: dict[str, float]) -> Callable:
    """fn, adding its time to spent[section]: without the time of timed calls inside it (a norm a projection calls
    counts as a norm), except for the forward, the whole that the sections are taken out of."""
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        _OPEN.append(0.0)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            inside = _OPEN.pop()
            spent[section] += elapsed if section == FORWARD else elapsed - inside
            if _OPEN:
                _OPEN[-1] += elapsed
    return timed


class _GenerateClock(LogitsProcessor):
    """Marks each generate step (a logits processor runs once per step); snapshots the op counter."""

    def __init__(self, counter: OpCounter | None) -> None:
        self.times, self.counts, self.counter = [], [], counter

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        if self.counter is not None:
            self.counts.append((self.counter.ops, self.counter.syncs))
        return scores


def generate_decode_steps(model, prompts: torch.Tensor, threads: int, count: bool) -> tuple[list[float], tuple]:
    """Seconds between consecutive generate steps (decode steps), and the median ops and syncs per step."""
    counter = OpCounter() if count else None
    clock = _GenerateClock(counter)
    config = GenerationConfig(max_new_tokens=PROFILE["new"], min_new_tokens=PROFILE["new"], do_sample=False,
                              pad_token_id=0)
    counting = counter if counter is not None else contextlib.nullcontext()
    with torch_threads(threads), torch.inference_mode(), attention_implementation(model, "sdpa"), counting:
        model.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=config,
                       logits_processor=LogitsProcessorList([clock]))
    times = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    per_step = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(clock.counts, clock.counts[1:], strict=False)]
    return times, tuple(statistics.median(c) for c in zip(*per_step, strict=True)) if per_step else (0, 0)


def profile(models: list[str], thread_counts: list[int], repeats: int) -> pd.DataFrame:
    """The pure decode step of each model at each thread count, engine vs transformers, interleaved."""
    rows = []
    for name in models:
        model, _ = load_model(None if name == "bundled" else name)
        prompts = _prompts(model.config.vocab_size)
        for threads in thread_counts:
            engines = {"engine": False, "engine (eager)": True}  # system -> enforce_eager
            counted, runs = {}, {system: [] for system in (*engines, "transformers")}
            for system, eager in engines.items():  # warm-up runs that also count
                counts = engine_decode_steps(model, prompts, threads, eager=eager)[1]
                counted[system] = (counts.ops, counts.syncs)
            counted["transformers"] = generate_decode_steps(model, prompts, threads, count=True)[1]
            for _ in range(repeats):
                for system, eager in engines.items():
                    runs[system].append(engine_decode_steps(model, prompts, threads, eager=eager)[0])
                runs["transformers"].append(generate_decode_steps(model, prompts, threads, count=False)[0])
            for system, system_runs in runs.items():
                steps = [t for run in system_runs for t in run]
                q1, _, q3 = statistics.quantiles(steps, n=4)
                rows.append({"model": name, "threads": threads, "system": system, "repeats": repeats,
                             "step_ms": statistics.median(steps) * 1e3, "step_ms_q1": q1 * 1e3,
                             "step_ms_q3": q3 * 1e3, "ops_per_step": counted[system][0],
                             "host_reads_per_step": counted[system][1], "load_1min": os.getloadavg()[0]})
                if system in engines:
                    ratios = [statistics.median(h) / statistics.median(e)
                              for e, h in zip(system_runs, runs["transformers"], strict=True)]
                    rows[-1] |= {"speedup_median": statistics.median(ratios), "speedup_min": min(ratios),
                                 "speedup_max": max(ratios)}
            print(pd.DataFrame(rows[-len(runs):]).to_string(index=False), flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-max", type=int, default=400)
    parser.add_argument("--output-max", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--csv", help="also write every row here")
    parser.add_argument("--profile", action="store_true", help="profile a pure decode step instead (see above)")
    parser.add_argument("--breakdown", action="store_true", help="where a pure decode step's time goes (see above)")
    parser.add_argument("--models", nargs="+", default=["bundled", "smollm2-135m"],
                        help="--profile's and --breakdown's models")
    parser.add_argument("--model", default="bundled", help="the model of the mixed benchmark")
    args = parser.parse_args()
    if args.profile or args.breakdown:
        print(f"pure decode step, batch {PROFILE['batch']}; {load()}")
        table = (profile if args.profile else breakdown)(args.models, args.threads, args.repeats)
        if args.csv:
            table.to_csv(args.csv, index=False)
        return
    model, tokenizer = load_model(None if args.model == "bundled" else args.model)
    workload = ServeWorkload(args.requests, prompt_max=args.prompt_max, output_min=min(8, args.output_max),
                             output_max=args.output_max)
    settings = EngineSettings(num_blocks=1024, max_num_seqs=16, max_num_batched_tokens=512)
    rows: list[dict] = []
    with pd.option_context("display.width", 220, "display.max_columns", 40):
        for threads in args.threads:
            print(f"\n== engine vs transformers, {threads} thread(s); {load()}")
            part = versus_transformers(model, tokenizer, workload, settings, args.repeats, threads)
            print(pd.DataFrame(part)[["system", *METRICS[:5], "throughput_ratio_median", "throughput_ratio_min",
                                      "throughput_ratio_max"]].to_string(index=False))
            rows += part
        print(f"\n== shared prefix; {load()}")
        rows += (part := shared_prefix(model, tokenizer, settings, args.repeats, args.requests))
        print(pd.DataFrame(part).to_string(index=False))
        print(f"\n== simulator calibrated on a grid of engine steps, predicting unseen workloads; {load()}")
        fit, predictions = simulator(model, tokenizer, max_requests=args.requests)
        print(pd.DataFrame(fit).to_string(index=False))
        shown = predictions[predictions["metric"].isin(COMPARED_SHOWN)]
        print(shown.pivot(index="system", columns="metric", values="error_pct").round(1).to_string())
        rows += fit + predictions.to_dict("records")
        print(f"\n== quantized pools; {load()}")
        rows += (part := quantized(model, tokenizer, workload, settings))
        print(pd.DataFrame(part)[["system", "output_tok_per_s", "kv_bytes_allocated", "kv_bytes_held",
                                  "outputs_identical", "tokens_before_first_difference"]].to_string(index=False))
    if args.csv:
        pd.DataFrame(rows).to_csv(args.csv, index=False)
        print(f"wrote {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
