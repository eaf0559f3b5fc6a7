"""Tiny decoder-only models trained from scratch that differ only in their number of KV heads.

Follows the comparison of GQA (Ainslie et al. 2023, section 4: MHA vs GQA-8 vs MQA at equal
training) at toy scale: the same Llama recipe (:mod:`kvcore.models.training`), the same seed, the same
batches in the same order, the same width and query heads; only ``num_key_value_heads`` changes
(MHA = all heads, GQA = a divisor, MQA = 1), which also removes a few K/V projection weights. Each
variant is measured for validation bits per byte, KV bytes per token (:func:`kvcore.shapes.kv_bytes`)
and batched decode speed with a KV cache (measured in interleaved rounds, so a busy machine's slow
moments spread over all variants; the speed depends on the shapes, not on the weight values).

Shipped results from a longer run live in ``kvcore/sharing/results/`` (see the README there); the
page shows them at once and can re-run a short version.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kvcore.models.corpus import build_corpus
from kvcore.models.loader import BUNDLED_DIR, bundled_documents, model_shape
from kvcore.models.training import ModelSpec, TrainSettings, text_bytes, token_stream, train
from kvcore.noise import WITHIN_NOISE, paired_means
from kvcore.shapes import kv_bytes
from kvcore.sharing.convert import window_nll

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CURVES_CSV = RESULTS_DIR / "kv_heads_curves.csv"
SUMMARY_CSV = RESULTS_DIR / "kv_heads_summary.csv"
DATA_SOURCES = ("bundled", "corpus")
ProgressCallback = Callable[[float, str], None]  # (fraction done 0..1, what is running)


def kind_of(kv_heads: int, heads: int) -> str:
    """'MHA', 'GQA' or 'MQA' for a model with ``heads`` query heads and ``kv_heads`` KV heads."""
    if kv_heads == heads:
        return "MHA"
    return "MQA" if kv_heads == 1 else "GQA"


def variant_name(kv_heads: int, heads: int) -> str:
    """Row label, e.g. ``'GQA-2 (2 KV heads)'``."""
    kind = kind_of(kv_heads, heads)
    return f"{kind} ({kv_heads} KV heads)" if kind != "GQA" else f"GQA-{kv_heads} ({kv_heads} KV heads)"


@dataclass(slots=True)
class VariantSettings:
    """Which variants to train and how (model size, steps, data), and how decode speed is measured.

    kv_heads: KV head counts to train, each a divisor of ``heads``. layers / hidden / heads / ffn: the
    shared model shape (head dim = hidden / heads). steps, batch, context (tokens, ``<bos>`` included),
    lr (peak), warmup (steps), eval_every (steps), eval_windows (validation windows per evaluation,
    None = all): the training run. data: ``"bundled"`` (the shipped training sample and validation text:
    fast, small) or ``"corpus"`` (the whole training split rebuilt by ``build_corpus(seed)``).
    decode_batch / decode_prompt / decode_tokens: sequences, prompt tokens (the cache each step reads) and
    timed generated tokens of the decode-speed measurement; decode_rounds: interleaved rounds over all
    variants (the median is kept). seed: init and data order.
    """

    kv_heads: tuple[int, ...] = (8, 4, 2, 1)
    layers: int = 4
    hidden: int = 256
    heads: int = 8
    ffn: int = 688
    steps: int = 400
    batch: int = 8
    context: int = 256
    lr: float = 2e-3
    warmup: int = 40
    eval_every: int = 100
    eval_windows: int | None = None
    data: str = "corpus"
    decode_batch: int = 16
    decode_prompt: int = 1024
    decode_tokens: int = 16
    decode_rounds: int = 9
    seed: int = 0
    specs: list[ModelSpec] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.kv_heads:
            raise ValueError("kv_heads must list at least one KV head count")
        if self.data not in DATA_SOURCES:
            raise ValueError(f"data must be one of {DATA_SOURCES}, got {self.data!r}")
        for name in ("decode_batch", "decode_prompt", "decode_tokens", "decode_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        max_positions = max(2048, self.context, self.decode_prompt + self.decode_tokens)
        self.specs = [ModelSpec(self.layers, self.hidden, self.heads, kv, self.ffn, max_positions)
                      for kv in dict.fromkeys(self.kv_heads)]  # validates shapes; duplicates dropped
        self.train_settings()  # validates the run

    def train_settings(self) -> TrainSettings:
        """The :class:`~kvcore.models.training.TrainSettings` every variant shares."""
        return TrainSettings(steps=self.steps, batch=self.batch, context=self.context, lr=self.lr,
                             warmup=self.warmup, eval_every=self.eval_every, eval_windows=self.eval_windows,
                             seed=self.seed)


def live_settings(steps: int = 30, seed: int = 0) -> VariantSettings:
    """A short version for the page and tests: 2 layers of width 128, 8 heads, context 128, the shipped text."""
    return VariantSettings(layers=2, hidden=128, heads=8, ffn=344, steps=steps, batch=8, context=128, lr=3e-3,
                           warmup=max(1, steps // 10), eval_every=max(1, steps // 3), eval_windows=16,
                           data="bundled", decode_batch=4, decode_prompt=128, decode_tokens=16, decode_rounds=5,
                           seed=seed)


@dataclass(slots=True)
class VariantResult:
    """Training curves (one row per variant and step) and a summary (one row per variant)."""

    curves: pd.DataFrame
    summary: pd.DataFrame


def bundled_tokenizer():
    """The bundled model's tokenizer (no weights loaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BUNDLED_DIR)


