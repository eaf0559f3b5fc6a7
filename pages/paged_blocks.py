"""Paged blocks page (not built yet)."""

import streamlit as st

st.title("Paged blocks")
st.info(
    (
        "Prefill and decode step by step over a paged block pool with prefix caching, ref counts and copy-on-"
        "write; fragmentation of contiguous vs paged allocation; paged attention checked against contiguous "
        "attention."
    ),
    icon=":material/construction:",
)
st.caption("This page is not built yet: it arrives with its own issue.")
