"""Live model: a real transformers model generating token by token, its attention, sinks, heavy hitters and KV bytes."""

import streamlit as st

from kvcore.models.attention import AttentionPatterns
from kvcore.models.live import kv_curves, opening_layer, patterns_table
from kvcore.models.loader import describe_model
from kvcore.models.runtime import text_config
from kvcore.plans import cache_plans
from ui import figures, live_runs, params, tables
from ui import live_figures as lf
from ui.guard import user_errors
from ui.live_runs import LiveRequest, comparison, generation, step_timing
from ui.live_steps import show_step_player
from ui.models import choose_model, shared_model

st.title("Live model")
st.markdown("A real causal LM writes one token per step: **prefill** puts the prompt's keys and values in the KV "
            "cache in one pass, each **decode** step reads the whole cache and appends one entry. **Attention sinks** "
            "(StreamingLLM) and **heavy hitters** (H2O), marked on the map, are what eviction policies keep.")
with st.sidebar:
    name = choose_model("Model", key="lm_model", hub_key="lm_hub")
    prompt = params.widget(st.text_area, "Prompt", key="lm_prompt", value="The import statement", max_chars=1000)
    new = params.widget(st.number_input, "New tokens", key="lm_new", min_value=1, max_value=128, value=40)
    temp = params.widget(st.slider, "Temperature (0 = greedy)", key="lm_temp", min_value=0.0, max_value=2.0,
                         value=0.0, step=0.1)
    seed = params.widget(st.number_input, "Seed", key="lm_seed", min_value=0, max_value=10_000, value=0)
    plan_name = params.widget(st.selectbox, "Cache policy", key="lm_plan", options=list(cache_plans()))
    evicting = plan_name.startswith("evict:")
    budget = params.widget(st.number_input, "Eviction budget (entries per layer and head)", key="lm_budget",
                           min_value=4, max_value=1024, value=32, disabled=not evicting)
    positions = params.widget(st.segmented_control, "Positions after eviction", key="lm_pos", disabled=not evicting,
                              options=["original", "rerotate"], default="original", required=True)

if name is None:
    st.info("Type a Hugging Face Hub name (a causal LM with at most 1.5 GB of weights), or pick the bundled model.")
    st.stop()
with user_errors(f"Loading {name}"):  # a progress bar while it loads; an error shown openly, never in a closed box
    shared = shared_model(name)
model, tokenizer = shared.model, shared.tokenizer
st.caption(f"Model: {describe_model(name)}.")
request = LiveRequest.of(prompt, new, temp, seed, plan_name, budget, positions)
with user_errors("Settings"):
    plan = request.cache_plan()
    request.settings()

st.subheader(f"Generated with the {plan.name} cache")
run = generation(shared, request, stream=True)
full = generation(shared, request.full, stream=False)

metrics, caption = st.container(), st.container()
left, right = st.columns(2)
with left:
    figures.show(figures.line_chart(kv_curves({plan.name: run, "full": full}), "step", "kv_bytes", "cache",
                                    title="KV bytes after each step"), key="lm_kv")
timed = None
with right, user_errors("Timing", stop=False):
    timed = step_timing(shared, request, run)  # None while it is measured behind the page (a bar follows it)
    if timed is not None:
        figures.show(lf.timing_chart(timed[0]), key="lm_ms")
with metrics:
    lf.generation_metrics(run, None if timed is None else timed[0])
if timed is not None:
    caption.caption(lf.timing_caption(*timed))
csv_settings = {"model": name, "plan": plan_name, "new": new, "seed": seed}
tables.show_table(run.table, "live", "tokens", csv_settings, height=260,
                  caption="One row per generated token: its log-prob, the wall time of that one step in this "
                          "generation (a single run: compare phases with the repeated timing above), and what the "
                          "cache holds afterwards (entries of layer 0, bytes of all layers).")

st.subheader("Attention over the generated sequence")
cfg, c = text_config(model), st.columns(5)
layer = params.widget(c[0].number_input, "Layer", key="lm_layer", min_value=0, max_value=cfg.num_hidden_layers - 1,
                      value=opening_layer(cfg.num_hidden_layers),
                      help="opens on the first layer past a sixth of the depth: the first layers attend locally")
head = params.widget(c[1].selectbox, "Head", key="lm_head", options=["mean", *range(cfg.num_attention_heads)])
sink_ratio = params.widget(c[2].number_input, "Sink: x uniform share", key="lm_sink", min_value=1.5,
                           max_value=100.0, value=5.0, step=0.5)
heavy = params.widget(c[3].slider, "Heavy hitters: top share of keys", key="lm_heavy", min_value=0.01,
                      max_value=0.5, value=0.05, step=0.01)
log_color = params.widget(c[4].toggle, "Log colour", key="lm_log", value=True)
thresholds = AttentionPatterns.for_length(len(run.ids), sink_ratio=sink_ratio, heavy_fraction=heavy)
attn = live_runs.attention(shared, request, run, layer, None if head == "mean" else int(head))
patterns = patterns_table(attn, run.tokens, thresholds)
title = f"Layer {layer}, head {head}: full cache, eager attention (dotted line: generation starts)"
figures.show(lf.attention_heatmap(attn, run.tokens, patterns, title, log_color, run.prompt_len), key="lm_map")
found, note = lf.sink_evidence(patterns, thresholds, f"layer {layer}, head {head}",
                               live_runs.token_zero_by_layer(shared, request, run, thresholds), shared.name)
(st.success if found else st.info)(note)
bars_title = f"Attention each key receives from far queries (sink: {sink_ratio:g}x)"
figures.show(lf.pattern_bars(patterns, run.tokens, bars_title, sink_ratio), key="lm_bars")
tables.show_table(patterns, "live", "patterns", {**csv_settings, "layer": layer, "head": head}, height=240,
                  caption=f"received_vs_uniform: mean attention from queries {thresholds.min_distance}+ positions "
                          "later over the uniform share 1/(t+1), the Eviction page's detector; keys with fewer than "
                          f"{thresholds.min_queries} such queries are not judged (empty). A sink reaches "
                          f"{sink_ratio:g}x. accumulated: the column sum (H2O).")
show_step_player(shared.name, request, run, attn, layer, head, thresholds, plan.name, csv_settings)

if plan_name != "full":
    st.subheader(f"{plan.name} vs the full cache")
    for col, label, text in zip(st.columns(2), ["Full cache", plan.name], [full.text, run.text], strict=True):
        col.markdown(f"**{label}**\n\n{text}")
    tables.show_table(comparison(shared, request, full), "live", "vs-full", csv_settings, height=240,
                      caption="The full cache's tokens scored through both caches (teacher forcing), so each row "
                              "compares the same token; delta < 0: the policy finds it less likely.")
