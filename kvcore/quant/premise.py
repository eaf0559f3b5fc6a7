"""KIVI's premise measured on a model's own cache (KIVI, Liu et al. 2024, arXiv:2402.02750, section 3, Fig. 2).

KIVI stores keys per channel and values per token because keys have a few *outlier channels*, large in every
token, and values do not: one scale per token must stretch over those channels and leaves few levels for the
rest, while one scale per channel fits each channel's own range. Two measurements test it here:

* channel magnitudes: per layer and KV head, each channel's mean |x| over the text's tokens, over the median
  channel of that head (:func:`channel_outliers`); a channel at :data:`OUTLIER_RATIO` x the median or more is an
  outlier channel;
* the same bits stored per channel and per token: the relative L2 error of keys under ``int{b}-channel`` and
  ``int{b}-token`` of :data:`~kvcore.quant.methods.METHODS`, layer by layer, with the perplexity each gives.

Layers are the units of each verdict: a two-sided sign test over layers says "holds" when the claimed side wins in
significantly more layers (p < 0.05), "does not hold" when the other side does, "within noise" otherwise (a
6-layer model can at best reach p = 0.03).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch

from kvcore.noise import WITHIN_NOISE
from kvcore.quant.model_kv import CapturedKV

OUTLIER_RATIO = 5.0  # a channel this many times its head's median channel (mean |x| over tokens) is an outlier
BITS = (2, 3, 4, 8)
SIGNIFICANCE = 0.05
PREMISE_COLUMNS = ("claim", "measured", "verdict")
KIVI = "KIVI, Liu et al. 2024"


def channel_ratios(x: torch.Tensor) -> torch.Tensor:
    """Each channel's mean |x| over tokens, over its head's median channel: ``[B, H, T, D]`` -> ``[H, D]``
    (tokens of every batch row pooled)."""
    magnitude = x.abs().float().mean(dim=(0, 2))  # [H, D]
    return magnitude / magnitude.median(dim=1, keepdim=True).values.clamp_min(1e-30)


def channel_outliers(captured: Sequence[CapturedKV], ratio: float = OUTLIER_RATIO) -> pd.DataFrame:
    """Per layer, keys (``k_``) and values (``v_``): ``top_ratio``, the largest channel over its head's median (the
    largest over KV heads), and ``outlier_share``, the share of (head, channel) pairs at ``ratio`` x or more.

    captured: one capture per text window (tokens of all windows pooled).
    """
    if not captured:
        raise ValueError("give at least one captured window")
    if not ratio > 1.0:
        raise ValueError(f"ratio must be > 1 (a multiple of the median channel), got {ratio}")
    rows = []
    for layer in range(captured[0].num_layers):
        row: dict[str, float | int] = {"layer": layer}
        for name, tensors in (("k", [c.keys[layer] for c in captured]), ("v", [c.values[layer] for c in captured])):
            ratios = channel_ratios(torch.cat(tensors, dim=2))  # [H, D]
            row[f"{name}_top_ratio"] = float(ratios.max())
            row[f"{name}_outlier_share"] = float((ratios >= ratio).float().mean())
        rows.append(row)
    return pd.DataFrame(rows)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided p-value of ``wins`` against ``losses`` (ties left out) when each side is equally likely."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def layer_verdict(wins: int, losses: int) -> str:
    """"holds" / "does not hold" when one side wins in significantly more layers (sign test), else within noise."""
    if sign_test(wins, losses) >= SIGNIFICANCE:
        return WITHIN_NOISE
    return "holds" if wins > losses else "does not hold"


def _spread(values: pd.Series) -> str:
    return f"median {values.median():.1f}x, {values.min():.1f}-{values.max():.1f}x"


def outlier_rows(channels: pd.DataFrame, ratio: float = OUTLIER_RATIO) -> list[dict[str, str]]:
    """The premise's first half: keys have outlier channels, and keys' channels are more uneven than values'."""
    layers = len(channels)
    k_layers = int((channels["k_top_ratio"] >= ratio).sum())
    v_layers = int((channels["v_top_ratio"] >= ratio).sum())
    has = "holds" if 2 * k_layers >= layers else "does not hold" if k_layers == 0 else "partly holds"
    outliers = {
        "claim": f"Keys have outlier channels: a few channels large in every token ({KIVI}, Fig. 2)",
        "measured": (f"in {k_layers} of {layers} layers some key channel's mean |K| is {ratio:g}x its head's median "
                     f"channel or more ({channels['k_outlier_share'].mean():.1%} of key channels; largest per "
                     f"layer: {_spread(channels['k_top_ratio'])}); values: {v_layers} of {layers} layers "
                     f"({_spread(channels['v_top_ratio'])})"),
        "verdict": has,
    }
    wins = int((channels["k_top_ratio"] > channels["v_top_ratio"]).sum())
    losses = int((channels["k_top_ratio"] < channels["v_top_ratio"]).sum())
    uneven = {
        "claim": f"Keys' channels are more uneven than values', so values can share one scale per token ({KIVI})",
        "measured": (f"the largest key channel stands further above its median than the largest value channel in "
                     f"{wins} of {layers} layers (sign test p = {sign_test(wins, losses):.2g})"),
        "verdict": layer_verdict(wins, losses),
    }
    return [outliers, uneven]


