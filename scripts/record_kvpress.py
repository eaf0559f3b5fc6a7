"""Record which prompt tokens kvpress 0.5.5's presses keep on the bundled model: the fixtures of the agreement test.

For the bundled model (6 layers, 8 heads of 32) and its GQA variant (the K/V projections of each 4
consecutive heads mean-pooled into one: 8 -> 2 KV heads, as ``kvcore.sharing.pool_kv_heads(model, 2)``
does), prompts of 100, 250 and 400 tokens of the bundled validation text (``<bos>`` first), and
compression ratios 0.5 and 0.8, each press (default kwargs) prefills the prompt once and the kept
positions of every layer and KV head are read from what the press hands back to the cache (each kept
key is matched to the one position of the uncompressed keys it equals). Writes one JSON file per model
variant and press into ``tests/fixtures/kvpress/`` plus its README.md; ``tests/test_kvpress_agreement.py``
replays them through the lab with no kvpress installed.

kvpress needs transformers < 5.3, so it lives in its own virtual environment, never in the project's:

    python3 -m venv "${TMPDIR:-/tmp}/kvpress-env"
    "${TMPDIR:-/tmp}/kvpress-env/bin/pip" install torch==2.13.0 kvpress==0.5.5 'transformers<5.3'
    "${TMPDIR:-/tmp}/kvpress-env/bin/python" scripts/record_kvpress.py

Attention: ``ObservedAttentionPress`` reads the attention probabilities, so it runs with eager
attention; the other presses run with SDPA (SnapKV and TOVA then recompute the window's attention
from the layer's hidden states, kvpress's path for fused kernels). ``--check-eager`` also runs SnapKV
and TOVA with eager attention (their other path) and reports whether the kept sets are the same.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from kvpress import KnormPress, ObservedAttentionPress, SnapKVPress, StreamingLLMPress, TOVAPress
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "kvcore" / "models" / "bundled"
OUT = ROOT / "tests" / "fixtures" / "kvpress"
LENGTHS = (100, 250, 400)
RATIOS = (0.5, 0.8)
VARIANTS = {"mha": 8, "gqa": 2}  # model variant -> KV heads
# lab name -> (press class, attention implementation it runs with)
PRESSES = {
    "streaming_llm": (StreamingLLMPress, "sdpa"),
    "knorm": (KnormPress, "sdpa"),
    "snapkv": (SnapKVPress, "sdpa"),
    "tova": (TOVAPress, "sdpa"),
    "observed_attention": (ObservedAttentionPress, "eager"),
}
COMMAND = ('python3 -m venv "${TMPDIR:-/tmp}/kvpress-env"\n'
           '"${TMPDIR:-/tmp}/kvpress-env/bin/pip" install torch==2.13.0 kvpress==0.5.5 \'transformers<5.3\'\n'
           '"${TMPDIR:-/tmp}/kvpress-env/bin/python" scripts/record_kvpress.py')


def load_bundled():
    """The bundled model in float32 on CPU, eval mode, and its tokenizer."""
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    model = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), tokenizer


def pool_kv_heads(model, groups: int):
    """A copy of ``model`` whose K/V projections are the means of each run of consecutive heads (GQA conversion)."""
    cfg = model.config
    heads, head_dim = cfg.num_key_value_heads, cfg.head_dim
    if groups == heads:
        return model
    state = model.state_dict()
    for name, t in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            per_head = t.reshape(groups, heads // groups, head_dim, t.shape[-1])  # [G, H/G, D, in]
            state[name] = per_head.mean(dim=1).reshape(groups * head_dim, t.shape[-1])  # [G*D, in]
    config = copy.deepcopy(cfg)
    config.num_key_value_heads = groups
    new = type(model)._from_config(config, attn_implementation=cfg._attn_implementation, dtype=torch.float32)
    new.load_state_dict(state, strict=True)
    return new.eval()


def prompt_ids(tokenizer, length: int) -> list[int]:
    """``<bos>`` and the first ``length - 1`` tokens of the bundled validation text (documents joined by blank
    lines, as ``kvcore.models.bundled_text()`` joins them)."""
    with (BUNDLED / "validation.jsonl").open(encoding="utf-8") as f:
        text = "\n\n".join(json.loads(line)["text"] for line in f if line.strip())
    ids = tokenizer(text[:20 * length], add_special_tokens=False)["input_ids"]
    if len(ids) < length - 1:
        raise ValueError(f"the validation text has fewer than {length - 1} tokens")
    return [tokenizer.bos_token_id, *ids[:length - 1]]


def kept_positions(before: torch.Tensor, after: torch.Tensor) -> list[list[int]]:
    """Per KV head, the sorted positions of ``before`` ``[1, Hkv, T, D]`` whose keys ``after`` ``[1, Hkv, k, D]`` kept.

    Each kept key must equal exactly one key of the prompt (kvpress gathers, it never mixes keys).
    """
    match = (after[0, :, :, None, :] == before[0, :, None, :, :]).all(dim=-1)  # [Hkv, k, T]
    if not bool((match.sum(dim=-1) == 1).all()):
        raise RuntimeError("a kept key matches no prompt position, or several")
    return [sorted(row.tolist()) for row in match.float().argmax(dim=-1)]


def run_press(model, press, ids: list[int]) -> list[list[list[int]]]:
    """Prefill ``ids`` under ``press``; the kept positions ``[layer][kv_head]`` read at the press's compress."""
    kept: dict[int, list[list[int]]] = {}
    compress = press.compress

    def recording_compress(module, hidden_states, keys, values, attentions, kwargs):
        new_keys, new_values = compress(module, hidden_states, keys, values, attentions, kwargs)
        kept[module.layer_idx] = kept_positions(keys, new_keys)
        return new_keys, new_values

    press.compress = recording_compress
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    layers = [kept[i] for i in range(model.config.num_hidden_layers)]
    for i, per_head in enumerate(layers):  # the cache holds what the press returned
        if cache.layers[i].keys.shape[-2] != len(per_head[0]):
            raise RuntimeError(f"layer {i}: the cache holds {cache.layers[i].keys.shape[-2]} tokens, "
                               f"the press kept {len(per_head[0])}")
    return layers


