"""The engine's KV pools: per layer one key and one value pool of ``[num_blocks, block_size, Hkv, D]``.

Follows vLLM's model runner (``initialize_kv_cache``): the pools are allocated once, before the first
step, and a token's K/V is written into its slot (``block_id * block_size + offset``, vLLM's
``slot_mapping``) by ``reshape_and_cache``. With ``kv_bits`` the pools are the quantized pools of
:func:`kvcore.kernels.quantize_paged_cache` (KIVI-style per token and head along D): each new token is
quantized on its own and its packed codes, scales and zero points are written into its slot, so a block
is appended to without requantizing it, and the quantized decode kernel reads the pools as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcore.kernels import quantize_paged_cache
from kvcore.kernels.native_paged import rope_and_cache
from kvcore.quant import QuantizedTensor, quantize
from kvcore.tensors import tensor_bytes

Pool = torch.Tensor | QuantizedTensor


def _slot_rows(t: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, block_size, Hkv, X]`` -> ``[num_blocks * block_size, Hkv, X]`` (a view: one row per slot)."""
    return t.view(-1, *t.shape[2:])


def _quantized_pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, bits: int,
                    group_size: int | None) -> QuantizedTensor:
    """An empty quantized pool laid out exactly as :func:`quantize_paged_cache` lays one out.

    One zero block is quantized to learn the layout (packed bytes per head, scale groups, scale dtype);
    the full pool is then allocated directly, never as a float tensor.
    """
    num_blocks = shape[0]
    template = quantize_paged_cache(torch.zeros(1, *shape[1:], dtype=dtype, device=device), bits, group_size)

    def grow(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.new_zeros((num_blocks, *t.shape[1:]))  # [num_blocks, block_size, Hkv, X]

    return QuantizedTensor(grow(template.codes), grow(template.scales), grow(template.zeros), template.bits,
                           template.axis, template.group_size, shape, dtype)


@dataclass(slots=True)
class KVPools:
    """Key and value pools of every layer, float (the model's dtype) or quantized to ``kv_bits``.

    keys/values: one pool per layer, ``[num_blocks, block_size, Hkv, D]`` (a :class:`QuantizedTensor`
    of that shape when quantized). kv_bits: None for float pools, else 8 or 4 (2 works too).
    """

    keys: list[Pool]
    values: list[Pool]
    kv_bits: int | None

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, kv_bits: int | None = None,
                 group_size: int | None = None) -> KVPools:
        """Pools for ``num_layers`` layers of ``num_blocks`` blocks of ``block_size`` token slots each.

        group_size: channels per scale group of quantized pools (None = the whole head dim).
        """
        shape = (num_blocks, block_size, num_kv_heads, head_dim)

        def pool() -> Pool:
            if kv_bits is None:
                return torch.zeros(shape, dtype=dtype, device=device)
            return _quantized_pool(shape, dtype, device, kv_bits, group_size)

        return cls([pool() for _ in range(num_layers)], [pool() for _ in range(num_layers)], kv_bits)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(num_blocks, block_size, Hkv, D)`` of every pool."""
        return tuple(self.keys[0].shape)

    @property
    def nbytes(self) -> int:
        """Exact bytes of all pools: float elements, or packed codes + scales + zeros when quantized."""
        if self.kv_bits is None:
            return tensor_bytes(*self.keys, *self.values)
        return sum(p.nbytes for p in (*self.keys, *self.values))

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store K/V ``[T, Hkv, D]`` of T new tokens into ``slots`` ``[T]`` (int64) of one layer."""
        for pool, x in ((self.keys[layer], keys), (self.values[layer], values)):
            if isinstance(pool, torch.Tensor):
                _slot_rows(pool).index_copy_(0, slots, x.to(pool.dtype))
                continue
            q = quantize(x, pool.bits, axis=-1, group_size=pool.group_size)  # each token on its own
            for stored, new in ((pool.codes, q.codes), (pool.scales, q.scales), (pool.zeros, q.zeros)):
                if stored is not None:  # codes [T, Hkv, D * bits / 8]; scales/zeros [T, Hkv, groups]
                    _slot_rows(stored).index_copy_(0, slots, new)

    def rope_and_write(self, layer: int, slots: torch.Tensor, qkv: torch.Tensor, num_q_heads: int, cos: torch.Tensor,
                       signed_sin: torch.Tensor) -> bool:
        """RoPE on the queries and keys of ``qkv [T, Hq + 2 Hkv, D]`` in place and their K/V into ``slots`` in one pass
        of the C kernel (:func:`kvcore.kernels.native_paged.rope_and_cache`); False, with nothing done, where it
        cannot (quantized pools among them): the caller rotates and calls :meth:`write`."""
        return self.kv_bits is None and rope_and_cache(qkv, num_q_heads, cos, signed_sin, slots, self.keys[layer],
                                                       self.values[layer])

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``slots`` ``[L]`` (int64) of one layer as ``[L, Hkv, D]`` in the model's dtype."""
        return _read(self.keys[layer], slots), _read(self.values[layer], slots)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy block ``src`` into block ``dst`` in every layer's K and V pool (copy-on-write)."""
        for pool in (*self.keys, *self.values):
            parts = (pool,) if isinstance(pool, torch.Tensor) else (pool.codes, pool.scales, pool.zeros)
            for t in parts:
                if t is not None:
                    t[dst].copy_(t[src])  # [block_size, Hkv, X]


def _read(pool: Pool, slots: torch.Tensor) -> torch.Tensor:
    """Rows ``slots`` of one pool, dequantized when quantized: ``[L, Hkv, D]``."""
    if isinstance(pool, torch.Tensor):
        return _slot_rows(pool).index_select(0, slots)  # [L, Hkv, D]
    _, _, heads, dim = pool.shape

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else _slot_rows(t).index_select(0, slots)  # [L, Hkv, X]

    part = QuantizedTensor(rows(pool.codes), rows(pool.scales), rows(pool.zeros), pool.bits, 2, pool.group_size,
                           (len(slots), heads, dim), pool.dtype)
    return part.dequantize()  # [L, Hkv, D]
