"""A streaming quantized KV cache: fp16 sinks and recent window, older tokens compressed as they age.

Follows KIVI (Liu et al. 2024, Algorithm 1): the most recent ``residual`` tokens stay in full
precision; older tokens are quantized, keys per channel over groups of G tokens once G of them have
left the window, values per token as soon as they leave it. The first ``n_sink`` tokens can stay
fp16 forever (attention sinks: StreamingLLM, Xiao et al. 2023; KVQuant keeps them too). The cache
holds exactly the stored forms, so ``nbytes`` is what memory holds. ``append`` reports how the
dequantized view changed, so a reader (the transformers cache layer) can keep a running view instead
of dequantizing everything each step; a kernel would dequantize block by block (:meth:`KVStream.blocks`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kvcore.quant.codecs import Codec, Stored
from kvcore.quant.formats import HalfTensor
from kvcore.quant.methods import QuantMethod, kivi
from kvcore.tensors import tensor_bytes


class KVStream:
    """One stream (keys or values) of one layer: ``[B, H, T, D]`` split into sink | aged chunks | recent.

    codec: how aged tokens are stored. n_sink: first tokens kept fp16. residual: most recent tokens
    kept fp16 (R). Aged tokens are compressed in multiples of ``codec.chunk_tokens``, so the fp16
    recent part holds R to R + chunk_tokens - 1 tokens once the stream is long enough.
    """

    def __init__(self, codec: Codec, n_sink: int = 0, residual: int = 0) -> None:
        self.codec, self.n_sink, self.residual = codec, n_sink, residual
        self.sink: torch.Tensor | None = None  # fp16 [B, H, s, D]
        self.chunks: list[Stored] = []
        self.chunk_lengths: list[int] = []
        self.recent: torch.Tensor | None = None  # fp16 [B, H, r, D]
        self.dtype: torch.dtype | None = None
        self.rows = 0  # B x H x D of one token, set on the first append

    @property
    def num_tokens(self) -> int:
        """Tokens held."""
        return self.num_sink + self.num_aged + self.num_recent

    @property
    def num_sink(self) -> int:
        """First tokens held in fp16."""
        return 0 if self.sink is None else self.sink.shape[-2]

    @property
    def num_aged(self) -> int:
        """Tokens stored by the codec (compressed)."""
        return sum(self.chunk_lengths)

    @property
    def num_recent(self) -> int:
        """Most recent tokens held in fp16 (not aged yet)."""
        return 0 if self.recent is None else self.recent.shape[-2]

    @property
    def nbytes(self) -> int:
        """Bytes held: fp16 sink and recent tokens plus every stored chunk, exactly."""
        half = tensor_bytes(self.sink, self.recent)
        return half + sum(c.nbytes for c in self.chunks)

    @property
    def fp16_nbytes(self) -> int:
        """What the held tokens take in fp16: 2 bytes x B x H x T x D."""
        return 2 * self.rows * self.num_tokens

    def append(self, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Add tokens ``[B, H, t, D]``, compress those that aged past the recent window, and return what
        changed in the dequantized view: ``(start position, tokens [B, H, n, D])`` pieces, the new tokens as
        stored in fp16 first, then any range just compressed, as it now reads back."""
        if x.ndim != 4:
            raise ValueError(f"expected [B, H, T, D], got shape {tuple(x.shape)}")
        self.dtype = self.dtype or x.dtype
        self.rows = x.shape[0] * x.shape[1] * x.shape[3]
        start = self.num_tokens
        half = x.to(torch.float16)
        changes = [(start, half.to(self.dtype))]
        take = min(self.n_sink - self.num_sink, x.shape[-2])
        if take > 0:
            self.sink = half[..., :take, :] if self.sink is None else torch.cat([self.sink, half[..., :take, :]], -2)
            half = half[..., take:, :]
        if half.shape[-2] == 0:
            return changes
        self.recent = half if self.recent is None else torch.cat([self.recent, half], dim=-2)  # [B, H, r, D]
        unit = self.codec.chunk_tokens
        due = (self.num_recent - self.residual) // unit * unit
        if due > 0:
            aged_at = self.num_sink + self.num_aged
            changes.append((aged_at, self._store(self.recent[..., :due, :].to(self.dtype))))
            self.recent = self.recent[..., due:, :]
        return changes

    def _store(self, aged: torch.Tensor) -> torch.Tensor:
        """Compress ``aged`` tokens as one chunk; return them as they read back."""
        chunk = self.codec.compress(aged, self.chunks[0] if self.chunks else None)
        self.chunks.append(chunk)
        self.chunk_lengths.append(aged.shape[-2])
        return chunk.dequantize()

    def read(self) -> torch.Tensor | None:
        """Every held token, dequantized from what is stored, in position order ``[B, H, T, D]`` (None when
        empty). A cache reading every step keeps a running view from :meth:`append`'s changes instead."""
        parts = [stored.dequantize() for _, _, stored in self.blocks()]
        return torch.cat(parts, dim=-2) if parts else None

    def blocks(self) -> Iterator[tuple[int, int, Stored]]:
        """``(start, stop, stored)`` for each stored piece in position order; ``stored.dequantize()``
        rebuilds tokens ``[start, stop)``. The per-block path for attention over a quantized cache."""
        start = 0
        pieces: list[tuple[int, Stored]] = []
        if self.sink is not None:
            pieces.append((self.num_sink, HalfTensor(self.sink, self.dtype)))
        pieces += list(zip(self.chunk_lengths, self.chunks, strict=True))
        if self.recent is not None and self.num_recent:
            pieces.append((self.num_recent, HalfTensor(self.recent, self.dtype)))
        for length, stored in pieces:
            yield start, start + length, stored
            start += length


