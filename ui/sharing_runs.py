"""Streamlit-cached runs of the Sharing page: the bundled model with its evaluation text, MHA->GQA conversion,
the cross-layer sweep and the short live training run. Every use of the shared model holds its lock."""

from __future__ import annotations

from typing import Any

import streamlit as st
import torch

from kvcore import sharing
from ui.models import shared_model
from ui.progress import with_progress


@st.cache_resource(show_spinner="Loading the bundled model...")
def bundled() -> tuple[Any, Any, tuple[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """The shared bundled model, its tokenizer, the evaluation streams and the cross-layer windows."""
    shared = shared_model()
    streams = sharing.eval_streams(shared.tokenizer)
    return shared.model, shared.tokenizer, streams, sharing.text_windows(streams[1], shared.tokenizer.bos_token_id,
                                                                         4, 128)


@st.cache_data(show_spinner="Pooling K/V heads and scoring each model...", max_entries=16)
def convert(windows: int, steps: int, seed: int) -> sharing.ConvertResult:
    """Pool the bundled model to each KV head count; perplexity on ``windows`` windows after ``steps`` uptraining."""
    model, tok, streams, _ = bundled()
    s = sharing.ConvertSettings(eval_windows=windows, uptrain_steps=steps, seed=seed)
    with shared_model().lock:
        return with_progress("Converting...", lambda cb: sharing.convert_experiment(model, tok, s, cb, streams))


@st.cache_data(show_spinner="Decoding the text through each shared cache...", max_entries=16)
def crosslayer(mode: str, t: float) -> sharing.CrossLayerResult:
    """Decode the cross-layer windows with each first shared layer, sharing by ``mode`` at merge weight ``t``."""
    with shared_model().lock:
        return sharing.crosslayer_sweep(bundled()[0], bundled()[3], mode, t)


@st.cache_data(show_spinner=False, max_entries=4)
def live(steps: int, seed: int) -> sharing.VariantResult:
    """Train the small MHA / GQA / MQA variants from scratch, ``steps`` steps each (``live_settings``)."""
    return with_progress("Training...", lambda cb: sharing.train_variants(sharing.live_settings(steps, seed),
                                                                          progress=cb))
