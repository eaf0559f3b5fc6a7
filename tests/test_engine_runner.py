"""The engine's model runner against the model's own forward pass, step by step.

Each sequence is fed as the engine feeds it: a prompt in one chunk or in several (7 + 5 + 1 tokens),
then one token per step, with K/V only in the runner's paged pools and block tables shuffled so that
physical blocks are out of order. Every logit row must equal the row of transformers' eager forward
over the whole sequence (fp32, 1e-4). Tiny random models cover each supported family: a GQA Llama, a
Qwen2 with q/k/v biases, a Qwen3 with q_norm/k_norm, a Mistral whose sliding window is shorter than
the sequence, a Qwen2 with full and windowed layers; the bundled model covers a trained one.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from kvcore.engine.forward import RotaryTable
from kvcore.engine.pools import KVPools
from kvcore.engine.runner import ModelRunner, SequenceChunk, unsupported
from kvcore.kernels import DecodeBatch, native
from kvcore.models import load_model
from kvcore.quant import QuantizedTensor

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=128, tie_word_embeddings=False)
FAMILIES = {
    "llama-gqa": (LlamaConfig, {}),
    "qwen2-bias": (Qwen2Config, {}),
    "qwen3-qk-norm": (Qwen3Config, {}),
    "mistral-window": (MistralConfig, {"sliding_window": 5}),
    "qwen2-mixed-window": (Qwen2Config, {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
}
CHUNKINGS = {"one-chunk": (13,), "chunked": (7, 5, 1), "short-prompt": (3,)}  # the last decodes across windows
TOTAL = 24
BLOCK_SIZE, NUM_BLOCKS = 4, 16


def tiny_model(name: str, seed: int = 0):
    """A tiny random model of one family, eager attention, with weights large enough that attention
    patterns, biases and norm weights all move the logits (default init leaves them near zero or one)."""
    config_class, extra = FAMILIES[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_class(**TINY, **extra), attn_implementation="eager",
                                             dtype=torch.float32).eval()
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if param_name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif param_name.endswith("bias"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def tiny_models():
    return {name: tiny_model(name) for name in FAMILIES}


@pytest.fixture(scope="module")
def bundled():
    return load_model(None, "cpu")[0]


def token_ids(n: int, vocab: int = VOCAB, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def shuffled_table(num_tokens: int, seed: int = 2, num_blocks: int = NUM_BLOCKS) -> list[int]:
    """Physical blocks for ``num_tokens`` tokens, out of order (block 0 never used: tests poison it)."""
    order = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    return order[:math.ceil(num_tokens / BLOCK_SIZE)]


def run_sequence(runner: ModelRunner, ids: list[int], chunking: tuple[int, ...], table: list[int],
                 before_step=None) -> tuple[torch.Tensor, list[int]]:
    """Prefill ``ids[:sum(chunking)]`` in the given chunks, then decode the rest one token per step.

    Returns the logits of every step ``[steps, vocab]`` and the position each row predicts from.
    before_step(start, table): may edit the block table before a step (e.g. drop blocks out of the window).
    """
    rows, positions, start = [], [], 0
    steps = list(chunking) + [1] * (len(ids) - sum(chunking))
    for n in steps:
        if before_step is not None:
            before_step(start, table)
        rows.append(runner.execute([SequenceChunk("s", ids[start:start + n], start, table)])[0])
        positions.append(start + n - 1)
        start += n
    return torch.stack(rows), positions


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """transformers' own eager forward over the whole sequence: ``[T, vocab]``."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def max_diff_to_hf(model, chunking, **runner_kwargs) -> float:
    ids = token_ids(TOTAL, model.config.vocab_size)
    runner = ModelRunner(model, NUM_BLOCKS, BLOCK_SIZE, **runner_kwargs)
    logits, positions = run_sequence(runner, ids, chunking, shuffled_table(TOTAL))
    return float((logits - hf_logits(model, ids)[positions]).abs().max())


# --- equality with the model's own forward -------------------------------------------------------------


@pytest.mark.parametrize("chunking", CHUNKINGS.values(), ids=CHUNKINGS.keys())
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_chunks_and_decode_equal_the_hf_forward(tiny_models, family, chunking):
    assert max_diff_to_hf(tiny_models[family], chunking) < 1e-4


