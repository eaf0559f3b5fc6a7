"""Memory hierarchy page (not built yet)."""

import streamlit as st

st.title("Memory hierarchy")
st.info(
    (
        "GPU/CPU/disk/remote KV tiers with offload and prefetch, prefill/decode disaggregation, and the "
        "roofline of prefill vs decode."
    ),
    icon=":material/construction:",
)
st.caption("This page is not built yet: it arrives with its own issue.")
