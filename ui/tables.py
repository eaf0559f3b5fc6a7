"""Show a DataFrame and its CSV download, the same way on every page."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from ui.format import token_text

SIGNIFICANT = 4  # digits a float column shows for its smallest value (at most MAX_DECIMALS decimals)
MAX_DECIMALS = 4


def csv_name(page: str, table: str, settings: Mapping[str, object] | None = None) -> str:
    """A file name that says what the table is: ``<page>-<table>-<key>-<value>....csv``."""
    parts = [page, table, *(f"{k}-{v}" for k, v in (settings or {}).items())]
    name = "-".join(str(p) for p in parts)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:150] + ".csv"


def number_format(name: str, values: pd.Series) -> str | None:
    """How a numeric column is shown (a Streamlit format string), or None to leave it as it is (not a number).

    Integers, and floats that are all whole numbers (counts with a gap, which pandas keeps as floats): thousands
    separators, no decimals. Columns named ``*_pct``: one decimal and "%". Other floats: enough decimals for
    ``SIGNIFICANT`` digits of the smallest non-zero value (at most ``MAX_DECIMALS``), thousands separators; a column
    whose values are all below 0.001 in scientific notation.
    """
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return None
    if pd.api.types.is_integer_dtype(values):
        return "%,d"
    if name.endswith("_pct"):
        return "%,.1f%%"
    finite = np.abs(values.to_numpy(dtype=float))
    finite = finite[np.isfinite(finite) & (finite > 0)]
    if not finite.size or (finite == np.round(finite)).all():
        return "%,.0f"
    if finite.max() < 1e-3:
        return "%.2e"
    decimals = min(MAX_DECIMALS, max(0, SIGNIFICANT - 1 - math.floor(math.log10(finite.min()))))
    return f"%,.{decimals}f"


def shown_text(values: pd.Series, value: float | None = None) -> str:
    """``value`` (default the column's first) as the table shows it in its column ``values``: a metric or caption
    that repeats a table's number uses this, so one number has one formatting ("183.2 ms" in both, not "183 ms"
    beside it)."""
    fmt = number_format(str(values.name), values)
    value = values.iloc[0] if value is None else value
    if fmt is None:
        return str(value)
    found = re.fullmatch(r"%(,?)(?:\.(\d+))?([dfe])(%%)?", fmt)
    if found is None:
        return str(value)
    comma, decimals, kind, percent = found.groups()
    spec = f"{comma}.{decimals}{kind}" if decimals is not None else f"{comma}{kind}"
    text = format(int(value) if kind == "d" else float(value), spec)
    if text.startswith("-") and float(text.replace(",", "")) == 0:
        text = text[1:]  # never "-0.00"
    return text + ("%" if percent else "")


def column_config(df: pd.DataFrame) -> dict[Any, Any]:
    """A NumberColumn with :func:`number_format` for every numeric column of ``df``."""
    config = {}
    for name, values in df.items():
        fmt = number_format(str(name), values)
        if fmt is not None:
            config[name] = st.column_config.NumberColumn(format=fmt)
    return config


def shown_decimals(fmt: str) -> int | None:
    """Decimals a fixed-point format string shows ("%,.2f" -> 2, "%,.1f%%" -> 1); None for other formats."""
    found = re.search(r"\.(\d+)f", fmt)
    return int(found.group(1)) if found else None


def readable(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` for the screen: text columns whose name says "token" hold tokenizer pieces, shown with
    :func:`ui.format.token_text` ('Ġis' -> '·is', 'Ċ' -> '↵'); a float that its column's format would show as a
    negative zero ("-0.0000", "-0.0%") is shown as 0."""
    pieces = {name: df[name].map(lambda v: token_text(v) if isinstance(v, str) else v) for name in df.columns
              if "token" in str(name).lower() and not pd.api.types.is_numeric_dtype(df[name])}
    zeros = {}
    for name, values in df.items():
        fmt = number_format(str(name), values)
        if fmt is None or pd.api.types.is_integer_dtype(values):
            continue
        decimals = shown_decimals(fmt)
        shown_zero = (values.round(decimals) == 0) if decimals is not None else (values == 0)
        if (shown_zero & (values != 0) | (values == 0) & np.signbit(values.to_numpy(dtype=float))).any():
            zeros[name] = values.mask(shown_zero, 0.0)
    changed = pieces | zeros
    return df.assign(**changed) if changed else df


def show_table(df: pd.DataFrame, page: str, table: str, settings: Mapping[str, object] | None = None,
               *, caption: str | None = None, hide_index: bool = True, height: int | str = "auto") -> None:
    """st.dataframe with formatted columns (:func:`column_config`, :func:`readable`; a missing value shows as an
    empty cell) plus a "Download CSV" button whose file holds exactly the rows shown, at full precision and with
    the tokenizer's own pieces."""
    if caption:
        st.caption(caption)
    st.dataframe(readable(df), hide_index=hide_index, height=height, column_config=column_config(df),
                 placeholder="")  # a missing value is an empty cell, not "None"
    st.download_button(
        "Download CSV",
        data=df.to_csv(index=not hide_index).encode(),
        file_name=csv_name(page, table, settings),
        mime="text/csv",
        key=f"csv-{page}-{table}",
        on_click="ignore",
        icon=":material/download:",
    )
