"""The page's stepper: actions parse, replay deterministically, and the views describe the pool."""

import pytest

from kvcore.paged import stepper, views
from kvcore.shapes import PRESETS, kv_bytes


def test_actions_round_trip_and_reject_garbage():
    assert stepper.parse_actions("P0.D.C0.X1") == ["P0", "D", "C0", "X1"]
    assert stepper.format_actions(["P0", "D"]) == "P0.D"
    assert stepper.parse_actions("") == []
    with pytest.raises(ValueError, match="action 2 'Q' is not one of"):
        stepper.parse_actions("P0.Q")
    with pytest.raises(ValueError, match="request r3 is not running"):
        stepper.load_actions("P0.X3", stepper.StepperConfig())
    with pytest.raises(ValueError, match="prompt 3 does not exist"):
        stepper.load_actions("P3", stepper.StepperConfig(prompts=("a b",)))


def test_replay_shares_prefix_forks_and_frees():
    config = stepper.StepperConfig()  # block size 4, 16 blocks; prompts 0 and 1 share 6 words
    state = stepper.replay(config, ["P0", "P1", "D", "C0", "D", "X1"])
    m = state.cache.manager
    assert m.request_ids() == ["r0", "r2"]
    assert m.num_cached_tokens("r0") == 0
    assert state.parent_of == {"r2": "r0"}
    assert m.block_table("r2")[:3] == m.block_table("r0")[:3]
    assert any(e.kind == "copy_on_write" for e in m.events)
    assert max(state.event_action) == 6
    again = stepper.replay(config, ["P0", "P1", "D", "C0", "D", "X1"])
    assert views.block_grid(again).equals(views.block_grid(state))


def test_views_describe_the_pool():
    state = stepper.replay(stepper.StepperConfig(), ["P0", "P1"])
    grid = views.block_grid(state).set_index("block")
    assert grid.loc[0, "state"] == "shared"
    assert grid.loc[0, "ref_cnt"] == 2
    assert grid.loc[0, "slots"] == ["the", "quick", "brown", "fox"]
    tables = views.block_tables(state)
    assert tables["num_cached_tokens"].tolist() == [0, 4]
    assert tables.loc[1, "block_table"].startswith("0->0 ")
    queue = views.free_queue(state.cache.manager)
    assert len(queue) == state.cache.manager.num_free_blocks
    shape = PRESETS["llama-3-8b"]
    memory = views.memory_usage(state.cache.manager, shape).set_index("what")["tokens"]
    assert memory.iloc[0] == 12 + 9
    assert memory.iloc[1] == 12 + 9 - 4
    window = views.attention_window(state.cache.manager, "r0", 5)
    assert window["attended"].sum() == 5
    assert len(window) == 12
    assert views.memory_usage(state.cache.manager, shape)["kv_bytes"].iloc[1] == kv_bytes(shape, 17)
    assert list(views.event_log(state).columns[:2]) == ["action", "step"]


def test_out_of_blocks_is_a_message_not_an_error():
    config = stepper.StepperConfig(num_blocks=3, block_size=4)  # prompt 0 (12 words) takes all 3 blocks
    state = stepper.replay(config, ["P0", "P0", "D"])
    assert state.running == ["r0"]
    assert "refused" in state.messages[1]
    assert "out of blocks, waiting: r0" in state.messages[2]
    with pytest.raises(ValueError, match=r"num_blocks must be in 1\.\.64"):
        stepper.StepperConfig(num_blocks=0)