@pytest.mark.parametrize("chunking", CHUNKINGS.values(), ids=CHUNKINGS.keys())
def test_bundled_model_equals_its_hf_forward(bundled, chunking):
    assert max_diff_to_hf(bundled, chunking) < 1e-4


def test_the_window_test_can_fail(tiny_models):
    """Attending to the whole context would break the windowed families: the comparison sees it."""
    assert max_diff_to_hf(tiny_models["mistral-window"], (7, 5, 1), sliding_window=1000) > 1e-2


def test_blocks_before_every_window_are_never_read(tiny_models):
    """Mistral, window 5: once a block lies wholly before the window of every query of a step the engine
    may free and reuse it; here its table entry is pointed at block 0, filled with NaN in every layer."""
    model, window = tiny_models["mistral-window"], 5
    ids = token_ids(TOTAL)
    runner = ModelRunner(model, NUM_BLOCKS, BLOCK_SIZE)
    for pool in (*runner.pools.keys, *runner.pools.values):
        pool[0] = float("nan")
    dropped = []

    def drop_dead_blocks(start: int, table: list[int]) -> None:
        oldest = max(0, start - window + 1)  # the oldest key position any query of this step sees
        for b in range(oldest // BLOCK_SIZE):
            if table[b] != 0:
                table[b] = 0
                dropped.append(b)

    logits, positions = run_sequence(runner, ids, (7, 5, 1), shuffled_table(TOTAL), drop_dead_blocks)
    assert dropped == [0, 1, 2, 3]  # the window has passed blocks 0-3 (positions 0-15) by the last step
    assert torch.isfinite(logits).all()
    assert (logits - hf_logits(model, ids)[positions]).abs().max() < 1e-4


def test_a_one_token_prompt_is_a_prefill(tiny_models):
    model = tiny_models["llama-gqa"]
    ids = token_ids(6)
    runner = ModelRunner(model, NUM_BLOCKS, BLOCK_SIZE)
    logits, positions = run_sequence(runner, ids, (1,), shuffled_table(6))
    assert (logits - hf_logits(model, ids)[positions]).abs().max() < 1e-4


# --- a mixed batch ---------------------------------------------------------------------------------------


def test_a_mixed_batch_equals_each_sequence_alone(tiny_models):
    """Two sequences prefilling chunks (one from scratch, one after a cached prefix) and three decoding,
    over shuffled physical blocks, in one step: each row equals that sequence run alone."""
    model = tiny_models["llama-gqa"]
    num_blocks = 40
    order = (torch.randperm(num_blocks, generator=torch.Generator().manual_seed(5))).tolist()
    # (computed before the step, fed this step, wants_logits)
    plan = {"new": (0, 9, True), "chunk": (8, 6, False), "d1": (5, 1, True), "d2": (17, 1, True), "d3": (11, 1, True)}
    ids = {name: token_ids(start + n, seed=10 + i) for i, (name, (start, n, _)) in enumerate(plan.items())}
    tables = {}
    for name, (start, n, _) in plan.items():
        need = math.ceil((start + n) / BLOCK_SIZE)
        tables[name], order = order[:need], order[need:]
    batched = ModelRunner(model, num_blocks, BLOCK_SIZE)
    for name, (start, _, _) in plan.items():  # the cached contexts, one sequence per step
        if start:
            batched.execute([SequenceChunk(name, ids[name][:start], 0, tables[name])])
    step = [SequenceChunk(name, ids[name][start:start + n], start, tables[name], wants)
            for name, (start, n, wants) in plan.items()]
    rows = batched.execute(step)
    assert rows.shape == (4, VOCAB)
    assert rows.dtype == torch.float32
    assert rows.device.type == "cpu"
    alone = []
    for name, (start, n, wants) in plan.items():
        runner = ModelRunner(model, num_blocks, BLOCK_SIZE)
        if start:
            runner.execute([SequenceChunk(name, ids[name][:start], 0, tables[name])])
        out = runner.execute([SequenceChunk(name, ids[name][start:start + n], start, tables[name], wants)])
        alone += [out[0]] if wants else []
        assert out.shape[0] == int(wants)
    assert (rows - torch.stack(alone)).abs().max() < 1e-5
    # and the skipped row's K/V landed: the chunked sequence decodes on as the full forward says
    follow = batched.execute([SequenceChunk("chunk", [3], 14, tables["chunk"])])
    assert (follow[0] - hf_logits(model, ids["chunk"] + [3])[-1]).abs().max() < 1e-4


def spy_decode_calls(monkeypatch, quantized: bool = False) -> list[int]:
    """Record the batch size of every decode-kernel call (over quantized pools when ``quantized``)."""
    calls, real = [], DecodeBatch.attend

    def spy(self, query, key_cache, *args):
        assert isinstance(key_cache, QuantizedTensor) == quantized
        calls.append(query.shape[0])
        return real(self, query, key_cache, *args)

    monkeypatch.setattr(DecodeBatch, "attend", spy)
    return calls


def test_decode_rows_share_one_kernel_call_per_layer(tiny_models, monkeypatch):
    model = tiny_models["llama-gqa"]
    calls = spy_decode_calls(monkeypatch)
    runner = ModelRunner(model, NUM_BLOCKS, BLOCK_SIZE)
    tables = [[1, 2], [3, 4], [5, 6]]
    runner.execute([SequenceChunk(str(i), token_ids(5, seed=i), 0, t) for i, t in enumerate(tables)])
    assert calls == []  # prefill never goes through the decode kernel
    runner.execute([SequenceChunk(str(i), [7], 5, t) for i, t in enumerate(tables)])
    assert calls == [3, 3]  # one call per layer, the three decodes batched


@pytest.mark.skipif(not (native.enabled() and native.compiler()), reason="no C compiler here (or KVLAB_NATIVE=0)")
@pytest.mark.parametrize(("family", "fused"), [("llama-gqa", True), ("qwen2-bias", True), ("qwen3-qk-norm", False)])
def test_rope_and_kv_writes_take_one_kernel_pass_on_fp32_pools(tiny_models, monkeypatch, family, fused):
    """Every layer of every step rotates and stores K/V in the C kernel's one pass (the equality tests above then
    hold for it); Qwen3, whose q/k norms come before RoPE, takes torch's ops."""
    writes = []
    real = KVPools.write
    monkeypatch.setattr(KVPools, "write", lambda self, *args: writes.append(1) or real(self, *args))
    assert max_diff_to_hf(tiny_models[family], (7, 5, 1)) < 1e-4
    assert (writes == []) == fused


# --- quantized pools ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "tolerance"), [(8, 0.05), (4, 0.6)])
def test_quantized_pools_stay_close_to_fp32(tiny_models, bits, tolerance):
    """Measured max |logit difference| to the fp32 runner (logit std 0.81): 0.020 at 8 bits and 0.39 at
    4 bits on this model and sequence; the tolerances leave a margin."""
    model = tiny_models["llama-gqa"]
    ids, table = token_ids(TOTAL), shuffled_table(TOTAL)
    exact, _ = run_sequence(ModelRunner(model, NUM_BLOCKS, BLOCK_SIZE), ids, (7, 5, 1), table)
    quantized, _ = run_sequence(ModelRunner(model, NUM_BLOCKS, BLOCK_SIZE, kv_bits=bits), ids, (7, 5, 1), table)
    diff = float((quantized - exact).abs().max())
    assert 1e-4 < diff < tolerance


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_decode_reads_the_same_codes_as_prefill(tiny_models, bits, monkeypatch):
    """Prefill reads K/V back from the quantized pools too, so a token decoded through the quantized
    kernel gets the logits that a one-chunk prefill of the same tokens gets (fp32 rounding apart)."""
    model = tiny_models["qwen3-qk-norm"]
    calls = spy_decode_calls(monkeypatch, quantized=True)
    ids, table = token_ids(18), shuffled_table(18)
    decoded, positions = run_sequence(ModelRunner(model, NUM_BLOCKS, BLOCK_SIZE, kv_bits=bits), ids, (12,), table)
    assert calls == [1] * 2 * 6  # six decode steps, one call per layer each
    for row, pos in zip(decoded[1:], positions[1:], strict=True):
        fresh = ModelRunner(model, NUM_BLOCKS, BLOCK_SIZE, kv_bits=bits)
        prefilled = fresh.execute([SequenceChunk("s", ids[:pos + 1], 0, table)])[0]
        assert (row - prefilled).abs().max() < 1e-4


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_kv_bytes_counts_every_pool_exactly(tiny_models, bits):
    """2 pools x 2 layers x 16 blocks x 4 slots x 2 KV heads, each slot-head holding D = 32 channels:
    fp32 4 bytes each; quantized D * bits / 8 bytes of codes + an fp16 scale + an fp16 zero."""
    runner = ModelRunner(tiny_models["llama-gqa"], NUM_BLOCKS, BLOCK_SIZE, kv_bits=bits)
    per_slot_head = 32 * 4 if bits is None else 32 * bits // 8 + 2 + 2
    assert runner.kv_bytes == 2 * 2 * NUM_BLOCKS * BLOCK_SIZE * 2 * per_slot_head


# --- copy-on-write, refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [None, 4])
def test_copy_block_copies_every_layer_k_and_v(tiny_models, bits):
    runner = ModelRunner(tiny_models["qwen2-bias"], NUM_BLOCKS, BLOCK_SIZE, kv_bits=bits)
    runner.execute([SequenceChunk("s", token_ids(6), 0, [3, 9])])
    runner.copy_block(9, 12)  # block 9 holds positions 4-5: the one a fork must not share once it writes
    for pool in (*runner.pools.keys, *runner.pools.values):
        parts = [pool] if bits is None else [pool.codes, pool.scales, pool.zeros]
        for t in parts:
            assert torch.equal(t[12], t[9])
            assert t[9].abs().sum() > 0
    # the fork continues in the copy and sees the same context as the original in its own block
    forked = runner.execute([SequenceChunk("f", [5], 6, [3, 12])])
    original = runner.execute([SequenceChunk("s", [5], 6, [3, 9])])
    assert torch.allclose(forked, original, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        runner.copy_block(3, NUM_BLOCKS)


def test_unsupported_names_the_reason():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0,
                                      eos_token_id=0))
    reason = unsupported(gpt2)
    assert "gpt2" in reason
    assert "position embeddings" in reason
    with pytest.raises(ValueError, match="gpt2"):
        ModelRunner(gpt2, NUM_BLOCKS)


