"""Serving engine: a real model served through the lab's own scheduler, blocks and kernels, measured."""

import streamlit as st

from kvcore.engine.experiment import EngineSettings
from kvcore.engine.workload import ServeWorkload
from kvcore.models.loader import HUB_MODELS, OFFLINE_MODELS, describe_model
from ui import engine_figures, figures, params, tables
from ui.engine_runs import choose_model_workload, served, workload_defaults
from ui.guard import user_errors

st.title("Serving engine")
st.markdown(
    "The simulator's lessons, on a real model: every request below is real text served by the lab's engine. The "
    "**scheduler** is the simulator's (vLLM 0.33's rules) and decides every step, the **block manager** makes "
    "every block decision, and the model's own layers run with K/V only in **paged pools**, decode attention "
    "through the paged kernel. Greedy outputs equal transformers' `generate` token for token (tested). Beside it, "
    "transformers serves the same requests with **static batching**, and the simulator, its step time calibrated "
    "once on a grid of engine steps, predicts the run it never saw.")
with st.sidebar:
    model = params.widget(st.selectbox, "Model (Llama family)", key="eg_model",
                          options=[*OFFLINE_MODELS, *(m for m in HUB_MODELS if m != "gpt2")],
                          on_change=choose_model_workload,
                          help="bundled: the 5.8M-parameter toy (fast); smollm2-135m: a real pretrained model, "
                               "23x the parameters, so choosing it sets fewer, shorter requests")
    defaults = workload_defaults(model)
    st.subheader("Workload (real text, all arriving at once)")
    n = params.widget(st.slider, "Requests", key="eg_n", min_value=1, max_value=64, value=defaults["eg_n"])
    p_max = params.widget(st.slider, "Longest prompt (tokens)", key="eg_pmax", min_value=8, max_value=400,
                          value=defaults["eg_pmax"])
    o_max = params.widget(st.slider, "Longest output (tokens)", key="eg_omax", min_value=8, max_value=64,
                          value=defaults["eg_omax"])
    prefix = params.widget(st.slider, "Shared prefix (tokens)", key="eg_prefix", min_value=0, max_value=256, value=0,
                           step=16, help="a system prompt that some requests start with")
    share = params.widget(st.slider, "Requests with the prefix", key="eg_share", min_value=0.0, max_value=1.0,
                          value=0.5, disabled=prefix == 0)
    seed = params.widget(st.number_input, "Seed", key="eg_seed", min_value=0, max_value=10_000, value=0)
    st.subheader("Engine (vLLM's settings)")
    blocks = params.widget(st.select_slider, "KV blocks", key="eg_blocks", options=[16, 32, 64, 128, 256, 512, 1024,
                                                                                      2048], value=256)
    block_size = params.widget(st.segmented_control, "Block size", key="eg_bs", options=[8, 16, 32], default=16,
                               required=True)
    seqs = params.widget(st.slider, "max_num_seqs", key="eg_seqs", min_value=1, max_value=32, value=16)
    budget = params.widget(st.select_slider, "max_num_batched_tokens", key="eg_budget",
                           options=[64, 128, 256, 512, 1024, 2048], value=512)
    caching = params.widget(st.toggle, "Prefix caching", key="eg_apc", value=True)
    chunked = params.widget(st.toggle, "Chunked prefill", key="eg_chunked", value=True)
    bits = params.widget(st.segmented_control, "KV pools", key="eg_bits", options=["fp32", "8-bit", "4-bit"],
                         default="fp32", required=True)
    versus = params.widget(st.toggle, "Also serve with transformers (static batching)", key="eg_hf", value=True)

with user_errors("Settings"):
    workload = ServeWorkload(n, min(5, p_max), p_max, min(8, o_max), o_max, prefix, share if prefix else 0.0, seed)
    settings = EngineSettings(blocks, block_size, seqs, budget, caching, chunked,
                              {"fp32": None, "8-bit": 8, "4-bit": 4}[bits])
with user_errors("Serving"):
    run, comparing = served(model, workload, settings, versus)  # comparing: transformers' runs measured behind

engine_figures.run_metrics(run)
st.caption(f"Model: {describe_model(model)}.")
st.caption(engine_figures.measured_note(run, comparing))
figures.show(engine_figures.step_timeline(run.steps), key="eg_timeline")
shown = {"model": model, "n": n, "seed": seed}
tables.show_table(run.summary, "engine", "systems", shown, caption=(
    "The same requests, each run to its output length; each system's row is the median of its runs (min and max "
    "of the headline metrics beside). TTFT counts the wait for a seat (all arrive at once); peak memory: growth "
    "of the process's resident memory while serving; KV bytes held: blocks in use at the peak (transformers: its "
    "largest padded batch cache); allocated: the engine's pools, reserved up front."))

st.subheader("The block pool, step by step")
steps = sorted(run.pool["step"].unique())
at = params.widget(st.select_slider, "After step", key="eg_step", options=steps, value=steps[len(steps) // 2])
figures.show(engine_figures.pool_map(run.pool, run.num_blocks, at), key="eg_pool")
tables.show_table(run.pool[run.pool["step"] == at], "engine", "pool", {**shown, "step": at}, height=220,
                  caption="Blocks held or still cached after the step: ref_cnt (0 = free, reusable, still hit by a "
                          "matching prefix until evicted), owners, and the block's hash (chained over full blocks).")

st.subheader("Requests")
tables.show_table(run.requests, "engine", "requests", shown, height=280,
                  caption="Prompt (its last tokens) and output text, prefix-cache hits, preemptions and times.")

st.subheader("Measured vs simulated")
engine_figures.measured_vs_simulated(model, workload, settings, run, shown)
with st.expander("Every step"):
    tables.show_table(run.steps, "engine", "steps", shown, height=260)
