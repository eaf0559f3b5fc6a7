"""The Live model experiment: one generation, its per-token table, the attention map of what it wrote, what
the cache held at every step (for the step-by-step view), and its prefill/decode timing, repeated."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from kvcore.models.attention import AttentionPatterns, capture_attention, detect_patterns, far_attention_ratio
from kvcore.models.cache import LabCache
from kvcore.models.generate import GenerationSettings, TokenEvent, events_table, generate_stream
from kvcore.models.plan import CachePlan
from kvcore.models.runtime import encode_prompt
from kvcore.models.steps import StepView, build_view, cache_holdings


@dataclass(slots=True)
class LiveRun:
    """One generation. ids: prompt + generated token ids; table: :func:`~kvcore.models.generate.events_table`.

    held / compressed: per step, the share of (layer, KV head) pairs holding each position the step's query
    could read (positions 0..query) and the share stored compressed (:func:`~kvcore.models.steps.cache_holdings`;
    the tokens fed in that step count as held). plan: the cache plan's name.
    """

    prompt_len: int
    ids: list[int]
    tokens: list[str]
    text: str
    table: pd.DataFrame
    held: list[np.ndarray] = field(default_factory=list, repr=False)
    compressed: list[np.ndarray] = field(default_factory=list, repr=False)
    plan: str = "full"


class HoldingsRecorder:
    """Records what the cache holds before every step of a generation (``observe`` of ``generate_stream``)."""

    def __init__(self, plan: CachePlan, prompt_len: int) -> None:
        self.plan, self.prompt_len = plan, prompt_len
        self.held: list[np.ndarray] = []
        self.compressed: list[np.ndarray] = []

    def __call__(self, step: int, cache: LabCache) -> None:
        query = self.prompt_len - 1 + step
        seen = 0 if step == 0 else query  # positions in the cache before this step's forward
        held, compressed = cache_holdings(cache, self.plan.hook, seen)
        self.held.append(np.concatenate([held, np.ones(query + 1 - seen)]))  # this step's tokens are read
        self.compressed.append(np.concatenate([compressed, np.zeros(query + 1 - seen)]))


def stream_run(model, tokenizer, prompt: str, settings: GenerationSettings, plan: CachePlan,
               sink: list[LiveRun]) -> Iterator[str]:
    """Yield a generation's text pieces (for ``st.write_stream``), then append its :class:`LiveRun` to ``sink``."""
    prompt_ids = encode_prompt(tokenizer, prompt)[0].tolist()
    events: list[TokenEvent] = []
    recorder = HoldingsRecorder(plan, len(prompt_ids))
    for event in generate_stream(model, tokenizer, prompt, settings, plan, observe=recorder):
        events.append(event)
        yield event.text
    sink.append(finish_run(tokenizer, prompt_ids, events, recorder))


def finish_run(tokenizer, prompt_ids: list[int], events: list[TokenEvent],
               recorder: HoldingsRecorder | None = None) -> LiveRun:
    """Assemble a :class:`LiveRun` from the prompt ids, the generated events and what the cache held."""
    ids = prompt_ids + [e.token_id for e in events]
    return LiveRun(len(prompt_ids), ids, tokenizer.convert_ids_to_tokens(ids),
                   tokenizer.decode([e.token_id for e in events], skip_special_tokens=True),
                   events_table(events, tokenizer), held=recorder.held if recorder else [],
                   compressed=recorder.compressed if recorder else [],
                   plan=recorder.plan.name if recorder else "full")


def run_live(model, tokenizer, prompt: str, settings: GenerationSettings, plan: CachePlan) -> LiveRun:
    """A whole generation at once (no streaming)."""
    sink: list[LiveRun] = []
    for _ in stream_run(model, tokenizer, prompt, settings, plan, sink):
        pass
    return sink[0]


def run_attention(model, run: LiveRun) -> torch.Tensor:
    """The full cache's attention over the whole generated sequence: ``[layers, Hq, T, T]`` (eager attention)."""
    return capture_attention(model, torch.tensor(run.ids))


def layer_map(attention: torch.Tensor, layer: int, head: int | None) -> np.ndarray:
    """``[T, T]`` map of one layer of ``attention`` ``[L, Hq, T, T]``; ``head=None`` averages heads."""
    L, H = attention.shape[:2]
    if not 0 <= layer < L:
        raise ValueError(f"layer must be in 0..{L - 1}, got {layer}")
    if head is not None and not 0 <= head < H:
        raise ValueError(f"head must be in 0..{H - 1} or the mean, got {head}")
    attn = attention[layer].mean(dim=0) if head is None else attention[layer, head]  # [T, T]
    return attn.numpy()


