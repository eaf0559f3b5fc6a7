"""Show a DataFrame and its CSV download, the same way on every page."""

from __future__ import annotations

import re
from collections.abc import Mapping

import pandas as pd
import streamlit as st


def csv_name(page: str, table: str, settings: Mapping[str, object] | None = None) -> str:
    """A file name that says what the table is: ``<page>-<table>-<key>-<value>....csv``."""
    parts = [page, table, *(f"{k}-{v}" for k, v in (settings or {}).items())]
    name = "-".join(str(p) for p in parts)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:150] + ".csv"


def show_table(df: pd.DataFrame, page: str, table: str, settings: Mapping[str, object] | None = None,
               *, caption: str | None = None, hide_index: bool = True, height: int | str = "auto") -> None:
    """st.dataframe plus a "Download CSV" button whose file holds exactly the rows shown."""
    if caption:
        st.caption(caption)
    st.dataframe(df, hide_index=hide_index, height=height)
    st.download_button(
        "Download CSV",
        data=df.to_csv(index=not hide_index).encode(),
        file_name=csv_name(page, table, settings),
        mime="text/csv",
        key=f"csv-{page}-{table}",
        on_click="ignore",
        icon=":material/download:",
    )
