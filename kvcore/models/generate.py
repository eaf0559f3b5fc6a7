"""Token-by-token generation as a Python generator, timed, with the KV bytes after every step.

Each yielded :class:`TokenEvent` carries the token, its log-probability under the model, the time of
the step that produced it (the first token comes from the prefill, the rest from one-token decode
steps, the split every serving system reports as TTFT vs TPOT) and the cache size after the step.
Generation runs through a :class:`~kvcore.models.plan.CachePlan`, so an eviction or quantization plan
changes what the model sees exactly as it would in :func:`~kvcore.models.perplexity.streaming_nll`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from kvcore.device import torch_threads
from kvcore.models.cache import LabCache
from kvcore.models.perplexity import streaming_nll
from kvcore.models.plan import FULL, CachePlan, run_step
from kvcore.models.runtime import encode_prompt, model_device
from kvcore.noise import Timing

Observer = Callable[[int, LabCache], None]


@dataclass(slots=True)
class GenerationSettings:
    """How to pick tokens.

    max_new_tokens: tokens to generate (1-2048). temperature: 0 = greedy (argmax), else sampling
    from softmax(logits / temperature). top_k: sample among the k most likely tokens (0 = all).
    seed: sampling seed. stop_at_eos: stop after the model emits its end-of-sequence token.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 2048:
            raise ValueError(f"max_new_tokens must be in 1..2048, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError(f"temperature must be in [0, 5] (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")


@dataclass(slots=True)
class TokenEvent:
    """One generated token. ms: wall time of the step that produced it (prefill for step 0), in milliseconds.

    kv_tokens / kv_bytes: entries (layer 0) and bytes the cache holds after the step.
    position: the token's position in the full sequence (prompt included).
    """

    step: int
    token_id: int
    text: str
    logprob: float
    ms: float
    phase: str
    kv_tokens: int
    kv_bytes: int
    position: int


def _pick(logits: torch.Tensor, settings: GenerationSettings, gen: torch.Generator) -> int:
    if settings.temperature == 0.0:
        return int(logits.argmax())
    scaled = logits / settings.temperature  # [V]
    if settings.top_k:
        kth = scaled.topk(min(settings.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return int(torch.multinomial(scaled.softmax(-1), 1, generator=gen))


@torch.inference_mode()
def generate_stream(model, tokenizer, prompt: str | torch.Tensor, settings: GenerationSettings | None = None,
                    plan: CachePlan = FULL, observe: Observer | None = None) -> Iterator[TokenEvent]:
    """Yield one :class:`TokenEvent` per generated token (greedy or sampled), through ``plan``'s cache.

    prompt: text (encoded with the tokenizer's special tokens) or ids ``[T]`` / ``[1, T]``. tokenizer: None
    generates ids only (prompt ids, empty text pieces, no end-of-sequence stop). observe: called as
    ``observe(step, cache)`` before each step's forward, outside its timing (the cache as the step reads it).
    """
    settings = settings or GenerationSettings()
    ids = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else torch.as_tensor(prompt).reshape(1, -1)
    device = model_device(model)
    ids = ids.to(device)
    gen = torch.Generator().manual_seed(settings.seed)
    cache = plan.new_cache(model)
    generated: list[int] = []
    text_so_far, step_input = "", ids
    for step in range(settings.max_new_tokens):
        if observe is not None:
            observe(step, cache)
        t0 = time.perf_counter()
        logits = run_step(model, cache, step_input, plan)[0, -1].float().cpu()  # [V]
        token = _pick(logits, settings, gen)
        ms = (time.perf_counter() - t0) * 1e3
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True) if tokenizer is not None else ""
        piece = "" if text.endswith("\ufffd") else text[len(text_so_far):]  # hold back a partial UTF-8 character
        text_so_far = text_so_far if text.endswith("\ufffd") else text
        yield TokenEvent(step, token, piece, float(logits.log_softmax(-1)[token]), ms,
                         "prefill" if step == 0 else "decode", cache.num_tokens(0), cache.nbytes,
                         ids.shape[1] + step)
        if settings.stop_at_eos and tokenizer is not None and token == tokenizer.eos_token_id:
            break
        step_input = torch.tensor([[token]], device=device)


def events_table(events: Sequence[TokenEvent], tokenizer=None) -> pd.DataFrame:
    """The per-token table (the page's table, the CLI's output and CSV): one row per event.

    With ``tokenizer``, adds ``token`` (the vocabulary entry, readable even for partial UTF-8 pieces).
    """
    df = pd.DataFrame([asdict(e) for e in events])
    if df.empty:
        return pd.DataFrame(columns=["step", "token_id", "text", "logprob", "ms", "phase", "kv_tokens", "kv_bytes",
                                     "position"])
    if tokenizer is not None:
        df.insert(2, "token", tokenizer.convert_ids_to_tokens(df["token_id"].tolist()))
    return df


def generate_table(model, tokenizer, prompt: str | torch.Tensor, settings: GenerationSettings | None = None,
                   plan: CachePlan = FULL) -> pd.DataFrame:
    """Run :func:`generate_stream` to the end and return :func:`events_table`."""
    return events_table(list(generate_stream(model, tokenizer, prompt, settings, plan)), tokenizer)


def compare_to_full(model, tokenizer, prompt: str, settings: GenerationSettings, plan: CachePlan,
                    full: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per generated token: the full-cache continuation's log-prob, and the same token's log-prob under ``plan``.

    Teacher-forced (the plan reads the full cache's tokens), so the two columns score the same text
    even after the plan's own free-running text has diverged. full: the full-cache
    :func:`generate_table` of the same prompt and settings, if already computed.
    """
    full = generate_table(model, tokenizer, prompt, settings, FULL) if full is None else full
    prompt_ids = encode_prompt(tokenizer, prompt)[0]
    ids = torch.cat([prompt_ids, torch.tensor(full["token_id"].tolist())])
    if len(full) < 2 and len(prompt_ids) < 2:
        raise ValueError("generate at least 2 tokens (or use a longer prompt) to compare log-probs")
    nll = streaming_nll(model, ids[:len(prompt_ids) + len(full)], plan, prefill=len(prompt_ids))
    plan_lp = (-nll[len(prompt_ids) - 1:]).tolist()
    return pd.DataFrame({"step": full["step"], "token": full["token"], "text": full["text"],
                         "logprob_full": full["logprob"], f"logprob_{plan.name}": plan_lp,
                         "delta": [p - f for p, f in zip(plan_lp, full["logprob"], strict=True)]})


@dataclass(slots=True)
class PhaseTiming:
    """Prefill and decode timed in interleaved rounds: each round times one prefill of the prompt, then the
    first generated tokens fed one per step (what serving systems report as TTFT and TPOT).

    prefill, decode: :class:`~kvcore.noise.Timing` (ms) of the rounds' prefills and of every timed decode step
    (decode is None when nothing was generated). ratios: per round, its prefill over the median of its own decode
    steps (the two measured under the same load, seconds apart).
    """

    prefill: Timing
    decode: Timing | None
    ratios: np.ndarray

    def phases(self) -> dict[str, Timing]:
        """``{"prefill": ..., "decode": ...}``, the decode entry only when there is one."""
        return {"prefill": self.prefill} | ({"decode": self.decode} if self.decode is not None else {})

    def ratio(self) -> tuple[float, float, float] | None:
        """Median and interquartile range of the per-round prefill / decode-step ratio (None without decode)."""
        if not len(self.ratios):
            return None
        q1, median, q3 = np.percentile(self.ratios, [25, 50, 75])
        return float(median), float(q1), float(q3)

    def within_noise(self) -> bool:
        """True when the rounds disagree more than prefill and a decode step differ: the ratios' interquartile
        range is wider than the ratio's distance from 1 (then no ratio is worth stating)."""
        ratio = self.ratio()
        return ratio is None or ratio[2] - ratio[1] >= abs(ratio[0] - 1.0)


@torch.inference_mode()
def time_generation(model, ids: Sequence[int] | torch.Tensor, prompt_len: int, plan: CachePlan = FULL,
                    repeats: int = 5, warmup: int = 1, decode_steps: int = 16,
                    threads: int | None = 1, progress: Callable[[float, str], None] | None = None,
                    turn: Callable[[], AbstractContextManager] = nullcontext) -> PhaseTiming:
    """Prefill and decode time of a generation in interleaved rounds, warmed up and repeated (ms).

    ids: prompt + generated token ids; prompt_len: how many are prompt. Each of ``warmup`` untimed then
    ``repeats`` timed rounds builds a fresh ``plan`` cache, times one forward of the prompt, then times the
    first ``decode_steps`` generated tokens fed one per step (the same work as generating them; each step one
    sample). Interleaving puts a prefill and its decode steps under the same load, so a burst of other work
    stretches both rather than one (:class:`PhaseTiming`). threads: torch threads while timing (None: as set);
    one by default, as the eviction sweep times its steps: a one-token step of a small model gains nothing from
    more, and on a shared CPU they contend with whatever else runs. progress: called ``(fraction, label)`` as each
    round starts. turn: entered around each round (a shared model's lock, taken per round so that its other users
    go between the rounds).
    """
    tokens = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids).reshape(1, -1)
    tokens = tokens.to(model_device(model))
    if not 1 <= prompt_len <= tokens.shape[1]:
        raise ValueError(f"prompt_len must be in 1..{tokens.shape[1]}, got {prompt_len}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    sync = torch.cuda.synchronize if tokens.is_cuda else (lambda: None)
    stop = min(tokens.shape[1], prompt_len + decode_steps)
    prefills: list[float] = []
    rounds: list[list[float]] = []
    for round_ in range(warmup + repeats):
        if progress is not None:
            progress(round_ / (warmup + repeats), f"round {round_ + 1} of {warmup + repeats} (a prefill, then "
                                                  f"{stop - prompt_len} decode steps)")
        with turn(), torch_threads(threads):  # threads per round: another user may set them between rounds
            steps = _round(model, plan, tokens, prompt_len, stop, sync)
        if round_ >= warmup:
            prefills.append(steps[0])
            rounds.append(steps[1:])
    decode = [ms for r in rounds for ms in r]
    ratios = np.array([p / float(np.median(r)) for p, r in zip(prefills, rounds, strict=True) if r])
    return PhaseTiming(Timing.of(prefills, warmup), Timing.of(decode, warmup) if decode else None, ratios)


def _round(model, plan: CachePlan, tokens: torch.Tensor, prompt_len: int, stop: int,
           sync: Callable[[], None]) -> list[float]:
    """One round into a fresh cache: ms of the prompt's forward, then of each one-token step up to ``stop``."""
    cache = plan.new_cache(model)
    times = []
    for a, b in [(0, prompt_len), *((t, t + 1) for t in range(prompt_len, stop))]:
        sync()
        start = time.perf_counter()
        run_step(model, cache, tokens[:, a:b], plan)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times
