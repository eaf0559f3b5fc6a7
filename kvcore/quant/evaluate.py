"""Measure every KV quantization method on a real model's cache: bytes, reconstruction, attention, perplexity.

For one text: exact bytes vs fp16; per layer, K and V reconstruction error (MSE, relative L2) and the
relative error of attention outputs when the model's real queries attend over dequantized instead of
original K/V; perplexity of teacher-forced decoding through the quantized cache (every scored token
reads its past from the cache, as in generation); decode speed. ``python -m kvcore quant`` runs it.

Every perplexity carries its noise (:mod:`kvcore.noise`): a paired block bootstrap over the scored
tokens, cut into blocks of :data:`~kvcore.noise.BLOCK_TOKENS` consecutive tokens of one window, every
method resampled on the same blocks. A method's ratio to fp16 gets an interval; its ``vs_fp16`` says
"worse" or "better" only when that interval excludes 1, and "within noise" otherwise. The Pareto front
counts a perplexity difference only when it is outside the noise.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from kvcore.device import torch_threads
from kvcore.models.generate import GenerationSettings, generate_stream
from kvcore.models.loader import bundled_text
from kvcore.models.perplexity import PROGRESS_EVERY, Progress, Streamed, stream_text
from kvcore.models.plan import FULL, run_step
from kvcore.models.runtime import token_windows
from kvcore.noise import BLOCK_TOKENS, LEVEL, MIN_UNITS, WITHIN_NOISE, block_sums, bootstrap_ratios, load_average
from kvcore.quant.hf_cache import fp16_nbytes_per_row, nbytes_per_row, quantized_plan, seconds_per_row
from kvcore.quant.methods import METHODS, QuantMethod
from kvcore.quant.model_kv import CapturedKV, capture_qkv
from kvcore.quant.premise import OUTLIER_RATIO, channel_outliers, kivi_premise
from kvcore.quant.stream import QuantizedKV

# Tokens (windows x length) the page decodes through every method's cache at once. benchmarks/memory.py
# on a 2-core CPU, all methods: 384 tokens took 14 s and 1.0 GB peak, 1024 tokens 33 s and 1.5 GB.
# The CLI has no such limit.
PAGE_TOKEN_LIMIT = 512
# The page's default text: 2 windows of 256 tokens, the second half of each scored (256 scored tokens, 16
# bootstrap blocks). Measured over 6 window groups of the bundled validation text: at 64 scored tokens
# (1 x 128) int2-token's ratio to fp16 ran from 0.978 to 1.228 and kivi-2 showed -2% "gains"; at 256
# scored tokens int2-token stayed above fp16 in every group (1.035-1.121) and int4/kivi-2 within a few
# percent of 1, which their intervals call within noise. Over 6 groups of 2 windows, the groups' 95%
# intervals held the 12-window estimate in 91% of (method, group) cases.
PAGE_TOKENS, PAGE_WINDOWS = 256, 2
# SmolLM2-135M (23x the bundled model's parameters, 30 layers to quantize instead of 6) decodes every method at
# 2 x 256 tokens in about two minutes on 2 shared cores (118 s at load 2.5) and at 1 x 256 in about half that:
# its page opens on one window (128 scored tokens, 8 bootstrap blocks, the fewest that rank anything), where
# int2-token (51x fp16) and int2-channel (2.7x) stay far apart and int4-token's +15% [+6%, +25%] stays worse.
PAGE_WINDOWS_BY_MODEL = {"smollm2-135m": 1}


def page_windows(model: str, tokens: int = PAGE_TOKENS) -> int:
    """Text windows the Quantization page opens on for ``model`` (a :func:`~kvcore.models.loader.model_name`) at
    ``tokens`` tokens per window: the model's own number, fewer where they would pass :data:`PAGE_TOKEN_LIMIT`."""
    return min(PAGE_WINDOWS_BY_MODEL.get(model, PAGE_WINDOWS), max(1, PAGE_TOKEN_LIMIT // tokens))


def text_windows(tokenizer, num_tokens: int, seed: int = 0, windows: int = 1, text: str | None = None) -> torch.Tensor:
    """``windows`` consecutive windows of ``num_tokens`` token ids of ``text``, ``<bos>`` first: ``[W, T]``.

    text: default the bundled model's validation split. seed: which group of windows (group ``seed``
    of consecutive ones, wrapping around), so the same seed always reads the same tokens.
    """
    if num_tokens < 2 or windows < 1:
        raise ValueError(f"need num_tokens >= 2 and windows >= 1, got {num_tokens} and {windows}")
    body = tokenizer(bundled_text("validation") if text is None else text, add_special_tokens=False)["input_ids"]
    need = (num_tokens - (tokenizer.bos_token_id is not None)) * windows
    start = (seed * need) % max(1, len(body) - need + 1)
    return token_windows(body, num_tokens, windows, tokenizer.bos_token_id, start)


@dataclass(slots=True, frozen=True)
class QuantText:
    """The text a quantization run reads: ``windows`` windows of ``tokens`` tokens, group ``seed`` (a cache key)."""

    tokens: int = PAGE_TOKENS
    seed: int = 0
    windows: int = PAGE_WINDOWS

    def ids(self, tokenizer) -> torch.Tensor:
        """The windows' token ids ``[W, T]`` (:func:`text_windows` of the bundled validation text)."""
        return text_windows(tokenizer, self.tokens, self.seed, self.windows)


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    return float(err.norm() / ref.norm().clamp_min(1e-30))


def reconstruct(captured: CapturedKV, method: QuantMethod, layer: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Store one layer's whole K/V with ``method`` (the state after prefilling the text) and read it back:
    (keys, values, exact bytes)."""
    store = QuantizedKV(method)
    store.append(captured.keys[layer], captured.values[layer])
    return store.keys(), store.values(), store.nbytes


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of queries ``[B, Hq, T, D]`` over ``[B, Hkv, T, D]`` (GQA by head groups)."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                            enable_gqa=q.shape[1] != k.shape[1])


def layer_errors(captured: CapturedKV, method: QuantMethod) -> pd.DataFrame:
    """Per layer: bytes, K/V MSE and relative L2 error, and relative error of the attention output."""
    rows = []
    for layer in range(captured.num_layers):
        q, k, v = captured.queries[layer], captured.keys[layer], captured.values[layer]
        k_hat, v_hat, nbytes = reconstruct(captured, method, layer)
        out, out_hat = attention(q, k, v, captured.scaling), attention(q, k_hat, v_hat, captured.scaling)
        rows.append({
            "method": method.name, "layer": layer, "bytes": nbytes, "fp16_bytes": 2 * (k.numel() + v.numel()),
            "k_mse": float((k_hat - k).pow(2).mean()), "k_rel_err": _rel(k_hat - k, k),
            "v_mse": float((v_hat - v).pow(2).mean()), "v_rel_err": _rel(v_hat - v, v),
            "attn_rel_err": _rel(out_hat - out, out),
        })
    return pd.DataFrame(rows)


@torch.inference_mode()
def stream_methods(model, windows: torch.Tensor, methods: list[QuantMethod], prompt_tokens: int,
                   progress: Progress | None = None, lock: AbstractContextManager | None = None) -> Streamed:
    """Every (window, method) pair streamed in one batch, row ``r`` = window ``r // M`` through method ``r % M``:
    what ``stream_text(model, windows.repeat_interleave(M, 0), quantized_plan(...), prompt_tokens,
    feed_last=True)`` measures, with each window's prompt fed once instead of once per method.

    A prefill attends to its own tokens exactly whatever the cache stores (:class:`QuantizedKVLayer`, as KIVI and
    transformers' quantized cache), so its keys, values and logits are the same for every method: they are
    computed once per window in full precision and appended to every method's store, then each later token is
    decoded through each row's own store. windows: ``[W, T]``; returns the batch's :class:`Streamed`. lock: held
    around each forward pass, not the whole run (a shared model's lock: its other users run between the steps).
    """
    lock = lock or nullcontext()
    W, T = windows.shape
    M = len(methods)
    if not 1 <= prompt_tokens < T:
        raise ValueError(f"prompt_tokens must be in [1, {T - 1}] for {T}-token windows, got {prompt_tokens}")
    prompt = FULL.new_cache(model)
    with lock:
        logits = run_step(model, prompt, windows[:, :prompt_tokens])  # [W, P, V]
    plan = quantized_plan([m for _ in range(W) for m in methods])
    cache = plan.new_cache(model)
    for i, layer in enumerate(prompt.layers):  # [W, Hkv, P, D] -> [W * M, Hkv, P, D]
        cache.update(layer.keys.repeat_interleave(M, dim=0), layer.values.repeat_interleave(M, dim=0), i)
    ids = windows.repeat_interleave(M, dim=0)  # [W * M, T]
    parts = [_nll(logits, windows[:, 1:prompt_tokens + 1]).repeat_interleave(M, dim=0)]  # [W * M, P]
    start, waited = time.perf_counter(), 0.0  # waited: for the lock, not decoding (not in the decode time)
    for t in range(prompt_tokens, T):  # the last token is fed too, so the cache ends holding each whole window
        if progress is not None and (t - prompt_tokens) % PROGRESS_EVERY == 0:
            progress((t - prompt_tokens) / (T - prompt_tokens),
                     f"decoding token {t - prompt_tokens + 1} of {T - prompt_tokens}")
        asked = time.perf_counter()
        with lock:
            waited += time.perf_counter() - asked
            step = run_step(model, cache, ids[:, t:t + 1], plan)  # [W * M, 1, V]
        if t + 1 < T:
            parts.append(_nll(step, ids[:, t + 1:t + 2]))
    return Streamed(torch.cat(parts, dim=1).cpu(), time.perf_counter() - start - waited, T - prompt_tokens, cache)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B, n, V]`` logits, ``[B, n]`` targets -> ``[B, n]`` NLL in nats (float32 log-softmax, as streaming does)."""
    return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def _decode_rows(model, windows: torch.Tensor, methods: list[QuantMethod], prompt_tokens: int,
                 batched: bool, progress: Progress | None = None, lock: AbstractContextManager | None = None
                 ) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Perplexity, bytes held and speed of each method decoding every window (one batched run, or one run
    per method with one row per window), and each method's scored NLL ``[W, T - prompt_tokens]``. The
    cache ends holding each whole window. progress: ``(fraction, label)`` as the decode goes. lock: held around
    each forward pass (batched) or each method's run."""
    W, M = windows.shape[0], len(methods)
    report = progress or (lambda fraction, label: None)
    if batched:  # row r decodes window r // M with method r % M
        what = f"{M} methods x {W} windows in one batch"
        run = stream_methods(model, windows, methods, prompt_tokens,
                             progress=lambda fraction, label: report(fraction, f"{label}, {what}"), lock=lock)
        parts = [(run, methods[i], list(range(i, W * M, M))) for i in range(M)]
    else:
        parts = []
        for i, method in enumerate(methods):
            with lock or nullcontext():
                run = stream_text(model, windows, quantized_plan([method] * W), prompt_tokens, feed_last=True,
                                  progress=_share(report, i, M, method.name))
            parts.append((run, method, list(range(W))))
    runs = {id(run): run for run, _, _ in parts}  # batched: one run shared by every method
    held = {key: (nbytes_per_row(run.cache), fp16_nbytes_per_row(run.cache)) for key, run in runs.items()}
    rows = [_method_row(run, method, prompt_tokens, r, held[id(run)]) for run, method, r in parts]
    return rows, {method.name: run.nll[r, prompt_tokens - 1:] for run, method, r in parts}


def _share(progress: Progress, i: int, n: int, name: str) -> Progress:
    """Progress of part ``i`` of ``n`` as a share of the whole."""
    return lambda fraction, label: progress((i + fraction) / n, f"{name}: {label}")


def _method_row(run: Streamed, method: QuantMethod, prompt_tokens: int, rows: list[int],
                held: tuple[list[int], list[int]]) -> dict:
    """One method's row of a decode run over batch ``rows`` (its windows); held: the run's bytes per row and their
    fp16 size (:func:`~kvcore.quant.hf_cache.nbytes_per_row`, counted once per run).

    Scored tokens are those predicted by reading the cache: from the last prompt token on. tokens_per_s:
    its tokens over the model's step time, shared pro rata between rows, plus its own measured cache time
    (exactly the wall time when the run decoded this method alone).
    """
    seconds = seconds_per_row(run.cache)
    model_seconds = max(run.decode_seconds - sum(seconds), 0.0) * len(rows) / len(seconds)
    cache_seconds = sum(seconds[r] for r in rows)
    wall = model_seconds + cache_seconds
    first = run.cache.layers[0].stores[rows[0]]
    return {
        "method": method.name,
        "perplexity": float(torch.exp(run.nll[rows, prompt_tokens - 1:].double().mean())),
        "cache_bytes": held[0][rows[0]], "cache_fp16_bytes": held[1][rows[0]],
        "tokens_per_s": len(rows) * run.decode_steps / wall if wall > 0 else float("nan"),
        "cache_ms_per_token": 1e3 * cache_seconds / (len(rows) * run.decode_steps),
        "k_fp16_tokens": first.k.num_sink + first.k.num_recent,
        "v_fp16_tokens": first.v.num_sink + first.v.num_recent,
    }


@dataclass(slots=True)
class QuantEval:
    """What :func:`evaluate` measured.

    summary: one row per method (bytes_ratio, mean K/V/attention errors over layers, perplexity and its
    interval, ppl_vs_fp16 and its interval, vs_fp16, the noise-aware Pareto flag, tokens_per_s...).
    by_layer: one row per method and layer. num_tokens/prompt_tokens: each window's length and how much of
    it was prefilled before scoring; windows: how many. nll: each method's scored NLL ``[W, T - prompt]``
    (nats), what the intervals resample. measured_at / load_1min: when the decode ran (Unix seconds) and the
    1-minute load average then: what the speed columns (tokens_per_s, cache_ms_per_token) describe. channels:
    each layer's key and value channel magnitudes (:func:`~kvcore.quant.premise.channel_outliers`).
    """

    summary: pd.DataFrame
    by_layer: pd.DataFrame
    num_tokens: int
    prompt_tokens: int
    windows: int = 1
    nll: dict[str, torch.Tensor] | None = None
    measured_at: float = float("nan")
    load_1min: float = float("nan")
    channels: pd.DataFrame | None = None

    def premise(self, ratio: float = OUTLIER_RATIO) -> pd.DataFrame:
        """KIVI's premise as measured here (:func:`~kvcore.quant.premise.kivi_premise`): outlier channels in keys,
        not values, and per-channel keys beating per-token ones at each bit width both ran at."""
        if self.channels is None:
            raise ValueError("this result has no channel magnitudes (measure it with evaluate)")
        return kivi_premise(self.channels, self.summary, self.by_layer, ratio)

    @property
    def scored_tokens(self) -> int:
        """Tokens scored per method (all windows)."""
        return self.windows * (self.num_tokens - self.prompt_tokens)


SUMMARY_COLUMNS = ("method", "family", "bytes_ratio", "bytes", "fp16_bytes", "k_rel_err", "v_rel_err",
                   "attn_rel_err", "perplexity", "perplexity_low", "perplexity_high", "ppl_vs_fp16",
                   "ppl_vs_fp16_low", "ppl_vs_fp16_high", "vs_fp16", "pareto", "scored_tokens", "tokens_per_s",
                   "cache_ms_per_token", "k_mse", "v_mse", "k_fp16_tokens", "v_fp16_tokens")
NOISE_COLUMNS = ("perplexity_low", "perplexity_high", "ppl_vs_fp16_low", "ppl_vs_fp16_high", "vs_fp16", "pareto",
                 "scored_tokens")


def pareto_front(df: pd.DataFrame, x: str = "bytes_ratio", y: str = "perplexity") -> pd.Series:
    """True for rows no other row beats: none has both ``x`` <= and ``y`` <= with one strictly lower."""
    xs, ys = df[x].to_numpy(), df[y].to_numpy()
    beaten = [bool(((xs <= a) & (ys <= b) & ((xs < a) | (ys < b))).any()) for a, b in zip(xs, ys, strict=True)]
    return pd.Series([not b for b in beaten], index=df.index, name="pareto")


def noisy_pareto_front(sizes: np.ndarray, samples: np.ndarray, level: float = LEVEL, trusted: bool = True
                       ) -> np.ndarray:
    """The Pareto front when perplexity differences inside the noise count as ties.

    sizes: ``[M]`` bytes (lower is better). samples: ``[R, M]`` bootstrap samples of each method's mean
    NLL, resampled alike (paired). Method i beats j when it is no larger and its NLL is lower beyond the
    noise, or when it is smaller and its NLL is not higher beyond the noise. trusted: False when too few
    units back the samples to rank anything: no method is marked. ``[M]`` bool: beaten by none.
    """
    if not trusted:
        return np.zeros(len(sizes), dtype=bool)
    d = samples[:, :, None] - samples[:, None, :]  # [R, M, M]: NLL of i minus NLL of j
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(d, tail, axis=0), np.percentile(d, 100 - tail, axis=0)  # [M, M]
    smaller, no_larger = sizes[:, None] < sizes[None, :], sizes[:, None] <= sizes[None, :]
    beats = (no_larger & (high < 0)) | (smaller & (low <= 0))  # [M, M]: i beats j
    np.fill_diagonal(beats, False)
    return ~beats.any(axis=0)


def noise_columns(nll: Mapping[str, torch.Tensor], sizes: Mapping[str, float], base: str = "fp16",
                  block: int = BLOCK_TOKENS, level: float = LEVEL, seed: int = 0) -> pd.DataFrame:
    """Per method: perplexity interval, ratio to ``base`` with its interval, vs_fp16 and the noise-aware front
    (over ``base`` and the methods that differ from it beyond the noise: one within noise is never on it).

    nll: method -> scored NLL ``[W, n]`` on the same tokens. sizes: method -> bytes ratio. Blocks of
    ``block`` consecutive scored tokens of one window are the bootstrap units, resampled alike for every
    method (a paired block bootstrap, :mod:`kvcore.noise`).
    """
    names = list(nll)
    units = [block_sums(nll[n], block) for n in names]
    counts = units[0][1]
    sums = np.stack([u[0] for u in units], axis=1)  # [units, M]
    samples = bootstrap_ratios(sums, counts, seed=seed)  # [R, M] mean NLL per resample
    tail = (1 - level) / 2 * 100
    mean = sums.sum(axis=0) / counts.sum()  # [M]
    low, high = (np.exp(np.percentile(samples, q, axis=0)) for q in (tail, 100 - tail))
    out = pd.DataFrame({"method": names, "perplexity_low": np.minimum(low, np.exp(mean)),
                        "perplexity_high": np.maximum(high, np.exp(mean))})
    if base in nll:
        b = names.index(base)
        ratio = np.exp(samples - samples[:, [b]])  # [R, M]
        point = np.exp(mean - mean[b])
        r_low, r_high = np.percentile(ratio, tail, axis=0), np.percentile(ratio, 100 - tail, axis=0)
        out["ppl_vs_fp16_low"], out["ppl_vs_fp16_high"] = np.minimum(r_low, point), np.maximum(r_high, point)
        trusted = len(counts) >= MIN_UNITS
        out["vs_fp16"] = [vs_fp16(n == base, lo, hi, trusted) for n, lo, hi in zip(names, out["ppl_vs_fp16_low"],
                                                                                  out["ppl_vs_fp16_high"], strict=True)]
    else:
        out["ppl_vs_fp16_low"] = out["ppl_vs_fp16_high"] = float("nan")
        out["vs_fp16"] = "no fp16 run"
    # a method within noise of fp16 is neither on the front nor beats another onto or off it
    ranked = (out["vs_fp16"] != WITHIN_NOISE).to_numpy()
    out["pareto"] = False
    out.loc[ranked, "pareto"] = noisy_pareto_front(np.array([sizes[n] for n in names])[ranked], samples[:, ranked],
                                                   level, trusted=len(counts) >= MIN_UNITS)
    out["scored_tokens"] = int(counts.sum())
    return out


def vs_fp16(is_base: bool, low: float, high: float, trusted: bool = True) -> str:
    """"worse" / "better" when the ratio's interval [low, high] excludes 1, "within noise" otherwise (and
    always when ``trusted`` is False: fewer than :data:`~kvcore.noise.MIN_UNITS` blocks back the interval)."""
    if is_base:
        return "baseline"
    if not trusted:
        return WITHIN_NOISE
    return "worse" if low > 1 else "better" if high < 1 else WITHIN_NOISE


def errors(model, input_ids: torch.Tensor, methods: Mapping[str, QuantMethod]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What storing each window's whole K/V with each method costs, without decoding (a second or two where
    :func:`evaluate`'s decode takes a minute): ``by_layer`` (one row per method and layer: bytes, K/V MSE and
    relative error, attention output error; means over windows) and every layer's key and value channel magnitudes
    (:func:`~kvcore.quant.premise.channel_outliers`). input_ids: ``[T]`` or ``[W, T]``; one forward per window."""
    windows = input_ids.reshape(-1, input_ids.shape[-1])  # [W, T]
    with torch_threads(1):
        captured = [capture_qkv(model, w) for w in windows]  # shared by every method
        per_window = [layer_errors(c, m) for c in captured for m in methods.values()]
    by_layer = pd.concat(per_window).groupby(["method", "layer"], sort=False).mean().reset_index()
    return by_layer, channel_outliers(captured)


def error_means(by_layer: pd.DataFrame) -> pd.DataFrame:
    """Each method's K/V and attention errors, means over layers (the summary's error columns)."""
    return by_layer.groupby("method", sort=False)[["k_mse", "k_rel_err", "v_mse", "v_rel_err",
                                                   "attn_rel_err"]].mean().reset_index()


def evaluate(model, input_ids: torch.Tensor, methods: Mapping[str, QuantMethod] | None = None,
             prompt_tokens: int | None = None, batched: bool = True, seed: int = 0,
             progress: Progress | None = None, lock: AbstractContextManager | None = None) -> QuantEval:
    """Measure each method on ``model``'s KV cache over ``input_ids``: ``[T]`` or ``[W, T]`` (W windows).

    methods: name -> method (default every method of :data:`METHODS`). prompt_tokens: tokens of each
    window prefilled exactly before teacher-forced one-token decoding scores the rest (default T/2);
    perplexity is exp of the mean NLL over all scored tokens of all windows. batched: decode every
    (method, window) pair in one batched pass, one row each (same numbers as separate runs, far faster
    on a CPU). bytes: exact bytes one window's cache holds at the end (all layers, K and V);
    fp16_bytes: the same tokens at 2 bytes; errors: means over layers (and windows) of each window's
    whole K/V stored in one go (:func:`errors`). seed: seeds the bootstrap of the intervals
    (:func:`noise_columns`). progress: called as ``progress(fraction, label)`` while it runs (a page's progress
    bar). lock: held around each use of the model (each forward pass of the decode), not the whole run, so that
    other users of a shared model run between the steps.
    """
    methods = dict(METHODS if methods is None else methods)
    if not methods:
        raise ValueError("give at least one method")
    windows = input_ids.reshape(-1, input_ids.shape[-1])  # [W, T]
    prompt = windows.shape[1] // 2 if prompt_tokens is None else prompt_tokens
    report = progress or (lambda fraction, label: None)
    report(0.0, "Storing each window's K/V with every method (bytes, K/V and attention error)...")
    with lock or nullcontext():
        by_layer, channels = errors(model, windows, methods)
    with torch_threads(1):
        rows, nll = _decode_rows(model, windows, list(methods.values()), prompt, batched,
                                 lambda fraction, label: report(0.1 + 0.9 * fraction, f"Perplexity: {label}"), lock)
    summary = pd.DataFrame(rows).merge(error_means(by_layer), on="method")
    summary["family"] = [methods[n].family for n in summary["method"]]
    summary["bytes"], summary["fp16_bytes"] = summary.pop("cache_bytes"), summary.pop("cache_fp16_bytes")
    summary["bytes_ratio"] = summary["bytes"] / summary["fp16_bytes"]
    base = summary.loc[summary["method"] == "fp16", "perplexity"]
    summary["ppl_vs_fp16"] = summary["perplexity"] / base.iloc[0] if len(base) else float("nan")
    summary = _with_noise(summary, nll, seed)
    return QuantEval(summary, by_layer, int(windows.shape[1]), prompt, int(windows.shape[0]), nll, time.time(),
                     load_average(), channels)


def _with_noise(summary: pd.DataFrame, nll: Mapping[str, torch.Tensor], seed: int = 0) -> pd.DataFrame:
    """``summary`` with its :data:`NOISE_COLUMNS` (re)computed from the scored NLL of its methods."""
    sizes = dict(zip(summary["method"], summary["bytes_ratio"], strict=True))
    noise = noise_columns({m: nll[m] for m in summary["method"]}, sizes, seed=seed)
    summary = summary.drop(columns=[c for c in NOISE_COLUMNS if c in summary]).merge(noise, on="method")
    return summary[list(SUMMARY_COLUMNS)]


def combine(first: QuantEval, second: QuantEval) -> QuantEval:
    """Rows of ``second`` added to ``first`` (methods already in ``first`` are not repeated); intervals
    and the Pareto front are recomputed over all of them. Both must come from the same text."""
    if (first.num_tokens, first.prompt_tokens, first.windows) != (second.num_tokens, second.prompt_tokens,
                                                                   second.windows):
        raise ValueError("combine results measured on the same windows and prompt length")
    new = ~second.summary["method"].isin(first.summary["method"])
    summary = pd.concat([first.summary, second.summary[new]], ignore_index=True)
    nll = {**(second.nll or {}), **(first.nll or {})}
    summary = _with_noise(summary, nll)
    by_layer = pd.concat([first.by_layer, second.by_layer[second.by_layer["method"].isin(
        second.summary.loc[new, "method"])]], ignore_index=True)
    finite = [r for r in (first, second) if np.isfinite(r.measured_at)]
    measured = (min(r.measured_at for r in finite), max(r.load_1min for r in finite)) if finite else (np.nan, np.nan)
    return QuantEval(summary, by_layer, first.num_tokens, first.prompt_tokens, first.windows, nll, *measured,
                     first.channels if first.channels is not None else second.channels)


def methods_table(methods: Mapping[str, QuantMethod] | None = None) -> pd.DataFrame:
    """One row per method: family, how K and V are stored, fp16 sinks/window, and the paper it follows."""
    methods = METHODS if methods is None else methods
    return pd.DataFrame([{"method": n, "family": m.family, "keys": m.key.describe(), "values": m.value.describe(),
                          "fp16_sink_tokens": m.n_sink, "fp16_recent_tokens": m.residual, "paper": m.paper}
                         for n, m in methods.items()])


def generate_text(model, tokenizer, prompt_ids: torch.Tensor, method: QuantMethod, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt_ids`` ``[T]`` with the KV cache stored by ``method`` (stops at ``<eos>``)."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens)  # validates the count
    with torch_threads(1):
        tokens = [e.token_id for e in generate_stream(model, tokenizer, prompt_ids, settings, quantized_plan(method))]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def channel_magnitudes(x: torch.Tensor, head: int | None = None) -> torch.Tensor:
    """``|x|`` of a ``[1, H, T, D]`` cache as a token x channel map ``[T, D]`` (one head) or ``[T, H*D]`` (all heads,
    head-major), the view in which KIVI shows that keys have fixed outlier channels and values do not."""
    if head is not None:
        if not 0 <= head < x.shape[1]:
            raise ValueError(f"head must be in [0, {x.shape[1]}), got {head}")
        return x[0, head].abs()
    return x[0].abs().permute(1, 0, 2).reshape(x.shape[2], -1)  # [T, H * D]
