"""Paged blocks: a vLLM block pool step by step, fragmentation of contiguous vs paged memory, paged attention."""

import streamlit as st

from kvcore import paged
from kvcore.device import get_device
from kvcore.paged import stepper, views
from kvcore.paged.attention_check import AttentionCheckConfig, check_summary
from kvcore.shapes import PRESETS
from ui import figures, paged_figures, params, tables
from ui.format import bytes_str
from ui.guard import user_errors
from ui.paged_runs import run_attention_check, run_fragmentation


def push(actions: list[str], action: str | None) -> None:
    params.set_query_value("steps", stepper.format_actions([*actions, action]) if action else None)


st.title("Paged blocks")
st.markdown("vLLM stores the KV cache in fixed-size **blocks**; each sequence's **block table** maps its logical "
            "blocks to physical ones, so memory is taken one block at a time and shared by reference. Full "
            "blocks are hashed over their prefix and reused across requests (**automatic prefix caching**); "
            "free blocks wait in an LRU **free block queue** and keep their hash until evicted.")
with st.sidebar:
    model = params.model_preset("Model shape (KV bytes)", key="model")
    num_blocks = params.widget(st.slider, "Blocks in the pool", key="blocks", min_value=4, max_value=64, value=16)
    block_size = params.widget(st.segmented_control, "Block size (tokens)", key="bs", options=[1, 2, 4, 8, 16],
                               default=4, required=True)
    caching = params.widget(st.toggle, "Prefix caching", key="apc", value=True)
    text = params.widget(st.text_area, "Prompts (one per line, up to 4)", key="prompts",
                         value="\n".join(stepper.DEFAULT_PROMPTS), height=150, max_chars=4000)
with user_errors("Stepper settings"):
    config = stepper.StepperConfig(tuple(t for t in text.splitlines() if t.strip()), num_blocks, block_size, caching)
actions = params.query_value("steps", [], lambda raw: stepper.load_actions(raw, config),
                             "actions P<prompt>, D, C<request>, X<request> joined by '.' that replay on this pool")
state = stepper.replay(config, actions)

st.header("Step through prefill and decode")
c1, c2, c3 = st.columns([3, 2, 3], vertical_alignment="bottom")
prompt = params.widget(c1.selectbox, "Prompt", key="prompt", options=range(len(config.prompts)),
                       format_func=lambda i: f"{i}: {config.prompts[i][:60]}")
c1.button("Prefill", on_click=push, args=(actions, f"P{prompt}"), icon=":material/input:")
params.hold_choice("req", state.running)  # a finished or not-yet-created request: the first running one
req = params.widget(c2.selectbox, "Request", key="req", options=state.running)
c2.button("Fork", on_click=push, args=(actions, f"C{(req or '')[1:]}"), disabled=req is None,
          icon=":material/call_split:")
c2.button("Finish", on_click=push, args=(actions, f"X{(req or '')[1:]}"), disabled=req is None, icon=":material/done:")
c3.button("Decode step", on_click=push, args=(actions, "D"), disabled=not state.running, icon=":material/redo:")
c3.button("Reset", on_click=push, args=(actions, None), disabled=not actions, icon=":material/restart_alt:")
c1.button("Example: shared prefix, then a fork", on_click=params.set_query_value, args=("steps", stepper.EXAMPLE),
          icon=":material/play_arrow:", disabled=bool(actions))
if state.messages:
    st.info(f"Step {len(actions)}: {state.messages[-1]}")
manager = state.cache.manager
figures.show(paged_figures.block_grid_figure(views.block_grid(state), block_size), key="grid")
figures.show(paged_figures.free_queue_figure(views.free_queue(manager)), key="queue")
left, right = st.columns(2)
with left:
    tables.show_table(views.block_tables(state), "paged", "block-tables", caption="Block tables (logical -> physical)")
    st.metric("KV cache usage (blocks held)", f"{manager.usage:.0%}")
with right:
    tables.show_table(views.memory_usage(manager, PRESETS[model]), "paged", "memory", {"model": model},
                      caption=f"KV bytes for {model} (16-bit): a shared prefix is stored once; blocks reserve "
                              "whole slots.")
tables.show_table(views.event_log(state), "paged", "events", height=240,
                  caption="Event log: allocate, hit, evict, cache, copy_on_write, fork, free")

st.header("Storage is not attention")
if state.running:
    who = req or state.running[0]
    window = params.widget(st.slider, "Attention window N (recent tokens)", key="win", min_value=1, max_value=64,
                           value=4)
    win = views.attention_window(manager, who, window)
    figures.show(paged_figures.attention_window_figure(win, block_size), key="window")
    read, held, read_bytes, held_bytes = views.window_bytes(win, PRESETS[model])
    st.caption(f"{who}: attention reads {read} of {held} tokens ({bytes_str(read_bytes)}) but the cache still "
               f"stores all {held} ({bytes_str(held_bytes)}): a window saves reads, not memory, unless blocks "
               "outside it are freed.")
else:
    st.caption("Prefill a prompt to see which stored tokens a recent-N attention window reads.")

st.header("Fragmentation: contiguous vs paged")
f1, f2, f3 = st.columns(3)
kind = params.widget(f1.segmented_control, "Length distribution", key="dist", options=["fixed", "uniform", "lognormal"],
                     default="lognormal", required=True)
spread = params.widget(f1.slider, "Spread (uniform: +- fraction of mean; lognormal: sigma)", key="spread",
                       min_value=0.0, max_value=1.0 if kind == "uniform" else 3.0, value=1.0, step=0.1)
p_mean = params.widget(f2.number_input, "Mean prompt (tokens)", key="pmean", min_value=1, max_value=1500, value=161)
o_mean = params.widget(f2.number_input, "Mean output (tokens)", key="omean", min_value=1, max_value=1500, value=338)
n_req = params.widget(f3.slider, "Requests", key="nreq", min_value=10, max_value=500, value=200, step=10)
seed = params.widget(f3.number_input, "Seed", key="seed", min_value=0, max_value=10_000, value=0)
with user_errors("Fragmentation"):
    prompts, outputs = (paged.LengthDistribution(kind, float(mean), spread) for mean in (p_mean, o_mean))
    summary, sampling = run_fragmentation(paged.FragmentationConfig(n_req, prompts, outputs, seed=seed))
figures.show(figures.bar_chart(paged.waste_breakdown(summary), "allocator", "percent", "part", barmode="stack",
                               title="Where KV memory goes (time-averaged)", y_title="% of memory held"))
settings = {"dist": kind, "p": p_mean, "o": o_mean, "spread": spread, "n": n_req, "seed": seed}
tables.show_table(summary, "paged", "fragmentation", settings, caption=paged_figures.fragmentation_caption())
figures.show(paged_figures.sampling_figure(sampling), key="sampling")
tables.show_table(sampling, "paged", "parallel-sampling", settings,
                  caption="n samples per request with the real block manager: n separate copies vs fork().")

st.header("Paged attention check")
k1, k2, k3 = st.columns(3)
batch = params.widget(k1.slider, "Sequences", key="kb", min_value=1, max_value=8, value=4)
context = params.widget(k2.slider, "Longest context (tokens)", key="kt", min_value=1, max_value=2048, value=512)
dtype = params.widget(k3.segmented_control, "dtype", key="kdt", options=["float32", "float16", "bfloat16"],
                      default="float32", required=True)
with user_errors("Attention check"):
    check = run_attention_check(AttentionCheckConfig.for_model(model, batch, context, dtype=dtype,
                                                               device=get_device().type))
tables.show_table(check, "paged", "attention-check", {"model": model, "dtype": dtype}, caption=check_summary(check))
