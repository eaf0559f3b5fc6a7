"""Speed of the scheduler simulator: token-steps per second for each scheduler, prefix caching off and on.

    python benchmarks/batching.py [--requests 1000] [--output-mean 512] [--runs 1] [--csv batching.csv]

A token-step is one token granted to one request in one step (prefill and decode tokens together); a
decode token-step is a one-token grant, each an ``append`` on the real block manager, and sets the cost. Times are
wall-clock on this machine in this run; ratios compare schedulers measured in the same run.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvcore.sched import POLICIES, CostModel, SimConfig, WorkloadConfig, make_workload, simulate  # noqa: E402
from kvcore.shapes import GPU_PRESETS, PRESETS  # noqa: E402

BUDGETS = {"static": 8192, "continuous": 8192, "chunked": 512}


def time_run(workload, config: SimConfig, runs: int) -> dict[str, object]:
    """Median wall time of ``runs`` simulations and the token-steps they did."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        result = simulate(workload, config)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    token_steps = int(result.timeline["batch_tokens"].sum())
    decode_steps = int(result.timeline["decode_tokens"].sum())
    return {"scheduler": config.policy, "prefix_caching": config.enable_prefix_caching,
            "steps": len(result.timeline), "token_steps": token_steps, "decode_token_steps": decode_steps,
            "seconds": round(seconds, 3), "token_steps_per_s": round(token_steps / seconds),
            "decode_token_steps_per_s": round(decode_steps / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--output-mean", type=int, default=512, help="mean output tokens (lognormal)")
    parser.add_argument("--rate", type=float, default=50.0, help="arrivals per second")
    parser.add_argument("--runs", type=int, default=1, help="repeats per row (median)")
    parser.add_argument("--profile", action="store_true", help="print the top functions of a continuous run")
    parser.add_argument("--csv", help="also write the table here")
    args = parser.parse_args()
    workload = make_workload(WorkloadConfig(num_requests=args.requests, output_mean=args.output_mean,
                                            max_output=8 * args.output_mean, rate=args.rate, seed=0))
    cost = CostModel(PRESETS["llama-3-8b"], GPU_PRESETS["H100 80GB"])
    print(f"{len(workload.requests)} requests, {workload.total_output_tokens:,} output tokens, "
          f"{workload.total_prompt_tokens:,} prompt tokens")
    rows = [time_run(workload, SimConfig(cost, policy=p, max_num_batched_tokens=BUDGETS[p],
                                         enable_prefix_caching=caching), args.runs)
            for p in POLICIES for caching in (False, True)]
    table = pd.DataFrame(rows)
    base = table.loc[(table["scheduler"] == "continuous") & ~table["prefix_caching"], "seconds"].iloc[0]
    table["time_vs_continuous"] = (table["seconds"] / base).round(2)
    print(table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(simulate, workload, SimConfig(cost, enable_prefix_caching=True))
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
