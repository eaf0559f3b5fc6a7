"""``python -m kvcore engine``: serve a workload of real text on the lab's engine, headless.

``--compare hf`` adds transformers' generate with static batching on the same requests; ``--compare sim``
calibrates the simulator's step time on a grid of engine steps (it never sees the run) and predicts the run;
``--compare kv`` serves the workload again with 8- and 4-bit pools. Model code loads when the command runs,
so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import pandas as pd

COMPARISONS = ("hf", "sim", "kv")
TABLES = ("summary", "requests", "steps", "fit", "prediction")


def add_cli(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``engine``."""
    p = sub.add_parser("engine", parents=[parent],
                       help="serve real prompts on the lab's paged engine; compare with transformers and the simulator")
    p.add_argument("--model", default=None, help="bundled (default), a local folder or a Hub name (Llama family)")
    p.add_argument("--requests", type=int, default=64, help="requests, all arriving at once")
    p.add_argument("--prompt-min", type=int, default=5, help="shortest prompt (tokens)")
    p.add_argument("--prompt-max", type=int, default=400, help="longest prompt (tokens)")
    p.add_argument("--output-min", type=int, default=8, help="shortest output (tokens)")
    p.add_argument("--output-max", type=int, default=64, help="longest output (tokens)")
    p.add_argument("--shared-prefix", type=int, default=0, help="tokens of a prefix shared by some requests")
    p.add_argument("--shared-fraction", type=float, default=0.0, help="share of requests starting with it")
    p.add_argument("--num-blocks", type=int, default=1024, help="KV blocks (the null block included)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block")
    p.add_argument("--max-num-seqs", type=int, default=16, help="running sequences at most (transformers: batch)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget per step")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn automatic prefix caching off")
    p.add_argument("--no-chunked-prefill", action="store_true", help="prefill each prompt whole")
    p.add_argument("--kv-bits", type=int, choices=(8, 4), default=None, help="quantized pools")
    p.add_argument("--threads", type=int, default=1, help="torch threads while serving (both systems)")
    p.add_argument("--compare", nargs="*", choices=COMPARISONS, default=[], help="what to compare against")
    p.add_argument("--table", choices=TABLES, default="summary", help="which table to print and write")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> pd.DataFrame:
    """Build the workload, serve it, and return the table ``--table`` names."""
    from kvcore.engine.calibrate import calibrate_engine, coefficients_table, prediction_table, simulate_engine
    from kvcore.engine.experiment import EngineSettings, agreement, comparison, serve_engine, serve_transformers
    from kvcore.engine.workload import ServeWorkload
    from kvcore.models.loader import load_model

    try:
        model, tokenizer = load_model(args.model)
    except OSError as exc:
        raise ValueError(str(exc)) from exc
    workload = ServeWorkload(args.requests, args.prompt_min, args.prompt_max, args.output_min, args.output_max,
                             args.shared_prefix, args.shared_fraction, args.seed)
    prompts, outputs = workload.build(tokenizer)
    settings = EngineSettings(args.num_blocks, args.block_size, args.max_num_seqs, args.max_num_batched_tokens,
                              not args.no_prefix_caching, not args.no_chunked_prefill, args.kv_bits, args.threads)
    runs = [serve_engine(model, prompts, outputs, settings)]
    engine = runs[0].engine
    if "hf" in args.compare:
        runs.append(serve_transformers(model, prompts, outputs, args.max_num_seqs, tokenizer.pad_token_id or 0,
                                       threads=args.threads))
    if "kv" in args.compare:
        for bits in (8, 4):
            run_bits = serve_engine(model, prompts, outputs, replace(settings, kv_bits=bits), system=f"engine kv{bits}")
            run_bits.summary |= agreement(runs[0].outputs, run_bits.outputs)
            runs.append(run_bits)
    tables = {"summary": comparison([[r] for r in runs]), "requests": engine.result().requests,
              "steps": engine.stats.timeline}
    if "sim" in args.compare or args.table in ("prediction", "fit"):
        fit = calibrate_engine(model, block_size=args.block_size, threads=args.threads,
                               max_seqs=max(args.max_num_seqs, 1))
        tables["fit"] = coefficients_table(fit)
        tables["prediction"] = prediction_table(engine.result(), simulate_engine(engine, prompts, outputs, fit))
        if args.table != "prediction":
            print(tables["prediction"].to_string(index=False), file=sys.stderr)
    return tables[args.table]
