"""Quantization page (not built yet)."""

import streamlit as st

st.title("Quantization")
st.info(
    (
        "int8/4/3/2 KV quantization (per-token, per-channel, grouped, KIVI, fp16 outliers) with exact bytes "
        "and measured error."
    ),
    icon=":material/construction:",
)
st.caption("This page is not built yet: it arrives with its own issue.")
