"""Real models for KV Cache Lab: the bundled offline model, cache adapters, attention capture, perplexity.

Names are imported on first use (PEP 562), so ``import kvcore.models`` stays cheap until a model is
needed. Public API (see each module for details):

- :func:`load_model` ``(name_or_path=None, device=None) -> (model, tokenizer)``; :func:`bundled_text`,
  :func:`bundled_documents`, :func:`model_shape`, ``HUB_MODELS`` (loader)
- :class:`LabCache`, :class:`LabLayer`, :func:`new_cache` (cache: keep / re-rotate / bytes)
- :class:`CachePlan`, :class:`StepState`, :class:`EvictionHook`, :func:`run_step`, :func:`cache_plans` (policy)
- :func:`rope_inv_freq`, :func:`rotate` (rope); :class:`QueryCapture` (capture)
- :func:`capture_attention`, :func:`detect_patterns`, :func:`layer_summary`, :class:`AttentionPatterns` (attention)
- :func:`token_nll`, :func:`streaming_nll`, :func:`perplexity`, :func:`bits_per_byte` (perplexity)
- :func:`generate_stream`, :func:`generate_table`, :func:`events_table`, :func:`compare_to_full`,
  :class:`GenerationSettings`, :class:`TokenEvent`, :func:`timing_summary` (generate)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "kvcore.models.loader": ("load_model", "bundled_text", "bundled_documents", "model_shape", "HUB_MODELS",
                             "BUNDLED_DIR", "BUNDLED_NAME", "check_hub_model"),
    "kvcore.models.cache": ("LabCache", "LabLayer", "new_cache", "normalize_keep_index"),
    "kvcore.models.policy": ("CachePlan", "StepState", "EvictionHook", "run_step", "cache_plans", "FULL"),
    "kvcore.models.rope": ("rope_inv_freq", "rotate"),
    "kvcore.models.capture": ("QueryCapture",),
    "kvcore.models.attention": ("capture_attention", "detect_patterns", "layer_summary", "AttentionPatterns"),
    "kvcore.models.perplexity": ("token_nll", "streaming_nll", "perplexity", "bits_per_byte"),
    "kvcore.models.generate": ("generate_stream", "generate_table", "events_table", "compare_to_full",
                               "GenerationSettings", "TokenEvent", "timing_summary"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'kvcore.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
