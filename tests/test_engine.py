"""The serving engine: real tokens through the lab's scheduler, blocks and kernels, checked against transformers.

Every greedy output must equal ``model.generate(..., do_sample=False)`` on the prompt alone, and the logits of
every request's last step must equal transformers' own forward over the same tokens, whatever the engine did
in between: chunked prefill, prefix-cache hits, preemption and recompute, forked samples, a sliding window.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kvcore.engine import LLMEngine, SamplingParams
from kvcore.models import bundled_text, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundled(one_thread):
    return load_model(None, "cpu")


@pytest.fixture(scope="module")
def mixed_prompts(bundled):
    """16 prompts of 5 to 400 tokens; four share a 100-token prefix, two are the same prompt."""
    _, tokenizer = bundled
    text = tokenizer(bundled_text())["input_ids"]  # about 42k tokens of held-out text
    lengths = [5, 9, 17, 33, 48, 64, 80, 111, 150, 200, 260, 333, 400]
    prompts = [text[1000 * i: 1000 * i + n] for i, n in enumerate(lengths)]
    prefix = text[30_000:30_100]
    prompts += [prefix + text[31_000:31_020], prefix + text[32_000:32_055], prefix + text[31_000:31_020]]
    return prompts


def reference(model, prompt: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def last_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1].float()


def record_logits(engine: LLMEngine, monkeypatch) -> dict[str, torch.Tensor]:
    """Sequence id -> the logits row it last sampled from, read off the runner's output each step."""
    rows: dict[str, torch.Tensor] = {}
    execute = engine.runner.execute

    def spy(chunks):
        logits = execute(chunks)
        rows.update(zip([c.seq_id for c in chunks if c.wants_logits], logits, strict=True))
        return logits

    monkeypatch.setattr(engine.runner, "execute", spy)
    return rows


def check_against_transformers(model, logits: dict[str, torch.Tensor], prompts, outputs, max_tokens: int) -> None:
    for prompt, output in zip(prompts, outputs, strict=True):
        tokens = output.outputs[0].token_ids
        assert tokens == reference(model, prompt, max_tokens)
        final = logits[output.request_id]
        assert torch.allclose(final, last_logits(model, prompt + tokens[:-1]), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("caching", "chunked"), [(True, True), (False, True), (True, False), (False, False)])
def test_greedy_outputs_and_last_logits_equal_transformers(bundled, mixed_prompts, caching, chunked, monkeypatch):
    model, _ = bundled
    engine = LLMEngine(model, num_blocks=512, block_size=16, max_num_seqs=8, max_num_batched_tokens=512,
                       enable_prefix_caching=caching, enable_chunked_prefill=chunked)
    logits = record_logits(engine, monkeypatch)
    outputs = engine.generate(mixed_prompts, SamplingParams(max_tokens=12))
    check_against_transformers(model, logits, mixed_prompts, outputs, 12)
    assert [o.prompt_token_ids for o in outputs] == mixed_prompts
    if caching:  # the three prompts after the first of the shared prefix hit its 6 full blocks
        assert engine.stats.prefix_cache_hit_tokens >= 2 * 96
        assert [o.num_cached_tokens for o in outputs][-2:] == [96, 112]  # the repeated prompt hits 7 blocks


