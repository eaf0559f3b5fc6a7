"""Per-token negative log-likelihood of a text: full context, or streamed token by token through a cache plan.

Streaming is how eviction and quantization are judged (StreamingLLM, Xiao et al. 2023, section 4;
KIVI, Liu et al. 2024): every token is predicted from the cache as the plan left it, so a plan that
drops or blurs the wrong entries shows up as higher NLL. With the full plan, streaming equals the
full-context NLL (up to float rounding): that equality is what makes the comparison fair.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvcore.models.policy import FULL, CachePlan, run_step


def as_ids(model, input_ids: torch.Tensor | list[int], min_tokens: int = 2) -> torch.Tensor:
    """``input_ids`` as ``[1, T]`` on the model's device; ValueError if under ``min_tokens`` or past its positions."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)  # [1, T]
    if ids.shape[1] < min_tokens:
        raise ValueError(f"need at least {min_tokens} tokens to score a text, got {ids.shape[1]}")
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit and ids.shape[1] > limit:
        raise ValueError(f"{ids.shape[1]} tokens exceed this model's {limit} positions; use a shorter text")
    return ids.to(next(model.parameters()).device)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[n, V]`` logits and ``[n]`` targets -> ``[n]`` NLL in nats (float32 log-softmax)."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


@torch.inference_mode()
def token_nll(model, input_ids: torch.Tensor | list[int], chunk_size: int = 512) -> torch.Tensor:
    """NLL (nats) of tokens 1..T-1 given all tokens before them: ``[T - 1]``.

    input_ids: ``[T]`` or ``[1, T]`` (include ``<bos>`` if the model expects one). chunk_size: tokens
    per forward; chunks share one cache, so every token still sees its whole prefix (exact).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ids = as_ids(model, input_ids)
    cache = FULL.new_cache(model)
    T, parts = ids.shape[1], []
    for start in range(0, T - 1, chunk_size):
        chunk = ids[:, start:min(start + chunk_size, T - 1)]  # [1, c]; the last token is only a target
        logits = run_step(model, cache, chunk)[0]  # [c, V]
        parts.append(_nll(logits, ids[0, start + 1:start + 1 + chunk.shape[1]]))
    return torch.cat(parts).cpu()


@torch.inference_mode()
def streaming_nll(model, input_ids: torch.Tensor | list[int], plan: CachePlan = FULL,
                  prefill: int = 1) -> torch.Tensor:
    """NLL (nats) of tokens 1..T-1, decoding one token per step through ``plan``: ``[T - 1]``.

    prefill: tokens fed in the first forward (>= 1, e.g. a prompt); the plan's hook runs after it and
    after every later single-token step, so it can evict or requantize before the next prediction.
    """
    ids = as_ids(model, input_ids)
    T = ids.shape[1]
    if not 1 <= prefill < T:
        raise ValueError(f"prefill must be in [1, {T - 1}] for a {T}-token text, got {prefill}")
    cache = plan.new_cache(model)
    logits = run_step(model, cache, ids[:, :prefill], plan)[0]  # [prefill, V]
    parts = [_nll(logits, ids[0, 1:prefill + 1])]
    for t in range(prefill, T - 1):
        logits = run_step(model, cache, ids[:, t:t + 1], plan)[0]  # [1, V]
        parts.append(_nll(logits, ids[0, t + 1:t + 2]))
    return torch.cat(parts).cpu()


def perplexity(nll: torch.Tensor) -> float:
    """exp(mean NLL): the perplexity of the scored tokens."""
    return math.exp(float(nll.double().mean()))


def bits_per_byte(nll: torch.Tensor, text: str) -> float:
    """Total NLL in bits divided by the UTF-8 bytes of ``text`` (tokenizer-independent)."""
    return float(nll.double().sum()) / math.log(2) / len(text.encode("utf-8"))
