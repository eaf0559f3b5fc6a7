"""Streamlit-cached runs of the Quantization page on the bundled model: captured Q/K/V, every method measured,
K/V magnitude maps and greedy text. ``settings`` everywhere is the page's custom-method tuple
``(name, bits, scheme, group, residual, sinks, outliers %)``; every use of the model holds its lock."""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from kvcore.quant import evaluate as qe
from kvcore.quant.methods import METHODS, QuantMethod, custom_method
from kvcore.quant.model_kv import CapturedKV
from ui.models import shared_model


def model() -> tuple[Any, Any]:
    """The bundled model and its tokenizer, shared by every page and session."""
    shared = shared_model()
    return shared.model, shared.tokenizer


def method_of(name: str, bits: int, scheme: str, group: int, residual: int, sinks: int,
              outliers: float) -> QuantMethod:
    """The registered method ``name``, or for "custom" one built from the settings (``outliers`` in percent)."""
    return METHODS[name] if name != "custom" else custom_method(bits, scheme, group, residual, sinks, outliers / 100)


@st.cache_resource(show_spinner="Capturing queries, keys and values...")
def captured(tokens: int, seed: int, windows: int) -> CapturedKV:
    """Queries, keys and values of every layer over the first text window."""
    with shared_model().lock:
        return qe.capture_qkv(model()[0], qe.text_ids(model()[1], tokens, seed, windows)[0])


@st.cache_data(show_spinner="Decoding the text through every method's cache...")
def measure(tokens: int, seed: int, windows: int, *settings: Any) -> qe.QuantEval:
    """Every registered method measured (no ``settings``), or fp16 and the custom method (with them)."""
    methods = METHODS if not settings else {"fp16": METHODS["fp16"], "custom": method_of(*settings)}
    with shared_model().lock:
        return qe.evaluate(model()[0], qe.text_ids(model()[1], tokens, seed, windows), methods)


@st.cache_data(show_spinner=False)
def maps(tokens: int, seed: int, windows: int, layer: int, head: int | None, *settings: Any) -> list[np.ndarray]:
    """Token x channel magnitudes of K, V and of the method's K and V errors at ``layer`` (``head`` None = all)."""
    cap = captured(tokens, seed, windows)
    k_hat, v_hat, _ = qe.reconstruct(cap, method_of(*settings), layer)
    k, v = cap.keys[layer], cap.values[layer]
    return [qe.channel_magnitudes(t, head).numpy() for t in (k, v, k_hat - k, v_hat - v)]


@st.cache_data(show_spinner="Generating with both caches...")
def texts(tokens: int, seed: int, windows: int, new_tokens: int, *settings: Any) -> list[str]:
    """The prompt (first half of window 1), then its greedy continuation through the fp16 and the method's cache."""
    m, tok = model()
    prompt = qe.text_ids(tok, tokens, seed, windows)[0, : tokens // 2]
    with shared_model().lock:
        return [tok.decode(prompt, skip_special_tokens=True)] + [
            qe.generate_text(m, tok, prompt, method, new_tokens) for method in (METHODS["fp16"], method_of(*settings))]
