"""Streamlit-cached runs of the Memory hierarchy page: offload, prefill/decode split, roofline, and the copy speeds
measured on this machine (cached for 10 minutes only: they describe the machine right now)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from kvcore import hierarchy
from kvcore.hierarchy.experiment import run_offload, run_pd, run_roofline, tiers_for
from kvcore.shapes import PRESETS

offload = st.cache_data(run_offload, show_spinner="Replaying the workload through the tiers...")
pd_split = st.cache_data(run_pd, show_spinner="Simulating both serving setups...")
roofline = st.cache_data(run_roofline, show_spinner=False)


@st.cache_data(ttl=600, show_spinner="Copying KV tensors through memory and a temporary file...")
def bandwidth(model: str, gpu: str, link: str, size_mb: int) -> pd.DataFrame:
    """Measured GB/s of a ``size_mb`` MB KV tensor of ``model``, best of 3, beside ``gpu``'s tiers over ``link``."""
    tiers = tiers_for(gpu, link)
    return hierarchy.measure_bandwidth(PRESETS[model], size_mb, 3, tiers[1], tiers[2])