def test_supported_models_have_no_reason(tiny_models, bundled):
    assert all(unsupported(m) is None for m in (*tiny_models.values(), bundled))


def test_bad_steps_raise_value_errors_naming_the_problem(tiny_models):
    runner = ModelRunner(tiny_models["llama-gqa"], NUM_BLOCKS, BLOCK_SIZE)
    with pytest.raises(ValueError, match="do not fit"):
        runner.execute([SequenceChunk("s", token_ids(6), 0, [1])])
    with pytest.raises(ValueError, match="twice"):
        runner.execute([SequenceChunk("s", [1], 0, [1]), SequenceChunk("s", [2], 0, [2])])
    with pytest.raises(ValueError, match="must be in"):
        runner.execute([SequenceChunk("s", [1], 0, [NUM_BLOCKS])])
    with pytest.raises(ValueError, match="token ids"):
        runner.execute([SequenceChunk("s", [VOCAB], 0, [1])])
    with pytest.raises(ValueError, match="at least one token"):
        SequenceChunk("s", [], 0, [1])
    with pytest.raises(ValueError, match="kv_bits"):
        ModelRunner(tiny_models["llama-gqa"], NUM_BLOCKS, kv_bits=3)
    assert runner.execute([]).shape == (0, VOCAB)


def test_the_rotary_table_is_the_models_rotary_and_grows_when_a_step_reaches_past_it(bundled):
    module = bundled.model.rotary_emb
    table = RotaryTable(module)
    like = torch.empty(3, bundled.config.hidden_size)
    positions = torch.tensor([0, 7, 255])
    cos, signed_sin = table(positions, 256, like)
    assert len(table.cos) == 256  # the first step sizes it: at least 256 positions
    expected_cos, sin = module(like[None], positions[None])  # [1, 3, D]
    half = sin.shape[-1] // 2
    assert torch.allclose(cos[:, 0], expected_cos[0], atol=1e-6)
    assert torch.allclose(signed_sin[:, 0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1), atol=1e-6)
    table(torch.tensor([300]), 301, like)
    assert len(table.cos) == 512  # twice as long once a step reaches past it
    assert torch.equal(table(positions, 256, like)[0], cos)
