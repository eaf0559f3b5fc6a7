"""Captured decode graphs (kvcore/engine/graph.py): the same logits as the eager step, bit for bit, and only where
they apply."""

from __future__ import annotations

import pytest
import torch

from kvcore.device import torch_threads
from kvcore.engine import graph as graph_module
from kvcore.engine.runner import ModelRunner, SequenceChunk
from kvcore.kernels import native
from kvcore.models import load_model
from tests.test_engine_runner import BLOCK_SIZE, NUM_BLOCKS, tiny_model, token_ids

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (native.enabled() and native.compiler()),
                                 reason="no C compiler here (or KVLAB_NATIVE=0): no half-width kernel, no graphs")]


def half_exact(model):
    """The model with every weight rounded to an fp16 value (as a model stored in fp16 loads), so that every
    projection runs the half-width kernel."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


@pytest.fixture(scope="module")
def exact_models():
    return {name: half_exact(tiny_model(name)) for name in ("llama-gqa", "qwen2-bias", "mistral-window",
                                                            "qwen3-qk-norm")}


@pytest.fixture(scope="module")
def bundled():
    return load_model(None, "cpu")[0]


def replays(monkeypatch) -> list[int]:
    """The batch size of every graph replay from now on."""
    seen, real = [], graph_module.DecodeGraph.replay

    def spy(self, parts, step, plan):
        seen.append(len(step.token_ids))
        return real(self, parts, step, plan)

    monkeypatch.setattr(graph_module.DecodeGraph, "replay", spy)
    return seen


def serve(runner: ModelRunner, prompts: dict[str, list[int]], tables: dict[str, list[int]], decodes: int,
          leave_after: dict[str, int] | None = None, join: dict[str, int] | None = None) -> list[torch.Tensor]:
    """Prefill every prompt in one step, then decode every sequence one token per step (token 3 each time):
    sequence s stops after ``leave_after[s]`` decodes; sequence s is prefilled only at decode step ``join[s]``,
    beside the others' decodes. Returns every step's logits."""
    leave_after, join = leave_after or {}, join or {}
    done = {name: 0 for name in prompts}
    out = [runner.execute([SequenceChunk(name, ids, 0, tables[name]) for name, ids in prompts.items()
                           if name not in join])]
    for step in range(decodes):
        chunks = []
        for name, ids in prompts.items():
            if join.get(name, 0) > step or done[name] >= leave_after.get(name, decodes):
                continue
            if join.get(name) == step:
                chunks.append(SequenceChunk(name, ids, 0, tables[name]))
                continue
            chunks.append(SequenceChunk(name, [3], len(ids) + done[name], tables[name]))
            done[name] += 1
        out.append(runner.execute(chunks))
    return out


def eager_and_graph(model, *args, num_blocks: int = NUM_BLOCKS, block_size: int = BLOCK_SIZE, **kwargs
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], ModelRunner]:
    runs = {}
    for eager in (True, False):
        runner = ModelRunner(model, num_blocks, block_size, enforce_eager=eager)
        runs[eager] = serve(runner, *args, **kwargs), runner
    return runs[True][0], runs[False][0], runs[False][1]


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-bias", "mistral-window"])
def test_replayed_steps_equal_eager_steps_bit_for_bit(exact_models, monkeypatch, family):
    """Three sequences decode; one leaves (a new batch size, a new capture); a fourth is prefilled beside the others'
    decodes (that step runs eagerly) and then decodes with them. Mistral's window of 5 cuts into a context after two
    steps: from then on its steps run eagerly."""
    seen = replays(monkeypatch)
    windowed = family == "mistral-window"
    lengths = (2, 2, 3, 2) if windowed else (6, 3, 9, 4)  # windowed: two decode steps fit the window of 5
    prompts = {name: token_ids(n, seed=seed) for seed, (name, n) in enumerate(zip("abcd", lengths, strict=True))}
    tables = {"a": [1, 2, 3, 4], "b": [5, 6, 7], "c": [8, 9, 10, 11], "d": [12, 13, 14]}
    eager, replayed, runner = eager_and_graph(exact_models[family], prompts, tables, 6, leave_after={"b": 2},
                                              join={"d": 3})
    assert runner.graph_problem is None
    assert len(eager) == len(replayed) == 7
    for step, (e, g) in enumerate(zip(eager, replayed, strict=True)):
        assert torch.equal(e, g), f"step {step}: max difference {float((e - g).abs().max())}"
    if windowed:
        assert seen == [3, 3]  # then the window cuts into c's context, and every step after runs eagerly
    else:
        assert seen == [3, 3, 2, 3, 3]  # step 3 (a prefill beside decodes) ran eagerly
        assert runner.graphs.captures == 2


def test_two_threads_split_a_long_sequence_and_the_merge_is_replayed_too(bundled, monkeypatch):
    """At 2 threads a 300-token context is cut into two spans whose partial softmaxes are merged: the graph's
    merge call equals the eager one."""
    seen = replays(monkeypatch)
    vocab = bundled.config.vocab_size
    prompts = {"long": token_ids(300, vocab, seed=4), "short": token_ids(20, vocab, seed=5)}
    tables = {"long": list(range(1, 21)), "short": [21, 22]}
    with torch_threads(2):
        eager, replayed, runner = eager_and_graph(bundled, prompts, tables, 3, num_blocks=32, block_size=16)
    assert seen == [2, 2, 2]
    graph = next(iter(runner.graphs.graphs.values()))
    assert graph.plan.workers == 2
    assert len(graph.plan.spans) == 3  # two spans for the long one: a merge
    for e, g in zip(eager, replayed, strict=True):
        assert torch.equal(e, g)


def test_graphs_are_captured_once_per_shape_and_only_the_latest_kept(exact_models, monkeypatch):
    monkeypatch.setattr(graph_module, "GRAPHS_KEPT", 4)
    model = exact_models["llama-gqa"]
    runner = ModelRunner(model, 64, BLOCK_SIZE)
    sizes = list(range(1, graph_module.GRAPHS_KEPT + 3))
    names = [f"s{i}" for i in range(max(sizes))]
    tables = {name: [1 + 4 * i + j for j in range(4)] for i, name in enumerate(names)}  # 16 positions each
    runner.execute([SequenceChunk(name, [5, 6], 0, tables[name]) for name in names])
    for position, size in enumerate([*sizes, sizes[-1], sizes[0]]):
        runner.execute([SequenceChunk(name, [7], 2 + position, tables[name]) for name in names[:size]])
    assert len(runner.graphs.graphs) == graph_module.GRAPHS_KEPT
    # every size once, then the last size again from the cache, then the first size, evicted by then: captured again
    assert runner.graphs.captures == len(sizes) + 1


def test_graph_problem_names_why_a_model_runs_eagerly(exact_models, bundled):
    def problem(model, **kwargs) -> str | None:
        return ModelRunner(model, NUM_BLOCKS, BLOCK_SIZE, **kwargs).graph_problem

    assert problem(bundled) is None
    assert problem(bundled, enforce_eager=True) == "enforce_eager is set"
    assert "quantized" in problem(bundled, kv_bits=8)
    assert "'torch' backend" in problem(bundled, backend="torch")
    assert "exact in neither fp16 nor bf16" in problem(tiny_model("llama-gqa"))  # fp32 weights
    assert "query and key head" in problem(exact_models["qwen3-qk-norm"])
