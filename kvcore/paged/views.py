"""Tables of the paged cache's state for the page: block grid, block tables, free queue, memory, window."""

from __future__ import annotations

import pandas as pd

from kvcore.paged.cache import EMPTY_SLOT
from kvcore.paged.events import events_frame
from kvcore.paged.hashing import short_hash
from kvcore.paged.manager import KVCacheManager
from kvcore.paged.stepper import StepperState
from kvcore.shapes import ModelShape, kv_bytes

BLOCK_STATES = ("in use", "shared", "cached, free", "free")


def block_owners(manager: KVCacheManager) -> dict[int, list[tuple[str, int]]]:
    """block id -> [(request, logical block index), ...] over all live block tables."""
    owners: dict[int, list[tuple[str, int]]] = {}
    for rid in manager.request_ids():
        for logical, block_id in enumerate(manager.block_table(rid)):
            owners.setdefault(block_id, []).append((rid, logical))
    return owners


def block_fill(manager: KVCacheManager, block_id: int, owners: list[tuple[str, int]]) -> int:
    """Tokens that hold valid K/V in a block: from an owner's length, full if cached, else 0."""
    if owners:
        rid, logical = owners[0]
        return min(manager.block_size, manager.num_tokens(rid) - logical * manager.block_size)
    return manager.block_size if manager.block(block_id).block_hash is not None else 0


def block_grid(state: StepperState) -> pd.DataFrame:
    """One row per physical block: owners, ref_cnt, state, hash, valid tokens and the words in its slots."""
    manager, owners = state.cache.manager, block_owners(state.cache.manager)
    queue_pos = {b: i for i, b in enumerate(manager.free_block_queue())}
    rows = []
    for block_id in range(manager.num_blocks):
        block, held = manager.block(block_id), owners.get(block_id, [])
        fill = block_fill(manager, block_id, held)
        if held:
            kind = "shared" if block.ref_cnt > 1 else "in use"
        else:
            kind = "cached, free" if block.block_hash is not None else "free"
        words = [state.vocab.decode(t) if t != EMPTY_SLOT and i < fill else ""
                 for i, t in enumerate(state.cache.block_token_ids(block_id))]
        rows.append({"block": block_id, "state": kind, "owners": ", ".join(r for r, _ in held),
                     "ref_cnt": block.ref_cnt, "hash": short_hash(block.block_hash), "tokens": fill,
                     "queue_position": queue_pos.get(block_id), "slots": words})
    return pd.DataFrame(rows)


def block_tables(state: StepperState) -> pd.DataFrame:
    """One row per running request: its block table (logical -> physical) and token counts."""
    manager = state.cache.manager
    rows = [{"request": rid, "prompt": state.prompt_of.get(rid), "forked_from": state.parent_of.get(rid, ""),
             "num_tokens": manager.num_tokens(rid), "num_cached_tokens": manager.num_cached_tokens(rid),
             "block_table": " ".join(f"{i}->{b}" for i, b in enumerate(manager.block_table(rid)))}
            for rid in manager.request_ids()]
    columns = ["request", "prompt", "forked_from", "num_tokens", "num_cached_tokens", "block_table"]
    return pd.DataFrame(rows, columns=columns)


def free_queue(manager: KVCacheManager) -> pd.DataFrame:
    """The free block queue from head (reused first) to tail, with each block's hash if still cached."""
    ids = manager.free_block_queue()
    return pd.DataFrame({"position": range(len(ids)), "block": ids,
                         "hash": [short_hash(manager.block(b).block_hash) for b in ids]})


def event_log(state: StepperState) -> pd.DataFrame:
    """The manager's events with the stepper action that caused each."""
    frame = events_frame(state.cache.manager.events)
    frame.insert(0, "action", state.event_action[:len(frame)])
    return frame


def memory_usage(manager: KVCacheManager, shape: ModelShape, bits: int = 16) -> pd.DataFrame:
    """KV bytes for the model shape: tokens the requests see, tokens stored, slots held, whole pool."""
    owners = block_owners(manager)
    stored = sum(block_fill(manager, b, held) for b, held in owners.items())
    cached_free = sum(1 for b in manager.free_block_queue() if manager.block(b).block_hash is not None)
    rows = [("tokens seen by requests (shared counted per request)",
             sum(manager.num_tokens(r) for r in manager.request_ids())),
            ("tokens stored (shared counted once)", stored),
            ("slots reserved by requests (whole blocks)", len(owners) * manager.block_size),
            ("slots of cached free blocks (evictable)", cached_free * manager.block_size),
            ("whole pool", manager.num_blocks * manager.block_size)]
    return pd.DataFrame([{"what": what, "tokens": n, "kv_bytes": kv_bytes(shape, n, bits=bits)}
                         for what, n in rows])


def attention_window(manager: KVCacheManager, request_id: str, window: int) -> pd.DataFrame:
    """Each stored token of a request, where it lives, and whether a recent-``window`` attention reads it."""
    if window < 1:
        raise ValueError(f"window must be >= 1 token, got {window}")
    num_tokens, bs = manager.num_tokens(request_id), manager.block_size
    table = manager.block_table(request_id)
    return pd.DataFrame({"position": range(num_tokens),
                         "logical_block": [p // bs for p in range(num_tokens)],
                         "physical_block": [table[p // bs] for p in range(num_tokens)],
                         "slot": [p % bs for p in range(num_tokens)],
                         "attended": [p >= num_tokens - window for p in range(num_tokens)]})


def window_bytes(window: pd.DataFrame, shape: ModelShape, bits: int = 16) -> tuple[int, int, int, int]:
    """(tokens read, tokens stored, KV bytes read, KV bytes stored) of an :func:`attention_window` table."""
    read, held = int(window["attended"].sum()), len(window)
    return read, held, kv_bytes(shape, read, bits=bits), kv_bytes(shape, held, bits=bits)
