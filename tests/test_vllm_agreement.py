"""The simulator with vLLM 0.33's rules replays the real vLLM scheduler step for step.

tests/fixtures/vllm holds what vLLM 0.33.0's own v1 ``Scheduler`` (sync) and ``AsyncScheduler`` did on
seven traces (scripts/record_vllm_schedules.py made them; see their README). Each is replayed through
``simulate`` with ``SimConfig.vllm(...)`` and a step time of exactly one second, so a request recorded as
arriving before step k arrives at k seconds. Every grant of every step, every preemption, every prefix
hit and every finish step must be the same; the textbook rules must differ where the README says they do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcore.sched import FittedCost, SimConfig, Workload, simulate

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "vllm").glob("*.json"))
ONE_SECOND = FittedCost("one second per step", intercept_s=1.0)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def replay(fixture: dict, tables: list | None = None, **rules):
    s, requests = fixture["settings"], fixture["requests"]
    workload = Workload.from_prompts([r["prompt_token_ids"] for r in requests], [r["max_tokens"] for r in requests],
                                     [float(r["arrival_step"]) for r in requests])
    config = SimConfig.vllm(ONE_SECOND, max_num_seqs=s["max_num_seqs"],
                            max_num_batched_tokens=s["max_num_batched_tokens"],
                            enable_chunked_prefill=s["enable_chunked_prefill"],
                            enable_prefix_caching=s["enable_prefix_caching"], block_size=s["block_size"],
                            num_blocks=s["num_blocks"], async_scheduling=fixture["mode"] == "async",
                            max_model_len=s["max_model_len"])
    if rules:
        config = config.__class__(**{**{f: getattr(config, f) for f in config.__slots__}, **rules})
    def record(out, sched) -> None:
        admitted = {r.req.index for r in out.admitted}
        tables.append([(r.req.index, sched.manager.block_table(r.rid), r.req.index in admitted)
                       for r, _ in out.scheduled])

    return simulate(workload, config, on_step=record if tables is not None else None)


def grants(result) -> list[list[list[int]]]:
    steps = [[] for _ in range(int(result.schedule["step"].max()) + 1)]
    for step, request, tokens in result.schedule.itertuples(index=False):
        steps[step].append([request, tokens])
    return steps


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_every_step_grants_what_vllm_granted(path):
    fixture = load(path)
    result = replay(fixture)
    assert grants(result) == [step["sched"] for step in fixture["steps"]]
    want = [(step["step"], r) for step in fixture["steps"] for r in step["preempted"]]
    assert list(result.preemption_events.itertuples(index=False, name=None)) == want


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_prefix_hits_and_finish_steps_match(path):
    fixture = load(path)
    result = replay(fixture)
    requests = result.requests
    assert requests["prefix_hit_tokens"].tolist() == [r["num_cached_tokens"] for r in fixture["requests"]]
    assert requests["readmit_hit_tokens"].tolist() == [sum(h for _, h in r["readmissions"])
                                                        for r in fixture["requests"]]
    # a one-second step that starts at second k ends at k + 1
    assert (requests["finish_s"] - 1).astype(int).tolist() == [r["finish_step"] for r in fixture["requests"]]
    assert result.summary["kv_blocks"].iloc[0] == fixture["settings"]["num_blocks"]


def allocations(tables: list[list[tuple[int, list[int], bool]]]) -> list[list[list]]:
    """Per step, ``[request, block ids]`` appended to each table that grew: an admitted request's whole table
    (the fixtures' ``alloc``)."""
    out, held = [], {}
    for step in tables:
        grown = []
        for request, table, admitted in step:
            before = [] if admitted else held[request]
            if len(table) > len(before):
                grown.append([request, table[len(before):]])
            held[request] = table
        out.append(grown)
    return out


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_every_step_hands_out_the_block_ids_vllm_handed_out(path):
    fixture, tables = load(path), []
    replay(fixture, tables)
    assert allocations(tables) == [step["alloc"] for step in fixture["steps"]]


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_free_blocks_after_each_step_match(path):
    fixture = load(path)
    result = replay(fixture)
    usable = fixture["settings"]["num_blocks"] - 1
    assert (usable - result.timeline["kv_blocks_used"]).tolist() == [step["free"] for step in fixture["steps"]]


@pytest.mark.parametrize(("trace", "rule"), [
    ("mixed-sync", "scheduler_reserve_full_isl"),  # the 1000-token request would be admitted at step 3
    ("no-sharing-sync", "prepend_unhashed_free_blocks"),
    ("no-sharing-sync", "null_block"),
])
def test_each_vllm_rule_is_needed(trace, rule):
    fixture, tables = load(Path(__file__).parent / "fixtures" / "vllm" / f"{trace}.json"), []
    without = replay(fixture, tables, **{rule: False})
    same = (grants(without) == [step["sched"] for step in fixture["steps"]]
            and allocations(tables) == [step["alloc"] for step in fixture["steps"]])
    assert not same
