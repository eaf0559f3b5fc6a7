"""Sharing: fewer KV heads (MHA / GQA / MQA) and fewer KV layers (cross-layer), in bytes and in perplexity."""

import streamlit as st

from kvcore import sharing
from kvcore.shapes import GPU_PRESETS, KV_BITS, PRESETS
from kvcore.sharing.convert import ConvertSettings
from kvcore.sharing.crosslayer import MODES, CrossLayerSettings, layer_roles
from kvcore.sharing.variants import live_settings, shipped_results
from ui import figures, params, tables
from ui import sharing_figures as sf
from ui.guard import user_errors
from ui.sharing_runs import bundled, convert, crosslayer, live

st.title("Sharing KV across heads and layers")
st.markdown(
    "The cache holds K and V for every **KV head** of every **layer**. **GQA** lets a group of query heads read one "
    "KV head (**MQA**: all of them read one), so the cache shrinks by the group size (Ainslie et al. 2023). "
    "**Cross-layer** sharing lets adjacent layers keep one K/V between them (CLA, Brandon et al. 2024; MiniCache, "
    "Liu et al. 2024). Below: the memory each saves on real model shapes (smollm2-135m is the real GQA model the lab "
    "runs offline: 9 query heads over 3 KV heads, a third of what its MHA equivalent would hold), then what it costs "
    "on the bundled model, converted after training or trained that way from scratch.")
tab_heads, tab_layers, tab_convert, tab_scratch = params.widget(st.tabs, sf.TABS, key="sh_tab")
calc = not tab_heads.open  # the calculator's settings shape the Heads tab only: greyed out on the others
with st.sidebar:
    preset = params.widget(st.selectbox, "Model preset", key="sh_model", options=list(PRESETS), index=2, disabled=calc)
    shape, options = PRESETS[preset], sharing.divisors(PRESETS[preset].num_q_heads)
    kv = params.widget(st.selectbox, "KV heads", key="sh_kv", options=options, index=options.index(shape.num_kv_heads),
                       disabled=calc)
    tokens = params.widget(st.number_input, "Context (tokens)", key="sh_tokens", min_value=1, max_value=2_000_000,
                           value=8192, step=1024, disabled=calc)
    batch = params.widget(st.number_input, "Batch (sequences)", key="sh_batch", min_value=1, max_value=4096, value=8,
                          disabled=calc)
    bits = params.widget(st.segmented_control, "KV bits", key="sh_bits", options=list(KV_BITS), default=16,
                         required=True, disabled=calc)
    gpu = params.widget(st.selectbox, "GPU", key="sh_gpu", options=list(GPU_PRESETS), disabled=calc)
    seed = params.widget(st.number_input, "Seed (training runs)", key="sh_seed", min_value=0, max_value=9999, value=0,
                         disabled=tab_heads.open or tab_layers.open)
    st.caption(sf.sidebar_note(tab_heads.open, tab_layers.open))

if tab_heads.open:
    with tab_heads, user_errors("Calculator"):
        table = sharing.kv_heads_table(shape, tokens, batch, bits, GPU_PRESETS[gpu])
        row = table.set_index("kv_heads").loc[kv]
        figures.show(sf.head_groups(shape.num_q_heads, kv, f"{preset} with {kv} KV heads: {row.attention}, "
                                    f"{row.q_heads_per_kv_head} query head(s) per KV head"), key="groups")
        sf.head_metrics(row, tokens, batch, gpu)
        if note := sf.weights_note(table, kv, GPU_PRESETS[gpu]):
            st.warning(note)
        fit = sf.capacity(shape, GPU_PRESETS[gpu], bits, tokens)
        sf.side_by_side([sf.bytes_per_token(table, bits), *([fit] if fit else [])], "calc")
        tables.show_table(table, "sharing", "kv-heads", {"model": preset, "tokens": tokens, "batch": batch,
                                                         "bits": bits}, caption=sf.HEADS_CAPTION)

if tab_layers.open:
    with tab_layers:
        with user_errors("Loading the bundled model"):
            n_layers, ids = bundled()[0].config.num_hidden_layers, bundled()[3]
        c1, c2, c3 = st.columns(3)
        mode = params.widget(c1.segmented_control, "Mode", key="sh_mode", options=list(MODES), default="share",
                             required=True)
        start = params.widget(c2.slider, "First shared layer", key="sh_start", min_value=0, max_value=n_layers - 2,
                              value=min(2, n_layers - 2))
        t = params.widget(c3.slider, "Merge weight t of the upper layer", key="sh_t", min_value=0.0, max_value=1.0,
                          value=0.5, step=0.1, disabled=mode == "share")
        with user_errors("Cross-layer sharing"):
            cl = crosslayer(mode, t if mode != "share" else 0.5).table
        st.caption(sf.MODE_TEXT[mode])
        st.caption(sf.crosslayer_summary(cl, start))
        left, right = st.columns([3, 2])
        with left:
            figures.show(sf.crosslayer(cl, start), key="cl")
        with right:
            tables.show_table(layer_roles(CrossLayerSettings(mode, start, t), n_layers), "sharing",
                              "layer-roles", {"mode": mode, "start": start})
        tables.show_table(cl, "sharing", "cross-layer", {"mode": mode, "t": t}, caption=sf.crosslayer_caption(ids))

if tab_convert.open:
    with tab_convert:
        c1, c2, c3 = st.columns(3)
        windows = params.widget(c1.number_input, "Validation windows (256 tokens)", key="sh_windows", min_value=1,
                                max_value=16, value=4)
        uptrain = params.widget(c2.toggle, "Uptrain each converted model", key="sh_uptrain", value=False)
        steps = params.widget(c3.slider, "Uptraining steps", key="sh_usteps", min_value=5, max_value=20, value=10,
                              step=5, disabled=not uptrain)
        up = steps if uptrain else 0
        with user_errors("Conversion"):  # the seed only orders uptraining batches
            conv = convert(ConvertSettings(eval_windows=windows, uptrain_steps=up, seed=seed if up else 0))
        st.caption(sf.convert_caption(conv.table, up))
        figures.show(sf.conversion(conv.table), key="conv")
        tables.show_table(conv.table, "sharing", "convert", {"windows": windows, "uptrain": up})

if tab_scratch.open:
    with tab_scratch:
        shipped = shipped_results()
        if shipped is None:
            st.info("No shipped results: run `python scripts/train_kv_head_variants.py`.")
        else:
            st.caption(sf.shipped_caption(shipped.summary))
            sf.side_by_side(sf.curves(shipped.curves, "Shipped run"), "shipped")
            tables.show_table(shipped.summary, "sharing", "kv-heads-shipped")
        if params.widget(st.toggle, "Re-run a short version here", key="sh_live", value=False):
            lsteps = params.widget(st.slider, "Steps per variant", key="sh_lsteps", min_value=10, max_value=30,
                                   value=20, step=10)
            with user_errors("Training"):
                run = live(live_settings(lsteps, seed))
            st.caption(sf.shipped_caption(run.summary, "Live run"))
            sf.side_by_side(sf.curves(run.curves, "Live run"), "live")
            tables.show_table(run.summary, "sharing", "kv-heads-live", {"steps": lsteps, "seed": seed})
