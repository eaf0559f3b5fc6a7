"""Train tiny Llama models that differ only in KV heads (MHA 8, GQA 4 and 2, MQA 1) and ship their results.

Writes ``kv_heads_curves.csv`` (every step: loss, learning rate; validation at each evaluation),
``kv_heads_summary.csv`` (per variant: validation bits/byte and perplexity, KV bytes per token, decode
tokens/s), ``run.json`` (settings, command, wall time, machine) and ``README.md`` into ``--out`` (default
``kvcore/sharing/results/``). Uses :mod:`kvcore.models.training`, the bundled model's recipe.

    python scripts/train_kv_head_variants.py --steps 400 --warmup 40 --eval-every 100 --threads 1

``--decode-only`` re-measures just the decode speed of the shipped variants (on freshly initialized
models of the same shapes: the speed does not depend on the weight values) and rewrites the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

from kvcore.noise import load_average, load_note
from kvcore.sharing.variants import (
    CURVES_CSV,
    RESULTS_DIR,
    SUMMARY_CSV,
    VariantSettings,
    remeasure_decode,
    train_variants,
)

SETTING_ARGS = ("seed", "kv_heads", "layers", "hidden", "heads", "ffn", "steps", "batch", "context", "lr", "warmup",
                "eval_every", "data", "decode_batch", "decode_prompt", "decode_tokens", "decode_rounds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = VariantSettings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--seed", type=int, default=d.seed, help="seed for init and batch order (same for all variants)")
    p.add_argument("--kv-heads", type=int, nargs="+", default=list(d.kv_heads), help="KV head counts to train")
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--hidden", type=int, default=d.hidden, help="model width")
    p.add_argument("--heads", type=int, default=d.heads, help="query heads")
    p.add_argument("--ffn", type=int, default=d.ffn, help="SwiGLU intermediate size")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per variant")
    p.add_argument("--batch", type=int, default=d.batch, help="sequences per step")
    p.add_argument("--context", type=int, default=d.context, help="tokens per sequence, <bos> included")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between validation passes")
    p.add_argument("--data", choices=("corpus", "bundled"), default=d.data,
                   help="corpus: the whole training split (build_corpus); bundled: the shipped sample")
    p.add_argument("--decode-batch", type=int, default=d.decode_batch, help="sequences decoded together")
    p.add_argument("--decode-prompt", type=int, default=d.decode_prompt, help="prompt tokens in the cache")
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens, help="timed decode steps")
    p.add_argument("--decode-rounds", type=int, default=d.decode_rounds, help="interleaved rounds (median, IQR kept)")
    p.add_argument("--decode-only", action="store_true",
                   help="only re-measure the decode speed of the shipped summary (model shape from run.json)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest on a small, busy machine: no oversubscription)")
    return p.parse_args(argv)


def machine() -> str:
    """CPU model, core count and torch threads, for the README."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, Python {platform.python_version()}, {platform.system()}")


