"""``python -m kvcore needle``: needle-in-a-haystack retrieval under every method, headless (model code loads when
it runs)."""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from kvcore.eviction.cli import parse_budget
from kvcore.needle.config import MODES
from kvcore.needle.methods import DEFAULT_METHODS, needle_methods
from kvcore.needle.prompt import QUESTION_PLACES

TABLES = ("cells", "summary", "runs")
DEFAULT_MODEL = "smollm2-135m"


def config_from_args(args: argparse.Namespace):
    """The :class:`~kvcore.needle.config.NeedleConfig` the flags describe (``all`` = every method)."""
    from kvcore.needle.config import NeedleConfig

    methods = tuple(needle_methods()) if "all" in args.methods else tuple(args.methods)
    return NeedleConfig(methods, tuple(args.budgets), tuple(args.lengths), tuple(args.depths), args.needles,
                        args.mode, args.question, args.max_new_tokens, args.seed, args.threads)


def run(args: argparse.Namespace) -> pd.DataFrame:
    """Load the model, run the grid with progress on stderr, print what it found; return the table ``--table``
    names (``summary`` joined with the eviction sweep's perplexity when ``--perplexity-tokens`` is given)."""
    from kvcore.models.loader import describe_model, load_model
    from kvcore.needle.lesson import join_perplexity, lessons
    from kvcore.needle.perplexity import perplexity_table
    from kvcore.needle.run import run_needle

    config = config_from_args(args)
    try:
        model, tokenizer = load_model(args.model)
    except OSError as exc:
        raise ValueError(str(exc)) from exc

    def progress(done: int, total: int, label: str) -> None:
        print(f"[{done}/{total}] {label}", file=sys.stderr)

    results = run_needle(model, tokenizer, config, progress)
    summary = results.summary
    if args.perplexity_tokens:
        summary = join_perplexity(summary, perplexity_table(model, tokenizer, config, args.perplexity_tokens,
                                                            progress=progress))
    print(f"{describe_model(args.model)}; {config.mode} mode, question {config.question}; "
          f"{config.haystacks} haystacks ({config.needles} needles x {len(config.lengths)} lengths x "
          f"{len(config.depths)} depths)")
    for line in lessons(summary):
        print(line)
    return {"cells": results.table, "summary": summary, "runs": results.runs}[args.table]


def add_cli(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``needle``: retrieval of a fact hidden in a haystack, for every method against the full cache."""
    p = sub.add_parser("needle", parents=[parent],
                       help="needle-in-a-haystack retrieval under eviction, kvpress presets and quantization")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="smollm2-135m (default), bundled (too small to retrieve), a local folder or a Hub name")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="NAME",
                   help="full, evict:<policy>, kvpress:<press>, quant:<method> (a bare policy or quantizer name "
                        "works), or all; full is always run")
    p.add_argument("--budgets", nargs="+", type=parse_budget, default=[0.25], metavar="B",
                   help="eviction and kvpress: tokens kept (128) or a share of the context (0.25)")
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 1024], metavar="TOKENS",
                   help="haystack tokens, the needle included")
    p.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.5, 0.9], metavar="D",
                   help="where the needle goes, a share of the haystack (0 = start, 1 = end)")
    p.add_argument("--needles", type=int, default=3, help="draws (needle, value, haystack) per length and depth")
    p.add_argument("--mode", default="prefill", choices=MODES,
                   help="prefill: compress once after the context (kvpress); decode: evict token by token")
    p.add_argument("--question", default="compressed", choices=QUESTION_PLACES,
                   help="compressed: the question ends the compressed context (SnapKV); after: fed after it "
                        "(kvpress's pipeline)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer tokens at most (stops at the value)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--perplexity-tokens", type=int, default=0, metavar="N",
                   help="also measure the eviction sweep's perplexity on N held-out tokens at the same budgets and "
                        "join it to the summary (0: skip)")
    p.add_argument("--table", choices=TABLES, default="cells",
                   help="cells: method x budget x length x depth; summary: method x budget; runs: every answer")
    p.set_defaults(run=run)
