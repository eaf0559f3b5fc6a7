"""Measured transfer bandwidth: real copies, positive GB/s, and no temporary file left behind."""

from __future__ import annotations

import os

import pytest
import torch

from kvcore.hierarchy import bandwidth, default_tiers
from kvcore.shapes import GPU_PRESETS, PRESETS, kv_bytes

GPT2 = PRESETS["gpt2"]


def test_kv_tensor_is_kv_shaped_and_within_the_size():
    t = bandwidth.kv_tensor(GPT2, 2e6)
    assert t.shape[:2] == (2, GPT2.num_layers)
    assert t.shape[3:] == (GPT2.num_kv_heads, GPT2.head_dim)
    assert t.dtype == torch.bfloat16
    assert t.numel() * 2 == kv_bytes(GPT2, t.shape[2]) <= 2e6


def test_measured_bandwidth_is_positive_and_leaves_no_files(tmp_path):
    tiers = default_tiers(GPU_PRESETS["H100 80GB"])
    df = bandwidth.measure_bandwidth(GPT2, size_mb=2, repeats=1, host_tier=tiers[1], disk_tier=tiers[2],
                                     tmp_root=tmp_path)
    measured = df[~df["method"].str.startswith("not measured")]
    assert {"host memcpy (DRAM -> DRAM)", "disk write + fsync", "disk read (page cache)",
            "disk read (cold)"} <= set(measured["path"])
    assert (measured["measured_GBps"] > 0).all()
    assert df.set_index("path").loc["disk write + fsync", "nominal_GBps"] == tiers[2].write_bandwidth / 1e9
    if not torch.cuda.is_available():
        assert df["path"].str.contains("GPU").sum() == 2
    assert list(tmp_path.iterdir()) == []


def test_temp_files_are_removed_when_a_write_fails(tmp_path, monkeypatch):
    def broken_fsync(fd: int) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        bandwidth.measure_bandwidth(GPT2, size_mb=1, repeats=1, tmp_root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_sizes_are_bounded():
    with pytest.raises(ValueError, match="size_mb must be in"):
        bandwidth.measure_bandwidth(GPT2, size_mb=4096)
    with pytest.raises(ValueError, match="repeats must be in"):
        bandwidth.measure_bandwidth(GPT2, repeats=0)


def test_filesystem_is_named(tmp_path):
    assert bandwidth.filesystem_of(tmp_path) != ""
