"""Live model page (not built yet)."""

import streamlit as st

st.title("Live model")
st.info(
    (
        "A real transformers model generating, with its attention, sinks, heavy hitters and the cache policy "
        "shown live."
    ),
    icon=":material/construction:",
)
st.caption("This page is not built yet: it arrives with its own issue.")
