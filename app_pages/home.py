"""Home: what the KV cache is, and a calculator of how much memory it takes."""

import streamlit as st

from kvcore.shapes import GPU_PRESETS, KV_BITS, PRESETS, custom_shape, kv_bytes, weight_bytes
from ui import figures, home_figures, params, tables
from ui.format import bytes_str
from ui.guard import user_errors
from ui.home_runs import calculator

st.title("KV Cache Lab")
st.markdown(
    "An LLM generates in two phases. **Prefill** runs the whole prompt at once and writes a key and a "
    "value vector per token, per layer, per KV head: the **KV cache**. **Decode** then makes one token per "
    "step: it reads the entire cache to attend over the past and appends one more entry. The cache grows "
    "with every token of every sequence in the batch, so at long contexts and large batches it, not the "
    "weights, decides how much fits on a GPU. The pages on the left show how serving systems page, "
    "schedule, evict, quantize, share and offload it, measured on real tensors and a real model."
)
ref = PRESETS["llama-2-7b"]
st.caption(
    f"Example: {ref.name} keeps {bytes_str(kv_bytes(ref, 1))} of KV per token at 16 bits; 32 sequences of "
    f"4,096 tokens hold {bytes_str(kv_bytes(ref, 4096, 32))} of cache next to {bytes_str(weight_bytes(ref))} "
    "of weights."
)

st.header("KV memory calculator")
names = params.widget(st.multiselect, "Models", key="models", options=[*PRESETS, "custom"],
                      default=["llama-2-7b", "llama-3-8b", "mistral-7b"])
left, right = st.columns([1, 3], gap="large")
with left:
    tokens = params.widget(st.number_input, "Context length (tokens)", key="tokens", min_value=1,
                           max_value=10_000_000, value=10_000, step=1024)
    batch = params.widget(st.number_input, "Batch size (sequences)", key="batch", min_value=1,
                          max_value=4096, value=1)
    bits = params.widget(st.segmented_control, "KV precision (bits)", key="bits", options=list(KV_BITS),
                         default=16, required=True)
    gpu = params.widget(st.selectbox, "GPU", key="gpu", options=list(GPU_PRESETS))
    shapes = [PRESETS[n] for n in names if n in PRESETS]
    if "custom" in names:
        with st.expander("Custom shape", expanded=True):
            layers = params.widget(st.number_input, "Layers", key="c_layers", min_value=1, max_value=512, value=32)
            q_heads = params.widget(st.number_input, "Query heads", key="c_q", min_value=1, max_value=512, value=32)
            kv_heads = params.widget(st.number_input, "KV heads", key="c_kv", min_value=1, max_value=512, value=8)
            head_dim = params.widget(st.number_input, "Head dim", key="c_d", min_value=1, max_value=1024, value=128)
            billions = params.widget(st.number_input, "Parameters (billions)", key="c_params", min_value=0.001,
                                     max_value=2000.0, value=8.0, step=0.5)
            with user_errors("Custom shape", stop=False):
                shapes.append(custom_shape(layers, q_heads, kv_heads, head_dim, int(billions * 1e9)))

if not shapes:
    st.info("Pick at least one model.")
    st.stop()
with user_errors("Calculator"):
    table, curve = calculator(tuple(shapes), tokens, batch, bits, gpu)

with right:
    home_figures.memory_metrics(table, tokens, batch, gpu)
    figures.show(home_figures.kv_vs_context(curve, batch, bits))
settings = {"tokens": tokens, "batch": batch, "bits": bits}
tables.show_table(table, "home", "kv-memory", settings,
                  caption="KV bytes = 2 x layers x KV heads x head dim x tokens x batch x bits / 8. "
                          "Weights counted at 16 bits; 'tokens fit' = (HBM - weights) / KV bytes per token.")
