"""Corpus-level measurements of a model: unigram baselines for bits/byte, attention patterns over many windows."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import pandas as pd
import torch

from kvcore.models.attention import capture_attention, layer_summary
from kvcore.models.runtime import token_windows
from kvcore.models.training import token_stream


def _entropy_bits(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def unigram_bits_per_byte(text: str, tokenizer, train_ids: Sequence[int] | None = None) -> dict[str, float]:
    """Unigram baselines in bits per UTF-8 byte of ``text``.

    byte_unigram_entropy: entropy of the text's own byte distribution (a unigram model fit on the very
    text it scores, so a lower bound for any byte-unigram model). token_unigram_entropy: the same for
    the tokenizer's tokens, in bits per byte. token_unigram_cross_entropy (with ``train_ids``): a
    token unigram fit on training tokens with add-one smoothing, scored on ``text``.
    """
    data = text.encode("utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = {
        "byte_unigram_bits_per_byte": _entropy_bits(Counter(data)),
        "token_unigram_entropy_bits_per_byte": _entropy_bits(Counter(ids)) * len(ids) / len(data),
    }
    if train_ids is not None:
        counts, total, vocab = Counter(train_ids), len(train_ids), len(tokenizer)
        bits = -sum(math.log2((counts[i] + 1) / (total + vocab)) for i in ids)
        out["token_unigram_cross_entropy_bits_per_byte"] = bits / len(data)
    return out


def text_windows(tokenizer, docs: Sequence[str], window: int, num_windows: int) -> torch.Tensor:
    """Up to ``num_windows`` windows ``[W, window]`` of ``<bos>`` + consecutive tokens of the documents (each ends
    with ``<eos>``)."""
    ids = token_stream(tokenizer, docs).tolist()
    count = min(num_windows, len(ids) // (window - 1))
    if count < 1:
        return torch.empty(0, window, dtype=torch.long)
    return token_windows(ids, window, count, tokenizer.bos_token_id)


def attention_summary(model, tokenizer, docs: Sequence[str], window: int = 256, num_windows: int = 8,
                      min_query: int = 32, fraction: float = 0.05) -> pd.DataFrame:
    """Per layer, averaged over windows of real text: attention on position 0 vs uniform, top-key share.

    Windows: ``num_windows`` consecutive pieces of ``window`` tokens (``<bos>`` first) of ``docs``.
    """
    windows = text_windows(tokenizer, docs, window, num_windows)
    if not len(windows):
        raise ValueError(f"the documents hold fewer than {window} tokens; give more text or a smaller window")
    tables = [layer_summary(capture_attention(model, w), min_query, fraction) for w in windows]
    summary = pd.concat(tables).groupby("layer", as_index=False).mean()
    summary.insert(1, "windows", len(windows))
    summary.insert(2, "window_tokens", window)
    return summary
