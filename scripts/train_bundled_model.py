"""Train the bundled offline model of KV Cache Lab: a small Llama on Python's own documentation.

Builds the corpus (``kvcore.models.corpus``), trains a byte-level BPE tokenizer, trains a
``LlamaForCausalLM`` (RoPE, multi-head attention) with AdamW and a cosine schedule, and writes into
``--out`` (default ``kvcore/models/bundled/``): ``model.safetensors`` (fp16), ``config.json``,
``tokenizer.json`` + ``tokenizer_config.json``, ``validation.jsonl``, ``train_sample.jsonl``,
``training_log.csv`` and ``metrics.json`` (validation bits/byte, unigram baselines, attention-sink and
heavy-hitter measurements). Every training sequence starts with ``<bos>``: a fixed first token is where
attention sinks form when a model grows them (StreamingLLM, Xiao et al. 2023).

    OMP_WAIT_POLICY=PASSIVE python scripts/train_bundled_model.py --seed 0 --steps 1200 --warmup 50 \\
        --eval-every 100 --threads 2 --weight-decay 0.5

(the shipped model; its README gives the measurements)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

from kvcore.models.corpus import CORPUS_LICENSE, build_corpus
from kvcore.models.stats import attention_summary, unigram_bits_per_byte
from kvcore.models.training import (
    ModelSpec,
    Schedule,
    batch_at,
    evaluate,
    make_optimizer,
    random_starts,
    text_bytes,
    token_stream,
    train_step,
)

SPECIALS = ("<pad>", "<bos>", "<eos>")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "kvcore/models/bundled")
    p.add_argument("--seed", type=int, default=0, help="seed for init, batches and the corpus split")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps (the most, with --minutes)")
    p.add_argument("--minutes", type=float, default=None,
                   help="train for this much wall time instead: the cosine schedule follows elapsed time")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--context", type=int, default=512, help="tokens per training sequence, <bos> included")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256, help="model width")
    p.add_argument("--heads", type=int, default=8, help="attention heads (= KV heads: multi-head attention)")
    p.add_argument("--ffn", type=int, default=688, help="SwiGLU intermediate size")
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size, special tokens included")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate / peak")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.5, help="AdamW decay of weight matrices")
    p.add_argument("--eval-every", type=int, default=100, help="steps between validation passes")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--max-positions", type=int, default=2048, help="config max_position_embeddings")
    return p.parse_args(argv)


def train_tokenizer(docs: list[str], vocab: int):
    """Byte-level BPE (GPT-2 style) with <pad>, <bos>, <eos>; encoding prepends <bos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   model_max_length=1_000_000, clean_up_tokenization_spaces=False)


def progress_at(step: int, elapsed_s: float, warmup_s: float, args: argparse.Namespace) -> float:
    """Schedule progress after warm-up: by steps, or by wall time with ``--minutes``."""
    if args.minutes is None:
        return (step - args.warmup) / max(1, args.steps - args.warmup)
    return (elapsed_s - warmup_s) / max(1e-9, args.minutes * 60 - warmup_s)


