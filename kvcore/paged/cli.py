"""``python -m kvcore paged``: the Paged blocks page's experiments, headless.

``--experiment`` picks one: ``fragmentation`` (KV memory waste of contiguous vs paged allocation),
``sampling`` (blocks held by n parallel samples with and without fork) or ``attention`` (paged decode
attention against the contiguous reference on random K/V of a model shape: max difference, time per
call and the kernel that ran).
"""

from __future__ import annotations

import argparse

import pandas as pd

from kvcore.paged.fragmentation import FragmentationConfig, fragmentation_experiment
from kvcore.paged.sampling import parallel_sampling_memory
from kvcore.paged.workload import LENGTH_KINDS, LengthDistribution
from kvcore.shapes import PRESETS

EXPERIMENTS = ("fragmentation", "sampling", "attention")


def _fragmentation_config(args: argparse.Namespace) -> FragmentationConfig:
    return FragmentationConfig(
        num_requests=args.requests,
        prompt=LengthDistribution(args.dist, args.prompt_mean, args.spread),
        output=LengthDistribution(args.dist, args.output_mean, args.spread),
        max_seq_len=args.max_seq_len, block_size=args.block_size, num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs, seed=args.seed)


def _attention(args: argparse.Namespace) -> pd.DataFrame:
    from kvcore.paged.attention_check import AttentionCheckConfig, check_paged_attention  # imports torch

    return check_paged_attention(AttentionCheckConfig.for_model(
        args.model, args.batch, args.context, block_size=args.block_size, dtype=args.dtype, device=args.device,
        seed=args.seed))


def run(args: argparse.Namespace) -> pd.DataFrame:
    """Build the config from the command line and run the chosen experiment."""
    if args.experiment == "attention":
        return _attention(args)
    config = _fragmentation_config(args)
    if args.experiment == "sampling":
        return parallel_sampling_memory(config.workload(), block_size=config.block_size)
    return fragmentation_experiment(config)


def add_cli(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``paged``: KV memory waste of three allocators on one generated workload."""
    d = FragmentationConfig()
    p = sub.add_parser("paged", parents=[parent],
                       help="KV memory waste of contiguous vs paged allocation, parallel sampling, paged attention")
    p.add_argument("--experiment", default="fragmentation", choices=EXPERIMENTS, help="which part of the page")
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
    attention = p.add_argument_group("attention")
    attention.add_argument("--model", default="llama-3-8b", choices=list(PRESETS), help="head counts and dim")
    attention.add_argument("--batch", type=int, default=4, help="sequences (ragged, longest first)")
    attention.add_argument("--context", type=int, default=512, help="longest sequence (tokens)")
    attention.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    attention.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(run=run)
