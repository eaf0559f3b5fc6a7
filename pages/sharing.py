"""Sharing (GQA/MQA/cross-layer) page (not built yet)."""

import streamlit as st

st.title("Sharing (GQA/MQA/cross-layer)")
st.info(
    (
        "MHA vs GQA vs MQA vs cross-layer sharing: the memory each saves, converting a trained model, and "
        "tiny models trained with different KV heads."
    ),
    icon=":material/construction:",
)
st.caption("This page is not built yet: it arrives with its own issue.")
