"""The study: every KV cache method of the lab on one model, measured the same way, saved in one folder.

For each method (:mod:`kvcore.study.methods`) on the same prompt, greedy decoding of ``new_tokens`` tokens:

* **ms per token**: a short warm-up generation, then ``repeats`` timed generations; each gives the mean time
  of its one-token decode steps, and the table shows the median of the repeats with their interquartile
  range, min and max (:class:`kvcore.noise.Timing`), and the machine's 1-minute load average while they ran
  (the higher of the readings before and after: other work on the cores slows every step). The prefill is
  timed apart.
* **peak memory**: one more generation inside :func:`kvcore.engine.measure.peak_memory`, after freed memory is
  handed back to the system: growth of the resident set on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
  It is measured apart from the timed runs, so the sampling thread does not slow them.
* **KV bytes held** after the last token (exact: packed codes and scales of a quantized cache).
* **perplexity** of ``ppl_tokens`` tokens of held-out text streamed one token per step through the method's
  cache, with a 95% block-bootstrap interval, and its ratio to the full cache's on the same blocks (paired).
* **agreement** with the full cache's greedy text: the share of positions holding the same token, and the
  first position that differs.
* **retrieval**: the share of ``needles`` needle-in-a-haystack prompts (``needle_tokens`` tokens of the bundled
  corpus, a fact with a random value hidden at spread depths, then its question) whose greedy answer through the
  method's cache holds the value, with Wilson's interval (:mod:`kvcore.needle.probe`). Perplexity flatters
  recency; retrieval asks for one fact from anywhere in the context.

Runs are deterministic apart from the timings. Every finished method is saved at once
(:mod:`kvcore.study.results`), so ``resume`` skips it after an interruption.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kvcore.device import torch_threads
from kvcore.engine.measure import peak_memory
from kvcore.models.generate import GenerationSettings, TokenEvent, generate_stream
from kvcore.models.loader import MAX_WEIGHT_BYTES, bundled_text, load_model
from kvcore.models.perplexity import stream_text
from kvcore.models.runtime import max_positions, model_device
from kvcore.needle.probe import plan_answers, spread_prompts
from kvcore.needle.tables import wilson_interval
from kvcore.noise import Timing, block_sums, bootstrap_interval, load_average, paired_difference
from kvcore.study import results
from kvcore.study.methods import FAMILIES, METHODS, MethodSettings, build_method
from kvcore.study.names import DTYPES as DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
Progress = Callable[[int, str], None]  # (tokens processed since the last call, what is running)


@dataclass(slots=True)
class StudySettings:
    """One study.

    model: None (the bundled model), a local folder or a Hub name. dtype: weights' dtype (``float32``,
    ``float16``, ``bfloat16``). device: None = CUDA when available. max_weight_gb: refuse models with more
    stored weights (None = no limit). methods: which methods (``full`` is always run: the reference).
    new_tokens: tokens each generation produces. prompt: the prompt text (None = the first
    ``prompt_tokens`` tokens of the bundled held-out text). repeats: timed generations per method.
    warmup_tokens: tokens of the untimed warm-up generation. ppl_tokens: tokens scored for perplexity.
    threads: torch CPU threads (None = leave as is). seed: bootstrap seed. method: the methods' settings.
    needles: needle-in-a-haystack prompts per method (0 = no retrieval column). needle_tokens: haystack tokens
    of each.
    """

    model: str | None = None
    dtype: str = "float32"
    device: str | None = None
    max_weight_gb: float | None = MAX_WEIGHT_BYTES / 1e9
    methods: tuple[str, ...] = METHODS
    new_tokens: int = 512
    prompt: str | None = None
    prompt_tokens: int = 64
    repeats: int = 3
    warmup_tokens: int = 16
    ppl_tokens: int = 512
    threads: int | None = 1
    seed: int = 0
    method: MethodSettings = field(default_factory=MethodSettings)
    needles: int = 4
    needle_tokens: int = 512

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown study method {unknown[0] if unknown else None!r}; choose from "
                             f"{', '.join(METHODS)}")
        self.methods = tuple(dict.fromkeys(("full", *self.methods)))
        for name, low in (("new_tokens", 2), ("prompt_tokens", 1), ("repeats", 1), ("warmup_tokens", 1),
                          ("ppl_tokens", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, low in (("needles", 0), ("needle_tokens", 32)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.new_tokens > 2048:
            raise ValueError(f"new_tokens must be at most 2048, got {self.new_tokens}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads must be None (as they are) or an integer >= 1, got {self.threads!r}")
        if self.max_weight_gb is not None and not self.max_weight_gb > 0:
            raise ValueError(f"max_weight_gb must be > 0 (or None: no limit), got {self.max_weight_gb}")
        if self.method.budget < self.method.n_sink + 1:
            raise ValueError(f"budget must hold the {self.method.n_sink} sink tokens and one more, "
                             f"got {self.method.budget}")

    def record(self) -> dict[str, Any]:
        """The settings as a flat JSON-ready dict (what ``settings.json`` stores and ``resume`` compares)."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "method"}
        return flat | {f"method_{k}": v for k, v in asdict(self.method).items()}

    def folder_name(self) -> str:
        """``study-<model>-<hash of the settings>``: one folder per set of settings (methods aside)."""
        record = {k: v for k, v in self.record().items() if k != "methods"}
        digest = hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:8]
        model = (self.model or "bundled").rstrip("/").replace("/", "_").replace("\\", "_")
        return f"study-{model}-{digest}"


