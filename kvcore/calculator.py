"""The KV memory calculator behind the Home page and ``python -m kvcore memory``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pandas as pd

from kvcore.shapes import GPU_PRESETS, PRESETS, GpuSpec, ModelShape, kv_bytes, tokens_that_fit, weight_bytes


def memory_table(shapes: Sequence[ModelShape], num_tokens: int, batch_size: int = 1, bits: int = 16,
                 gpu: GpuSpec | None = None) -> pd.DataFrame:
    """One row per model: KV bytes per token and in total, and (with a GPU) what fits after the weights.

    Weights are counted at 16 bits; ``bits`` is the KV precision. ``weights_fit``: whether the weights alone fit
    the GPU's memory (when they do not, ``tokens_fit_after_weights`` is 0 for that reason).
    """
    if num_tokens < 1 or batch_size < 1:
        raise ValueError(f"context length and batch size must be >= 1, got {num_tokens} and {batch_size}")
    rows = []
    for shape in shapes:
        total = kv_bytes(shape, num_tokens, batch_size, bits)
        row = {
            "model": shape.name,
            "attention": f"{shape.attention_kind} {shape.num_q_heads}q/{shape.num_kv_heads}kv",
            "layers": shape.num_layers,
            "head_dim": shape.head_dim,
            "kv_bits": bits,
            "kv_bytes_per_token": kv_bytes(shape, 1, 1, bits),
            "tokens": num_tokens,
            "batch": batch_size,
            "kv_bytes_total": total,
            "kv_GB_total": total / 1e9,
            "weights_GB_16bit": weight_bytes(shape) / 1e9,
        }
        if gpu is not None:
            fit = tokens_that_fit(shape, gpu, bits)
            row |= {
                "gpu": gpu.name,
                "tokens_fit_after_weights": fit,
                "weights_fit": weight_bytes(shape) <= gpu.hbm_bytes,
                "fits": total + weight_bytes(shape) <= gpu.hbm_bytes,
            }
        rows.append(row)
    return pd.DataFrame(rows)


def kv_curve(shapes: Sequence[ModelShape], max_tokens: int, batch_size: int = 1, bits: int = 16,
             points: int = 24) -> pd.DataFrame:
    """KV bytes vs context length for each model, ``points`` contexts from 1 to ``max_tokens``."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    step = max(1, max_tokens // max(1, points - 1))
    contexts = sorted({1, *range(step, max_tokens, step), max_tokens})
    rows = [{"model": s.name, "tokens": t, "kv_GB": kv_bytes(s, t, batch_size, bits) / 1e9}
            for s in shapes for t in contexts]
    return pd.DataFrame(rows)


def add_cli(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``memory``: the calculator table for presets."""
    p = sub.add_parser("memory", parents=[parent], help="KV cache bytes for model presets (the Home calculator)")
    p.add_argument("--model", nargs="+", default=["llama-3-8b"], choices=sorted(PRESETS), metavar="NAME",
                   help=f"model presets: {', '.join(PRESETS)}")
    p.add_argument("--tokens", type=int, default=8192, help="context length in tokens")
    p.add_argument("--batch", type=int, default=1, help="sequences in the batch")
    p.add_argument("--bits", type=int, default=16, choices=(16, 8, 4, 2), help="KV precision")
    p.add_argument("--gpu", default="H100 80GB", choices=sorted(GPU_PRESETS), help="GPU preset")
    p.set_defaults(run=lambda a: memory_table([PRESETS[m] for m in a.model], a.tokens, a.batch, a.bits,
                                              GPU_PRESETS[a.gpu]))
