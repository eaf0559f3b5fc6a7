"""``python -m kvcore quant``: every KV quantization method measured on a real model, headless.

Imports only the registry at start-up; the model and transformers load when the command runs.
"""

from __future__ import annotations

import argparse

import pandas as pd

from kvcore.quant.methods import METHODS


def add_cli(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``quant``: bytes, K/V and attention errors, perplexity and speed per method."""
    p = sub.add_parser("quant", parents=[parent], help="KV cache quantization: bytes, errors, perplexity per method")
    p.add_argument("--model", default=None, help="model folder or Hub name (default: the bundled model)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="NAME",
                   help=f"methods: {', '.join(METHODS)}")
    p.add_argument("--tokens", type=int, default=256, help="tokens per text window")
    p.add_argument("--windows", type=int, default=4, help="consecutive windows of the validation text")
    p.add_argument("--prompt", type=int, default=None, help="tokens of each window prefilled before scoring "
                                                             "(default: half)")
    p.add_argument("--sequential", action="store_true", help="decode each method on its own (end-to-end tokens/s)")
    p.add_argument("--by-layer", action="store_true", help="print the per-layer table instead of the summary")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> pd.DataFrame:
    """Load the model, take ``--windows`` windows of ``--tokens`` tokens of its validation text, evaluate; say how
    many tokens were scored and what the intervals are, then return the table (with its interval columns)."""
    import torch

    from kvcore.models.loader import load_model
    from kvcore.noise import BLOCK_TOKENS, MIN_UNITS
    from kvcore.quant.evaluate import evaluate, text_windows

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    ids = text_windows(tokenizer, args.tokens, args.seed, args.windows)
    result = evaluate(model, ids, {n: METHODS[n] for n in args.methods}, args.prompt, batched=not args.sequential,
                      seed=args.seed)
    blocks = -(-(result.num_tokens - result.prompt_tokens) // BLOCK_TOKENS) * result.windows
    print(f"perplexity over {result.scored_tokens} scored tokens ({result.windows} x {result.num_tokens}, "
          f"{result.prompt_tokens} prefilled each); *_low/*_high: 95% paired block bootstrap over {blocks} blocks of "
          f"{BLOCK_TOKENS} tokens; vs_fp16 is worse/better only when the interval excludes 1"
          + (f" (under {MIN_UNITS} blocks: nothing is called)" if blocks < MIN_UNITS else ""))
    return result.by_layer if args.by_layer else result.summary
