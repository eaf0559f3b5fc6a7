"""``python -m kvcore generate``: token-by-token generation with timing and KV bytes, the Live model page's table."""

from __future__ import annotations

import argparse

import pandas as pd


def run_generate(args: argparse.Namespace) -> pd.DataFrame:
    """Load the model, generate, and return the per-token table (token, log-prob, ms, KV bytes)."""
    import torch

    from kvcore.models.generate import GenerationSettings, generate_table
    from kvcore.models.loader import load_model

    torch.manual_seed(args.seed)
    try:
        model, tokenizer = load_model(args.model, args.device)
    except OSError as exc:  # no network, missing files: a message, not a traceback
        raise ValueError(str(exc)) from exc
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, seed=args.seed)
    table = generate_table(model, tokenizer, args.prompt, settings).drop(columns=["token_id"])
    table["text"] = table["text"].map(repr)  # newlines and spaces visible in the printed table
    return table


def add_cli(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``generate``."""
    p = sub.add_parser("generate", parents=[parent],
                       help="generate with a real model; per-token log-prob, ms and KV bytes (the Live model page)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    p.add_argument("--model", default=None,
                   help="'bundled' (default, offline), a local folder, or a Hub name (gpt2, "
                        "HuggingFaceTB/SmolLM2-135M, Qwen/Qwen2.5-0.5B)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples with --seed")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(run=run_generate)
