"""Storage tiers a KV chunk can live in: GPU HBM, CPU DRAM, local NVMe, a remote store.

The tier list follows LMCache's storage backends (GPU, ``local_cpu``, ``local_disk``, ``remote_url``) and
vLLM's KV offloading connector. Every tier is an editable dataclass; :func:`default_tiers` fills one in
from a :class:`~kvcore.shapes.GpuSpec` plus typical figures whose source is given in each docstring.
Bandwidths are end to end between the tier and HBM (a disk read crosses the host link too, so it is the
slower of the two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvcore.shapes import GB, GpuSpec

# NVIDIA GH200 datasheet: NVLink-C2C is 900 GB/s total, 450 GB/s per direction between Grace and Hopper.
NVLINK_C2C_BANDWIDTH = 450e9
# Datasheet sequential figures of a PCIe Gen4 x4 NVMe SSD (Samsung 990 PRO: 7.45 GB/s read, 6.9 GB/s write).
NVME_READ_BANDWIDTH = 7.0e9
NVME_WRITE_BANDWIDTH = 6.0e9
# NVMe 4 KiB random-read latency is tens of microseconds; 100 us leaves room for the file system.
NVME_LATENCY_S = 100e-6
# A 100 Gb/s NIC (RDMA or TCP) moves at most 12.5 GB/s; a round trip to a Redis-like store is ~1 ms.
REMOTE_BANDWIDTH = 12.5e9
REMOTE_LATENCY_S = 1e-3
# cudaMemcpyAsync from pinned memory: a few microseconds to launch and set up the DMA.
HOST_LINK_LATENCY_S = 10e-6

HOST_LINKS = ("pcie", "nvlink-c2c")


@dataclass(slots=True)
class Tier:
    """One place a KV chunk can be kept.

    name: label shown on the page. capacity_bytes: bytes this tier may hold for cached KV (0 = tier
    off). read_bandwidth: bytes/s from this tier into HBM. write_bandwidth: bytes/s from HBM into this
    tier. latency_s: fixed seconds per transfer (per chunk). link: what the bytes cross. source: where
    the figures come from.
    """

    name: str
    capacity_bytes: float
    read_bandwidth: float
    write_bandwidth: float
    latency_s: float = 0.0
    link: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a tier needs a non-empty name")
        if not (math.isfinite(self.capacity_bytes) and self.capacity_bytes >= 0):
            raise ValueError(f"{self.name}: capacity_bytes must be a finite number >= 0, got {self.capacity_bytes!r}")
        for field in ("read_bandwidth", "write_bandwidth"):
            value = getattr(self, field)
            if not (isinstance(value, int | float) and value > 0 and not math.isnan(value)):
                raise ValueError(f"{self.name}: {field} must be > 0 bytes/s (inf allowed), got {value!r}")
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError(f"{self.name}: latency_s must be a finite number >= 0 seconds, got {self.latency_s!r}")

    def read_time(self, nbytes: float) -> float:
        """Seconds to bring ``nbytes`` from this tier into HBM (latency + bytes / read bandwidth)."""
        return self.latency_s + nbytes / self.read_bandwidth

    def write_time(self, nbytes: float) -> float:
        """Seconds to write ``nbytes`` from HBM into this tier."""
        return self.latency_s + nbytes / self.write_bandwidth


def default_tiers(gpu: GpuSpec, host_link: str = "pcie", gpu_gb: float = 4.0, cpu_gb: float = 16.0,
                  disk_gb: float = 64.0, remote_gb: float = 1000.0,
                  remote_bandwidth: float = REMOTE_BANDWIDTH) -> list[Tier]:
    """GPU HBM, CPU DRAM, local NVMe and a remote store for ``gpu``, fastest first.

    Follows LMCache's backends (local_cpu, local_disk, remote). Sources: HBM bandwidth and the PCIe host
    link from the GPU datasheet (``GpuSpec``); NVLink-C2C 450 GB/s per direction (GH200 datasheet);
    NVMe 7.0 / 6.0 GB/s read / write (PCIe Gen4 x4 SSD datasheets), 100 us; remote 12.5 GB/s (100 Gb/s
    NIC line rate), 1 ms per round trip. Capacities (GB, decimal) are the share each tier gives to cached
    KV: the GPU figure is what is left for idle prefixes after weights and running requests. The default
    capacities are small on purpose, so that a few thousand chat turns spill into every tier.

    host_link: 'pcie' (the GPU's datasheet link) or 'nvlink-c2c' (Grace Hopper). remote_bandwidth: bytes/s
    of the network to the remote store (a slow one makes recomputing cheaper than loading).
    """
    if host_link not in HOST_LINKS:
        raise ValueError(f"host_link must be one of {HOST_LINKS}, got {host_link!r}")
    if host_link == "pcie":
        link_bw, link_name = gpu.host_link_bandwidth, gpu.host_link or "PCIe"
    else:
        link_bw, link_name = NVLINK_C2C_BANDWIDTH, "NVLink-C2C"
    return [
        Tier("GPU HBM", gpu_gb * GB, gpu.hbm_bandwidth, gpu.hbm_bandwidth, 0.0, "on device",
             f"{gpu.name} datasheet HBM bandwidth; hits are reused in place"),
        Tier("CPU DRAM", cpu_gb * GB, link_bw, link_bw, HOST_LINK_LATENCY_S, link_name,
             f"{link_name} per-direction bandwidth" + (" (GPU datasheet)" if host_link == "pcie" else
                                                        " (GH200 datasheet)")),
        Tier("Local NVMe", disk_gb * GB, min(NVME_READ_BANDWIDTH, link_bw), min(NVME_WRITE_BANDWIDTH, link_bw),
             NVME_LATENCY_S, f"NVMe -> host -> {link_name}", "PCIe Gen4 x4 NVMe SSD datasheet figures"),
        Tier("Remote store", remote_gb * GB, min(remote_bandwidth, link_bw), min(remote_bandwidth, link_bw),
             REMOTE_LATENCY_S, f"network -> host -> {link_name}", "default: 100 Gb/s NIC line rate, ~1 ms RTT"),
    ]
