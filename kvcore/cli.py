"""``python -m kvcore``: every experiment of the lab, headless, results to CSV.

Each experiment module exposes ``add_cli(subparsers, parent)``, which registers one subcommand
whose ``run(args)`` returns the same DataFrame the page shows. This file only wires them up. The
command modules import model code (transformers) inside ``run``, so ``--help`` starts without it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence

import pandas as pd

from kvcore import calculator
from kvcore.engine import cli as engine_cli
from kvcore.eviction import cli as eviction_cli
from kvcore.hierarchy import cli as hierarchy_cli
from kvcore.models import cli as models_cli
from kvcore.needle import cli as needle_cli
from kvcore.paged import cli as paged_cli
from kvcore.quant import cli as quant_cli
from kvcore.sched import cli as sched_cli
from kvcore.sharing import cli as sharing_cli
from kvcore.study import cli as study_cli

# The modules registering a subcommand, in the order --help lists them.
EXPERIMENTS = (calculator, paged_cli, hierarchy_cli, sched_cli, engine_cli, quant_cli, models_cli, eviction_cli,
               needle_cli, sharing_cli, study_cli)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subcommand per experiment."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--csv", metavar="PATH", help="also write the result table to this CSV file")
    parent.add_argument("--seed", type=int, default=0, help="random seed (same seed, same numbers)")
    parser = argparse.ArgumentParser(prog="python -m kvcore",
                                     description="KV Cache Lab experiments, headless.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in EXPERIMENTS:
        module.add_cli(sub, parent)
    return parser


MAX_CELL = 40  # characters of a text cell printed (an error message is cut; the CSV keeps it whole)


def printable(table: pd.DataFrame, width: int | None = None) -> str:
    """``table`` as a terminal can read it: text cells cut to ``MAX_CELL`` characters and the columns wrapped into
    blocks no wider than ``width`` (default: the terminal's, or ``COLUMNS``, else 100)."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    return table.to_string(index=False, max_colwidth=MAX_CELL, line_width=width)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand, print its table, optionally write it as CSV; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        table: pd.DataFrame = args.run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(printable(table))
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"wrote {len(table)} rows to {args.csv}")
    return 0
