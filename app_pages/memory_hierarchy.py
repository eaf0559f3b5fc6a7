"""Memory hierarchy: tiered KV offload and prefetch, measured transfers, prefill/decode split, roofline."""

import streamlit as st

from kvcore.hierarchy import WRITE_MODES, OffloadConfig, PDConfig, ServingWorkload
from kvcore.hierarchy.experiment import make_workload, tiers_for
from kvcore.shapes import GPU_PRESETS
from ui import figures, params, tables
from ui import hierarchy_figures as hf
from ui.guard import user_errors
from ui.hierarchy_runs import bandwidth, offload, pd_split, roofline

TABS = ["Offload & prefetch", "Measured bandwidth", "Prefill/decode split", "Roofline"]
CHOICES = {"Workload": ("h_wl", ["chat", "rag"]), "Eviction (every tier)": ("h_policy", ["lru", "lfu", "fifo"]),
           "Writes": ("h_write", list(WRITE_MODES)), "Prefetch next turn into": ("h_prefetch", ["off", "gpu", "cpu"])}
OFFLOAD_INPUTS = {  # label: (key, min, max, default) of the offload tab's number inputs
    "Requests": ("h_n", 50, 5000, 2000), "GPU (GB)": ("h_g_gb", 0.0, 1e5, 4.0), "CPU (GB)": ("h_c_gb", 0.0, 1e5, 16.0),
    "Disk (GB)": ("h_d_gb", 0.0, 1e5, 64.0), "Remote (GB)": ("h_r_gb", 0.0, 1e5, 1000.0),
    "Remote GB/s": ("h_r_bw", 0.01, 1e3, 12.5)}
PD_INPUTS = {  # label: (key, min, max, default) of the prefill/decode tab's number inputs
    "Requests/s": ("h_rate", 0.1, 200.0, 6.0), "Prompt tokens": ("h_prompt", 16, 32768, 2048),
    "Output tokens": ("h_out", 2, 4096, 256), "Requests": ("h_pd_n", 20, 2000, 300),
    "GPUs in each setup": ("h_gpus", 2, 8, 2), "Prefill GPUs": ("h_pgpus", 1, 7, 1),
    "KV link (GB/s)": ("h_kv_bw", 0.1, 2000.0, 50.0), "Link latency (ms)": ("h_kv_lat", 0.0, 100.0, 0.1)}

st.title("Memory hierarchy")
st.markdown("As in LMCache, KV can outlive HBM in CPU DRAM, on local NVMe or in a remote store: prompts are cut into "
            "**256-token chunks** keyed by their prefix, and a later request with the same prefix **loads** a chunk "
            "when that is faster than **recomputing** it. Tabs: that reuse on a workload, this machine's real copy "
            "speeds, prefill and decode on separate GPUs (DistServe), and the roofline of prefill vs decode.")
with st.sidebar:
    model = params.model_preset("Model", key="h_model")
    gpu = params.widget(st.selectbox, "GPU", key="h_gpu", options=list(GPU_PRESETS))
    link = params.widget(st.segmented_control, "GPU <-> CPU link", key="h_link", options=["pcie", "nvlink-c2c"],
                         default="pcie", required=True)
    seed = params.widget(st.number_input, "Seed", key="h_seed", min_value=0, max_value=10_000, value=0)
tab_offload, tab_bw, tab_pd, tab_roof = params.widget(st.tabs, TABS, key="h_tab")

