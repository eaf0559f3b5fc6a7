"""Sharing KV across heads and layers: MHA / GQA / MQA memory, MHA->GQA conversion, cross-layer sharing, tiny runs.

Names are imported on first use (PEP 562), so ``import kvcore.sharing`` stays cheap (the calculator
needs no torch). Public API (see each module):

- :func:`divisors`, :func:`with_kv_heads`, :func:`head_variants`, :func:`kv_heads_table`, :func:`fit_table`,
  :func:`group_map` (calc: bytes and capacity, no torch)
- :func:`pool_kv_heads`, :func:`valid_groups`, :class:`ConvertSettings`, :func:`convert_experiment`,
  :func:`eval_streams` (convert: mean pooling + uptraining, Ainslie et al. 2023)
- :class:`CrossLayerSettings`, :func:`cross_layer_plan`, :func:`crosslayer_experiment`, :func:`crosslayer_sweep`,
  :func:`layer_roles`, :func:`text_windows` (crosslayer: CLA / MiniCache)
- :class:`VariantSettings`, :func:`live_settings`, :func:`train_variants`, :func:`shipped_results` (variants)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "kvcore.sharing.calc": ("head_variants", "kv_heads_table", "fit_table", "group_map", "divisors", "with_kv_heads"),
    "kvcore.sharing.convert": ("pool_kv_heads", "valid_groups", "ConvertSettings", "ConvertResult",
                               "convert_experiment", "eval_streams", "measured_kv_bytes_per_token"),
    "kvcore.sharing.crosslayer": ("CrossLayerSettings", "CrossLayerResult", "cross_layer_plan",
                                  "crosslayer_experiment", "crosslayer_sweep", "layer_roles", "text_windows", "MODES"),
    "kvcore.sharing.variants": ("VariantSettings", "VariantResult", "live_settings", "train_variants",
                                "shipped_results", "decode_tokens_per_s"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'kvcore.sharing' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
