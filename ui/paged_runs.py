"""Streamlit-cached runs of the Paged blocks page: the fragmentation experiment and the paged attention check."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from kvcore import paged
from kvcore.device import get_device
from kvcore.kernels import AttentionCheckConfig, check_paged_attention


@st.cache_data(show_spinner="Simulating three allocators...")
def run_fragmentation(kind: str, prompt_mean: float, output_mean: float, spread: float, requests: int,
                      seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Contiguous vs paged allocators on one workload (summary), and its parallel-sampling memory (n copies vs fork)."""
    config = paged.FragmentationConfig(requests, paged.LengthDistribution(kind, prompt_mean, spread),
                                       paged.LengthDistribution(kind, output_mean, spread), seed=seed)
    sampling = paged.parallel_sampling_memory(config.workload(), block_size=config.block_size)
    return paged.fragmentation_experiment(config), sampling


@st.cache_data(show_spinner="Running both attentions...")
def run_attention_check(model: str, batch: int, context: int, dtype: str) -> pd.DataFrame:
    """Paged vs contiguous decode attention with ``model``'s heads over ``batch`` ragged sequences, on this device."""
    return check_paged_attention(AttentionCheckConfig.for_model(model, batch, context, dtype=dtype,
                                                                device=get_device().type))
