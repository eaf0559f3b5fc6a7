"""A real model's queries, keys and values, and teacher-forced decoding through a (quantized) cache.

Queries and post-RoPE keys/values are captured through transformers' attention interface (the
tensors the attention kernel receives), so any causal LM that uses it works, GQA included.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

_CAPTURE = "kvcore_capture"


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """Record what attention receives on the module, then run SDPA."""
    module._kvcore_qkv = (query.detach(), key.detach(), value.detach(), kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(_CAPTURE, _capture_attention)


@dataclass(slots=True)
class CapturedKV:
    """Per layer: queries ``[B, Hq, T, D]``, keys and values ``[B, Hkv, T, D]`` (post-RoPE), float32 on CPU.

    scaling: the softmax scale the model uses (1/sqrt(D) for Llama).
    """

    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    scaling: float

    def __post_init__(self) -> None:
        if not (len(self.queries) == len(self.keys) == len(self.values)) or not self.keys:
            raise ValueError("need the same, non-zero number of layers of queries, keys and values")

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[-2]


@contextmanager
def _attention(model, name: str) -> Iterator[None]:
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def capture_qkv(model, input_ids: torch.Tensor) -> CapturedKV:
    """Run one forward pass over ``input_ids`` ``[T]`` and keep every layer's queries, keys and values."""
    ids = input_ids.reshape(1, -1).to(_device(model))  # [1, T]
    with _attention(model, _CAPTURE):
        model(input_ids=ids, use_cache=False)
    modules = [m for m in model.modules() if hasattr(m, "_kvcore_qkv")]
    modules.sort(key=lambda m: getattr(m, "layer_idx", 0))
    records = [m.__dict__.pop("_kvcore_qkv") for m in modules]
    if not records:
        raise ValueError(f"{type(model).__name__} does not route attention through transformers' attention interface")
    q, k, v, scaling = zip(*records, strict=True)
    scale = scaling[0] if scaling[0] is not None else 1.0 / math.sqrt(k[0].shape[-1])
    as_cpu = [t.float().cpu() for t in (*q, *k, *v)]
    n = len(records)
    return CapturedKV(as_cpu[:n], as_cpu[n:2 * n], as_cpu[2 * n:], float(scale))


@dataclass(slots=True)
class DecodeRun:
    """Teacher-forced decoding through a cache: per-token negative log-likelihood and wall time.

    nll: ``[rows, N]`` nats for each scored token of each batch row. decode_seconds: wall time of the
    one-token steps (all rows together). decode_tokens: steps taken.
    """

    nll: torch.Tensor
    decode_seconds: float
    decode_tokens: int

    def perplexity(self) -> list[float]:
        """exp(mean nll) per row."""
        return torch.exp(self.nll.double().mean(dim=-1)).tolist()

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")


@contextmanager
def one_thread() -> Iterator[None]:
    """Run a block on one intra-op thread, then restore the setting.

    Decode steps of a small model are many ops of a few thousand elements: extra threads only add
    synchronisation, and stall badly when other processes hold the cores.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def decode_through_cache(model, input_ids: torch.Tensor, cache, prompt_tokens: int, rows: int = 1) -> DecodeRun:
    """Prefill ``prompt_tokens`` tokens, then feed the rest one token per step, scoring each next token.

    Every scored token is predicted by a step that reads all earlier tokens back from ``cache`` (as in
    generation), so a quantized cache's error reaches the scores; the prompt's own attention is exact.
    All ``T`` tokens end up in the cache. input_ids: ``[T]`` (repeated in ``rows`` batch rows) or
    ``[rows, T]`` (one sequence per row); 1 <= prompt_tokens < T.
    """
    ids = input_ids.reshape(1, -1).expand(rows, -1) if input_ids.ndim == 1 else input_ids  # [rows, T]
    ids = ids.to(_device(model))
    T = ids.shape[1]
    if not 1 <= prompt_tokens < T:
        raise ValueError(f"prompt_tokens must be in [1, {T - 1}] for {T} tokens, got {prompt_tokens}")

    def nll(logits: torch.Tensor, target: int) -> torch.Tensor:  # logits [rows, V] -> [rows]
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, target:target + 1])[:, 0].neg()

    logits = model(input_ids=ids[:, :prompt_tokens], cache=cache, use_cache=True).logits[:, -1]  # [rows, V]
    scored = [nll(logits, prompt_tokens)]
    start = time.perf_counter()
    for t in range(prompt_tokens, T):
        logits = model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1]
        if t + 1 < T:
            scored.append(nll(logits, t + 1))
    seconds = time.perf_counter() - start
    return DecodeRun(torch.stack(scored, dim=-1).cpu(), seconds, T - prompt_tokens)


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, cache, max_new_tokens: int) -> torch.Tensor:
    """``model.generate`` greedily from ``input_ids`` ``[T]`` with ``cache``; returns the new ids ``[N]``."""
    ids = input_ids.reshape(1, -1).to(_device(model))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=model.config.pad_token_id or 0)
    return out[0, ids.shape[1]:].cpu()