def test_a_small_pool_preempts_and_recomputes_to_the_same_tokens(bundled, mixed_prompts, monkeypatch):
    model, _ = bundled
    engine = LLMEngine(model, num_blocks=40, block_size=16, max_num_seqs=8, max_num_batched_tokens=256)
    logits = record_logits(engine, monkeypatch)
    outputs = engine.generate(mixed_prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    assert engine.stats.preemptions > 0
    for prompt, output in zip(mixed_prompts, outputs, strict=True):
        tokens = output.outputs[0].token_ids
        assert len(tokens) == 24
        final = logits[output.request_id]
        assert torch.allclose(final, last_logits(model, prompt + tokens[:-1]), atol=1e-4, rtol=0)
    assert engine.stats.peak_blocks_used <= 39  # the null block is never used


def test_a_prefix_hit_skips_the_models_work_for_the_hit_tokens(bundled, mixed_prompts):
    model, _ = bundled
    shared = mixed_prompts[-3:]
    work = {}
    for caching in (False, True):
        engine = LLMEngine(model, num_blocks=256, max_num_seqs=1, max_num_batched_tokens=256,
                           enable_prefix_caching=caching)
        engine.generate(shared, SamplingParams(max_tokens=4, ignore_eos=True))
        work[caching] = (engine.stats.model_tokens, engine.stats.prefix_cache_hit_tokens)
    assert work[False][1] == 0
    assert work[True][1] == 96 + 112  # one request at a time: each later one finds the earlier blocks
    assert work[True][0] == work[False][0] - work[True][1]  # the hit tokens never went through the model


def test_parallel_samples_fork_the_prompt_and_copy_on_write(bundled, monkeypatch):
    model, tokenizer = bundled
    prompt = tokenizer("The import statement")["input_ids"]  # 4 tokens: a partial block shared by the forks
    copies = []
    engine = LLMEngine(model, num_blocks=64, block_size=16, max_num_seqs=4)
    copy = engine.runner.copy_block
    monkeypatch.setattr(engine.runner, "copy_block", lambda src, dst: (copies.append((src, dst)), copy(src, dst)))
    logits = record_logits(engine, monkeypatch)
    out = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=7, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # three draws, not three copies
    assert len(copies) == 2  # the first two writers copy the shared last block; the last one writes in place
    assert out.num_cached_tokens == 0
    for i, sample in enumerate(out.outputs):
        rid = out.request_id if i == 0 else f"{out.request_id}/{i}"
        tokens = sample.token_ids
        assert torch.allclose(logits[rid], last_logits(model, prompt + tokens[:-1]), atol=1e-4, rtol=0)
    greedy = engine.generate([prompt], SamplingParams(max_tokens=6, n=2))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids == reference(model, prompt, 6)


def test_sampling_is_repeatable_with_a_seed(bundled):
    model, tokenizer = bundled
    prompt = tokenizer("A dictionary")["input_ids"]
    engine = LLMEngine(model, num_blocks=32, max_num_seqs=2)
    params = SamplingParams(max_tokens=10, temperature=0.8, seed=3, ignore_eos=True)
    first = engine.generate([prompt], params)[0].outputs[0].token_ids
    again = engine.generate([prompt], params)[0].outputs[0].token_ids
    other = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0.8, seed=4, ignore_eos=True))
    assert first == again
    assert other[0].outputs[0].token_ids != first


def tiny(kind: str):
    torch.manual_seed(0)
    common = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=12)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_gqa_biases_and_sliding_windows_generate_as_transformers(kind):
    model = tiny(kind)
    prompts = [list(range(3, 3 + n)) for n in (5, 19, 30)]
    engine = LLMEngine(model, num_blocks=64, block_size=4, max_num_seqs=3, max_num_batched_tokens=16)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = torch.tensor([prompt])
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert output.outputs[0].token_ids == want
    if kind == "mistral":  # 46-token sequences, a 12-token window: blocks before every window go back to the pool
        assert engine.runner.sliding_window == 12
        assert engine.stats.peak_blocks_used < sum(-(-(len(p) + 16) // 4) for p in prompts)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_pools_hold_fewer_bytes_and_still_generate(bundled, mixed_prompts, bits):
    model, _ = bundled
    full = LLMEngine(model, num_blocks=256, max_num_seqs=8)
    quantized = LLMEngine(model, num_blocks=256, max_num_seqs=8, kv_bits=bits)
    D = 32  # head_dim of the bundled model: codes + an fp16 scale and zero per token and head, vs fp32
    assert quantized.kv_bytes / full.kv_bytes == pytest.approx((D * bits / 8 + 4) / (4 * D))
    prompts = mixed_prompts[:6]
    want = [o.outputs[0].token_ids for o in full.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))]
    got = [o.outputs[0].token_ids for o in quantized.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))]
    assert all(len(g) == 8 for g in got)
    same = sum(a == b for w, g in zip(want, got, strict=True) for a, b in zip(w, g, strict=True))
    assert same >= (0.6 if bits == 8 else 0.2) * 48  # what the benchmark reports; here only a floor


