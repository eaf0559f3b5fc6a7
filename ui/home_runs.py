"""Cached run of the Home page: the KV memory calculator over the chosen model shapes (frozen dataclasses)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from kvcore.calculator import kv_curve, memory_table
from kvcore.shapes import GPU_PRESETS, ModelShape


@st.cache_data(show_spinner=False, max_entries=64)
def calculator(shapes: tuple[ModelShape, ...], tokens: int, batch: int, bits: int,
               gpu: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The memory table (one row per model, what fits on ``gpu``) and KV bytes vs context for each model."""
    return memory_table(shapes, tokens, batch, bits, GPU_PRESETS[gpu]), kv_curve(shapes, tokens, batch, bits)
