"""Figures of the Home page: the calculator's headline numbers and the KV-vs-context chart."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from ui.figures import line_chart
from ui.format import bytes_str, count_str


def memory_metrics(table: pd.DataFrame, tokens: int, batch: int, gpu: str) -> None:
    """KV per token, in total, and tokens that fit after the weights, for the first model of the table."""
    first = table.iloc[0]
    m1, m2, m3 = st.columns(3)
    m1.metric(f"KV per token ({first.model})", bytes_str(first.kv_bytes_per_token))
    m2.metric(f"KV, {tokens:,} tokens x {batch}", bytes_str(first.kv_bytes_total))
    m3.metric(f"Tokens fit on {gpu}", count_str(first.tokens_fit_after_weights),
              help=f"Tokens of KV at this precision in {gpu}'s memory after the weights (16-bit)")


def kv_vs_context(curve: pd.DataFrame, batch: int, bits: int) -> go.Figure:
    """KV cache size vs context length, one line per model."""
    return line_chart(curve, "tokens", "kv_GB", "model", markers=False,
                      title=f"KV cache vs context (batch {batch}, {bits}-bit)", x_title="context length (tokens)",
                      y_title="KV cache (GB)")
