"""Streamlit-cached runs of the Sharing page: the bundled model with its evaluation text, MHA->GQA conversion,
the cross-layer sweep and the short live training run. Keys are the experiments' own settings dataclasses;
every use of the shared model holds its lock."""

from __future__ import annotations

from typing import Any

import streamlit as st
import torch

from kvcore.sharing import convert as conv
from kvcore.sharing import crosslayer as cl
from kvcore.sharing import variants
from ui.models import shared_model
from ui.progress import with_progress

CROSSLAYER_WINDOWS, CROSSLAYER_TOKENS = 4, 128  # the cross-layer sweep decodes token by token: keep it short


@st.cache_resource(show_spinner="Loading the bundled model...")
def bundled() -> tuple[Any, Any, tuple[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """The shared bundled model, its tokenizer, the evaluation streams and the cross-layer windows."""
    shared = shared_model()
    streams = conv.eval_streams(shared.tokenizer)
    windows = cl.text_windows(streams[1], shared.tokenizer.bos_token_id, CROSSLAYER_WINDOWS, CROSSLAYER_TOKENS)
    return shared.model, shared.tokenizer, streams, windows


@st.cache_data(show_spinner="Pooling K/V heads and scoring each model...", max_entries=16)
def convert(settings: conv.ConvertSettings) -> conv.ConvertResult:
    """Pool the bundled model to each KV head count and score it (after uptraining, when ``settings`` ask)."""
    model, tok, streams, _ = bundled()
    with shared_model().lock:
        return with_progress("Converting...", lambda cb: conv.convert_experiment(model, tok, settings, cb, streams))


@st.cache_data(show_spinner="Decoding the text through each shared cache...", max_entries=16)
def crosslayer(mode: str, t: float) -> cl.CrossLayerResult:
    """Decode the cross-layer windows with each first shared layer, sharing by ``mode`` at merge weight ``t``."""
    with shared_model().lock:
        return cl.crosslayer_sweep(bundled()[0], bundled()[3], mode, t)


@st.cache_data(show_spinner=False, max_entries=4)
def live(settings: variants.VariantSettings) -> variants.VariantResult:
    """Train the small MHA / GQA / MQA variants from scratch with ``settings``."""
    return with_progress("Training...", lambda cb: variants.train_variants(settings, progress=cb))
