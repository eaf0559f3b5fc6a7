"""``python -m kvcore paged``: the fragmentation experiment (contiguous vs paged allocation), headless."""

from __future__ import annotations

import argparse

import pandas as pd

from kvcore.paged.fragmentation import FragmentationConfig, fragmentation_experiment
from kvcore.paged.workload import LENGTH_KINDS, LengthDistribution


def run(args: argparse.Namespace) -> pd.DataFrame:
    """Build the config from the command line and run the experiment."""
    config = FragmentationConfig(
        num_requests=args.requests,
        prompt=LengthDistribution(args.dist, args.prompt_mean, args.spread),
        output=LengthDistribution(args.dist, args.output_mean, args.spread),
        max_seq_len=args.max_seq_len, block_size=args.block_size, num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs, seed=args.seed)
    return fragmentation_experiment(config)


def add_cli(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``paged``: KV memory waste of three allocators on one generated workload."""
    d = FragmentationConfig()
    p = sub.add_parser("paged", parents=[parent],
                       help="KV memory waste: contiguous max-length, contiguous exact-length, paged")
    p.add_argument("--requests", type=int, default=d.num_requests, help="requests, all queued at step 0")
    p.add_argument("--dist", default=d.prompt.kind, choices=LENGTH_KINDS, help="length distribution")
    p.add_argument("--prompt-mean", type=float, default=d.prompt.mean, help="mean prompt length (tokens)")
    p.add_argument("--output-mean", type=float, default=d.output.mean, help="mean output length (tokens)")
    p.add_argument("--spread", type=float, default=d.prompt.spread,
                   help="uniform: half-width as a fraction of the mean (0..1); lognormal: sigma (0..3)")
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len, help="longest request (tokens)")
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per block")
    p.add_argument("--num-blocks", type=int, default=d.num_blocks, help="memory, in blocks, for every allocator")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="running requests at most")
    p.set_defaults(run=run)
