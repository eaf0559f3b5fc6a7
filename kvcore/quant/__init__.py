"""KV cache quantization: packed integer codes (2/3/4/8 bits), KIVI, fp16 sinks and outliers, FP8, low rank.

Every stored form reports ``nbytes`` exactly (packed codes + scales + zeros + anything kept in fp16),
and ``dequantize()`` rebuilds the tensor. :data:`METHODS` is the registry that the Quantization page,
``python -m kvcore quant`` and :func:`kvcore.quant.evaluate.evaluate` iterate over.
"""

from kvcore.quant.codecs import Fp8Codec, Fp16Codec, IntCodec, LowRankCodec
from kvcore.quant.formats import Fp8Tensor, LowRankTensor, SparseOutliers, quantize_fp8
from kvcore.quant.integer import QuantizedTensor, quantize
from kvcore.quant.methods import METHODS, CustomSettings, QuantMethod, custom_method, kivi, method_named
from kvcore.quant.packing import pack_codes, unpack_codes
from kvcore.quant.stream import KiviCache, KVStream, QuantizedKV

__all__ = [
    "METHODS",
    "CustomSettings",
    "Fp8Codec",
    "Fp8Tensor",
    "Fp16Codec",
    "IntCodec",
    "KVStream",
    "KiviCache",
    "LowRankCodec",
    "LowRankTensor",
    "QuantMethod",
    "QuantizedKV",
    "QuantizedTensor",
    "SparseOutliers",
    "custom_method",
    "kivi",
    "method_named",
    "pack_codes",
    "quantize",
    "quantize_fp8",
    "unpack_codes",
]