def write_jsonl(path: Path, docs: list[str], sources: list[str]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for source, text in zip(sources, docs, strict=True):
            f.write(json.dumps({"source": source, "text": text}, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    corpus = build_corpus(seed=args.seed)
    tokenizer = train_tokenizer(corpus.train, args.vocab)
    train_ids, val_ids = token_stream(tokenizer, corpus.train), token_stream(tokenizer, corpus.validation)
    val_bytes = text_bytes(corpus.validation)
    print(f"corpus: {len(corpus.train)} train docs ({len(train_ids):,} tokens), {len(corpus.validation)} validation "
          f"docs ({len(val_ids):,} tokens, {val_bytes:,} bytes); tokenizer {len(tokenizer)} "
          f"[{time.perf_counter() - t0:.1f}s]", flush=True)

    model = ModelSpec(args.layers, args.hidden, args.heads, args.heads, args.ffn, args.max_positions).build(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    opt = make_optimizer(model, args.lr, args.weight_decay)
    schedule = Schedule(args.lr, args.warmup, args.steps, args.min_lr_ratio)
    bos, log_rows = tokenizer.bos_token_id, []
    t_train, cpu0, tokens_seen, loss_ema = time.perf_counter(), time.process_time(), 0, None
    best = {"val_nats_per_token": math.inf, "step": 0, "state": None}
    model.train()
    step, warmup_s, last = 0, 0.0, False
    while not last:
        elapsed = time.perf_counter() - t_train
        warmup_s = elapsed if step == args.warmup else warmup_s
        progress = progress_at(step, elapsed, warmup_s, args)
        lr = schedule.lr(step, progress)
        last = step == args.steps - 1 or (args.minutes is not None and step > args.warmup and progress >= 1.0)
        inputs, targets = batch_at(train_ids, random_starts(rng, len(train_ids), args.context, args.batch),
                                   args.context, bos)
        loss = train_step(model, opt, inputs, targets, lr)
        tokens_seen += inputs.numel()
        loss_ema = loss if loss_ema is None else 0.95 * loss_ema + 0.05 * loss
        if step % 25 == 0 or last:
            el = time.perf_counter() - t_train
            print(f"step {step:5d} loss {loss:.3f} (ema {loss_ema:.3f}) lr {lr:.2e} "
                  f"tokens {tokens_seen:,} {tokens_seen / el:,.0f} tok/s elapsed {el / 60:.1f} min", flush=True)
        if (step + 1) % args.eval_every == 0 or last:
            metrics = evaluate(model, val_ids, args.context, bos, val_bytes)
            row = {"step": step + 1, "tokens_seen": tokens_seen, "lr": lr, "train_loss_ema": loss_ema,
                   **metrics, "elapsed_s": time.perf_counter() - t_train}
            log_rows.append(row)
            if metrics["val_nats_per_token"] < best["val_nats_per_token"]:  # early stopping on validation loss
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best = {"val_nats_per_token": metrics["val_nats_per_token"], "step": step + 1, "state": state}
            print("eval", json.dumps(row), flush=True)
            with (args.out / "training_log.csv").open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                w.writeheader()
                w.writerows(log_rows)
        step += 1
    wall_s, cpu_s = time.perf_counter() - t_train, time.process_time() - cpu0
    model.load_state_dict(best["state"])
    print(f"keeping the weights of step {best['step']} (lowest validation loss)", flush=True)
    run = {"steps": step, "kept_step": best["step"], "tokens_seen": tokens_seen, "train_wall_s": wall_s,
           "train_cpu_s": cpu_s, "parameters": n_params}
    finish(args, model, tokenizer, corpus, val_ids, val_bytes, run)


def finish(args, model, tokenizer, corpus, val_ids, val_bytes, run: dict) -> None:
    """Save in fp16, reload as fp32, and measure what the README reports on the saved weights."""
    from transformers import AutoModelForCausalLM

    model.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    write_jsonl(args.out / "validation.jsonl", corpus.validation, corpus.validation_sources)
    sample = [(s, d) for s, d in zip(corpus.train_sources, corpus.train, strict=True)][:40]
    write_jsonl(args.out / "train_sample.jsonl", [d for _, d in sample], [s for s, _ in sample])
    saved = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32, attn_implementation="eager").eval()
    metrics = evaluate(saved, val_ids, args.context, tokenizer.bos_token_id, val_bytes)
    val_text = "".join(corpus.validation)
    train_ids = [i for d in corpus.train for i in tokenizer(d, add_special_tokens=False)["input_ids"]]
    baselines = unigram_bits_per_byte(val_text, tokenizer, train_ids)
    attention = attention_summary(saved, tokenizer, corpus.validation, window=args.context, num_windows=8, min_query=32)
    report = {
        "command": "python scripts/train_bundled_model.py " + " ".join(sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        **run,
        "torch_threads": args.threads, "corpus_license": CORPUS_LICENSE,
        "train_docs": len(corpus.train), "validation_docs": len(corpus.validation), "validation_bytes": val_bytes,
        "validation_tokens": len(val_ids), **metrics, **baselines,
        "attention": attention.to_dict(orient="records"),
    }
    (args.out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "attention"}, indent=2))
    print(attention.to_string(index=False))


if __name__ == "__main__":
    main()
