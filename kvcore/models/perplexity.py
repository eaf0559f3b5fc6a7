"""Per-token negative log-likelihood of a text: full context, or streamed token by token through a cache plan.

Streaming is how eviction, quantization and cross-layer sharing are judged (StreamingLLM, Xiao et al.
2023, section 4; KIVI, Liu et al. 2024): every token is predicted from the cache as the plan left it,
so a plan that drops or blurs the wrong entries shows up as higher NLL. With the full plan, streaming
equals the full-context NLL (up to float rounding): that equality is what makes the comparison fair.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvcore.models.cache import LabCache
from kvcore.models.plan import FULL, CachePlan, run_step
from kvcore.models.runtime import as_ids

Progress = Callable[[float, str], None]
PROGRESS_EVERY = 8  # one-token steps between two progress reports


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B, n, V]`` logits and ``[B, n]`` targets -> ``[B, n]`` NLL in nats (float32 log-softmax)."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


@torch.inference_mode()
def token_nll(model, input_ids: torch.Tensor | list[int], chunk_size: int = 512) -> torch.Tensor:
    """NLL (nats) of tokens 1..T-1 given all tokens before them: ``[T - 1]``.

    input_ids: ``[T]`` or ``[1, T]`` (include ``<bos>`` if the model expects one). chunk_size: tokens
    per forward; chunks share one cache, so every token still sees its whole prefix (exact).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ids = as_ids(model, input_ids)[:1]
    cache = FULL.new_cache(model)
    T, parts = ids.shape[1], []
    for start in range(0, T - 1, chunk_size):
        stop = min(start + chunk_size, T - 1)  # the last token is only a target
        parts.append(_nll(run_step(model, cache, ids[:, start:stop]), ids[:, start + 1:stop + 1]))
    return torch.cat(parts, dim=1)[0].cpu()


@dataclass(slots=True)
class Streamed:
    """A text streamed through a cache: NLL of every target, the time of the one-token steps, the cache.

    nll: ``[B, T - 1]`` nats of tokens 1..T-1. decode_seconds: wall time of the one-token steps (all rows
    together); decode_steps: how many. cache: as the plan left it after the last token fed.
    """

    nll: torch.Tensor
    decode_seconds: float
    decode_steps: int
    cache: LabCache

    @property
    def tokens_per_s(self) -> float:
        """One-token steps per second (each step decodes one token of every row)."""
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


@torch.inference_mode()
def stream_text(model, input_ids: torch.Tensor | list[int], plan: CachePlan = FULL, prefill: int = 1,
                feed_last: bool = False, progress: Progress | None = None) -> Streamed:
    """Feed tokens ``0 .. prefill-1`` in one forward, then one token per step through ``plan``; score every next token.

    input_ids: ``[T]`` or ``[B, T]`` (rows decode together, each through its own cache entries).
    prefill: tokens of the first forward (1 <= prefill < T, e.g. a prompt); the plan's hook runs after it
    and after every one-token step, so it can evict or requantize before the next prediction.
    feed_last: also feed the last token (nothing left to score), so the cache ends holding the whole text.
    progress: called as ``progress(fraction, label)`` every few steps (a page's progress bar).
    """
    ids = as_ids(model, input_ids)  # [B, T]
    T = ids.shape[1]
    if not 1 <= prefill < T:
        raise ValueError(f"prefill must be in [1, {T - 1}] for a {T}-token text, got {prefill}")
    cache = plan.new_cache(model)
    parts = [_nll(run_step(model, cache, ids[:, :prefill], plan), ids[:, 1:prefill + 1])]  # [B, prefill]
    stop = T if feed_last else T - 1
    start = time.perf_counter()
    for t in range(prefill, stop):
        if progress is not None and (t - prefill) % PROGRESS_EVERY == 0:
            progress((t - prefill) / max(1, stop - prefill), f"decoding token {t - prefill + 1} of {stop - prefill}")
        logits = run_step(model, cache, ids[:, t:t + 1], plan)  # [B, 1, V]
        if t + 1 < T:
            parts.append(_nll(logits, ids[:, t + 1:t + 2]))
    seconds = time.perf_counter() - start
    return Streamed(torch.cat(parts, dim=1).cpu(), seconds, stop - prefill, cache)


def streaming_nll(model, input_ids: torch.Tensor | list[int], plan: CachePlan = FULL,
                  prefill: int = 1) -> torch.Tensor:
    """NLL (nats) of tokens 1..T-1 of one text, decoding one token per step through ``plan``: ``[T - 1]``.

    prefill: tokens fed in the first forward (>= 1, e.g. a prompt); see :func:`stream_text`.
    """
    return stream_text(model, as_ids(model, input_ids)[:1], plan, prefill).nll[0]


def perplexity(nll: torch.Tensor) -> float:
    """exp(mean NLL): the perplexity of the scored tokens."""
    return math.exp(float(nll.double().mean()))


def bits_per_byte(nll: torch.Tensor, text: str) -> float:
    """Total NLL in bits divided by the UTF-8 bytes of ``text`` (tokenizer-independent)."""
    return float(nll.double().sum()) / math.log(2) / len(text.encode("utf-8"))
