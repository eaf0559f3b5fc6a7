"""Continuous batching page (not built yet)."""

import streamlit as st

st.title("Continuous batching")
st.info(
    (
        "A scheduler simulator (static, continuous, chunked prefill, preemption) driven by the real block "
        "manager, with throughput, TTFT and TPOT."
    ),
    icon=":material/construction:",
)
st.caption("This page is not built yet: it arrives with its own issue.")