class QuantizedKV:
    """Keys and values of one layer stored with a :class:`QuantMethod`; ``append(k, v)`` then read back.

    k, v: ``[B, Hkv, t, D]``. nbytes: exact bytes of both streams.
    """

    def __init__(self, method: QuantMethod) -> None:
        self.method = method
        self.k = KVStream(method.key, method.n_sink, method.residual)
        self.v = KVStream(method.value, method.n_sink, method.residual)

    def append(self, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[list[tuple[int, torch.Tensor]], list[tuple[int, torch.Tensor]]]:
        """Add new tokens' keys and values (same shape); returns the changes of each view (see
        :meth:`KVStream.append`)."""
        if k.shape != v.shape:
            raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} must have the same shape")
        return self.k.append(k), self.v.append(v)

    def keys(self) -> torch.Tensor | None:
        """All keys, dequantized ``[B, H, T, D]``."""
        return self.k.read()

    def values(self) -> torch.Tensor | None:
        """All values, dequantized ``[B, H, T, D]``."""
        return self.v.read()

    @property
    def num_tokens(self) -> int:
        """Tokens held."""
        return self.k.num_tokens

    @property
    def nbytes(self) -> int:
        """Exact bytes of keys and values as stored."""
        return self.k.nbytes + self.v.nbytes

    @property
    def fp16_nbytes(self) -> int:
        """What the same keys and values take in fp16."""
        return self.k.fp16_nbytes + self.v.fp16_nbytes


class KiviCache(QuantizedKV):
    """KIVI's streaming cache (Liu et al. 2024): keys per-channel and values per-token, ``bits``-bit
    asymmetric in groups of ``group_size``, the last ``residual`` tokens in full precision (fp16).

    Keys age group by group: once ``group_size`` tokens have left the window they are quantized
    together, per channel. Values age token by token, per token in groups of ``group_size`` channels.
    """

    def __init__(self, bits: int = 2, group_size: int = 32, residual: int = 128) -> None:
        super().__init__(kivi(bits, group_size, residual))
