"""Eviction: KV cache policies compared on a real model (perplexity, attention kept, memory held)."""

import streamlit as st

from kvcore.eviction import DEFAULT_BUDGETS, DEFAULT_POLICIES, POLICIES, kvpress_hyperparameters
from kvcore.eviction.evaluate import EvictionConfig, sample_text
from kvcore.models.loader import describe_model
from ui import eviction_figures, eviction_steps, figures, params, tables
from ui.eviction_runs import EvictionText, reference_verdicts, sweep
from ui.format import bytes_str
from ui.guard import user_errors
from ui.models import choose_model
from ui.needle_figures import needle_section

TOKEN_BUDGETS = [8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
SHARE_BUDGETS = [0.05, 0.1, 0.125, 0.25, 0.5, 0.75]
POSITIONS = {"original": "Original positions: each new token is fed at its true position and kept keys keep "
                         "their rotation (works with every model).",
             "rerotate": "Re-rotated inside the cache (StreamingLLM): kept keys are rotated to compact positions "
                         "0..budget-1 and each new token comes at the cache length (RoPE models only)."}

st.title("Eviction")
st.markdown("When the KV cache outgrows its memory, a policy decides which tokens to drop. Here every policy runs "
            "on a real model, token by token with the cache **held at the budget** (StreamingLLM's streaming "
            "perplexity), or compressing the prompt **once** (kvpress). Each is measured against the full cache: "
            "perplexity, the share of full-cache attention that still lands on readable tokens, the error of each "
            "layer's attention output, cache hits and misses, speed and the bytes the cache really holds.")
with st.sidebar:
    model_name = choose_model("Model", key="model", hub_key="hub", hub_label="Hub name or folder", typed_links=True)
    source = params.widget(st.segmented_control, "Text", key="src", options=["bundled sample", "your text"],
                           default="bundled sample", required=True)
    own = (params.widget(st.text_area, "Your text", key="text", value="", max_chars=20_000)
           if source == "your text" else "")
    max_tokens = params.widget(st.slider, "Tokens streamed", key="ntok", min_value=32, max_value=1024,
                               value=256, step=32)
    mode = params.widget(st.segmented_control, "Mode", key="mode", options=["decode", "prefill"], default="decode",
                         required=True, help="decode: hold the cache at the budget while streaming; "
                                             "prefill: compress the first half once, score the second half")
    positions = params.widget(st.segmented_control, "Positions after eviction", key="pos", options=list(POSITIONS),
                              default="original", required=True)
    unit = params.widget(st.segmented_control, "Budget unit", key="unit", options=["tokens", "share"],
                         default="tokens", required=True)
    budgets = (params.widget(st.multiselect, "Budgets (tokens kept)", key="budgets", options=TOKEN_BUDGETS,
                             default=list(DEFAULT_BUDGETS)) if unit == "tokens" else
               params.widget(st.multiselect, "Budgets (share of the tokens)", key="shares", options=SHARE_BUDGETS,
                             default=[0.125, 0.25]))
    chosen = params.widget(st.multiselect, "Policies", key="policies", options=[p for p in POLICIES if p != "full"],
                           default=list(DEFAULT_POLICIES))
    kvpress = params.widget(st.toggle, "kvpress-compatible", key="kvpress", value=False,
                            help="policies that have a kvpress 0.5.5 press keep exactly its tokens (its options and "
                                 "defaults; a share budget truncated as kvpress counts it)")
    with st.expander("Hyperparameters"):
        hyper = {p: params.dataclass_widgets(POLICIES[p], p) for p in chosen}
    if kvpress:
        hyper |= kvpress_hyperparameters(chosen)

if model_name is None or not chosen or not budgets:
    st.info("Type a Hub name or a model folder." if model_name is None else "Pick at least one policy and one budget.")
    st.stop()
with user_errors("Settings"):
    config = EvictionConfig(tuple(chosen), tuple(budgets), hyper, positions, mode, max_tokens,
                            budget_rule="kvpress" if kvpress else "round")
    config.check_cost()
    text = EvictionText(model_name, own if source == "your text" else sample_text(), max_tokens)
    results = sweep(text, config)
st.caption(f"Model: {describe_model(model_name)}.")
if results is None:  # the runs are measured behind the page: what the reference alone decides, meanwhile
    with user_errors("Reference"):
        eviction_figures.show_verdicts(reference_verdicts(text))
    st.caption("The policies' perplexities, attention kept, maps, step player and tables fill in when every run is "
               "measured (the bar above says how far).")
else:
    table = results.table

    st.caption(f"{POSITIONS[positions]} {len(results.tokens) + 1} tokens streamed: the first {len(results.tokens)} fed "
               f"through the cache, each predicting the next; the full cache holds "
               f"{bytes_str(table['kv_bytes_full'].iloc[0])}.")
    st.caption(eviction_figures.KVPRESS_NOTE)
    eviction_figures.show_verdicts(results.verdicts)
    left, right = st.columns(2)
    at = params.widget(st.selectbox, "Budget shown below (tokens)", key="at",
                       options=eviction_figures.budgets_shown(table))
    figs = eviction_figures.page_figures((text, tuple(config.runs())), at, mode, results)
    for column, name in ((left, "ppl"), (right, "bytes")):
        with column:
            figures.show(figs[name], key=name)
    figures.show(figs["maps"], key="maps")
    for column, name in zip(st.columns(2), ("mass", "err"), strict=True):
        with column:
            figures.show(figs[name], key=name)
    figures.show(figs["strip"], key="strip")
    eviction_steps.show_step_player(text, config, results, at)
    settings = {"mode": mode, "pos": positions, "tokens": max_tokens}
    tables.show_table(table, "eviction", "results", settings, caption=eviction_figures.TABLE_CAPTION)
    with st.expander("Per-layer and per-token tables"):
        tables.show_table(results.layers, "eviction", "layers", settings)
        tables.show_table(results.tokens, "eviction", "tokens", settings)
needle_section()
