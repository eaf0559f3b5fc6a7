"""Sharing KV across heads and layers: MHA / GQA / MQA memory, MHA->GQA conversion, cross-layer sharing, tiny runs.

Modules (the package itself imports only the torch-free calculator):

- :mod:`~kvcore.sharing.calc`: bytes and capacity per KV head count (no torch)
- :mod:`~kvcore.sharing.convert`: mean pooling of K/V heads + uptraining (Ainslie et al. 2023)
- :mod:`~kvcore.sharing.crosslayer`: cross-layer sharing and merging (CLA, Brandon et al. 2024; MiniCache)
- :mod:`~kvcore.sharing.variants`: tiny models trained from scratch that differ only in KV heads
"""

from kvcore.sharing.calc import divisors, fit_table, group_map, head_variants, kv_heads_table, with_kv_heads

__all__ = ["divisors", "fit_table", "group_map", "head_variants", "kv_heads_table", "with_kv_heads"]
