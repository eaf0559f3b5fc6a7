"""``python -m kvcore sharing``: KV sharing across heads and layers, headless (the Sharing page's experiments).

``--experiment calc`` (MHA/GQA/MQA bytes and what fits on a GPU), ``convert`` (MHA -> GQA by mean-pooling
K/V heads, optionally uptrained), ``crosslayer`` (adjacent layers share or merge their KV) and ``train``
(tiny models that differ only in KV heads, trained from scratch).
"""

from __future__ import annotations

import argparse

import pandas as pd

from kvcore.shapes import GPU_PRESETS, KV_BITS, PRESETS

EXPERIMENTS = ("calc", "convert", "crosslayer", "train")


def _load(name: str | None):
    from kvcore.models.loader import load_model

    try:
        return load_model(name)
    except OSError as exc:  # no network, missing files: a message, not a traceback
        raise ValueError(str(exc)) from exc


def run_calc(args: argparse.Namespace) -> pd.DataFrame:
    from kvcore.sharing.calc import kv_heads_table

    return kv_heads_table(PRESETS[args.preset], args.tokens, args.batch, args.bits, GPU_PRESETS[args.gpu])


def run_convert(args: argparse.Namespace) -> pd.DataFrame:
    import torch

    from kvcore.sharing.convert import ConvertSettings, convert_experiment

    torch.manual_seed(args.seed)
    model, tokenizer = _load(args.model)
    settings = ConvertSettings(groups=tuple(args.groups) if args.groups else None, context=args.context,
                               eval_windows=args.windows, uptrain_steps=args.uptrain_steps,
                               uptrain_batch=args.uptrain_batch, uptrain_lr=args.uptrain_lr, data=args.data,
                               seed=args.seed)
    return convert_experiment(model, tokenizer, settings).table


def run_crosslayer(args: argparse.Namespace) -> pd.DataFrame:
    from kvcore.models.runtime import text_config
    from kvcore.sharing.convert import eval_streams
    from kvcore.sharing.crosslayer import MODES, CrossLayerSettings, crosslayer_experiment, text_windows

    model, tokenizer = _load(args.model)
    _, val_ids, _ = eval_streams(tokenizer)
    ids = text_windows(val_ids, tokenizer.bos_token_id, args.windows, args.context)  # [W, C], <bos> first
    num_layers = text_config(model).num_hidden_layers
    starts = args.start_layer if args.start_layer is not None else list(range(0, num_layers, 2))
    modes = MODES if args.mode == "all" else (args.mode,)
    return crosslayer_experiment(model, ids, [CrossLayerSettings(m, s, args.t) for m in modes for s in starts]).table


def run_train(args: argparse.Namespace) -> pd.DataFrame:
    from dataclasses import replace

    import torch

    from kvcore.sharing.variants import live_settings, train_variants

    torch.set_num_threads(args.threads)
    return train_variants(replace(live_settings(args.steps, args.seed), kv_heads=tuple(args.kv_heads))).summary


def run(args: argparse.Namespace) -> pd.DataFrame:
    """Dispatch ``--experiment``."""
    return {"calc": run_calc, "convert": run_convert, "crosslayer": run_crosslayer,
            "train": run_train}[args.experiment](args)


def add_cli(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``sharing``."""
    p = sub.add_parser("sharing", parents=[parent],
                       help="MHA/GQA/MQA and cross-layer KV sharing: bytes, conversion, perplexity (the Sharing page)")
    p.add_argument("--experiment", choices=EXPERIMENTS, default="calc",
                   help="calc: bytes per KV head count; convert: MHA->GQA mean pooling (+ uptraining); "
                        "crosslayer: layer pairs share/merge KV; train: tiny models with 8/4/2/1 KV heads")
    calc = p.add_argument_group("calc")
    calc.add_argument("--preset", default="llama-2-7b", choices=sorted(PRESETS), help="model preset")
    calc.add_argument("--tokens", type=int, default=4096, help="context length in tokens")
    calc.add_argument("--batch", type=int, default=1, help="sequences in the batch")
    calc.add_argument("--bits", type=int, default=16, choices=KV_BITS, help="KV precision")
    calc.add_argument("--gpu", default="H100 80GB", choices=sorted(GPU_PRESETS), help="GPU preset")
    conv = p.add_argument_group("convert / crosslayer")
    conv.add_argument("--model", default=None, help="'bundled' (default, offline), a local folder or a Hub name")
    conv.add_argument("--groups", type=int, nargs="+", help="KV head counts to pool to (default: every divisor)")
    conv.add_argument("--context", type=int, default=256, help="tokens per validation window (<bos> first)")
    conv.add_argument("--windows", type=int, default=8, help="validation windows scored")
    conv.add_argument("--uptrain-steps", type=int, default=0, help="AdamW uptraining steps per model (0 = none)")
    conv.add_argument("--uptrain-batch", type=int, default=4, help="sequences per uptraining step")
    conv.add_argument("--uptrain-lr", type=float, default=3e-4, help="peak uptraining learning rate")
    conv.add_argument("--data", choices=("bundled", "corpus"), default="bundled",
                      help="uptraining text: the shipped sample (fast) or the bundled model's whole training split")
    conv.add_argument("--mode", default="all", choices=("all", "share", "merge-linear", "merge-slerp"),
                      help="cross-layer mode (all = each)")
    conv.add_argument("--start-layer", type=int, nargs="+", help="first shared layer(s) (default 0, 2, 4, ...)")
    conv.add_argument("--t", type=float, default=0.5, help="merge weight of the upper layer, in [0, 1]")
    train = p.add_argument_group("train")
    train.add_argument("--steps", type=int, default=30, help="training steps per variant (short live version)")
    train.add_argument("--kv-heads", type=int, nargs="+", default=[8, 4, 2, 1], help="KV head counts to train")
    train.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.set_defaults(run=run)
