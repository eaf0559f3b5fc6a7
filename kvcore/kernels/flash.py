"""Split-K softmax pieces shared by the chunked kernels (flash-decoding).

Follows flash-decoding (Dao et al. 2023, "Flash-Decoding for long-context inference") and vLLM's
PagedAttention V2: the keys of a sequence are cut into chunks; each chunk yields a partial result
``(m, l, o)`` = (max score, sum of exp(score - m), sum of exp(score - m) * value); a final reduction
rescales the partials to a common max and divides. No chunk ever needs the others, so the full score
row is never held and the softmax stays exact (not an approximation).
"""

from __future__ import annotations

import math

import torch


def chunk_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m_out: torch.Tensor, l_out: torch.Tensor,
                  o_out: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Write one chunk's partial softmax state into ``m_out``, ``l_out``, ``o_out``.

    q: fp32 queries already multiplied by the softmax scale, ``[..., Hkv, G, D]`` (G query heads per KV
    head, kept as a dimension instead of repeating K/V). k/v: fp32 ``[..., Hkv, C, D]`` for the chunk's
    C tokens (strided views are fine). mask: optional bool ``[..., 1, 1, C]``, True = attend; every row
    must attend to at least one token. Outputs: ``m_out``/``l_out`` ``[..., Hkv, G, 1]`` and
    ``o_out`` ``[..., Hkv, G, D]``.
    """
    scores = torch.matmul(q, k.transpose(-1, -2))  # [..., Hkv, G, C]
    if mask is not None:
        scores.masked_fill_(~mask, -math.inf)
    torch.amax(scores, dim=-1, keepdim=True, out=m_out)
    scores.sub_(m_out).exp_()  # p = exp(s - m), in place: the chunk's scores are not needed again
    torch.sum(scores, dim=-1, keepdim=True, out=l_out)
    torch.matmul(scores, v, out=o_out)


def merge_partials(m: torch.Tensor, l: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Reduce P chunk partials to the attention output: ``sum_i e^(m_i - M) o_i / sum_i e^(m_i - M) l_i``.

    m/l: ``[P, ..., 1]``; o: ``[P, ..., D]``. A partial with ``m = -inf``, ``l = 0`` and ``o = 0``
    (a chunk a sequence does not reach) gets weight 0. Returns ``[..., D]``.
    """
    m_max = m.amax(dim=0)  # [..., 1]
    weights = torch.exp(m - m_max)  # [P, ..., 1]
    return (o * weights).sum(dim=0) / (l * weights).sum(dim=0)


def empty_partials(num_chunks: int, lead: tuple[int, ...], head_dim: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial buffers that weigh nothing until written: m = -inf, l = 0, o = 0.

    Returns m/l ``[num_chunks, *lead, 1]`` and o ``[num_chunks, *lead, head_dim]`` in fp32.
    """
    m = torch.full((num_chunks, *lead, 1), -math.inf, device=device)
    l = torch.zeros(num_chunks, *lead, 1, device=device)
    o = torch.zeros(num_chunks, *lead, head_dim, device=device)
    return m, l, o