def _ppl(summary: pd.DataFrame, method: str) -> str:
    row = summary.loc[method]
    return f"{row.ppl_vs_fp16:.3g}x [{row.ppl_vs_fp16_low:.3g}, {row.ppl_vs_fp16_high:.3g}] ({row.vs_fp16})"


def per_channel_rows(summary: pd.DataFrame, by_layer: pd.DataFrame) -> list[dict[str, str]]:
    """The premise's second half, one row per bit width both ``int{b}-channel`` and ``int{b}-token`` ran at: keys
    stored per channel have a lower error than per token, layer by layer (KIVI, Fig. 2 and Table 1)."""
    table = summary.set_index("method")
    errors = by_layer.pivot(index="layer", columns="method", values="k_rel_err")
    rows = []
    for bits in BITS:
        channel, token = f"int{bits}-channel", f"int{bits}-token"
        if channel not in errors or token not in errors or channel not in table.index or token not in table.index:
            continue
        wins = int((errors[channel] < errors[token]).sum())
        losses = int((errors[channel] > errors[token]).sum())
        rows.append({
            "claim": f"Keys stored per channel lose less than per token at {bits} bits ({KIVI})",
            "measured": (f"key error {table.loc[channel, 'k_rel_err']:.3f} per channel vs "
                         f"{table.loc[token, 'k_rel_err']:.3f} per token (relative L2, mean over layers; lower in "
                         f"{wins} of {len(errors)} layers, sign test p = {sign_test(wins, losses):.2g}); "
                         f"perplexity vs fp16 {_ppl(table, channel)} per channel, {_ppl(table, token)} per "
                         f"token; bytes "
                         f"{table.loc[channel, 'bytes_ratio']:.3f}x vs {table.loc[token, 'bytes_ratio']:.3f}x fp16 "
                         "(a scale per channel and 32 tokens vs one per token)"),
            "verdict": layer_verdict(wins, losses),
        })
    return rows


def kivi_premise(channels: pd.DataFrame, summary: pd.DataFrame | None, by_layer: pd.DataFrame,
                 ratio: float = OUTLIER_RATIO) -> pd.DataFrame:
    """KIVI's premise as measured: outlier channels in keys (not values), and per-channel keys beating per-token
    ones at each bit width. channels: :func:`channel_outliers`; summary / by_layer: a
    :class:`~kvcore.quant.evaluate.QuantEval`'s tables (summary None: the outlier rows alone, before any decode).
    Columns :data:`PREMISE_COLUMNS`."""
    rows = outlier_rows(channels, ratio) + ([] if summary is None else per_channel_rows(summary, by_layer))
    return pd.DataFrame(rows, columns=list(PREMISE_COLUMNS))
