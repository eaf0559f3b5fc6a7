"""The serving engine measured on this machine: against transformers, with a shared prefix, against the simulator,
and with quantized pools.

    python benchmarks/engine.py [--requests 64] [--repeats 3] [--threads 1 2] [--csv engine.csv]

1. engine vs ``model.generate`` with static batching (batch = max_num_seqs) on the same mixed-length workload
   of real text (5-400 prompt tokens, 8-64 output tokens): the two run interleaved, ``--repeats`` times per
   thread count; medians and the per-repeat throughput ratio (median, min-max);
2. a workload whose requests share a 192-token prefix: TTFT with prefix caching on vs off;
3. the simulator's step time fitted to one engine run (R^2), then its prediction of that run and of a run of
   another workload (a different seed), error in %;
4. 8- and 4-bit pools: KV bytes vs the fp32 pools (and vs fp16), speed, greedy outputs still identical.
Every number is one run on a shared machine; the load average is printed next to each section.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvcore.engine.calibrate import fit_step_time, prediction_table, simulate_engine  # noqa: E402
from kvcore.engine.experiment import (  # noqa: E402
    EngineSettings,
    agreement,
    serve_engine,
    serve_transformers,
)
from kvcore.engine.workload import ServeWorkload  # noqa: E402
from kvcore.models import load_model  # noqa: E402

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


def simulator(model, tokenizer, workload: ServeWorkload, settings: EngineSettings) -> tuple[list[dict], pd.DataFrame]:
    """Fit on one run; predict it and a run of another seed."""
    tables, fit = [], None
    for seed in (workload.seed, workload.seed + 1):
        prompts, outputs = replace(workload, seed=seed).build(tokenizer)
        engine = serve_engine(model, prompts, outputs, settings).engine
        fit = fit or fit_step_time(engine.stats.timeline)
        table = prediction_table(engine.result(), simulate_engine(engine, prompts, outputs, fit))
        tables.append(table.assign(section="simulator", system=f"fitted on seed {workload.seed}, run seed {seed}"))
    rows = [{"section": "simulator fit", "system": fit.name, "intercept_us": fit.intercept_s * 1e6,
             "per_token_us": fit.per_token_s * 1e6, "per_pair_ns": fit.per_pair_s * 1e9,
             "per_kv_token_ns": fit.per_kv_token_s * 1e9, "r2": fit.r2}]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-max", type=int, default=400)
    parser.add_argument("--output-max", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--csv", help="also write every row here")
    args = parser.parse_args()
    model, tokenizer = load_model()
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
        print(f"\n== simulator fitted to the engine; {load()}")
        fit, predictions = simulator(model, tokenizer, workload, settings)
        print(pd.DataFrame(fit).to_string(index=False))
        print(predictions.to_string(index=False))
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
