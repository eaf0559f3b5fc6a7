"""KV memory of parallel sampling with and without sharing the prompt's blocks (vLLM paper, §4.4, Fig. 15).

For each request, ``n`` samples of ``output_len`` tokens are generated from one prompt. Without
sharing, each sample is its own request holding a full copy of the prompt. With sharing, the prompt
is allocated once and forked ``n - 1`` times (:meth:`KVCacheManager.fork`): all samples share the
prompt's blocks and the partially filled last prompt block is copied on the first write
(copy-on-write). Both are measured on the real block manager as the blocks held once all samples
are complete (the peak: blocks only grow while a request runs).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from kvcore.paged.manager import KVCacheManager


def _blocks_held(manager: KVCacheManager, prompt_len: int, output_len: int, n: int, share: bool) -> int:
    ids = [f"s{k}" for k in range(n)]
    if share:
        manager.allocate(ids[0], [0] * prompt_len)
        for child in ids[1:]:
            manager.fork(ids[0], child)
    else:
        for rid in ids:
            manager.allocate(rid, [0] * prompt_len)
    for rid in ids:
        if manager.append(rid, [0] * output_len) is None:
            raise RuntimeError("the measuring pool is too small; this is a bug")
    held = manager.num_blocks - manager.num_free_blocks
    for rid in ids:
        manager.free(rid)
    return held


def parallel_sampling_memory(workload: pd.DataFrame, n_values: Sequence[int] = (1, 2, 4, 6, 8),
                             block_size: int = 16) -> pd.DataFrame:
    """Blocks held for ``n`` samples per request, summed over the workload, with and without fork.

    workload: rows with prompt_len and output_len (tokens). n_values: samples per request.
    Columns: n, blocks_no_sharing, blocks_shared, saved_pct.
    """
    if not n_values or min(n_values) < 1:
        raise ValueError(f"n_values must be sample counts >= 1, got {list(n_values)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    longest = int((workload["prompt_len"] + workload["output_len"]).max())
    manager = KVCacheManager(max(n_values) * (-(-longest // block_size) + 1), block_size,
                             enable_prefix_caching=False, log_events=False)
    rows = []
    for n in n_values:
        sums = {True: 0, False: 0}
        for prompt_len, output_len in zip(workload["prompt_len"], workload["output_len"], strict=True):
            for share in (False, True):
                sums[share] += _blocks_held(manager, int(prompt_len), int(output_len), n, share)
        rows.append({"n": n, "blocks_no_sharing": sums[False], "blocks_shared": sums[True],
                     "saved_pct": 100.0 * (1 - sums[True] / sums[False])})
    return pd.DataFrame(rows)