def opening_layer(num_layers: int) -> int:
    """The layer a page first shows: the first one past a sixth of the model's depth.

    The first layers of a pretrained LLM attend locally and attention sinks show after them (StreamingLLM,
    Xiao et al. 2023, Fig. 2: layers 0-1 of Llama-2-7B's 32 are local; SmolLM2-135M's token 0 gets 5-22x
    its uniform share from far queries in 26 of its 30 layers, none of layers 0-2). 6 layers -> 1, 30 -> 5.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return min(num_layers - 1, num_layers // 6)


def key_sink_by_layer(attention: torch.Tensor, patterns: AttentionPatterns, key: int = 0) -> pd.DataFrame:
    """Whether key ``key`` is an attention sink in each layer of ``attention`` ``[L, Hq, T, T]`` (heads averaged,
    the detector of :func:`~kvcore.models.attention.detect_patterns`): ``layer``, ``received_vs_uniform`` (the
    mean attention it gets from queries ``min_distance``+ later over the uniform share; NaN when too few such
    queries) and ``sink`` (at least ``sink_ratio``). StreamingLLM (Xiao et al. 2023) finds token 0 a sink in
    most layers of a pretrained LLM."""
    if not 0 <= key < attention.shape[-1]:
        raise ValueError(f"key must be in 0..{attention.shape[-1] - 1}, got {key}")
    maps = attention.float().mean(dim=1)  # [L, T, T]
    ratio = far_attention_ratio(maps, patterns.min_distance, patterns.min_queries)[:, key]  # [L]
    return pd.DataFrame({"layer": range(maps.shape[0]), "received_vs_uniform": ratio.tolist(),
                         "sink": (ratio >= patterns.sink_ratio).tolist()})


def attention_map(model, run: LiveRun, layer: int, head: int | None) -> np.ndarray:
    """``[T, T]`` attention of one layer over the whole sequence (full cache); ``head=None`` averages heads."""
    return layer_map(run_attention(model, run), layer, head)


def kv_curves(runs: dict[str, LiveRun]) -> pd.DataFrame:
    """KV entries and bytes after each step of several runs, labelled by run in a ``cache`` column."""
    tables = [run.table[["step", "kv_tokens", "kv_bytes"]].assign(cache=name) for name, run in runs.items()]
    return pd.concat(tables, ignore_index=True)


def patterns_table(attn: np.ndarray, tokens: list[str], patterns: AttentionPatterns) -> pd.DataFrame:
    """:func:`~kvcore.models.attention.detect_patterns` of a map, with each key's token."""
    table = detect_patterns(torch.from_numpy(attn), patterns)
    table.insert(1, "token", tokens[:len(table)])
    return table


def step_view(run: LiveRun, attn: np.ndarray, patterns: AttentionPatterns,
              steps: Sequence[int] | None = None) -> StepView:
    """The generation step by step: each step's query attention row (from ``attn``, a ``[T, T]`` map of the
    whole sequence), what the run's cache held and compressed when it read, the sinks and heavy hitters up to
    it, and the step's token, cache entries and bytes. steps: which steps (default every one), in order."""
    total = len(run.held)
    if not total:
        raise ValueError("this run recorded no cache holdings (generate it with stream_run)")
    steps = list(range(total)) if steps is None else [int(s) for s in steps]
    if not steps or min(steps) < 0 or max(steps) >= total:
        raise ValueError(f"steps must lie in 0..{total - 1}, got {steps[:5]}")
    table = run.table.iloc[steps]
    queries = [run.prompt_len - 1 + s for s in steps]
    frame = pd.DataFrame({"step": steps, "query": queries, "token": table["token"].tolist(),
                          "kv_tokens": table["kv_tokens"].tolist(), "kv_bytes": table["kv_bytes"].tolist()})
    maps = torch.from_numpy(np.ascontiguousarray(attn)).float()
    last = run.prompt_len - 1 + total - 1
    return build_view(frame, attn[queries], {run.plan: [run.held[s] for s in steps]},
                      {run.plan: [run.compressed[s] for s in steps]}, maps, patterns, run.tokens[:last + 1])
