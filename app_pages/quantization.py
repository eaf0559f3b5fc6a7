"""Quantization: store the KV cache in 8/4/3/2 bits (per token, per channel, KIVI, outliers, FP8, SVD), measured."""

import streamlit as st

from kvcore.models.loader import OFFLINE_MODELS, describe_model
from kvcore.quant import evaluate as qe
from kvcore.quant.methods import METHODS, CustomSettings, method_named
from kvcore.quant.premise import kivi_premise
from ui import figures, params, quant_figures, tables
from ui.guard import user_errors
from ui.quant_runs import first_look, maps, model, results, speed_note, texts

st.title("KV cache quantization")
st.markdown(
    "Storing keys and values in fewer bits shrinks the cache, but every code is a rounded value. **Keys** have a "
    "few channels with large magnitudes in every token (bright columns below), so one scale per *token* wastes "
    "levels on them; **values** have no such channels. KIVI therefore quantizes keys per **channel** and values "
    "per **token**, and keeps the most recent tokens in fp16. Every number below is measured on the chosen "
    "model: KIVI's premise, exact bytes of the packed codes, scales and zeros, the error of K, V and attention "
    "outputs, and the perplexity of decoding token by token through the quantized cache."
)

side = st.sidebar
model_name = params.widget(side.selectbox, "Model", key="qmodel", options=list(OFFLINE_MODELS),
                           help="bundled: the 5.8M-parameter toy (fast); smollm2-135m: a real pretrained model, "
                                "30 layers (its decode of one text window fills in behind the page: about a minute)")
with user_errors(f"Loading {model_name}"):
    cfg = model(model_name)[0].config
st.caption(f"Model: {describe_model(model_name)}.")
name = params.widget(side.selectbox, "Method", key="qmethod", options=[*METHODS, "custom"],
                     index=list(METHODS).index("kivi-2"))
with side.expander("Custom method (method = custom)", expanded=name == "custom"):
    bits = params.widget(st.segmented_control, "Bits", key="qbits", options=[2, 3, 4, 8], default=2, required=True)
    scheme = params.widget(st.selectbox, "Scales shared along", key="qaxis", help="kivi: K per channel, V per token",
                           options=["kivi", "per-token", "per-channel"])
    group = params.widget(st.selectbox, "Group size (channels per-token, tokens per-channel)", key="qgroup",
                          options=[16, 32, 64, 128], index=1)
    residual = params.widget(st.number_input, "Recent tokens kept fp16", key="qresidual", min_value=0,
                             max_value=512, value=32)
    sinks = params.widget(st.number_input, "First tokens kept fp16 (sinks)", key="qsinks", min_value=0,
                          max_value=64, value=0)
    outliers = params.widget(st.slider, "Outliers kept as sparse fp16 (%)", key="qoutliers", min_value=0.0,
                             max_value=5.0, value=0.0, step=0.5)
tokens = params.widget(side.select_slider, "Text length (tokens)", key="qtokens", options=[64, 128, 192, 256, 384],
                       value=qe.PAGE_TOKENS, help="the first half is the prompt; the second half is decoded and scored")
