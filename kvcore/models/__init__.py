"""Real models for KV Cache Lab, the bottom layer: loading, cache adapters, runtime helpers, perplexity.

Knows no cache policy: eviction and quantization build on it, and :mod:`kvcore.plans` combines them.
Modules: ``loader`` (the bundled offline model, Hub and local models), ``runtime`` (devices, shapes,
token ids), ``cache`` (a transformers cache that can drop, re-rotate and count entries), ``plan`` (a
cache plan and the one forward step every loop uses), ``capture`` / ``attention`` (queries, outputs,
attention maps, sinks and heavy hitters), ``perplexity``, ``generate``, ``live`` (the Live model
page's run), ``training`` / ``corpus`` / ``stats`` (the bundled model's training and measurements).
"""

from kvcore.models.loader import BUNDLED_DIR, BUNDLED_NAME, HUB_MODELS, bundled_documents, bundled_text, load_model

__all__ = ["BUNDLED_DIR", "BUNDLED_NAME", "HUB_MODELS", "bundled_documents", "bundled_text", "load_model"]
