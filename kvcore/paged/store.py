"""The physical paged KV store: per layer a key pool and a value pool of shape
``[num_blocks, block_size, Hkv, D]`` (vLLM's cache layout), written through a slot mapping.

Token position ``p`` of a request lives in slot ``block_table[p // block_size] * block_size +
p % block_size`` (vLLM's ``slot_mapping``), so a sequence is contiguous only logically.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcore.tensors import tensor_bytes


def slot_mapping(block_table: Sequence[int], block_size: int, start: int, num_tokens: int) -> torch.Tensor:
    """Slots (``block_id * block_size + offset``) of token positions ``start .. start + num_tokens - 1``.

    Raises ValueError if a position falls past the end of the block table.
    """
    end = start + num_tokens
    if start < 0 or num_tokens < 0 or end > len(block_table) * block_size:
        raise ValueError(f"positions {start}..{end - 1} do not fit a block table of {len(block_table)} blocks "
                         f"x {block_size} slots")
    positions = torch.arange(start, end)
    table = torch.as_tensor(list(block_table), dtype=torch.long)
    return table[positions // block_size] * block_size + positions % block_size


class PagedKVStore:
    """Key and value pools for every layer, preallocated like vLLM's KV cache tensors.

    num_blocks, block_size: pool geometry in blocks and token slots per block.
    num_layers, num_kv_heads, head_dim: the model's KV shape. dtype/device: of the pools.
    """

    def __init__(self, num_blocks: int, block_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size), ("num_layers", num_layers),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.block_size = block_size
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.key_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def num_layers(self) -> int:
        return len(self.key_caches)

    @property
    def nbytes(self) -> int:
        """Bytes held by all pools (reserved, whether or not a slot is in use)."""
        return tensor_bytes(*self.key_caches, *self.value_caches)

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write K/V ``[L, T, Hkv, D]`` of T tokens into ``slots`` ``[T]`` of every layer."""
        if keys.shape != values.shape or keys.dim() != 4 or keys.shape[0] != self.num_layers:
            raise ValueError(f"keys and values must both be [num_layers={self.num_layers}, T, Hkv, D], "
                             f"got {tuple(keys.shape)} and {tuple(values.shape)}")
        if keys.shape[1] != len(slots):
            raise ValueError(f"{keys.shape[1]} tokens of K/V but {len(slots)} slots")
        slots = slots.to(self.key_caches[0].device)
        for layer in range(self.num_layers):
            k_pool, v_pool = self.key_caches[layer], self.value_caches[layer]
            # [num_blocks, block_size, Hkv, D] -> [num_blocks * block_size, Hkv, D]
            k_pool.view(-1, *k_pool.shape[2:])[slots] = keys[layer].to(k_pool.dtype)
            v_pool.view(-1, *v_pool.shape[2:])[slots] = values[layer].to(v_pool.dtype)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's K/V in every layer (copy-on-write)."""
        for pool in (*self.key_caches, *self.value_caches):
            pool[dst].copy_(pool[src])

    def gather(self, layer: int, block_table: Sequence[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence's K and V in one layer as contiguous ``[Hkv, T, D]`` tensors (for checks)."""
        slots = slot_mapping(block_table, self.block_size, 0, num_tokens).to(self.key_caches[layer].device)
        k_pool, v_pool = self.key_caches[layer], self.value_caches[layer]
        keys = k_pool.view(-1, *k_pool.shape[2:])[slots]  # [T, Hkv, D]
        values = v_pool.view(-1, *v_pool.shape[2:])[slots]  # [T, Hkv, D]
        return keys.transpose(0, 1).contiguous(), values.transpose(0, 1).contiguous()  # [Hkv, T, D]
