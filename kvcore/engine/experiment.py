"""The engine measured: against transformers' own generate with static batching, and with quantized pools.

Both systems serve the same requests (real text, fixed output lengths, all arriving at once) and are
measured the same way: output tokens/s over the run, TTFT and TPOT per request (p50 / p99), peak memory
growth (:mod:`kvcore.engine.measure`) and the KV bytes held. Transformers runs ``model.generate`` on
padded batches of ``max_num_seqs`` requests, one batch after the other (FasterTransformer-style static
batching), with its default SDPA attention, each step timed through a streamer; the engine runs continuous
batching on paged pools.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from transformers import DynamicCache, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from kvcore.device import torch_threads
from kvcore.engine.engine import LLMEngine, scheduler_config
from kvcore.engine.measure import peak_memory
from kvcore.engine.params import SamplingParams
from kvcore.models.runtime import attention_implementation, model_device
from kvcore.noise import Interval
from kvcore.sched.config import SimConfig
from kvcore.sched.metrics import percentiles
from kvcore.tensors import tensor_bytes

Progress = Callable[[float, str], None]


@dataclass(slots=True, frozen=True)
class EngineSettings:
    """The engine's settings (vLLM's names; see :class:`~kvcore.engine.LLMEngine`), a hashable key."""

    num_blocks: int = 1024
    block_size: int = 16
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kv_bits: int | None = None
    threads: int | None = 1

    def config(self, model) -> SimConfig:
        """The scheduler settings an engine with these settings runs (what the simulator predicts it with)."""
        return scheduler_config(model, self.num_blocks, self.block_size, self.max_num_seqs,
                                self.max_num_batched_tokens, self.enable_prefix_caching, self.enable_chunked_prefill)

    def engine(self, model) -> LLMEngine:
        return LLMEngine(model, num_blocks=self.num_blocks, block_size=self.block_size,
                         max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                         enable_prefix_caching=self.enable_prefix_caching,
                         enable_chunked_prefill=self.enable_chunked_prefill, kv_bits=self.kv_bits,
                         threads=self.threads)


@dataclass(slots=True)
class ServedRun:
    """One system serving one workload: per-request times, the summary row, the generated ids.

    requests: ``request, prompt_tokens, output_tokens, first_token_s, finish_s, ttft_ms, tpot_ms`` (times from
    the run's start). summary: ``system`` plus the metrics of :func:`summary_row`. engine: the engine that
    ran (None for transformers), to read its steps and tables.
    """

    system: str
    requests: pd.DataFrame
    summary: dict
    outputs: list[list[int]]
    engine: LLMEngine | None = None


def summary_row(system: str, requests: pd.DataFrame, peak_bytes: int, kv_bytes_held: int,
                kv_bytes_allocated: int) -> dict:
    """Output tokens/s over the run, TTFT / TPOT p50 and p99, peak memory growth, and the KV bytes held at the
    peak against those allocated for it (the engine's pools are allocated once; a transformers cache grows)."""
    makespan = float(requests["finish_s"].max())
    tokens = int(requests["output_tokens"].sum())
    row = {"system": system, "requests": len(requests), "output_tokens": tokens, "makespan_s": makespan,
           "output_tok_per_s": tokens / makespan if makespan > 0 else float("nan")}
    row |= {k: v for k, v in percentiles(requests["ttft_ms"], "ttft_ms").items() if not k.endswith("p90")}
    row |= {k: v for k, v in percentiles(requests["tpot_ms"], "tpot_ms").items() if not k.endswith("p90")}
    return row | {"peak_memory_MB": peak_bytes / 1e6, "kv_bytes_held": kv_bytes_held,
                  "kv_bytes_allocated": kv_bytes_allocated}


TIME_COLUMNS = ("request", "prompt_tokens", "output_tokens", "first_token_s", "finish_s", "ttft_ms", "tpot_ms")


def _times(prompts: Sequence[Sequence[int]], outputs: Sequence[int], first: Sequence[float],
           finish: Sequence[float]) -> pd.DataFrame:
    df = pd.DataFrame({"request": range(len(prompts)), "prompt_tokens": [len(p) for p in prompts],
                       "output_tokens": list(outputs), "first_token_s": list(first), "finish_s": list(finish)})
    df["ttft_ms"] = df["first_token_s"] * 1e3  # every request arrives at the start
    decode = (df["output_tokens"] - 1).where(df["output_tokens"] > 1)
    df["tpot_ms"] = (df["finish_s"] - df["first_token_s"]) * 1e3 / decode
    return df


def serve_engine(model, prompts: Sequence[Sequence[int]], outputs: Sequence[int], settings: EngineSettings,
                 system: str = "engine", engine: LLMEngine | None = None,
                 progress: Callable[[float], None] | None = None,
                 on_step: Callable[[LLMEngine], None] | None = None) -> ServedRun:
    """Serve the requests on the lab's engine (each runs to its output length); progress and on_step as in
    :meth:`LLMEngine.generate`."""
    engine = engine or settings.engine(model)
    params = [SamplingParams(max_tokens=o, ignore_eos=True) for o in outputs]
    with peak_memory(model_device(model)) as peak:
        done = engine.generate(prompts, params, progress, on_step)
    table = engine.result().requests[list(TIME_COLUMNS)]  # one source: what every table of the run shows
    held = round(engine.kv_bytes / engine.config.num_blocks * engine.stats.peak_blocks_used)
    return ServedRun(system, table, summary_row(system, table, peak.bytes, held, engine.kv_bytes),
                     [d.outputs[0].token_ids for d in done], engine)


class _StepClock(BaseStreamer):
    """Stamps each token ``generate`` produces for a batch: ``times[k]`` ends step k (token k of every row)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def serve_transformers(model, prompts: Sequence[Sequence[int]], outputs: Sequence[int], batch_size: int,
                       pad_token_id: int = 0, progress: Progress | None = None, threads: int | None = 1) -> ServedRun:
    """Serve the requests with ``model.generate`` on padded batches of ``batch_size``, one batch at a time.

    Each batch runs to its longest output (static batching); a request's first token comes with its batch's
    prefill and its last when its own length is reached. KV bytes held: the largest batch cache. threads:
    torch intra-op threads (None: as set), as the engine's.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, first, finish, generated, held = model_device(model), [], [], [], 0
    start = time.perf_counter()
    with peak_memory(device) as peak, torch_threads(threads):
        for b in range(0, len(prompts), batch_size):
            batch, lengths = prompts[b:b + batch_size], outputs[b:b + batch_size]
            ids, mask = _left_padded(batch, pad_token_id, device)
            clock, cache = _StepClock(), DynamicCache()
            config = GenerationConfig(max_new_tokens=max(lengths), do_sample=False, eos_token_id=None,
                                      pad_token_id=pad_token_id)
            with torch.inference_mode(), attention_implementation(model, "sdpa"):  # transformers' default
                new = model.generate(ids, attention_mask=mask, generation_config=config, streamer=clock,
                                     cache=cache)[:, ids.shape[1]:]
            held = max(held, sum(tensor_bytes(layer.keys, layer.values) for layer in cache.layers))
            first += [clock.times[0] - start] * len(batch)
            finish += [clock.times[n - 1] - start for n in lengths]
            generated += [row[:n].tolist() for row, n in zip(new, lengths, strict=True)]
            if progress is not None:
                progress(min(1.0, (b + batch_size) / len(prompts)), "transformers generate")
    table = _times(prompts, outputs, first, finish)
    system = f"transformers generate (static, batch {batch_size})"
    return ServedRun(system, table, summary_row(system, table, peak.bytes, held, held), generated)


def _left_padded(batch: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(list(p))
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


SPREAD = ("output_tok_per_s", "ttft_ms_p50", "tpot_ms_p50")  # metrics shown with their min-max over repeats


def comparison(runs: Sequence[Sequence[ServedRun]]) -> pd.DataFrame:
    """One row per system from its interleaved repeats: each metric's median over the runs, min and max of the
    headline metrics, and the number of runs. ``runs[i]`` holds system i's runs (the engine first)."""
    rows = []
    for system in runs:
        table = pd.DataFrame([r.summary for r in system])
        row = {"system": table["system"].iloc[0], "runs": len(table)}
        row |= table.drop(columns="system").median(numeric_only=True).to_dict()
        row |= {f"{m}_{end}": getattr(table[m], end)() for m in SPREAD for end in ("min", "max")}
        rows.append(row)
    return pd.DataFrame(rows)


def paired_speedup(engine: Sequence[ServedRun], other: Sequence[ServedRun]) -> Interval:
    """Engine throughput over the other system's, run by run (interleaved repeats): the median ratio and its
    min-max over the pairs (units 0: a spread of repeats, not a bootstrap)."""
    ratios = [e.summary["output_tok_per_s"] / o.summary["output_tok_per_s"] for e, o in zip(engine, other,
                                                                                           strict=True)]
    return Interval(float(np.median(ratios)), min(ratios), max(ratios), level=float("nan"), units=0)


def agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> dict[str, float]:
    """How often ``other``'s greedy outputs still match ``reference``'s: whole outputs equal, and the share
    of tokens generated before the first difference."""
    same = [list(a) == list(b) for a, b in zip(reference, other, strict=True)]
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
              for a, b in zip(reference, other, strict=True)]
    total = sum(len(a) for a in reference)
    return {"outputs_identical": float(np.mean(same)), "tokens_before_first_difference": sum(prefix) / total}
