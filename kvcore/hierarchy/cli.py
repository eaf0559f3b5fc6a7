"""``python -m kvcore hierarchy``: the Memory hierarchy page headless.

``--experiment`` picks the part: ``offload`` (tiered KV reuse; ``--table`` picks summary, sources, tiers,
links, requests, ttft or residency), ``bandwidth`` (measured copies on this machine), ``pd`` (prefill/decode
disaggregation vs colocated; ``--table`` summary or requests) or ``roofline`` (``--table`` points,
decode-bytes, attention or prefill-scores).
"""

from __future__ import annotations

import argparse

import pandas as pd

from kvcore.hierarchy.bandwidth import measure_bandwidth
from kvcore.hierarchy.disagg import PDConfig, ServingWorkload
from kvcore.hierarchy.experiment import WORKLOADS, make_workload, run_offload, run_pd, run_roofline, tiers_for
from kvcore.hierarchy.offload import PREFETCH_TARGETS, OffloadConfig, offload_summary
from kvcore.hierarchy.policies import POLICIES
from kvcore.hierarchy.store import WRITE_MODES
from kvcore.hierarchy.tiers import HOST_LINKS
from kvcore.shapes import GPU_PRESETS, PRESETS

EXPERIMENTS = ("offload", "bandwidth", "pd", "roofline")


def _offload(a: argparse.Namespace) -> pd.DataFrame:
    tiers = tiers_for(a.gpu, a.host_link, a.gpu_gb, a.cpu_gb, a.disk_gb, a.remote_gb, a.remote_gbps)
    config = OffloadConfig(a.chunk_tokens, a.policy, a.write_mode, a.prefetch)
    runs = run_offload(a.model, a.gpu, tiers, make_workload(a.workload, a.requests, a.seed), config)
    full = runs.full
    tables = {"summary": offload_summary(full), "sources": full.sources, "tiers": full.tiers, "links": full.links,
              "requests": full.requests, "ttft": runs.ttft_summary(), "residency": full.residency}
    return tables[a.table or "summary"]


def _bandwidth(a: argparse.Namespace) -> pd.DataFrame:
    tiers = tiers_for(a.gpu, a.host_link)
    return measure_bandwidth(PRESETS[a.model], a.size_mb, a.repeats, tiers[1], tiers[2])


def _pd(a: argparse.Namespace) -> pd.DataFrame:
    wl = ServingWorkload(a.requests, a.rate, a.prompt_tokens, a.output_tokens, a.seed)
    config = PDConfig(a.num_gpus, a.prefill_gpus, a.link_gbps * 1e9, a.link_latency_ms / 1e3)
    per_request, summary = run_pd(a.model, a.gpu, wl, config)
    return per_request if a.table == "requests" else summary


def _roofline(a: argparse.Namespace) -> pd.DataFrame:
    t = run_roofline(a.model, a.gpu, a.context, a.batch)
    tables = {"points": t.points, "decode-bytes": t.decode_bytes, "attention": t.attention,
              "prefill-scores": t.prefill_scores}
    return tables[a.table or "points"]


RUNS = {"offload": _offload, "bandwidth": _bandwidth, "pd": _pd, "roofline": _roofline}
TABLES = {"offload": ("summary", "sources", "tiers", "links", "requests", "ttft", "residency"),
          "bandwidth": (), "pd": ("summary", "requests"),
          "roofline": ("points", "decode-bytes", "attention", "prefill-scores")}


def _run(a: argparse.Namespace) -> pd.DataFrame:
    allowed = TABLES[a.experiment]
    if a.table and a.table not in allowed:
        raise ValueError(f"--table {a.table!r} is not a table of {a.experiment}; choose from {allowed or 'none'}")
    return RUNS[a.experiment](a)


def add_cli(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``hierarchy``: offload, measured bandwidth, PD disaggregation and roofline."""
    p = sub.add_parser("hierarchy", parents=[parent], help="KV tiers, offload/prefetch, bandwidth, PD, roofline")
    p.add_argument("--experiment", choices=EXPERIMENTS, default="offload", help="which part to run")
    p.add_argument("--table", help="which result table to print (per experiment; see the module help)")
    p.add_argument("--model", default="llama-3-8b", choices=sorted(PRESETS), help="model preset")
    p.add_argument("--gpu", default="H100 80GB", choices=sorted(GPU_PRESETS), help="GPU preset")
    g = p.add_argument_group("offload")
    g.add_argument("--workload", choices=WORKLOADS, default="chat", help="multi-turn chat or RAG")
    g.add_argument("--requests", type=int, default=None, help="requests (offload 2000, pd 300)")
    g.add_argument("--host-link", choices=HOST_LINKS, default="pcie", help="GPU <-> CPU link")
    for tier, default in (("gpu", 4.0), ("cpu", 16.0), ("disk", 64.0), ("remote", 1000.0)):
        g.add_argument(f"--{tier}-gb", type=float, default=default, help=f"{tier} tier capacity for KV (GB)")
    g.add_argument("--remote-gbps", type=float, default=12.5, help="remote store bandwidth (GB/s)")
    g.add_argument("--policy", choices=sorted(POLICIES), default="lru", help="eviction order of every tier")
    g.add_argument("--write-mode", choices=WRITE_MODES, default="write-back")
    g.add_argument("--prefetch", choices=PREFETCH_TARGETS, default="off", help="warm a session's next turn into")
    g.add_argument("--chunk-tokens", type=int, default=256, help="tokens per chunk")
    b = p.add_argument_group("bandwidth")
    b.add_argument("--size-mb", type=float, default=64.0, help="tensor size (MB, 1-256)")
    b.add_argument("--repeats", type=int, default=3, help="best-of repeats")
    d = p.add_argument_group("pd")
    d.add_argument("--rate", type=float, default=6.0, help="requests per second")
    d.add_argument("--prompt-tokens", type=int, default=2048, help="mean prompt length")
    d.add_argument("--output-tokens", type=int, default=256, help="mean output length")
    d.add_argument("--num-gpus", type=int, default=2, help="GPUs in each setup")
    d.add_argument("--prefill-gpus", type=int, default=1, help="prefill GPUs when disaggregated")
    d.add_argument("--link-gbps", type=float, default=50.0, help="KV link bandwidth (GB/s, inf allowed)")
    d.add_argument("--link-latency-ms", type=float, default=0.1, help="KV link latency per transfer (ms)")
    r = p.add_argument_group("roofline")
    r.add_argument("--context", type=int, default=8192, help="context for attention I/O and decode bytes")
    r.add_argument("--batch", type=int, default=32, help="decode batch for the bytes split")

    def run(a: argparse.Namespace) -> pd.DataFrame:
        if a.requests is None:
            a.requests = 300 if a.experiment == "pd" else 2000
        return _run(a)

    p.set_defaults(run=run)