def press_kwargs(cls) -> dict:
    """The press's default hyperparameters (every dataclass field but the compression ratio)."""
    return {k: v for k, v in asdict(cls()).items() if k != "compression_ratio"}


def record(model, variant: str, name: str, prompts: dict[int, list[int]]) -> dict:
    """Every (length, ratio) case of one press on one model variant."""
    cls, attn = PRESSES[name]
    model.set_attn_implementation(attn)
    cases = []
    for length, ids in prompts.items():
        for ratio in RATIOS:
            layers = run_press(model, cls(compression_ratio=ratio), ids)
            cases.append({"num_tokens": length, "compression_ratio": ratio, "num_kept": len(layers[0][0]),
                          "kept": layers})
    return {"press": name, "kvpress_class": cls.__name__, "kwargs": press_kwargs(cls), "model_variant": variant,
            "num_key_value_heads": model.config.num_key_value_heads, "attn_implementation": attn,
            "kvpress_version": importlib.metadata.version("kvpress"), "transformers_version": transformers.__version__,
            "torch_version": torch.__version__, "prompts": {str(n): ids for n, ids in prompts.items()},
            "cases": cases}


def dumps(fixture: dict) -> str:
    """JSON with one line per list of token ids (readable diffs, no line per number)."""
    def block(obj, indent: str) -> str:
        inner = indent + "  "
        if isinstance(obj, dict):
            items = [f"{inner}{json.dumps(k)}: {block(v, inner)}" for k, v in obj.items()]
            return "{\n" + ",\n".join(items) + f"\n{indent}}}"
        if isinstance(obj, list) and obj and not all(isinstance(x, int) for x in obj):
            return "[\n" + ",\n".join(inner + block(x, inner) for x in obj) + f"\n{indent}]"
        return json.dumps(obj, separators=(",", ":"))
    return block(fixture, "") + "\n"


def check_eager(model, variant: str, fixtures: dict[str, dict]) -> None:
    """Rerun SnapKV and TOVA with eager attention (kvpress then slices the layer's attention) and compare."""
    model.set_attn_implementation("eager")
    for name in ("snapkv", "tova"):
        fixture = fixtures[name]
        same = sum(run_press(model, PRESSES[name][0](compression_ratio=c["compression_ratio"]),
                             fixture["prompts"][str(c["num_tokens"])]) == c["kept"] for c in fixture["cases"])
        print(f"{variant} {name}: eager attention keeps the same sets in {same}/{len(fixture['cases'])} cases")


def write_readme(files: list[str]) -> None:
    lines = [
        "# kvpress fixtures",
        "",
        "Which prompt positions kvpress 0.5.5's presses keep, per layer and KV head, on the bundled model",
        "(`mha`: 8 KV heads) and its GQA variant (`gqa`: each 4 consecutive K/V projection heads mean-pooled",
        "into one, 2 KV heads). Prompts: `<bos>` and the first 99, 249 and 399 tokens of",
        "`kvcore/models/bundled/validation.jsonl`; compression ratios 0.5 and 0.8; each press's default kwargs",
        "(recorded in each file). `tests/test_kvpress_agreement.py` replays them through the lab.",
        "",
        "Made with (kvpress needs transformers < 5.3, so it has its own virtual environment):",
        "",
        "```bash",
        COMMAND,
        "```",
        "",
        "Each file: `press`, `kwargs`, `model_variant`, `num_key_value_heads`, `attn_implementation` (eager for",
        "observed attention, which reads the attention probabilities; SDPA for the rest), versions, `prompts`",
        "(token ids by length) and `cases`: `num_tokens`, `compression_ratio`, `num_kept` and `kept`",
        "`[layer][kv_head]`, sorted positions.",
        "",
        "`--check-eager` also reruns SnapKV and TOVA with eager attention, where kvpress slices the layer's",
        "attention instead of recomputing the window's: on this model both paths keep the same sets in every",
        "case. Below the window's size SnapKV's kept set follows `torch.topk`'s order among equal scores",
        f"(torch {torch.__version__} on CPU, one thread, as recorded).",
        "",
        "Files:",
        "",
        *(f"- `{f}`" for f in files),
        "",
    ]
    (OUT / "README.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check-eager", action="store_true", help="also compare SnapKV and TOVA under eager attention")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # one thread: the same float sums on every machine
    base, tokenizer = load_bundled()
    prompts = {n: prompt_ids(tokenizer, n) for n in LENGTHS}
    OUT.mkdir(parents=True, exist_ok=True)
    files = []
    for variant, kv_heads in VARIANTS.items():
        model = pool_kv_heads(base, kv_heads)
        fixtures = {name: record(model, variant, name, prompts) for name in PRESSES}
        for name, fixture in fixtures.items():
            path = OUT / f"{variant}_{name}.json"
            path.write_text(dumps(fixture), encoding="utf-8")
            files.append(path.name)
            print(f"wrote {path.relative_to(ROOT)}")
        if args.check_eager:
            check_eager(model, variant, fixtures)
    write_readme(files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