def data_streams(tokenizer, data: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(train_ids, val_ids, val_bytes)`` for ``data`` = ``"bundled"`` or ``"corpus"`` (see VariantSettings)."""
    if data == "bundled":
        train_docs, val_docs = bundled_documents("train"), bundled_documents("validation")
    elif data == "corpus":
        corpus = build_corpus(seed=seed)
        train_docs, val_docs = corpus.train, corpus.validation
    else:
        raise ValueError(f"data must be one of {DATA_SOURCES}, got {data!r}")
    return token_stream(tokenizer, train_docs), token_stream(tokenizer, val_docs), text_bytes(val_docs)


@torch.inference_mode()
def decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy decode speed with a KV cache: generated tokens per second over the whole batch.

    prompt: ``[B, T]`` token ids, prefilled first (not timed); then ``new_tokens`` single-token steps are timed.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    logits = model(input_ids=prompt, cache=cache, use_cache=True).logits  # [B, T, V]
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = logits[:, -1:].argmax(-1)  # [B, 1]
        logits = model(input_ids=nxt, cache=cache, use_cache=True).logits  # [B, 1, V]
    return prompt.shape[0] * new_tokens / (time.perf_counter() - t0)


def decode_samples(models: Sequence, prompt: torch.Tensor, new_tokens: int, rounds: int = 3) -> list[list[float]]:
    """Decode tokens/s of each model in each of ``rounds`` interleaved rounds (model 1, 2, ..., 1, 2, ...), so a
    busy moment of the machine slows every model alike: ``[models][rounds]``."""
    runs: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, model in enumerate(models):
            runs[i].append(decode_tokens_per_s(model, prompt, new_tokens))
    return runs


def decode_speeds(models: Sequence, prompt: torch.Tensor, new_tokens: int, rounds: int = 3) -> list[float]:
    """Median decode tokens/s of each model over ``rounds`` interleaved rounds (:func:`decode_samples`)."""
    return [statistics.median(r) for r in decode_samples(models, prompt, new_tokens, rounds)]


MIN_ROUNDS = 3  # fewer interleaved rounds and a spread says nothing: no speed is called faster


def decode_columns(samples: Sequence[Sequence[float]]) -> dict[str, list]:
    """Per model: the median decode tokens/s of its rounds, the interquartile range (``_q1``, ``_q3``) and the
    number of rounds."""
    quartiles = [np.percentile(np.asarray(r, dtype=np.float64), [50, 25, 75]) for r in samples]
    return {"decode_tokens_per_s": [float(q[0]) for q in quartiles],
            "decode_tokens_per_s_q1": [float(q[1]) for q in quartiles],
            "decode_tokens_per_s_q3": [float(q[2]) for q in quartiles],
            "decode_rounds": [len(r) for r in samples]}


def speed_versus(row: pd.Series, other: pd.Series) -> str:
    """"faster" or "slower" than ``other`` (rows of a summary) when their decode IQRs do not overlap over at least
    :data:`MIN_ROUNDS` rounds each, else "within noise"; "no spread measured" for a summary without quartiles."""
    if "decode_tokens_per_s_q1" not in row or pd.isna(row.get("decode_tokens_per_s_q1")):
        return "no spread measured"
    if min(row.decode_rounds, other.decode_rounds) < MIN_ROUNDS:
        return WITHIN_NOISE
    if row.decode_tokens_per_s_q1 > other.decode_tokens_per_s_q3:
        return "faster"
    if row.decode_tokens_per_s_q3 < other.decode_tokens_per_s_q1:
        return "slower"
    return WITHIN_NOISE


def quality_columns(nll: Sequence[torch.Tensor], base: int, tokens_per_byte: float, seed: int = 0
                    ) -> dict[str, list]:
    """Validation NLL, perplexity and bits per byte of each variant with the bits' interval, and its difference
    in bits per byte from variant ``base`` (MHA) with that interval; ``vs_mha``: "better" / "worse" beyond the
    noise, else "within noise". nll: per-token NLL ``[W, C]`` of each variant on the same validation windows
    (a paired block bootstrap, :func:`kvcore.noise.paired_means`)."""
    means, diffs = paired_means(nll, base=base, seed=seed)
    bits = [m.map(lambda v: v * tokens_per_byte / math.log(2)) for m in means]
    delta = [d.map(lambda v: v * tokens_per_byte / math.log(2)) for d in diffs]
    return {"val_nats_per_token": [m.estimate for m in means],
            "val_perplexity": [math.exp(m.estimate) for m in means],
            "val_bits_per_byte": [b.estimate for b in bits], "val_bits_per_byte_low": [b.low for b in bits],
            "val_bits_per_byte_high": [b.high for b in bits], "bpb_vs_mha": [d.estimate for d in delta],
            "bpb_vs_mha_low": [d.low for d in delta], "bpb_vs_mha_high": [d.high for d in delta],
            "vs_mha": ["baseline" if i == base else d.versus(0.0, below="better", above="worse")
                       for i, d in enumerate(delta)]}


def decode_prompt(settings: VariantSettings, val_ids: torch.Tensor) -> torch.Tensor:
    """The first ``decode_batch x decode_prompt`` validation tokens as a ``[B, T]`` prompt."""
    need = settings.decode_batch * settings.decode_prompt
    if len(val_ids) < need:
        raise ValueError(f"the validation text ({len(val_ids)} tokens) is shorter than decode_batch x "
                         f"decode_prompt = {need} tokens")
    return val_ids[:need].view(settings.decode_batch, settings.decode_prompt)  # [B, T]


def _summary_row(model, spec: ModelSpec, rows: list[dict], settings: VariantSettings) -> dict:
    last, shape = rows[-1], model_shape(model)
    per_token = kv_bytes(shape, 1, bits=16)
    mha_bytes = kv_bytes(shape.with_kv_heads(shape.num_q_heads), 1, bits=16)
    return {
        "variant": variant_name(spec.kv_heads, spec.heads), "attention": kind_of(spec.kv_heads, spec.heads),
        "kv_heads": spec.kv_heads, "q_heads": spec.heads, "params": sum(p.numel() for p in model.parameters()),
        "steps": settings.steps, "tokens_seen": last["tokens_seen"], "train_s": last["elapsed_s"],
        "final_train_loss_ema": last["train_loss_ema"], "kv_bytes_per_token_16bit": per_token,
        "kv_vs_mha": per_token / mha_bytes,
        "decode_batch": settings.decode_batch, "decode_context": settings.decode_prompt,
    }


def train_variants(settings: VariantSettings, tokenizer=None, progress: ProgressCallback | None = None,
                   streams: Sequence | None = None) -> VariantResult:
    """Train every variant of ``settings`` from the same seed on the same batches; measure and tabulate them.

    tokenizer: default the bundled one. streams: ``(train_ids, val_ids, val_bytes)`` to reuse (default:
    built from ``settings.data``). progress: called with the fraction of all steps done and a label.
    Decode speed is measured after all variants are trained (:func:`decode_speeds`).
    """
    tokenizer = tokenizer or bundled_tokenizer()
    train_ids, val_ids, val_bytes = streams or data_streams(tokenizer, settings.data, settings.seed)
    prompt = decode_prompt(settings, val_ids)
    run = settings.train_settings()
    total = run.steps * len(settings.specs)
    curves, summary, models = [], [], []
    for i, spec in enumerate(settings.specs):
        name = variant_name(spec.kv_heads, spec.heads)

        def on_step(done: int, steps: int, loss: float, i: int = i, name: str = name) -> None:
            if progress is not None:
                progress((i * steps + done) / total, f"{name}: step {done}/{steps}, loss {loss:.3f}")

        torch.manual_seed(settings.seed)  # same init stream for every variant
        model = spec.build(tokenizer)
        rows = train(model, train_ids, val_ids, val_bytes, tokenizer.bos_token_id, run, on_step)
        curves += [{"variant": name, "kv_heads": spec.kv_heads, **row} for row in rows]
        summary.append(_summary_row(model, spec, rows, settings))
        models.append(model)
    if progress is not None:
        progress(1.0, "measuring decode speed")
    context = settings.context
    nll = [window_nll(m, val_ids, context, tokenizer.bos_token_id, settings.eval_windows) for m in models]
    base = next((i for i, spec in enumerate(settings.specs) if spec.kv_heads == spec.heads), 0)
    quality = quality_columns(nll, base, len(val_ids) / val_bytes, settings.seed)
    speeds = decode_columns(decode_samples(models, prompt, settings.decode_tokens, settings.decode_rounds))
    table = pd.DataFrame(summary).assign(**quality, **speeds)
    return VariantResult(pd.DataFrame(curves), table)


def remeasure_decode(settings: VariantSettings, summary: pd.DataFrame, tokenizer=None) -> pd.DataFrame:
    """``summary`` with its decode columns measured again on freshly initialized models of the same shapes.

    Decode speed depends on the shapes, not on the weight values, so no training is needed. Rows are
    matched on ``kv_heads``; every row of ``summary`` must have a spec in ``settings``.
    """
    tokenizer = tokenizer or bundled_tokenizer()
    _, val_ids, _ = data_streams(tokenizer, "bundled")
    specs = {s.kv_heads: s for s in settings.specs}
    missing = sorted(set(summary["kv_heads"]) - set(specs))
    if missing:
        raise ValueError(f"no model spec for KV heads {missing}; pass --kv-heads with every shipped variant")
    torch.manual_seed(settings.seed)
    models = [specs[kv].build(tokenizer).eval() for kv in summary["kv_heads"]]
    samples = decode_samples(models, decode_prompt(settings, val_ids), settings.decode_tokens, settings.decode_rounds)
    return summary.assign(decode_batch=settings.decode_batch, decode_context=settings.decode_prompt,
                          **decode_columns(samples))


def shipped_results(folder: Path = RESULTS_DIR) -> VariantResult | None:
    """The results shipped with the lab (``kv_heads_curves.csv``, ``kv_heads_summary.csv``), or None if absent."""
    curves, summary = folder / CURVES_CSV.name, folder / SUMMARY_CSV.name
    if not (curves.is_file() and summary.is_file()):
        return None
    return VariantResult(pd.read_csv(curves), pd.read_csv(summary))
