"""Eviction page (not built yet)."""

import streamlit as st

st.title("Eviction")
st.info(
    (
        "StreamingLLM, H2O, SnapKV, TOVA, Knorm, sliding window, LRU and random compared on a real model: "
        "perplexity and attention mass kept."
    ),
    icon=":material/construction:",
)
st.caption("This page is not built yet: it arrives with its own issue.")
