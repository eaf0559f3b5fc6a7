"""One engine experiment as tables: what the Serving engine page draws and downloads.

Serves a workload on the engine (and, when asked, on transformers' generate), records the block pool after
every step (owners, ref counts, hashes), keeps each request's text, fits the simulator's step time to the
run and predicts it. Everything is a DataFrame, so the page caches it and every table downloads as CSV.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import pandas as pd

from kvcore.engine.calibrate import prediction_table, simulate_engine
from kvcore.engine.engine import LLMEngine
from kvcore.engine.experiment import (
    EngineSettings,
    ServedRun,
    comparison,
    paired_speedup,
    serve_engine,
    serve_transformers,
)
from kvcore.engine.workload import ServeWorkload
from kvcore.models.runtime import num_kv_heads, text_config
from kvcore.noise import Interval
from kvcore.sched.cost import FittedCost

Progress = Callable[[float, str], None]
MAX_SNAPSHOT_STEPS = 400  # pool snapshots kept (evenly spaced) for the step slider
# What one page view may serve: requests x (longest prompt + longest output) x model parameters x pairs of
# runs. The bundled model (5.8M parameters) serving 64 requests of up to 400 + 64 tokens on the engine and on
# transformers (one pair) took 14-20 s on the 2-core machine of benchmarks/RESULTS.md; the CLI has no limit.
PAGE_WORK_LIMIT = 64 * 464 * 6e6  # requests x tokens x parameters, per engine + transformers pair of runs
REPEATS = 3  # interleaved runs per system when transformers serves too
# Memory a view may take on top of the app and its model (the page's goal: under 1.5 GB in all). The pools are
# allocated up front; transformers' eager prefill of one padded batch holds [batch, heads, width, width] fp32
# scores, about three copies at once (scores, masked, softmax): measured +376 MB for 16 x 400 tokens, +600 MB for
# 32 x 400 and +1,350 MB for 32 x 656 with the bundled model.
PAGE_POOL_BYTES = 256e6
PAGE_SCORE_BYTES = 128e6


@dataclass(slots=True)
class EngineReport:
    """What one engine experiment measured.

    summary: one row per system (the engine first), medians of its interleaved repeats. requests: one row per
    request of the engine's first run, with its text, times and prefix hits. steps: that run's timeline
    (measured step times). pool: one row per (step, block) held or cached after each of its steps. measured:
    that run as the simulator reports one (:func:`predict_run` compares a prediction with it). kv_bytes: the
    pools' bytes. speedup: engine over transformers throughput, run by run (None without it).
    """

    summary: pd.DataFrame
    requests: pd.DataFrame
    steps: pd.DataFrame
    pool: pd.DataFrame
    measured: pd.DataFrame
    num_blocks: int
    kv_bytes: int
    measured_at: str = ""
    load_average: float = float("nan")
    speedup: Interval | None = None


def pool_bytes(model, settings: EngineSettings) -> float:
    """Bytes the engine's K and V pools take for ``model`` (codes + fp16 scale and zero when quantized)."""
    cfg = text_config(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_slot = head_dim * next(model.parameters()).element_size() if settings.kv_bits is None else \
        head_dim * settings.kv_bits / 8 + 4
    return 2.0 * cfg.num_hidden_layers * num_kv_heads(model) * settings.num_blocks * settings.block_size * per_slot


def prefill_score_bytes(model, workload: ServeWorkload, batch_size: int) -> float:
    """Bytes of one layer's attention scores when transformers prefills its widest padded batch (eager, fp32)."""
    heads = text_config(model).num_attention_heads
    return 4.0 * min(batch_size, workload.num_requests) * heads * workload.longest_prompt ** 2


def check_page_limits(model, workload: ServeWorkload, settings: EngineSettings, transformers: bool = False,
                      repeats: int = REPEATS) -> None:
    """Refuse a view that would serve too much for half a minute of CPU (``repeats`` pairs of runs with
    transformers, the engine alone counted as one pair), allocate pools over 256 MB, or (with transformers)
    prefill padded batches whose attention scores take over 128 MB per layer."""
    if pool_bytes(model, settings) > PAGE_POOL_BYTES:
        raise ValueError(f"{settings.num_blocks} blocks of {settings.block_size} tokens take "
                         f"{pool_bytes(model, settings) / 1e6:,.0f} MB of pools for this model; the page allows "
                         f"{PAGE_POOL_BYTES / 1e6:.0f} MB: fewer blocks or quantized pools")
    scores, batch = prefill_score_bytes(model, workload, settings.max_num_seqs), settings.max_num_seqs
    if transformers and scores > PAGE_SCORE_BYTES:
        raise ValueError(f"transformers would prefill padded batches of {min(batch, workload.num_requests)} x "
                         f"{workload.longest_prompt} tokens, {scores / 1e6:,.0f} MB of attention scores per layer; "
                         f"the page allows {PAGE_SCORE_BYTES / 1e6:.0f} MB: a smaller max_num_seqs, shorter prompts, "
                         "or the engine alone (turn off 'Also serve with transformers')")
    params = sum(p.numel() for p in model.parameters())
    longest = workload.longest_prompt + workload.output_max
    pairs = repeats if transformers else 1
    if workload.num_requests * longest * params * pairs > PAGE_WORK_LIMIT:
        with_hf = f" ({repeats} runs per system)" if transformers else ""
        raise ValueError(f"{workload.num_requests} requests of up to {workload.longest_prompt} + "
                         f"{workload.output_max} tokens on a {params / 1e6:.0f}M-parameter model{with_hf} is more "
                         "than one view serves in about half a minute here: fewer or shorter requests, a shorter "
                         "shared prefix" + (", or the engine alone" if transformers else "") +
                         " (python -m kvcore engine has no limit)")


def pool_snapshot(engine: LLMEngine) -> list[dict]:
    """The pool after the engine's last step: one row per block held or still cached."""
    manager, step = engine.scheduler.manager, engine.stats.steps
    owners = manager.block_owners()
    rows = []
    for block in manager.blocks:
        if block is manager.null_block or (block.ref_cnt == 0 and block.block_hash is None):
            continue
        rows.append({"step": step, "block": block.block_id, "ref_cnt": block.ref_cnt,
                     "owners": " ".join(owners.get(block.block_id, [])),
                     "hash": "" if block.block_hash is None else f"{block.block_hash & 0xFFFFFFFF:08x}"})
    return rows


def request_table(run: ServedRun, tokenizer, prompts: list[list[int]]) -> pd.DataFrame:
    """Each request: its prompt and output text, lengths, prefix-cache hits and times."""
    table = run.requests.copy()
    result = run.engine.result().requests
    table.insert(1, "prompt", [tokenizer.decode(p[-60:], skip_special_tokens=True) for p in prompts])
    table.insert(2, "output", [tokenizer.decode(o, skip_special_tokens=True) for o in run.outputs])
    table["prefix_hit_tokens"] = result["prefix_hit_tokens"].to_numpy()
    table["preemptions"] = result["preemptions"].to_numpy()
    return table


def engine_report(model, tokenizer, workload: ServeWorkload, settings: EngineSettings, transformers: bool = True,
                  progress: Progress | None = None, repeats: int = REPEATS,
                  turn: Callable[[], AbstractContextManager] = nullcontext) -> EngineReport:
    """Serve ``workload`` on the engine (and on transformers), snapshot the pool, fit and predict.

    With transformers, the two systems run ``repeats`` times each, interleaved (engine, transformers, engine...),
    so a load that comes and goes hits both alike; the engine's first run is the one shown step by step. turn: entered
    around each run (a shared model's lock, taken per run so that its other users go between the runs).
    """
    prompts, outputs = workload.build(tokenizer)
    snapshots: list[dict] = []
    engine = settings.engine(model)
    runs = 2 * repeats if transformers else 1
    report = (lambda i, label: None) if progress is None else (lambda i, label: progress(0.9 * i / runs, label))
    report(0, "serving on the engine (run 1)")
    with turn():
        run = serve_engine(model, prompts, outputs, settings, engine=engine,
                           on_step=lambda e: snapshots.extend(pool_snapshot(e)))
    engines, others = [run], []
    for i in range(repeats if transformers else 0):
        report(2 * i + 1, f"serving with transformers' generate (run {i + 1} of {repeats})")
        with turn():
            others.append(serve_transformers(model, prompts, outputs, settings.max_num_seqs,
                                             tokenizer.pad_token_id or 0, threads=settings.threads))
        if i + 1 < repeats:
            report(2 * i + 2, f"serving on the engine (run {i + 2} of {repeats})")
            with turn():
                engines.append(serve_engine(model, prompts, outputs, settings))
    pool = pd.DataFrame(snapshots, columns=["step", "block", "ref_cnt", "owners", "hash"])
    kept = sorted(pool["step"].unique())
    if len(kept) > MAX_SNAPSHOT_STEPS:
        pool = pool[pool["step"].isin(kept[::-(-len(kept) // MAX_SNAPSHOT_STEPS)])]
    return EngineReport(comparison([engines, others] if others else [engines]), request_table(run, tokenizer, prompts),
                        engine.stats.timeline, pool.reset_index(drop=True), engine.result().summary,
                        engine.config.num_blocks, engine.kv_bytes, time.strftime("%Y-%m-%d %H:%M:%S"),
                        os.getloadavg()[0], paired_speedup(engines, others) if others else None)


def predict_run(report: EngineReport, model, tokenizer, workload: ServeWorkload, settings: EngineSettings,
                cost: FittedCost) -> pd.DataFrame:
    """The simulator serving the report's requests with the engine's settings and ``cost`` (a calibration that
    never saw this run), metric by metric against what the engine's first run measured."""
    prompts, outputs = workload.build(tokenizer)
    predicted = simulate_engine(settings.config(model), prompts, outputs, cost)
    return prediction_table(report.measured, predicted)
