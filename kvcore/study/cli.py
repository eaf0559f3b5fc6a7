"""``python -m kvcore study | sweep | search``: the whole study on one model, grids of any experiment, and the
serving-config search, headless. Model code loads when a command runs, so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from kvcore.sched.cli import add_workload_args, workload_from_args
from kvcore.sched.compare import RULES
from kvcore.shapes import GPU_PRESETS, PRESETS
from kvcore.study.engines import ENGINES, Resources, TaskResult
from kvcore.study.names import DTYPES, LATENCIES, SEARCH_TABLES
from kvcore.study.names import METHODS as STUDY_METHODS
from kvcore.study.names import TABLES as STUDY_TABLES


def add_cli(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``study``, ``sweep`` and ``search``."""
    _add_study(sub, parent)
    _add_sweep(sub, parent)
    _add_search(sub, parent)


def _bar(total: int, unit: str, quiet: bool):
    """A tqdm progress bar on stderr (disabled by ``--no-progress`` or when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, disable=quiet or None, file=sys.stderr, dynamic_ncols=True, leave=False)


def _add_study(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("study", parents=[parent],
                       help="every KV cache method on one model: ms/token, peak memory, KV bytes, perplexity, "
                            "agreement; a results folder with an HTML report")
    p.add_argument("--model", default=None, help="bundled (default), a local folder or a Hub name")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weights' dtype (default float32; with --no-weight-cap 16 bits)")
    p.add_argument("--no-weight-cap", action="store_true",
                   help="lift the app's 1.5 GB weight limit and load in 16 bits (bfloat16 on CPU, float16 on CUDA) "
                        "unless --dtype says otherwise")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--methods", nargs="+", default=list(STUDY_METHODS), choices=STUDY_METHODS, metavar="NAME",
                   help=f"methods to compare (full is always run): {', '.join(STUDY_METHODS)}")
    p.add_argument("--new-tokens", type=int, default=512, help="tokens each generation produces")
    p.add_argument("--prompt", default=None, help="prompt text (default: the bundled held-out text's first tokens)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="tokens of the default prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per method")
    p.add_argument("--warmup-tokens", type=int, default=16, help="tokens of the untimed warm-up generation")
    p.add_argument("--ppl-tokens", type=int, default=512, help="held-out tokens scored for perplexity")
    p.add_argument("--budget", type=int, default=128, help="eviction: KV entries kept per layer and head")
    p.add_argument("--n-sink", type=int, default=4, help="streaming_llm: attention-sink tokens")
    p.add_argument("--positions", default="original", choices=("original", "rerotate"),
                   help="eviction: original positions, or compact ones (StreamingLLM, RoPE models)")
    p.add_argument("--minicache-start", type=int, default=None, help="minicache: first merged layer (default half)")
    p.add_argument("--minicache-t", type=float, default=0.6, help="minicache: SLERP weight of the upper layer")
    p.add_argument("--gqa-groups", type=int, default=None, help="gqa: KV heads after pooling (default a quarter)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--needles", type=int, default=4,
                   help="needle-in-a-haystack prompts per method for the retrieval column (0: none)")
    p.add_argument("--needle-tokens", type=int, default=512, help="haystack tokens of each needle prompt")
    p.add_argument("--out", metavar="DIR", default=None, help="results folder (default ./study-<model>-<hash>)")
    p.add_argument("--resume", action="store_true", help="keep the methods the folder already holds")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--table", choices=STUDY_TABLES, default="summary", help="which table to print and write")
    p.set_defaults(run=run_study)


def study_settings(args: argparse.Namespace):
    """The :class:`~kvcore.study.study.StudySettings` the flags describe."""
    from kvcore.device import get_device
    from kvcore.models.loader import MAX_WEIGHT_BYTES
    from kvcore.study.methods import MethodSettings
    from kvcore.study.study import StudySettings

    dtype = args.dtype or ("float32" if not args.no_weight_cap else
                           "float16" if get_device(args.device).type == "cuda" else "bfloat16")
    method = MethodSettings(args.budget, args.n_sink, args.positions, args.minicache_start, args.minicache_t,
                            args.gqa_groups)
    cap = None if args.no_weight_cap else MAX_WEIGHT_BYTES / 1e9
    return StudySettings(args.model, dtype, args.device, cap, tuple(args.methods),
                         args.new_tokens, args.prompt, args.prompt_tokens, args.repeats, args.warmup_tokens,
                         args.ppl_tokens, args.threads, args.seed, method, needles=args.needles,
                         needle_tokens=args.needle_tokens)


def run_study(args: argparse.Namespace) -> pd.DataFrame:
    """Run the study, write its folder (tables, settings, report); return the table ``--table`` names."""
    from kvcore.study.report import write_report
    from kvcore.study.study import method_tokens
    from kvcore.study.study import run_study as study

    settings = study_settings(args)
    todo = len(settings.methods)
    with _bar(todo * method_tokens(settings), "tok", args.no_progress) as bar:
        def progress(tokens: int, label: str) -> None:
            bar.set_description(label, refresh=False)
            bar.update(tokens)

        def log(line: str) -> None:
            bar.write(line, file=sys.stderr)
            if "skipped" in line:
                bar.update(method_tokens(settings))

        try:
            result = study(settings, Path(args.out) if args.out else None, resume=args.resume, progress=progress,
                           log=log)
        except OSError as exc:
            raise ValueError(str(exc)) from exc
    print(f"results in {result.folder}/ (ran {', '.join(result.ran) or 'nothing new'})", file=sys.stderr)
    if not args.no_report:
        path = write_report(result.folder, result.tables, result.settings, result.versions)
        print(f"report: {path}", file=sys.stderr)
    return result.tables[args.table]


def _add_sweep(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sweep", parents=[parent],
                       help="cross the settings of any experiment from a grid file (TOML/YAML); local pool or Ray")
    p.add_argument("grid", metavar="GRID_FILE", help="a .toml (or .yaml) grid file: experiment, settings, grid")
    p.add_argument("--engine", default="local", choices=ENGINES, help="local process pool or Ray tasks")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="cells at once (local: processes, 1 = in this process; ray: CPUs of a Ray started here)")
    p.add_argument("--address", default=None,
                   help="ray: a running cluster to join ('auto' on a node of it, or HEAD_IP:6379)")
    p.add_argument("--cpus-per-cell", type=float, default=None, help="cores (and torch threads) per cell")
    p.add_argument("--gpus-per-cell", type=float, default=None, help="ray: GPUs per cell (a fraction shares one)")
    p.add_argument("--retries", type=int, default=None, help="ray: reruns of a cell whose worker died")
    p.add_argument("--out", metavar="DIR", default=None, help="also write the tables, grid and versions here")
    p.add_argument("--table", choices=("results", "cells"), default="results",
                   help="results: every cell's rows; cells: one row per cell with its time and error")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_sweep, parsers=sub.choices)


def _resources(args: argparse.Namespace, grid) -> Resources | None:
    from kvcore.study.grid import file_resources

    if args.cpus_per_cell is None and args.gpus_per_cell is None and args.retries is None:
        return None
    base = file_resources(grid)
    return Resources(base.cpus if args.cpus_per_cell is None else args.cpus_per_cell,
                     base.gpus if args.gpus_per_cell is None else args.gpus_per_cell,
                     base.retries if args.retries is None else args.retries)


def run_sweep(args: argparse.Namespace) -> pd.DataFrame:
    """Read the grid, run its cells with the engine, print the time each engine took; return the gathered table."""
    from kvcore.study import results
    from kvcore.study.grid import grid_cells, read_grid
    from kvcore.study.sweep import sweep

    grid = read_grid(args.grid)
    cells = grid_cells(grid, args.parsers, args.seed, _resources(args, grid))
    with _bar(len(cells), "cell", args.no_progress) as bar:
        def finished(result: TaskResult) -> None:
            if result.error is not None:
                bar.write(f"cell {result.index} failed: {result.error}", file=sys.stderr)
            bar.update(1)

        done = sweep(cells, engine=args.engine, jobs=args.jobs, address=args.address, on_result=finished)
    print(f"{len(cells)} cells of {grid.experiment!r} on {done.engine} in {done.seconds:.1f} s"
          + (f"; {done.failed} failed" if done.failed else ""), file=sys.stderr)
    if args.out:
        folder = Path(args.out)
        results.write_table(folder, "results", done.table)
        results.write_table(folder, "cells", done.cells)
        results.write_settings(folder, {"grid_file": str(args.grid), "experiment": grid.experiment,
                                        "settings": grid.settings, "grid": grid.axes, "engine": done.engine},
                               {"seconds": done.seconds})
    return done.table if args.table == "results" else done.cells


def _add_search(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("search", parents=[parent],
                       help="serving-config search under TTFT/TPOT p99 SLOs on the simulator: best config, Pareto "
                            "front, capacity")
    p.add_argument("--model", default="llama-3-8b", choices=sorted(PRESETS), help="model preset")
    p.add_argument("--gpu", default="H100 80GB", choices=sorted(GPU_PRESETS), help="GPU preset")
    p.add_argument("--calibrated", action="store_true",
                   help="time steps with this machine's engine serving the bundled model (needs --num-blocks)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV pool in blocks (default: what fits the GPU)")
    p.add_argument("--rules", default=RULES[0], choices=RULES, help="scheduler rules: textbook or vLLM 0.33's")
    p.add_argument("--ttft-p99-ms", type=float, default=500.0, help="SLO: p99 time to first token (ms)")
    p.add_argument("--tpot-p99-ms", type=float, default=50.0, help="SLO: p99 time per output token (ms)")
    p.add_argument("--max-num-seqs", type=int, nargs="+", default=[64, 128, 256], help="values searched")
    p.add_argument("--max-num-batched-tokens", type=int, nargs="+", default=[2048, 8192], help="values searched")
    p.add_argument("--schedulers", nargs="+", default=["continuous", "chunked"], choices=("continuous", "chunked"),
                   help="continuous batching (whole prompts) and/or chunked prefill")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32], help="values searched")
    p.add_argument("--prefix-caching", nargs="+", default=["off", "on"], choices=("off", "on"), help="values searched")
    p.add_argument("--pareto-latency", default="tpot_ms_p99", choices=LATENCIES, help="latency of the Pareto front")
    p.add_argument("--probes", type=int, default=4, help="rates per capacity round (0: no capacity search)")
    add_workload_args(p)
    p.add_argument("--engine", default="local", choices=ENGINES, help="local process pool or Ray tasks")
    p.add_argument("--jobs", type=int, default=1, help="simulations at once (1 = in this process)")
    p.add_argument("--address", default=None, help="ray: a running cluster to join")
    p.add_argument("--table", choices=SEARCH_TABLES, default="configs", help="which table to print and write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_search)


def run_search(args: argparse.Namespace) -> pd.DataFrame:
    """Build the workload and the deployment, search, print the findings; return the table ``--table`` names."""
    from kvcore.study.search import SLO, Deployment, SearchSpace, search

    workload = workload_from_args(args)
    cost = None
    if args.calibrated:
        if args.num_blocks is None:
            raise ValueError("--calibrated times this machine's engine, which knows no GPU memory: give --num-blocks")
        from kvcore.engine.calibrate import calibrate_engine
        from kvcore.models.loader import load_model

        cost = calibrate_engine(load_model(None)[0], threads=1, name="the bundled model's engine on this machine")
    deployment = Deployment(args.model, args.gpu, cost, args.num_blocks, args.rules)
    space = SearchSpace(tuple(args.max_num_seqs), tuple(args.max_num_batched_tokens), tuple(args.schedulers),
                        tuple(args.block_sizes), tuple(dict.fromkeys(v == "on" for v in args.prefix_caching)))
    total = len(space.configs()) + 2 * args.probes
    with _bar(total, "sim", args.no_progress) as bar:
        result = search(workload, deployment, space, SLO(args.ttft_p99_ms, args.tpot_p99_ms),
                        rate=None if args.trace else args.rate, latency=args.pareto_latency, probes=args.probes,
                        engine=args.engine, jobs=args.jobs, address=args.address, on_result=lambda _: bar.update(1))
    for line in result.lines:
        print(line, file=sys.stderr)
    if args.table == "capacity":
        return result.capacity
    if args.table == "pareto":
        front = result.configs[result.configs["pareto"]]
        return front.sort_values("output_tok_per_s", ascending=False, kind="stable")
    return result.configs
