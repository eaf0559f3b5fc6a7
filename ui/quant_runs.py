"""Streamlit-cached runs of the Quantization page on the bundled model: captured Q/K/V, every method measured,
K/V magnitude maps and greedy text. Keys are typed: the text (:class:`~kvcore.quant.evaluate.QuantText`) and
the custom method's settings (:class:`~kvcore.quant.methods.CustomSettings`); every use of the model holds its
lock."""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from kvcore.quant import evaluate as qe
from kvcore.quant.methods import METHODS, CustomSettings, method_named
from kvcore.quant.model_kv import CapturedKV
from ui.models import shared_model


def model() -> tuple[Any, Any]:
    """The bundled model and its tokenizer, shared by every page and session."""
    shared = shared_model()
    return shared.model, shared.tokenizer


@st.cache_resource(show_spinner="Capturing queries, keys and values...")
def captured(text: qe.QuantText) -> CapturedKV:
    """Queries, keys and values of every layer over the first text window."""
    with shared_model().lock:
        return qe.capture_qkv(model()[0], text.ids(model()[1])[0])


@st.cache_data(show_spinner="Decoding the text through every method's cache...")
def measure(text: qe.QuantText, custom: CustomSettings | None = None) -> qe.QuantEval:
    """Every registered method measured (``custom`` None), or fp16 and the custom method."""
    methods = METHODS if custom is None else {"fp16": METHODS["fp16"], "custom": custom.method()}
    with shared_model().lock:
        return qe.evaluate(model()[0], text.ids(model()[1]), methods)


def results(text: qe.QuantText, name: str, custom: CustomSettings) -> qe.QuantEval:
    """Every registered method, plus the custom one when it is the method shown."""
    result = measure(text)
    return qe.combine(result, measure(text, custom)) if name == "custom" else result


@st.cache_data(show_spinner=False)
def maps(text: qe.QuantText, layer: int, head: int | None, name: str, custom: CustomSettings) -> list[np.ndarray]:
    """Token x channel magnitudes of K, V and of the method's K and V errors at ``layer`` (``head`` None = all)."""
    cap = captured(text)
    k_hat, v_hat, _ = qe.reconstruct(cap, method_named(name, custom), layer)
    k, v = cap.keys[layer], cap.values[layer]
    return [qe.channel_magnitudes(t, head).numpy() for t in (k, v, k_hat - k, v_hat - v)]


@st.cache_data(show_spinner="Generating with both caches...")
def texts(text: qe.QuantText, new_tokens: int, name: str, custom: CustomSettings) -> list[str]:
    """The prompt (first half of window 1), then its greedy continuation through the fp16 and the method's cache."""
    m, tok = model()
    prompt = text.ids(tok)[0, : text.tokens // 2]
    with shared_model().lock:
        return [tok.decode(prompt, skip_special_tokens=True)] + [
            qe.generate_text(m, tok, prompt, method, new_tokens) for method in (METHODS["fp16"],
                                                                                method_named(name, custom))]