if tab_offload.open:
    with tab_offload:
        kind, policy, write, prefetch = (
            params.widget(col.segmented_control, label, key=key, options=opts, default=opts[0], required=True)
            for col, (label, (key, opts)) in zip(st.columns(4), CHOICES.items(), strict=True))
        c = [*st.columns(4), *st.columns(4)]
        chunk = params.widget(c[0].selectbox, "Chunk (tokens)", key="h_chunk", options=[64, 128, 256, 512], index=2)
        n, *caps, remote_bw = (
            params.widget(col.number_input, label, key=key, min_value=lo, max_value=hi, value=value,
                          format=hf.fmt(value))
            for col, (label, (key, lo, hi, value)) in zip(c[1:7], OFFLOAD_INPUTS.items(), strict=True))
        with user_errors("Offload simulation"):
            tiers, config = tiers_for(gpu, link, *caps, remote_bw), OffloadConfig(chunk, policy, write, prefetch)
            runs = offload(model, gpu, tiers, make_workload(kind, n, seed), config)
        full, ttft = runs.full, runs.ttft_summary()
        for col, (label, value) in zip(st.columns(4), hf.offload_metrics(runs).items(), strict=True):
            col.metric(label, value)
        figures.show(hf.chunk_map(full.residency, [t.name for t in tiers], f"Where each chunk lives "
                                  f"({full.chunk_bytes / 1e6:.1f} MB each), snapshots over the run"), key="h_fig_map")
        left, right = st.columns(2)
        with left:
            figures.show(hf.sources_bars(full.sources), key="h_fig_src")
        with right:
            figures.show(hf.ecdf(runs.ttft(), "ttft_ms", "setup", title="TTFT per request", x_title="TTFT (ms)"),
                         key="h_fig_ttft")
        settings = {"model": model, "wl": kind, "policy": policy, "write": write, "prefetch": prefetch}
        tables.show_table(ttft, "hierarchy", "ttft", settings, caption="TTFT = loads + one prefill pass of the "
                          "rest (cost model); no queueing. GPU only = vLLM's prefix cache without offload.")
        tables.show_table(full.tiers, "hierarchy", "tiers", settings, caption="Hit rate = share of all prompt "
                          "tokens loaded from (or reused in) the tier.")
        tables.show_table(full.links, "hierarchy", "links", settings, caption="Bytes moved per link and reason.")
        tables.show_table(full.requests, "hierarchy", "requests", settings, height=240)
        tables.show_table(full.residency, "hierarchy", "residency", settings, height=240,
                          caption="Where every chunk lives (one row per chunk and tier holding it, per snapshot).")

if tab_bw.open:
    with tab_bw:
        size = params.widget(st.slider, "Tensor size (MB)", key="h_mb", min_value=8, max_value=256, value=64, step=8)
        with user_errors("Bandwidth measurement"):
            bw = bandwidth(model, gpu, link, size)
        figures.show(hf.bandwidth_bars(bw, f"Copying a {model} KV tensor on this machine vs the tier presets"))
        tables.show_table(bw, "hierarchy", "bandwidth", {"model": model, "mb": size}, caption=hf.BANDWIDTH_CAPTION)

if tab_pd.open:
    with tab_pd:
        c = st.columns(4)
        rate, prompt, out, pd_n, gpus, p_gpus, link_gbps, lat = (
            params.widget(c[i % 4].number_input, label, key=key, min_value=lo, max_value=hi, value=value,
                          format=hf.fmt(value)) for i, (label, (key, lo, hi, value)) in enumerate(PD_INPUTS.items()))
        with user_errors("PD simulation"):
            per_req, summary = pd_split(model, gpu, ServingWorkload(pd_n, rate, prompt, out, seed),
                                        PDConfig(gpus, p_gpus, link_gbps * 1e9, lat / 1e3))
        for col, (metric, title) in zip(st.columns(2), hf.PD_TITLES.items(), strict=True):
            with col:
                figures.show(hf.ecdf(per_req, metric, "setup", title=title, x_title="seconds"), key=f"h_fig_{metric}")
        tables.show_table(summary, "hierarchy", "pd", {"model": model, "rate": rate}, caption=hf.PD_CAPTION)
        tables.show_table(per_req, "hierarchy", "pd-requests", {"model": model, "rate": rate}, height=240)

if tab_roof.open:
    with tab_roof:
        c = st.columns(2)
        ctx = params.widget(c[0].number_input, "Context (tokens)", key="h_ctx", min_value=1, max_value=1_000_000,
                            value=8192)
        batch = params.widget(c[1].number_input, "Decode batch", key="h_batch", min_value=1, max_value=4096, value=32)
        with user_errors("Roofline"):
            roof = roofline(model, gpu, ctx, batch)
        figures.show(hf.roofline(roof.points, roof.roof, GPU_PRESETS[gpu].ridge_point,
                                 f"Roofline of prefill and decode: {model} on {gpu}"))
        figures.show(hf.decode_bytes_bars(roof.decode_bytes, batch))
        settings = {"model": model, "gpu": gpu, "ctx": ctx, "batch": batch}
        st.markdown(hf.attention_note(roof.attention, GPU_PRESETS[gpu].ridge_point))
        tables.show_table(roof.attention, "hierarchy", "attention-io", settings, caption="Causal attention over the "
                          "context, all layers and query heads.")
        tables.show_table(roof.prefill_scores, "hierarchy", "prefill-scores", settings)
        tables.show_table(roof.points, "hierarchy", "roofline", settings)