windows = params.widget(side.number_input, "Text windows", key="qwindows", min_value=1,
                        max_value=max(1, qe.PAGE_TOKEN_LIMIT // tokens),
                        value=qe.page_windows(model_name, tokens),
                        help="perplexity averages over this many consecutive windows: more = narrower intervals, "
                             f"slower (up to {qe.PAGE_TOKEN_LIMIT} tokens in all, every method decoding them)")
seed = params.widget(side.number_input, "Which windows (seed)", key="qseed", min_value=0, max_value=999, value=0)
layer = params.widget(side.slider, "Layer (heatmaps)", key="qlayer", min_value=0, max_value=cfg.num_hidden_layers - 1,
                      value=0)
head = params.widget(side.selectbox, "Head (heatmaps)", key="qhead",
                     options=["all", *map(str, range(cfg.num_key_value_heads))])
new_tokens = params.widget(side.number_input, "Generated tokens", key="qgen", min_value=8, max_value=128, value=32)

with user_errors("Quantization"):
    custom = CustomSettings(bits, scheme, group, residual, sinks, outliers)
    method, text = method_named(name, custom), qe.QuantText(tokens, seed, windows)
    result = results(model_name, text, name, custom)  # None while the decode runs behind the page
    by_layer, channels = (result.by_layer, result.channels) if result else first_look(model_name, text, name, custom)
    premise = result.premise() if result else kivi_premise(channels, None, by_layer)
st.caption(f"**{name}**: {method.describe()}. Follows {method.paper}.")
quant_figures.method_metrics(result.summary.set_index("method").loc[name] if result else
                             qe.error_means(by_layer).set_index("method").loc[method.name])
if result:
    st.caption(quant_figures.noise_caption(result, model_name))
st.subheader(f"KIVI's premise, measured on {model_name}")
quant_figures.premise_boxes(premise, model_name)
if not result:
    st.caption("Per channel vs per token at each bit width fills in with the decode (it needs every method's "
               "perplexity).")
figures.show(quant_figures.channel_outliers(channels), key="q_channels")

tab_pareto, tab_maps, tab_layers, tab_text, tab_table = params.widget(st.tabs, quant_figures.TABS, key="qtab")
if tab_pareto.open:
    with tab_pareto:
        if result:
            figures.show(quant_figures.pareto(result.summary, name))
        else:
            st.info(quant_figures.DECODING, icon=":material/hourglass_top:")
if tab_maps.open:
    with tab_maps, user_errors("K/V maps"):
        grid = maps(model_name, text, layer, None if head == "all" else int(head), name, custom)
        titles = ("|K|", "|V|", f"|K̂ - K| ({name})", f"|V̂ - V| ({name})")
        for col, z, title in zip(st.columns(2) * 2, grid, titles, strict=True):
            with col:
                figures.show(quant_figures.magnitude_map(z, f"{title}, layer {layer}",
                                                         cfg.num_key_value_heads if head == "all" else None))
if tab_layers.open:
    with tab_layers:
        figures.show(quant_figures.layer_errors(by_layer, method.name))
if tab_text.open:
    with tab_text, user_errors("Generation"):
        prompt, fp16_text, method_text = texts(model_name, text, new_tokens, name, custom)
        st.caption(f"Greedy continuation of the first {tokens // 2} tokens of window 1 (last 400 characters shown):")
        st.code(prompt[-400:], language=None, wrap_lines=True)
        for col, label, words in zip(st.columns(2), ("fp16", name), (fp16_text, method_text), strict=True):
            col.markdown(f"**{label} cache**")
            col.code(words, language=None, wrap_lines=True)
if tab_table.open:
    with tab_table:
        shown = {"qmodel": model_name, "qtokens": tokens, "qwindows": windows, "qseed": seed}
        if result:
            tables.show_table(result.summary, "quantization", "methods", shown, caption=(
                f"{windows} x {tokens} tokens, the first {tokens // 2} of each prefilled, the rest decoded one by one "
                "and scored. bytes: what the cache holds at the end (all layers); errors: means over layers; "
                "_low/_high: the 95% interval; vs_fp16: worse/better only beyond the noise; pareto: the front when "
                "differences within noise are ties; tokens_per_s: shared batched model step + this method's own "
                "cache time, from one run under whatever load there was: a rough cost, never compared or ranked "
                f"({speed_note(result)}; the results are kept, so the speeds are as old as they are)."))
            tables.show_table(result.by_layer, "quantization", "by-layer", shown)
        else:
            st.info(quant_figures.DECODING, icon=":material/hourglass_top:")
        tables.show_table(qe.methods_table(), "quantization", "registry", caption="Every method and its paper.")
        tables.show_table(premise, "quantization", "kivi-premise", shown, caption="KIVI's premise as measured.")
        tables.show_table(channels, "quantization", "channels", shown, caption=quant_figures.CHANNELS_CAPTION)
