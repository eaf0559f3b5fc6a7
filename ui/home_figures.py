"""Figures of the Home page: the calculator's headline numbers and the KV-vs-context chart."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from ui.figures import line_chart
from ui.format import bytes_str, count_str


def memory_metrics(table: pd.DataFrame, tokens: int, batch: int, gpu: str) -> None:
    """KV per token, in total, and tokens that fit after the weights: one row of metrics per model of the table.

    A model whose weights alone do not fit the GPU shows "none" and says so under the metrics.
    """
    for row in table.itertuples(index=False):
        m1, m2, m3 = st.columns(3)
        m1.metric(f"{row.model}: KV per token", bytes_str(row.kv_bytes_per_token))
        m2.metric(f"KV, {tokens:,} tokens x {batch}", bytes_str(row.kv_bytes_total))
        m3.metric(f"Tokens fit on {gpu}", count_str(row.tokens_fit_after_weights) if row.weights_fit else "none",
                  help=f"Tokens of KV at this precision in {gpu}'s memory after the weights (16-bit)")
    too_big = table[~table["weights_fit"]]
    if len(too_big):
        st.warning(weights_note(too_big, gpu))


def weights_note(too_big: pd.DataFrame, gpu: str) -> str:
    """Which models' 16-bit weights do not fit ``gpu`` on their own (rows of the calculator's table)."""
    models = ", ".join(f"{row.model} ({row.weights_GB_16bit:,.0f} GB)" for row in too_big.itertuples(index=False))
    return (f"The 16-bit weights of {models} do not fit the {gpu}'s memory on their own, so no KV cache fits "
            "beside them: pick a larger GPU, or split the model over several.")


def coinciding(curve: pd.DataFrame) -> dict[str, str]:
    """Model -> its legend name, where models whose KV curves are identical (the same KV shape) share one name
    ("llama-3-8b = mistral-7b"): they draw one line, which says so."""
    groups: dict[tuple[float, ...], list[str]] = {}
    for model, part in curve.groupby("model", sort=False):
        groups.setdefault(tuple(part["kv_GB"]), []).append(str(model))
    return {model: " = ".join(models) for models in groups.values() for model in models}


def kv_vs_context(curve: pd.DataFrame, batch: int, bits: int) -> go.Figure:
    """KV cache size vs context length, one line per model; models with the same curve share one line whose name
    lists them all, and the title says they coincide."""
    names = coinciding(curve)
    first: dict[str, str] = {}
    for model, name in names.items():
        first.setdefault(name, model)  # a shared line is drawn once, for its first model
    shown = curve[curve["model"].isin(first.values())].assign(model=lambda d: d["model"].map(names))
    same = [name.split(" = ") for name in first if " = " in name]
    note = "; ".join(f"{', '.join(models[:-1])} and {models[-1]} coincide (same KV shape)" for models in same)
    return line_chart(shown, "tokens", "kv_GB", "model", markers=False,
                      title=f"KV cache vs context (batch {batch}, {bits}-bit)" + (f": {note}" if note else ""),
                      x_title="context length (tokens)", y_title="KV cache (GB)")
