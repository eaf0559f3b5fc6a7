"""``python -m kvcore eviction``: the Eviction page's sweep, headless (model code is imported only when it runs)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from kvcore.eviction import DEFAULT_BUDGETS, DEFAULT_POLICIES, POLICIES, Budget

POSITIONS = ("original", "rerotate")  # kvcore.models.cache.POSITION_MODES, kept here so --help stays fast
MODES = ("decode", "prefill")  # kvcore.eviction.runner.MODES


def coerce_hyperparameter(policy: str, name: str, raw: str) -> Any:
    """Parse ``raw`` for field ``name`` of ``POLICIES[policy]`` with the type of its default."""
    fields = {f.name: f for f in dataclasses.fields(POLICIES[policy])}
    if name not in fields:
        raise ValueError(f"{policy} has no hyperparameter {name!r}; it has {', '.join(fields) or 'none'}")
    kind = type(fields[name].default)
    if kind is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{policy}.{name} must be true or false, got {raw!r}")
        return raw.lower() in ("true", "1")
    try:
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"{policy}.{name} must be a {kind.__name__}, got {raw!r}") from exc


def parse_budget(raw: str) -> Budget:
    """``"64"`` -> 64 tokens, ``"0.25"`` -> a quarter of the tokens."""
    try:
        return int(raw)
    except ValueError:
        try:
            return float(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"budget must be tokens (64) or a ratio (0.25), got {raw!r}") from exc


def parse_hyperparameters(pairs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["streaming_llm.n_sink=2", ...]`` -> ``{"streaming_llm": {"n_sink": 2}}`` (typed by each field's default)."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        policy, dot, name = key.partition(".")
        if not sep or not dot or policy not in POLICIES:
            raise ValueError(f"--param takes POLICY.FIELD=VALUE with a known policy, got {pair!r}")
        out.setdefault(policy, {})[name] = coerce_hyperparameter(policy, name, raw)
    return out


def run(args: argparse.Namespace) -> pd.DataFrame:
    """Load the model, run the sweep with progress on stderr, print the verdicts; return the results table."""
    from kvcore.eviction import kvpress_hyperparameters
    from kvcore.eviction.evaluate import EvictionConfig, evaluate_text
    from kvcore.models.loader import load_model

    hyper = parse_hyperparameters(args.param)
    if args.kvpress:  # the press's options first; --param still overrides them
        hyper = kvpress_hyperparameters(args.policies) | hyper
    config = EvictionConfig(tuple(args.policies), tuple(args.budgets), hyper, args.positions, args.mode,
                            args.max_tokens, args.prompt_tokens, args.hit_ratio, args.seed,
                            budget_rule="kvpress" if args.kvpress else "round")
    try:
        model, tokenizer = load_model(args.model)
    except OSError as exc:
        raise ValueError(str(exc)) from exc
    text = Path(args.text_file).read_text(encoding="utf-8") if args.text_file else None
    results = evaluate_text(model, tokenizer, text, config,
                            lambda done, total, what: print(f"[{done}/{total}] {what}", file=sys.stderr))
    for row in results.verdicts.itertuples():
        print(f"{row.verdict.upper()}: {row.claim} ({row.evidence})")
    return results.layers if args.per_layer else results.table


def add_cli(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``eviction``: policies x budgets on a real model (perplexity, attention kept, counters)."""
    p = sub.add_parser("eviction", parents=[parent],
                       help="eviction policies on a real model: perplexity vs budget, attention kept, counters")
    p.add_argument("--model", default=None, help="bundled (default), a local folder or a Hub name")
    p.add_argument("--text-file", metavar="PATH", help="text to stream (default: the bundled held-out sample)")
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES),
                   choices=list(POLICIES), metavar="NAME", help=f"policies: {', '.join(POLICIES)}")
    p.add_argument("--budgets", nargs="+", type=parse_budget, default=list(DEFAULT_BUDGETS), metavar="B",
                   help="tokens kept (64) or a ratio of the tokens (0.25)")
    p.add_argument("--positions", default="original", choices=POSITIONS,
                   help="after eviction: original positions, or keys re-rotated to compact ones (RoPE only)")
    p.add_argument("--mode", default="decode", choices=MODES, help="decode-time eviction or prompt compression")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens of the text used")
    p.add_argument("--prompt-tokens", type=int, default=None, help="prefill mode: prompt length (default half)")
    p.add_argument("--hit-ratio", type=float, default=1.0, help="lookup threshold, x uniform attention share")
    p.add_argument("--param", action="append", default=[], metavar="POLICY.FIELD=VALUE",
                   help="a hyperparameter, e.g. streaming_llm.n_sink=2 (repeatable)")
    p.add_argument("--kvpress", action="store_true",
                   help="kvpress-compatible: each policy with a kvpress 0.5.5 press keeps exactly its tokens")
    p.add_argument("--per-layer", action="store_true", help="print the per-layer table instead")
    p.set_defaults(run=run)
