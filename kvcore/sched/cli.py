"""``python -m kvcore batching``: static vs continuous batching vs chunked prefill on one workload, headless."""

from __future__ import annotations

import argparse

import pandas as pd

from kvcore.sched.compare import DEFAULT_BUDGETS, RULES, ServingSetup, compare
from kvcore.sched.config import POLICIES, PREEMPTION
from kvcore.sched.trace import read_trace
from kvcore.sched.workload import ARRIVALS, LENGTHS, Workload, WorkloadConfig, make_workload
from kvcore.shapes import GPU_PRESETS, PRESETS


def workload_from_args(args: argparse.Namespace) -> Workload:
    """The trace when ``--trace`` is given, else a synthetic workload from the flags."""
    if args.trace:
        return read_trace(args.trace, prefix_tokens=args.prefix_tokens, seed=args.seed)
    return make_workload(WorkloadConfig(
        num_requests=args.requests, arrival=args.arrival, rate=args.rate, burst_cv=args.burst_cv,
        lengths=args.lengths, prompt_mean=args.prompt_mean, output_mean=args.output_mean, spread=args.spread,
        max_prompt=args.max_prompt, max_output=args.max_output, shared_prefix_fraction=args.shared_prefix,
        prefix_tokens=args.prefix_tokens, seed=args.seed))


def run(args: argparse.Namespace) -> pd.DataFrame:
    """Build the workload and one engine per scheduler; return the metrics table (one row each)."""
    setup = ServingSetup(args.model, args.gpu, tuple(args.schedulers), args.budget, args.chunk_budget,
                         args.max_num_seqs, args.preemption, args.host_blocks, args.prefix_caching, args.block_size,
                         args.num_blocks, args.rules)
    return compare(workload_from_args(args), setup.configs()).summary


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The flags :func:`workload_from_args` reads: a trace CSV, or a synthetic workload (defaults from
    :class:`~kvcore.sched.workload.WorkloadConfig`). Shared by ``batching`` and ``search``."""
    w = WorkloadConfig()
    p.add_argument("--trace", metavar="CSV", help="arrival_s,prompt_tokens,output_tokens[,prefix_id] per row")
    p.add_argument("--requests", type=int, default=w.num_requests, help="synthetic requests")
    p.add_argument("--arrival", default=w.arrival, choices=ARRIVALS, help="arrival process")
    p.add_argument("--rate", type=float, default=w.rate, help="mean arrival rate (requests/s)")
    p.add_argument("--burst-cv", type=float, default=w.burst_cv, help="bursty: CV of inter-arrival gaps")
    p.add_argument("--lengths", default=w.lengths, choices=LENGTHS, help="length distribution")
    p.add_argument("--prompt-mean", type=int, default=w.prompt_mean, help="mean prompt length (tokens)")
    p.add_argument("--output-mean", type=int, default=w.output_mean, help="mean output length (tokens)")
    p.add_argument("--spread", type=float, default=w.spread, help="uniform: +- fraction; lognormal: sigma")
    p.add_argument("--max-prompt", type=int, default=w.max_prompt, help="longest prompt (tokens)")
    p.add_argument("--max-output", type=int, default=w.max_output, help="longest output (tokens)")
    p.add_argument("--shared-prefix", type=float, default=w.shared_prefix_fraction,
                   help="fraction of requests starting with a shared prefix (0..1)")
    p.add_argument("--prefix-tokens", type=int, default=w.prefix_tokens, help="shared prefix length (tokens)")


def add_cli(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``batching``: throughput, TTFT, TPOT, preemptions of each scheduler on one workload."""
    p = sub.add_parser("batching", parents=[parent],
                       help="static vs continuous batching vs chunked prefill on the real block manager")
    p.add_argument("--schedulers", nargs="+", default=list(POLICIES), choices=POLICIES, help="schedulers to run")
    p.add_argument("--model", default="llama-3-8b", choices=sorted(PRESETS), help="model preset")
    p.add_argument("--gpu", default="H100 80GB", choices=sorted(GPU_PRESETS), help="GPU preset")
    add_workload_args(p)
    p.add_argument("--max-num-seqs", type=int, default=256, help="running requests at most (static: batch size)")
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGETS["continuous"],
                   help="continuous batching: max_num_batched_tokens per step")
    p.add_argument("--chunk-budget", type=int, default=DEFAULT_BUDGETS["chunked"],
                   help="chunked prefill: token budget per step")
    p.add_argument("--preemption", default="recompute", choices=PREEMPTION, help="what preemption does")
    p.add_argument("--host-blocks", type=int, default=None, help="swap pool size in blocks (default unbounded)")
    p.add_argument("--prefix-caching", action="store_true", help="enable automatic prefix caching")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-blocks", type=int, default=None, help="KV pool in blocks (default: what fits the GPU)")
    p.add_argument("--rules", default=RULES[0], choices=RULES,
                   help="continuous / chunked follow the textbook rules or vLLM 0.33's own scheduler")
    p.set_defaults(run=run)