@pytest.mark.parametrize(("prompts", "params", "message"), [
    ([[]], SamplingParams(), "prompt is empty"),
    ([[5, 99_999]], SamplingParams(), "unknown token ids"),
    ([[5, -1]], SamplingParams(), "unknown token ids"),
    ([[5] * 10], SamplingParams(max_tokens=4, n=9), "exceed max_num_seqs"),
    ([[5] * 2000], SamplingParams(max_tokens=100), "positions"),
    ([[5] * 600], SamplingParams(max_tokens=10), "the pool has"),
])
def test_bad_input_is_refused_and_the_engine_stays_usable(bundled, prompts, params, message):
    model, _ = bundled
    engine = LLMEngine(model, num_blocks=32, block_size=16, max_num_seqs=8)
    with pytest.raises(ValueError, match=message):
        engine.generate([[5, 6, 7], *prompts], params)
    assert not engine.has_unfinished_requests()  # nothing was queued, not even the good prompt
    assert engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3))[0].finished


def test_unchunked_prefill_needs_the_budget_to_cover_a_request(bundled):
    model, _ = bundled
    engine = LLMEngine(model, num_blocks=64, max_num_batched_tokens=64, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="without chunked prefill"):
        engine.generate([[5] * 60], SamplingParams(max_tokens=10))


def test_a_model_the_engine_cannot_run_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=16, n_layer=1, n_head=2)).eval()
    with pytest.raises(ValueError, match="no RoPE"):
        LLMEngine(gpt2, num_blocks=8)


def test_the_measured_run_reads_like_a_simulation(bundled, mixed_prompts):
    model, _ = bundled
    engine = LLMEngine(model, num_blocks=256, max_num_seqs=4, max_num_batched_tokens=128)
    engine.generate(mixed_prompts[:8], SamplingParams(max_tokens=6, ignore_eos=True))
    result = engine.result()
    assert len(result.requests) == 8
    assert (result.requests["generated_tokens"] == 6).all()
    assert result.timeline["batch_tokens"].sum() == engine.stats.model_tokens
    assert len(result.timeline) == engine.stats.steps
    assert result.summary["output_tokens"].iloc[0] == 48
    assert (result.timeline["batch_tokens"] <= 128).all()


def test_latencies_follow_the_measured_steps(bundled, monkeypatch):
    """A clock that only the model moves, 10 ms per sequence in a step, makes every time countable by hand.

    Two seats, three 20-token prompts of 3 output tokens each: step 0 prefills r0 and r1 (20 ms, both first
    tokens at 20 ms), steps 1-2 decode them (40, 60 ms: both finish); r2 waits for a seat, step 3 prefills it
    (70 ms) and steps 4-5 decode it (80, 90 ms).
    """
    import kvcore.engine.engine as engine_module

    model, _ = bundled
    clock = [0.0]
    monkeypatch.setattr(engine_module.time, "perf_counter", lambda: clock[0])
    engine = LLMEngine(model, num_blocks=64, max_num_seqs=2, max_num_batched_tokens=64)
    execute = engine.runner.execute

    def timed(chunks):
        clock[0] += 0.010 * len(chunks)
        return execute(chunks)

    monkeypatch.setattr(engine.runner, "execute", timed)
    engine.generate([[5 + i] * 20 for i in range(3)], SamplingParams(max_tokens=3, ignore_eos=True))
    result = engine.result()
    requests = result.requests.set_index("request")
    assert requests["ttft_ms"].round(6).tolist() == [20.0, 20.0, 70.0]
    assert requests["tpot_ms"].round(6).tolist() == [20.0, 20.0, 10.0]  # (60 - 20) / 2 and (90 - 70) / 2
    assert requests["e2e_ms"].round(6).tolist() == [60.0, 60.0, 90.0]
    assert requests["queue_ms"].round(6).tolist() == [0.0, 0.0, 60.0]
    assert (result.timeline["step_s"] * 1e3).round(6).tolist() == [20.0, 20.0, 20.0, 10.0, 10.0, 10.0]
    summary = result.summary.iloc[0]
    assert summary["makespan_s"] == pytest.approx(0.090)
    assert summary["output_tok_per_s"] == pytest.approx(9 / 0.090)