@dataclass(slots=True)
class StudyResult:
    """The study's tables (``summary``, ``steps``, ``texts``), its folder, and the settings and versions."""

    tables: dict[str, pd.DataFrame]
    folder: Path
    settings: dict[str, Any]
    versions: dict[str, Any]
    ran: list[str]  # methods computed by this call (the others were resumed from the folder)


def load_study_model(settings: StudySettings):
    """``(model, tokenizer)`` loaded straight in the settings' dtype on their device."""
    cap = float("inf") if settings.max_weight_gb is None else settings.max_weight_gb * 1e9
    return load_model(settings.model, settings.device, max_weight_bytes=cap, dtype=DTYPES[settings.dtype])


def study_inputs(model, tokenizer, settings: StudySettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt ids ``[P]`` and the perplexity text ids ``[ppl_tokens + 1]`` (the bundled held-out text)."""
    text_ids = tokenizer(bundled_text(), return_tensors="pt")["input_ids"][0]  # [T]
    if settings.prompt is not None:
        prompt = tokenizer(settings.prompt, return_tensors="pt")["input_ids"][0]
        if not len(prompt):
            raise ValueError("the prompt has no tokens")
    else:
        prompt = text_ids[:settings.prompt_tokens]
    limit = max_positions(model)
    if limit and len(prompt) + settings.new_tokens > limit:
        raise ValueError(f"{len(prompt)} prompt + {settings.new_tokens} new tokens exceed this model's {limit} "
                         "positions")
    if limit and settings.ppl_tokens + 1 > limit:
        raise ValueError(f"ppl_tokens {settings.ppl_tokens} exceeds this model's {limit} positions")
    if settings.ppl_tokens + 1 > len(text_ids):
        raise ValueError(f"ppl_tokens must be at most {len(text_ids) - 1}, the held-out text's tokens")
    return prompt, text_ids[:settings.ppl_tokens + 1]


def release_memory(device: torch.device) -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc ``malloc_trim``), so the next
    peak-memory reading counts what the next run needs, not what the last one left behind."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc: nothing to trim
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def _generate(method, tokenizer, prompt: torch.Tensor, tokens: int, progress: Progress | None,
              label: str) -> list[TokenEvent]:
    settings = GenerationSettings(max_new_tokens=tokens, temperature=0.0, stop_at_eos=False)
    events = []
    for event in generate_stream(method.model, tokenizer, prompt, settings, method.plan):
        events.append(event)
        if progress is not None:
            progress(1, label)
    return events


def run_method(name: str, model, tokenizer, prompt: torch.Tensor, ppl_ids: torch.Tensor, settings: StudySettings,
               progress: Progress | None = None) -> dict[str, Any]:
    """Measure one method (see the module doc); the record :func:`summary_table` and the cell file read."""
    began = time.perf_counter()
    method = build_method(name, model, settings.method)
    device = model_device(method.model)
    _generate(method, tokenizer, prompt, settings.warmup_tokens, progress, f"{name}: warm-up")
    release_memory(device)
    with peak_memory(device) as peak:
        events = _generate(method, tokenizer, prompt, settings.new_tokens, progress, f"{name}: peak memory")
    load = load_average()
    runs = [_generate(method, tokenizer, prompt, settings.new_tokens, progress, f"{name}: timed run {r + 1}")
            for r in range(settings.repeats)]
    load = max(load, load_average())
    streamed = stream_text(method.model, ppl_ids, method.plan, prefill=1)
    if progress is not None:
        progress(settings.ppl_tokens, f"{name}: perplexity")
    sums, counts = block_sums(streamed.nll[0])
    needles = needle_probe(method, tokenizer, settings, progress)
    return {
        "method": name, "family": method.family, "label": method.label,
        "tokens": [e.token_id for e in events], "text": "".join(e.text for e in events),
        "decode_ms": [float(np.mean([e.ms for e in run if e.phase == "decode"])) for run in runs],
        "prefill_ms": [next(e.ms for e in run if e.phase == "prefill") for run in runs],
        "steps": [{"step": e.step, "phase": e.phase, "ms": e.ms, "kv_tokens": e.kv_tokens, "kv_bytes": e.kv_bytes}
                  for e in runs[0]],
        "load_1min": load, "peak_bytes": peak.bytes, "peak_how": peak.how,
        "kv_bytes": events[-1].kv_bytes, "kv_tokens": events[-1].kv_tokens,
        "nll_sums": sums.tolist(), "nll_counts": counts.tolist(), "needle_answers": [a for a, _ in needles],
        "needle_found": [f for _, f in needles], "seconds": time.perf_counter() - began,
    }


def needle_probe(method, tokenizer, settings: StudySettings,
                 progress: Progress | None = None) -> list[tuple[str, bool]]:
    """The method's answers to the study's needle prompts and whether each holds its needle's value."""
    if not settings.needles:
        return []
    prompts = spread_prompts(tokenizer, settings.needles, settings.needle_tokens, settings.seed)
    on_prompt = None if progress is None else (lambda tokens: progress(tokens, f"{method.name}: needles"))
    return plan_answers(method.model, tokenizer, method.plan, prompts, on_prompt=on_prompt)


def method_tokens(settings: StudySettings) -> int:
    """Tokens one method processes (warm-up, the peak-memory run, the timed runs, perplexity): a progress total."""
    return (settings.warmup_tokens + settings.new_tokens * (1 + settings.repeats) + settings.ppl_tokens
            + settings.needles * settings.needle_tokens)


def run_study(settings: StudySettings, folder: Path | None = None, *, resume: bool = False,
              progress: Progress | None = None, log: Callable[[str], None] | None = None) -> StudyResult:
    """Run every method of ``settings`` (those already in ``folder`` too, unless ``resume``); write the tables.

    folder: the results folder (default ``./<settings.folder_name()>``). resume: keep the methods the
    folder already holds, when it was made with the same settings (methods aside). log: told what is
    skipped or failed. Raises ValueError when resuming a folder made with other settings.
    """
    folder = Path(folder) if folder is not None else Path(settings.folder_name())
    record = settings.record()
    before = results.read_settings(folder)
    done: dict[str, dict[str, Any]] = {}
    if resume and before is not None:
        changed = [k for k in results.settings_difference(before, record) if k != "methods"]
        if changed:
            raise ValueError(f"{folder} holds a study made with other settings ({', '.join(changed)}); "
                             "resume it with the same settings or choose another --out")
        done = {k: v for k, v in results.read_cells(folder).items() if "error" not in v}
    else:
        results.clear_cells(folder)
    results.write_settings(folder, record)
    todo = [m for m in settings.methods if m not in done]
    for name in settings.methods:
        if name in done and log is not None:
            log(f"{name}: already in {folder}, skipped (--resume)")
    ran = []
    if todo:
        model, tokenizer = load_study_model(settings)
        prompt, ppl_ids = study_inputs(model, tokenizer, settings)
        with torch_threads(settings.threads):
            for name in todo:
                done[name] = _safe_method(name, model, tokenizer, prompt, ppl_ids, settings, progress, log)
                results.write_cell(folder, name, done[name])
                ran.append(name)
    records = [done[m] for m in settings.methods]
    tables = {"summary": summary_table(records, settings.seed), "steps": steps_table(records),
              "texts": texts_table(records)}
    for name, table in tables.items():
        results.write_table(folder, name, table)
    return StudyResult(tables, folder, record, results.versions(), ran)


def _safe_method(name, model, tokenizer, prompt, ppl_ids, settings, progress, log) -> dict[str, Any]:
    try:
        return run_method(name, model, tokenizer, prompt, ppl_ids, settings, progress)
    except (ValueError, RuntimeError) as exc:  # one method the model cannot take does not stop the study
        if log is not None:
            log(f"{name}: failed: {exc}")
        if progress is not None:
            progress(0, f"{name}: failed")
        return {"method": name, "family": FAMILIES[name], "label": name, "error": f"{type(exc).__name__}: {exc}"}


def summary_table(records: list[dict[str, Any]], seed: int = 0) -> pd.DataFrame:
    """One row per method: timing, memory, KV bytes, perplexity and agreement (see the module doc)."""
    full = next((r for r in records if r["method"] == "full" and "error" not in r), None)
    rows = [_summary_row(r, full, seed) for r in records]
    return pd.DataFrame(rows)


def _summary_row(r: dict[str, Any], full: dict[str, Any] | None, seed: int) -> dict[str, Any]:
    row: dict[str, Any] = {"method": r["method"], "family": r["family"], "label": r["label"]}
    if "error" in r:
        return row | {"error": r["error"]}
    timing = Timing.of(r["decode_ms"], warmup=1, load_1min=r.get("load_1min", float("nan")))
    sums, counts = np.asarray(r["nll_sums"]), np.asarray(r["nll_counts"])
    ppl = bootstrap_interval(sums, counts, transform=math.exp, seed=seed)
    row |= {"ms_per_token": timing.median, "ms_q1": timing.q1, "ms_q3": timing.q3, "ms_min": timing.minimum,
            "ms_max": timing.maximum, "repeats": timing.repeats, "load_1min": timing.load_1min,
            "tokens_per_s": 1e3 / timing.median,
            "prefill_ms": float(np.median(r["prefill_ms"])), "peak_memory_bytes": r["peak_bytes"],
            "kv_bytes": r["kv_bytes"], "kv_tokens": r["kv_tokens"], "perplexity": ppl.estimate,
            "ppl_low": ppl.low, "ppl_high": ppl.high, **_retrieval(r.get("needle_found", []))}
    if full is None:
        return row
    ratio = paired_difference(sums, np.asarray(full["nll_sums"]), counts, transform=math.exp, seed=seed)
    same = [a == b for a, b in zip(r["tokens"], full["tokens"], strict=False)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return row | {"kv_vs_full": r["kv_bytes"] / full["kv_bytes"], "ms_vs_full": timing.median /
                  float(np.median(full["decode_ms"])), "ppl_vs_full": ratio.estimate, "ppl_vs_full_low": ratio.low,
                  "ppl_vs_full_high": ratio.high, "agreement": float(np.mean(same)) if same else float("nan"),
                  "first_divergence": first}


def _retrieval(found: list[bool]) -> dict[str, Any]:
    """The retrieval column: the share of needles found with Wilson's interval (NaN with no needles)."""
    if not found:
        nan = float("nan")
        return {"retrieval": nan, "retrieval_low": nan, "retrieval_high": nan, "needles": 0}
    rate = wilson_interval(sum(found), len(found))
    return {"retrieval": rate.estimate, "retrieval_low": rate.low, "retrieval_high": rate.high, "needles": len(found)}


def steps_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Every step of each method's first timed generation: ms, KV entries (layer 0) and KV bytes after it."""
    frames = [pd.DataFrame(r["steps"]).assign(method=r["method"]) for r in records if "steps" in r]
    if not frames:
        return pd.DataFrame(columns=["method", "step", "phase", "ms", "kv_tokens", "kv_bytes"])
    table = pd.concat(frames, ignore_index=True)
    return table[["method", "step", "phase", "ms", "kv_tokens", "kv_bytes"]]


def texts_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Each method's greedy text (the peak-memory run's; greedy decoding gives the same text every run)."""
    return pd.DataFrame([{"method": r["method"], "text": r.get("text"), "error": r.get("error")} for r in records])