def markdown_table(df: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table (numbers to 4 significant digits)."""
    def cell(v) -> str:
        return f"{v:,.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def readme(run: dict, summary: pd.DataFrame) -> str:
    """The results folder's README: what was run, how, where, and the summary table."""
    s = run["settings"]
    cols = [c for c in ("variant", "params", "val_bits_per_byte", "val_bits_per_byte_low", "val_bits_per_byte_high",
                        "val_perplexity", "kv_bytes_per_token_16bit", "decode_tokens_per_s", "decode_tokens_per_s_q1",
                        "decode_tokens_per_s_q3", "train_s") if c in summary]
    d = {"batch": s["decode_batch"], "prompt": s["decode_prompt"], "tokens": s["decode_tokens"],
         "rounds": s["decode_rounds"]} | run.get("decode", {})
    note = (f" (re-measured with `{d['command']}` on freshly initialized models of the same shapes: speed does not "
            "depend on the weight values)" if "command" in d else "")
    if "load_1min" in d:
        note += f"; {load_note(d['load_1min'], os.cpu_count())} when it finished"
    return f"""# Tiny models that differ only in KV heads

Produced by `scripts/train_kv_head_variants.py`; read by `kvcore.sharing.variants.shipped_results()` and the
Sharing page. `run.json` holds the same facts as this file, for programs.

- Command: `{run['command']}`
- Seed: {s['seed']} (same initialization stream and the same batches, in the same order, for every variant)
- Model: Llama (RoPE, SwiGLU, RMSNorm, tied embeddings), {s['layers']} layers, width {s['hidden']}, {s['heads']}
  query heads of dim {s['hidden'] // s['heads']}, SwiGLU {s['ffn']}, the bundled BPE tokenizer; KV heads
  {', '.join(map(str, s['kv_heads']))}
- Training: {s['steps']} AdamW steps of {s['batch']} x {s['context']} tokens, peak lr {s['lr']}, {s['warmup']} warm-up
  steps then cosine to 10%, weight decay 0.1, clip 1.0 (`kvcore.models.training`); data: `{s['data']}`;
  validation every {s['eval_every']} steps on the whole validation split
- Wall time: {run['wall_min']:.1f} min for training, evaluation and the first decode timing
- Machine: {run['machine']}; the CPU was shared with other jobs, so times and tokens/s are indicative only
- Decode speed: greedy, batch {d['batch']}, a {d['prompt']}-token prompt in the cache, {d['tokens']} timed steps,
  median of {d['rounds']} rounds interleaved over the variants (`_q1`, `_q3`: the interquartile range of the
  rounds), transformers SDPA attention{note}

{markdown_table(summary[cols])}

`kv_heads_curves.csv`: one row per variant and step (`train_loss`, `train_loss_ema`, `lr`, `elapsed_s` = seconds
in training steps); `val_*` columns are filled at step 0, every {s['eval_every']} steps and the last step.
`kv_heads_summary.csv`: one row per variant, measured after the last step{interval_note(summary)}
"""


def interval_note(summary: pd.DataFrame) -> str:
    """What the summary says about the noise of its validation numbers."""
    if "val_bits_per_byte_low" in summary:
        return ("; `_low` / `_high`: 95% intervals from a paired block bootstrap over the validation tokens "
                "(`bpb_vs_mha`: the difference from MHA on the same tokens, `vs_mha`: better or worse only beyond "
                "the noise).")
    return (". This run kept no per-token validation losses, so its bits per byte carry no interval and the "
            "variants are not ranked by them; a new training run writes the intervals.")


def settings_from(values: dict) -> VariantSettings:
    return VariantSettings(**{k: tuple(v) if k == "kv_heads" else v for k, v in values.items() if k in SETTING_ARGS})


def decode_only(args: argparse.Namespace) -> None:
    """Re-measure decode speed for the shipped summary and rewrite summary, run.json and README."""
    run = json.loads((args.out / "run.json").read_text())
    decode = {"batch": args.decode_batch, "prompt": args.decode_prompt, "tokens": args.decode_tokens,
              "rounds": args.decode_rounds}
    settings = settings_from(run["settings"] | {f"decode_{k}": v for k, v in decode.items()})
    summary = remeasure_decode(settings, pd.read_csv(args.out / SUMMARY_CSV.name))
    run["decode"] = decode | {"command": "python scripts/train_kv_head_variants.py " + " ".join(sys.argv[1:]),
                              "machine": machine(), "load_1min": round(load_average(), 2)}
    summary.to_csv(args.out / SUMMARY_CSV.name, index=False)
    (args.out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    (args.out / "README.md").write_text(readme(run, summary))
    print(summary[["variant", "decode_batch", "decode_context", "decode_tokens_per_s", "decode_tokens_per_s_q1",
                   "decode_tokens_per_s_q3", "decode_rounds"]].to_string(index=False))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.decode_only:
        decode_only(args)
        return
    settings = settings_from(vars(args))
    args.out.mkdir(parents=True, exist_ok=True)
    t0, last = time.perf_counter(), [0.0]

    def progress(frac: float, label: str) -> None:
        now = time.perf_counter() - t0
        if now - last[0] >= 30 or frac >= 1.0:
            last[0] = now
            print(f"[{now / 60:5.1f} min] {frac:6.1%} {label}", flush=True)

    result = train_variants(settings, progress=progress)
    fields = {f.name for f in dataclasses.fields(VariantSettings) if f.init}
    run = {"command": "python scripts/train_kv_head_variants.py " + " ".join(sys.argv[1:]),
           "wall_min": round((time.perf_counter() - t0) / 60, 1), "machine": machine(),
           "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()
                        if k in fields}}
    result.curves.to_csv(args.out / CURVES_CSV.name, index=False)
    result.summary.to_csv(args.out / SUMMARY_CSV.name, index=False)
    (args.out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    (args.out / "README.md").write_text(readme(run, result.summary))
    print(result.summary.to_string(index=False))
    print(f"wrote {args.out} in {run['wall_min']:.1f} min")


if __name__ == "__main__":
    main()