def test_cli_serves_a_workload_and_compares_it(tmp_path, capsys):
    from kvcore.cli import main

    out = tmp_path / "engine.csv"
    argv = ["engine", "--requests", "5", "--prompt-max", "40", "--output-min", "3", "--output-max", "6",
            "--num-blocks", "64", "--compare", "hf", "sim", "--csv", str(out)]
    assert main(argv) == 0
    table = __import__("pandas").read_csv(out)
    assert table["system"].tolist() == ["engine", "transformers generate (static, batch 16)"]
    assert (table["output_tokens"] == table["output_tokens"].iloc[0]).all()
    assert "error_pct" in capsys.readouterr().err  # the simulator's prediction of the run
    assert main(["engine", "--requests", "2", "--prompt-min", "3000", "--prompt-max", "4000"]) == 2  # > 2048 positions


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_generates_as_transformers_on_the_gpu():
    model, tokenizer = load_model(None, "cuda")
    prompts = [tokenizer("The import statement")["input_ids"], tokenizer("A dictionary is a")["input_ids"] * 20]
    engine = LLMEngine(model, num_blocks=64, block_size=16, max_num_seqs=4)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=12))
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = torch.tensor([prompt], device="cuda")
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert output.outputs[0].token_ids == want


def test_the_pages_limits_count_the_prefix_the_pools_and_transformers_scores(bundled):
    from kvcore.engine.experiment import EngineSettings
    from kvcore.engine.report import check_page_limits, pool_bytes, prefill_score_bytes
    from kvcore.engine.workload import ServeWorkload

    model = bundled[0]
    settings = EngineSettings(1024, 16, 16, 2048, True, True, None)
    # 1024 blocks x 16 slots x 6 layers x 8 KV heads x 32 dims x 4 bytes, for K and V
    assert pool_bytes(model, settings) == 2 * 6 * 8 * 1024 * 16 * 32 * 4
    benchmark = ServeWorkload(64, 5, 400, 8, 64)
    check_page_limits(model, benchmark, settings)  # the benchmark's workload, on the engine: allowed
    with pytest.raises(ValueError, match=r"\(3 runs per system\).* or the engine alone"):
        check_page_limits(model, benchmark, settings, transformers=True)  # three interleaved pairs: too much
    check_page_limits(model, ServeWorkload(21, 5, 400, 8, 64), settings, transformers=True)  # a third of it
    assert prefill_score_bytes(model, benchmark, 16) == 4 * 16 * 8 * 400 ** 2
    with pytest.raises(ValueError, match="shared prefix"):  # the prefix lengthens every prompt that has it
        check_page_limits(model, ServeWorkload(64, 5, 400, 8, 64, 256, 0.5), settings)
    check_page_limits(model, ServeWorkload(64, 5, 400, 8, 64, 256, 0.0), settings)  # nobody has it: no cost
    with pytest.raises(ValueError, match="256 MB"):
        check_page_limits(model, benchmark, EngineSettings(2048, 16, 16, 2048, True, True, None))
    check_page_limits(model, benchmark, EngineSettings(2048, 16, 16, 2048, True, True, 8))  # quantized: fits
    wide = EngineSettings(1024, 16, 32, 2048, True, True, None)
    with pytest.raises(ValueError, match="batches of 32 x 400"):
        check_page_limits(model, benchmark, wide, transformers=True)
    check_page_limits(model, benchmark, wide, transformers=False)  # the engine holds no padded batch


def test_a_report_takes_its_turn_per_run(bundled):
    """A comparison takes the model per run (engine, transformers, engine...), so its other users go between the
    runs: every run inside a turn of its own, none outside one."""
    from contextlib import contextmanager

    from kvcore.engine.experiment import EngineSettings
    from kvcore.engine.report import REPEATS, engine_report
    from kvcore.engine.workload import ServeWorkload

    model, tokenizer = bundled
    inside, turns = [False], []

    @contextmanager
    def turn():
        assert not inside[0]  # turns never nest: one run each
        inside[0] = True
        turns.append(1)
        yield
        inside[0] = False

    def watched(fn):
        def run(*args, **kwargs):
            assert inside[0], "a run outside its turn"
            return fn(*args, **kwargs)
        return run

    import kvcore.engine.report as report_module
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report_module, "serve_engine", watched(report_module.serve_engine))
        mp.setattr(report_module, "serve_transformers", watched(report_module.serve_transformers))
        report = engine_report(model, tokenizer, ServeWorkload(4, 5, 20, 4, 8), EngineSettings(64, 16, 4, 64),
                               turn=turn)
    assert len(turns) == 2 * REPEATS
    assert report.speedup is not None
