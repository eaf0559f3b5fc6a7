"""Check paged decode attention against the contiguous reference on random K/V, and time both (the Paged
blocks page's attention check, ``python -m kvcore paged --experiment attention``).

Each is warmed up, then timed call by call; the table reports the median, the interquartile range and the
machine's 1-minute load average, and says "faster" or "slower" only when the two ranges do not overlap
(:class:`kvcore.noise.Timing`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from kvcore.device import get_device
from kvcore.kernels import BACKENDS, choose_backend, contiguous_decode_attention, paged_decode_attention
from kvcore.noise import Timing, load_note, time_repeats
from kvcore.shapes import PRESETS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class PagedProblem:
    """Random decode-attention inputs laid out both ways: paged (shuffled blocks) and contiguous."""

    query: torch.Tensor  # [B, Hq, D]
    key_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    value_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor  # [B, max_blocks]
    seq_lens: torch.Tensor  # [B]
    keys: list[torch.Tensor]  # per sequence [1, Hkv, T_b, D]
    values: list[torch.Tensor]  # per sequence [1, Hkv, T_b, D]


def make_paged_problem(seq_lens: Sequence[int], num_q_heads: int, num_kv_heads: int, head_dim: int,
                       block_size: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                       seed: int = 0) -> PagedProblem:
    """Random K/V for each sequence scattered over shuffled physical blocks (unused table slots = -1).

    seq_lens: tokens per sequence. block_size: tokens per block.
    """
    if not seq_lens or min(seq_lens) < 1 or block_size < 1:
        raise ValueError(f"need >= 1 sequence of >= 1 token and block_size >= 1, got {list(seq_lens)}, {block_size}")
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-t // block_size) for t in seq_lens]
    num_blocks = sum(per_seq) + 1  # one spare block never referenced
    physical = torch.randperm(num_blocks, generator=gen)
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    block_tables = torch.full((len(seq_lens), max(per_seq)), -1, dtype=torch.int32)
    keys, values, next_block = [], [], 0
    for b, (t, n) in enumerate(zip(seq_lens, per_seq, strict=True)):
        ids = physical[next_block:next_block + n]
        next_block += n
        block_tables[b, :n] = ids.to(torch.int32)
        # [n, block_size, Hkv, D] -> [n * block_size, Hkv, D] -> [1, Hkv, T, D]
        keys.append(key_cache[ids].reshape(-1, num_kv_heads, head_dim)[:t].transpose(0, 1)[None].to(device))
        values.append(value_cache[ids].reshape(-1, num_kv_heads, head_dim)[:t].transpose(0, 1)[None].to(device))
    query = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=gen).to(dtype)
    return PagedProblem(query.to(device), key_cache.to(device), value_cache.to(device), block_tables.to(device),
                        torch.tensor(list(seq_lens), dtype=torch.int32, device=device), keys, values)


def contiguous_reference(problem: PagedProblem) -> torch.Tensor:
    """Contiguous attention, one sequence at a time (ragged lengths), stacked to ``[B, Hq, D]``."""
    return torch.cat([contiguous_decode_attention(problem.query[b:b + 1], k, v)
                      for b, (k, v) in enumerate(zip(problem.keys, problem.values, strict=True))])


@dataclass(slots=True)
class AttentionCheckConfig:
    """Settings of the paged-vs-contiguous check.

    seq_lens: tokens per sequence; block_size: tokens per block; dtype: 'float32', 'float16' or 'bfloat16';
    device: 'cpu' or 'cuda'; repeats: timed calls after ``warmup`` untimed ones, for each attention.
    """

    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    seq_lens: tuple[int, ...] = (512, 300, 77, 1)
    block_size: int = 16
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 20
    seed: int = 0
    warmup: int = 2

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if min(self.num_q_heads, self.num_kv_heads, self.head_dim, self.block_size, self.repeats) < 1:
            raise ValueError("heads, head_dim, block_size and repeats must all be >= 1")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 calls, got {self.warmup}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if not self.seq_lens or min(self.seq_lens) < 1:
            raise ValueError(f"seq_lens must be a non-empty list of lengths >= 1, got {self.seq_lens}")
        get_device(self.device)  # ValueError for 'cuda' without a GPU

    @classmethod
    def for_model(cls, model: str, batch: int, context: int, **options: Any) -> AttentionCheckConfig:
        """The head layout of preset ``model`` (kvcore.shapes.PRESETS) over :func:`ragged_lengths` ``(batch,
        context)``; ``options`` set the other fields."""
        shape = PRESETS[model]
        return cls(shape.num_q_heads, shape.num_kv_heads, shape.head_dim, ragged_lengths(batch, context), **options)


def ragged_lengths(batch: int, context: int) -> tuple[int, ...]:
    """``batch`` sequence lengths from ``context`` down to about ``context / batch`` tokens (ragged)."""
    if batch < 1 or context < 1:
        raise ValueError(f"batch and context must be >= 1, got {batch} and {context}")
    return tuple(max(1, context * (batch - b) // batch) for b in range(batch))


def check_paged_attention(config: AttentionCheckConfig) -> pd.DataFrame:
    """One row: max |paged - contiguous|, each attention's time per call (median and interquartile range, ms,
    of ``repeats`` calls after ``warmup``), which is faster beyond that spread, the load average, the backend
    that ran."""
    p = make_paged_problem(config.seq_lens, config.num_q_heads, config.num_kv_heads, config.head_dim,
                           config.block_size, DTYPES[config.dtype], config.device, config.seed)
    sync = torch.cuda.synchronize if p.query.is_cuda else None
    paged, paged_t = time_repeats(lambda: paged_decode_attention(p.query, p.key_cache, p.value_cache, p.block_tables,
                                                                 p.seq_lens), config.repeats, config.warmup, sync)
    ref, ref_t = time_repeats(lambda: contiguous_reference(p), config.repeats, config.warmup, sync)
    return pd.DataFrame([{
        "batch": len(config.seq_lens), "tokens": sum(config.seq_lens), "q_heads": config.num_q_heads,
        "kv_heads": config.num_kv_heads, "head_dim": config.head_dim, "block_size": config.block_size,
        "dtype": config.dtype, "device": config.device,
        "max_abs_diff": float((paged.float() - ref.float()).abs().max()),
        **_timing_columns("paged", paged_t), **_timing_columns("contiguous", ref_t),
        "paged_vs_contiguous": paged_t.versus(ref_t), "repeats": config.repeats, "warmup": config.warmup,
        "load_1min": paged_t.load_1min,
        "backend": choose_backend(p.query, p.key_cache, p.value_cache),
    }])


def _timing_columns(name: str, t: Timing) -> dict[str, float]:
    return {f"{name}_ms": t.median, f"{name}_ms_q1": t.q1, f"{name}_ms_q3": t.q3}


def check_summary(check: pd.DataFrame) -> str:
    """The check in words (first row): the difference, both timings with their spread, the verdict and the load."""
    row = check.iloc[0]
    verdict = {"faster": "paged is faster", "slower": "paged is slower"}.get(row.paged_vs_contiguous,
                                                                          "the two are within noise")
    return (f"max |paged - contiguous| = {row.max_abs_diff:.2e}. Per call on {row.device}: paged "
            f"({row.backend}: {BACKENDS[row.backend]}) {row.paged_ms:.3g} ms (IQR {row.paged_ms_q1:.3g}-"
            f"{row.paged_ms_q3:.3g}), contiguous "
            f"{row.contiguous_ms:.3g} ms (IQR {row.contiguous_ms_q1:.3g}-{row.contiguous_ms_q3:.3g}): medians of "
            f"{row.repeats} calls after {row.warmup} warm-ups; {verdict} (interquartile ranges "
            f"{'apart' if row.paged_vs_contiguous != 'within noise' else 'overlap'}). Measured under "
            f"{load_note(row.load_1min)}. Random K/V in shuffled physical blocks, ragged lengths, fp32 accumulation.")
