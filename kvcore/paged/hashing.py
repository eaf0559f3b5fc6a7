"""Block hashes chained over full blocks (vLLM v1 ``hash_block_tokens``).

A block's hash covers its parent's hash and its own token ids, so equal hashes mean an equal
prefix up to and including that block. Python's built-in ``hash`` of a tuple of ints is used (the
``builtin`` hash option of vLLM): it is fast and, for ints, the same in every process, so a shared
URL shows the same hashes. It is not collision-proof; vLLM offers SHA-256 for multi-tenant use.
"""

from __future__ import annotations

from collections.abc import Sequence

# Parent hash of the first block of every chain (vLLM's NONE_HASH, fixed here for determinism).
NONE_HASH = 0


def hash_block_tokens(parent_hash: int | None, block_token_ids: Sequence[int]) -> int:
    """Hash of one full block: its parent's hash (``None`` for the first block) and its token ids."""
    return hash((NONE_HASH if parent_hash is None else parent_hash, tuple(block_token_ids)))


def hash_full_blocks(token_ids: Sequence[int], block_size: int, parent_hash: int | None = None,
                     start: int = 0) -> list[int]:
    """Chained hashes of every full block of ``token_ids[start:]`` (``start`` a multiple of block_size).

    block_size: tokens per block. parent_hash: hash of the block before ``start``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if start % block_size:
        raise ValueError(f"start must be a multiple of block_size ({block_size}), got {start}")
    hashes = []
    for begin in range(start, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block_tokens(parent_hash, token_ids[begin:begin + block_size])
        hashes.append(parent_hash)
    return hashes


def short_hash(block_hash: int | None) -> str:
    """Six hex digits of a block hash for display; '' for None."""
    return "" if block_hash is None else f"{block_hash & 0xFFFFFF:06x}"
