"""Streamlit-cached runs of the Paged blocks page, keyed by the experiments' own settings dataclasses: the
fragmentation experiment and the paged attention check (a timing, so kept for :data:`CHECK_TTL_S` seconds only:
a later visitor gets it measured under the load of their own time)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from kvcore import paged
from kvcore.paged.attention_check import AttentionCheckConfig, check_paged_attention


@st.cache_data(show_spinner="Simulating three allocators...")
def run_fragmentation(config: paged.FragmentationConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Contiguous vs paged allocators on one workload (summary), and its parallel-sampling memory (n copies vs fork)."""
    sampling = paged.parallel_sampling_memory(config.workload(), block_size=config.block_size)
    return paged.fragmentation_experiment(config), sampling


CHECK_TTL_S = 60


@st.cache_data(ttl=CHECK_TTL_S, max_entries=16, show_spinner="Timing both attentions (warm-up, then repeats)...")
def run_attention_check(config: AttentionCheckConfig) -> pd.DataFrame:
    """Paged vs contiguous decode attention over ragged sequences, on the config's device, timed repeatedly."""
    return check_paged_attention(config)
