"""A block manager wired to a paged KV store: prefill and decode write real K/V through block tables.

The manager decides where tokens go (vLLM's scheduler + KV cache manager); this class does what
vLLM's model runner does with that decision: writes each new token's K/V into its slot, copies a
block on copy-on-write, and skips the prompt tokens served from the prefix cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcore.paged.manager import KVCacheManager
from kvcore.paged.store import PagedKVStore, slot_mapping
from kvcore.paged.synthetic import synthetic_kv

EMPTY_SLOT = -1


class PagedKVCache:
    """KVCacheManager + PagedKVStore + the token id held in every slot (for views and checks).

    num_blocks, block_size: pool geometry. num_layers, num_kv_heads, head_dim: KV shape per token.
    When prefill/decode get no K/V, :func:`synthetic_kv` of the tokens is written (seed ``kv_seed``).
    """

    def __init__(self, num_blocks: int, block_size: int, num_layers: int = 1, num_kv_heads: int = 1,
                 head_dim: int = 4, enable_prefix_caching: bool = True, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, log_events: bool = True, kv_seed: int = 0) -> None:
        self.store = PagedKVStore(num_blocks, block_size, num_layers, num_kv_heads, head_dim, dtype, device)
        self.manager = KVCacheManager(num_blocks, block_size, enable_prefix_caching, log_events=log_events,
                                      on_copy=self._copy_block)
        self.slot_token_ids = [EMPTY_SLOT] * (num_blocks * block_size)
        self.kv_seed = kv_seed

    @property
    def block_size(self) -> int:
        """Token slots per block."""
        return self.manager.block_size

    def prefill(self, request_id: str, token_ids: Sequence[int], keys: torch.Tensor | None = None,
                values: torch.Tensor | None = None) -> list[int] | None:
        """Allocate the prompt and write K/V ``[L, T, Hkv, D]`` of the tokens not hit in the prefix cache.

        keys/values: for all T prompt tokens (the hit ones are ignored) or None for synthetic K/V.
        Returns the block table or None when out of blocks (nothing written).
        """
        table = self.manager.allocate(request_id, token_ids)
        if table is None:
            return None
        start = self.manager.num_cached_tokens(request_id)
        self._write(request_id, table, token_ids, start, keys, values)
        return table

    def decode(self, request_id: str, token_ids: Sequence[int], keys: torch.Tensor | None = None,
               values: torch.Tensor | None = None) -> list[int] | None:
        """Append generated tokens and write their K/V ``[L, k, Hkv, D]`` (None: synthetic).

        Returns the block table or None when out of blocks (nothing written).
        """
        start = self.manager.num_tokens(request_id)
        table = self.manager.append(request_id, token_ids)
        if table is None or len(token_ids) == 0:
            return table
        all_tokens = self.manager.token_ids(request_id)
        self._write(request_id, table, all_tokens, start, keys, values, given_from=start)
        return table

    def fork(self, parent_id: str, child_id: str) -> None:
        """Share the parent's blocks with a child (no data moves until a copy-on-write)."""
        self.manager.fork(parent_id, child_id)

    def free(self, request_id: str) -> None:
        """Free the request's blocks; their K/V stay in the pools (cached blocks can be hit again)."""
        self.manager.free(request_id)

    def gather(self, request_id: str, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The request's K and V in ``layer`` as contiguous ``[Hkv, T, D]``."""
        return self.store.gather(layer, self.manager.block_table(request_id), self.manager.num_tokens(request_id))

    def block_token_ids(self, block_id: int) -> list[int]:
        """Token ids physically in the block's slots (EMPTY_SLOT where never written)."""
        bs = self.block_size
        return self.slot_token_ids[block_id * bs:(block_id + 1) * bs]

    def _write(self, request_id: str, table: list[int], token_ids: Sequence[int], start: int,
               keys: torch.Tensor | None, values: torch.Tensor | None, given_from: int = 0) -> None:
        num_new = len(token_ids) - start
        if num_new <= 0:
            return
        if keys is None or values is None:
            s = self.store
            keys, values = synthetic_kv(token_ids, s.num_layers, s.key_caches[0].shape[2],
                                        s.key_caches[0].shape[3], start, self.kv_seed)
        else:
            keys, values = keys[:, start - given_from:], values[:, start - given_from:]  # [L, num_new, Hkv, D]
        slots = slot_mapping(table, self.block_size, start, num_new)
        self.store.write(slots, keys, values)
        for slot, token in zip(slots.tolist(), token_ids[start:], strict=True):
            self.slot_token_ids[slot] = int(token)

    def _copy_block(self, src: int, dst: int) -> None:
        self.store.copy_block(src, dst)
        bs = self.block_size
        self.slot_token_ids[dst * bs:(dst + 1) * bs] = self.slot_token_ids[src * bs:(src + 1) * bs]
