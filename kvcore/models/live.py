"""The Live model experiment: one generation, its per-token table, and the attention map of what it wrote."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from kvcore.models.attention import AttentionPatterns, capture_attention, detect_patterns
from kvcore.models.generate import GenerationSettings, TokenEvent, events_table, generate_stream
from kvcore.models.plan import CachePlan
from kvcore.models.runtime import encode_prompt


@dataclass(slots=True)
class LiveRun:
    """One generation. ids: prompt + generated token ids; table: :func:`~kvcore.models.generate.events_table`."""

    prompt_len: int
    ids: list[int]
    tokens: list[str]
    text: str
    table: pd.DataFrame
    attention: torch.Tensor | None = field(default=None, repr=False)  # [layers, Hq, T, T], filled on demand


def stream_run(model, tokenizer, prompt: str, settings: GenerationSettings, plan: CachePlan,
               sink: list[LiveRun]) -> Iterator[str]:
    """Yield a generation's text pieces (for ``st.write_stream``), then append its :class:`LiveRun` to ``sink``."""
    prompt_ids = encode_prompt(tokenizer, prompt)[0].tolist()
    events: list[TokenEvent] = []
    for event in generate_stream(model, tokenizer, prompt, settings, plan):
        events.append(event)
        yield event.text
    sink.append(finish_run(tokenizer, prompt_ids, events))


def finish_run(tokenizer, prompt_ids: list[int], events: list[TokenEvent]) -> LiveRun:
    """Assemble a :class:`LiveRun` from the prompt ids and the generated events."""
    ids = prompt_ids + [e.token_id for e in events]
    return LiveRun(len(prompt_ids), ids, tokenizer.convert_ids_to_tokens(ids),
                   tokenizer.decode([e.token_id for e in events], skip_special_tokens=True),
                   events_table(events, tokenizer))


def run_live(model, tokenizer, prompt: str, settings: GenerationSettings, plan: CachePlan) -> LiveRun:
    """A whole generation at once (no streaming)."""
    sink: list[LiveRun] = []
    for _ in stream_run(model, tokenizer, prompt, settings, plan, sink):
        pass
    return sink[0]


def attention_map(model, run: LiveRun, layer: int, head: int | None) -> np.ndarray:
    """``[T, T]`` attention of one layer over the whole sequence (full cache); ``head=None`` averages heads."""
    if run.attention is None:
        run.attention = capture_attention(model, torch.tensor(run.ids))  # [L, Hq, T, T]
    L, H = run.attention.shape[:2]
    if not 0 <= layer < L:
        raise ValueError(f"layer must be in 0..{L - 1}, got {layer}")
    if head is not None and not 0 <= head < H:
        raise ValueError(f"head must be in 0..{H - 1} or the mean, got {head}")
    attn = run.attention[layer].mean(dim=0) if head is None else run.attention[layer, head]  # [T, T]
    return attn.numpy()


def kv_curves(runs: dict[str, LiveRun]) -> pd.DataFrame:
    """KV entries and bytes after each step of several runs, labelled by run in a ``cache`` column."""
    tables = [run.table[["step", "kv_tokens", "kv_bytes"]].assign(cache=name) for name, run in runs.items()]
    return pd.concat(tables, ignore_index=True)


def patterns_table(attn: np.ndarray, tokens: list[str], patterns: AttentionPatterns) -> pd.DataFrame:
    """:func:`~kvcore.models.attention.detect_patterns` of a map, with each key's token."""
    table = detect_patterns(torch.from_numpy(attn), patterns)
    table.insert(1, "token", tokens[:len(table)])
    return table
