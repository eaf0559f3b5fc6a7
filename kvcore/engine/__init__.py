"""A real paged serving engine: the model's own weights and modules, the lab's blocks, kernels and scheduler.

Names follow vLLM's offline API (``LLMEngine``, ``SamplingParams``, ``RequestOutput``).
"""

from kvcore.engine.engine import LLMEngine
from kvcore.engine.params import CompletionOutput, EngineStats, RequestOutput, SamplingParams
from kvcore.engine.runner import ModelRunner, SequenceChunk, unsupported

__all__ = ["CompletionOutput", "EngineStats", "LLMEngine", "ModelRunner", "RequestOutput", "SamplingParams",
           "SequenceChunk", "unsupported"]
