"""Model and GPU shapes, and the one KV memory formula every page uses.

Model values come from each model's published ``config.json`` on the Hugging Face Hub; parameter
counts are recomputed from those configs (embeddings, attention, MLP, norms, biases). GPU values are
the vendors' datasheet figures (dense, no sparsity). Nothing here imports torch, so the Home page
starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvcore.checks import positive_ints, positive_numbers

GB = 1e9
GIB = 1024**3


@dataclass(slots=True, frozen=True)
class ModelShape:
    """The parts of a decoder-only transformer that decide its KV cache and weight memory.

    num_q_heads / num_kv_heads: attention heads for queries and for keys/values (equal = MHA,
    1 = MQA, in between = GQA). head_dim in elements. num_params counts every weight.
    """

    name: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    num_params: int
    hidden_size: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0
    max_context: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        positive_ints(self, "num_layers", "num_q_heads", "num_kv_heads", "head_dim", "num_params")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}): each KV head serves a whole group of query heads"
            )

    @property
    def attention_kind(self) -> str:
        """'MHA', 'GQA' or 'MQA'."""
        if self.num_kv_heads == self.num_q_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    @property
    def group_size(self) -> int:
        """Query heads that read one KV head."""
        return self.num_q_heads // self.num_kv_heads

    def with_kv_heads(self, num_kv_heads: int) -> ModelShape:
        """The same model with another number of KV heads (MHA/GQA/MQA variants)."""
        return replace(self, name=f"{self.name} ({num_kv_heads} KV heads)", num_kv_heads=num_kv_heads)


@dataclass(slots=True, frozen=True)
class GpuSpec:
    """An accelerator's datasheet numbers.

    hbm_bytes: device memory in bytes; hbm_bandwidth: bytes/s; bf16_flops: dense FLOP/s;
    host_link_bandwidth: bytes/s per direction between host memory and the device.
    """

    name: str
    hbm_bytes: float
    hbm_bandwidth: float
    bf16_flops: float
    host_link_bandwidth: float
    host_link: str = ""

    def __post_init__(self) -> None:
        positive_numbers(self, "hbm_bytes", "hbm_bandwidth", "bf16_flops", "host_link_bandwidth")

    @property
    def ridge_point(self) -> float:
        """FLOPs per byte where compute and memory time are equal (roofline ridge)."""
        return self.bf16_flops / self.hbm_bandwidth


def _hf(repo: str) -> str:
    return f"https://huggingface.co/{repo}/blob/main/config.json"


PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("gpt2", 12, 12, 12, 64, 124_439_808, 768, 3072, 50257, 1024, _hf("openai-community/gpt2")),
        ModelShape("llama-2-7b", 32, 32, 32, 128, 6_738_415_616, 4096, 11008, 32000, 4096,
                   _hf("meta-llama/Llama-2-7b-hf")),
        ModelShape("llama-3-8b", 32, 32, 8, 128, 8_030_261_248, 4096, 14336, 128256, 8192,
                   _hf("meta-llama/Meta-Llama-3-8B")),
        ModelShape("llama-3-70b", 80, 64, 8, 128, 70_553_706_496, 8192, 28672, 128256, 8192,
                   _hf("meta-llama/Meta-Llama-3-70B")),
        ModelShape("mistral-7b", 32, 32, 8, 128, 7_241_732_096, 4096, 14336, 32000, 32768,
                   _hf("mistralai/Mistral-7B-v0.1")),
        ModelShape("qwen2.5-7b", 28, 28, 4, 128, 7_615_616_512, 3584, 18944, 152064, 131072,
                   _hf("Qwen/Qwen2.5-7B")),
        ModelShape("falcon-7b", 32, 71, 1, 64, 6_921_720_704, 4544, 18176, 65024, 2048, _hf("tiiuae/falcon-7b")),
        # the lab's offline real model (kvcore.models.load_model("smollm2-135m")): GQA, 9 query heads per 3 KV heads
        ModelShape("smollm2-135m", 30, 9, 3, 64, 134_515_008, 576, 1536, 49152, 8192,
                   _hf("HuggingFaceTB/SmolLM2-135M-Instruct")),
    )
}

GPU_PRESETS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec("H100 80GB", 80 * GIB, 3.35e12, 989e12, 64e9, "PCIe Gen5 x16"),
        GpuSpec("H200 141GB", 141 * GB, 4.8e12, 989e12, 64e9, "PCIe Gen5 x16"),
        GpuSpec("A100 80GB", 80 * GIB, 2.039e12, 312e12, 32e9, "PCIe Gen4 x16"),
        GpuSpec("L4 24GB", 24 * GIB, 300e9, 121e12, 32e9, "PCIe Gen4 x16"),
        GpuSpec("RTX 4090 24GB", 24 * GIB, 1.008e12, 165.2e12, 32e9, "PCIe Gen4 x16"),
    )
}

KV_BITS = (16, 8, 4, 2)


def kv_bytes(shape: ModelShape, num_tokens: int, batch_size: int = 1, bits: int = 16) -> int:
    """Bytes of K and V over all layers: 2 x layers x kv_heads x head_dim x tokens x batch x bits/8.

    The one memory formula of the lab (vLLM's ``get_kv_cache_spec`` page size, per token). Rounds
    up to whole bytes when bits do not fill a byte. Scales/zeros of quantized caches are counted
    by ``kvcore.quant``, not here.
    """
    if num_tokens < 0 or batch_size < 0:
        raise ValueError(f"num_tokens and batch_size must be >= 0, got {num_tokens}, {batch_size}")
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    total_bits = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * num_tokens * batch_size * bits
    return -(-total_bits // 8)


def weight_bytes(shape: ModelShape, bits: int = 16) -> int:
    """Bytes of the model weights stored at ``bits`` per parameter."""
    return -(-shape.num_params * bits // 8)


def tokens_that_fit(shape: ModelShape, gpu: GpuSpec, bits: int = 16, weight_bits: int = 16,
                    reserve_bytes: float = 0.0) -> int:
    """KV tokens that fit in HBM after the weights (and an optional activation reserve); 0 if none."""
    free = gpu.hbm_bytes - weight_bytes(shape, weight_bits) - reserve_bytes
    per_token = kv_bytes(shape, 1, bits=bits)
    return max(0, int(free // per_token))


def custom_shape(num_layers: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 num_params: int) -> ModelShape:
    """A user-defined shape, validated like the presets."""
    return ModelShape("custom", num_layers, num_q_heads, num_kv_heads, head_dim, num_params)
