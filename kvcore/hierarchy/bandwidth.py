"""Measured transfer bandwidth of KV-shaped tensors on this machine, beside the tiers' nominal figures.

What LMCache's backends do to a chunk, done for real with a KV tensor ``[2, layers, tokens, kv_heads,
head_dim]`` in bf16: a host memcpy (``torch`` ``copy_``), a write to a file with ``os.fsync`` and reads
back, and pinned host <-> GPU copies when CUDA is present. Files live in a ``tempfile.TemporaryDirectory``
that is removed on success and on error.

The read right after a write is served by the OS page cache (RAM), not the disk. A colder read is tried
without root: ``O_DIRECT`` bypasses the page cache; where the file system refuses it,
``posix_fadvise(DONTNEED)`` asks the kernel to drop the file's clean pages (advisory); if neither works
the row says the read is page cache. Sizes are bounded so a run stays short.
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from kvcore.hierarchy.tiers import Tier
from kvcore.shapes import ModelShape, kv_bytes

MAX_MB = 256.0
ALIGN = 4096


def kv_tensor(shape: ModelShape, nbytes: float) -> torch.Tensor:
    """A bf16 KV tensor ``[2, layers, tokens, kv_heads, head_dim]`` of at most ``nbytes`` (at least one token)."""
    tokens = max(1, int(nbytes // kv_bytes(shape, 1)))
    # [2 (K and V), L, T, H_kv, D]
    return torch.ones(2, shape.num_layers, tokens, shape.num_kv_heads, shape.head_dim, dtype=torch.bfloat16)


def _best(fn: Callable[[], None], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def filesystem_of(path: str | Path) -> str:
    """'type on device' of the mount holding ``path`` (from /proc/mounts), or 'unknown'."""
    path, best = str(Path(path).resolve()), ("", "unknown")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mount, fstype, *_ = line.split()
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[0]):
                    best = (mount, f"{fstype} on {dev}")
    except OSError:
        pass
    return best[1]


def _write_file(path: Path, data: memoryview) -> None:
    with open(path, "wb", buffering=0) as f:
        written = 0
        while written < len(data):
            written += f.write(data[written:])
        os.fsync(f.fileno())


def _read_file(path: Path, buf: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < len(buf):
            n = f.readinto(buf[got:])
            if not n:
                break
            got += n


def _read_direct(path: Path, size: int) -> None:
    """Read with O_DIRECT into a page-aligned buffer (raises OSError where unsupported)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    buf = mmap.mmap(-1, -(-size // ALIGN) * ALIGN)
    try:
        while os.readv(fd, [buf]) == len(buf):
            pass
    finally:
        buf.close()
        os.close(fd)


def _cold_read(path: Path, size: int, buf: memoryview, repeats: int) -> tuple[float, str]:
    """Best seconds of a page-cache-bypassing read, and how it was done."""
    if hasattr(os, "O_DIRECT"):
        try:
            return _best(lambda: _read_direct(path, size), repeats), "O_DIRECT (bypasses the page cache)"
        except OSError:
            pass

    def dropped_then_read() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        _read_file(path, buf)

    if hasattr(os, "posix_fadvise"):
        return _best(dropped_then_read, repeats), "after posix_fadvise(DONTNEED) (advisory page-cache drop)"
    return _best(lambda: _read_file(path, buf), repeats), "page cache (could not bypass it here)"


def _row(path: str, nbytes: int, seconds: float, nominal: float, nominal_from: str, method: str) -> dict:
    measured = nbytes / seconds / 1e9 if seconds > 0 and math.isfinite(seconds) else math.nan
    return {"path": path, "measured_GBps": measured, "nominal_GBps": nominal / 1e9 if nominal else math.nan,
            "nominal_from": nominal_from, "MB": nbytes / 1e6, "best_ms": seconds * 1e3, "method": method}


def _cuda_rows(src: torch.Tensor, repeats: int, nominal: float, nominal_from: str) -> list[dict]:
    n = src.numel() * src.element_size()
    if not torch.cuda.is_available():
        return [_row(p, n, math.nan, nominal, nominal_from, "not measured: no CUDA device on this machine")
                for p in ("host -> GPU (pinned)", "GPU -> host (pinned)")]
    pinned = src.pin_memory()
    dev = torch.empty_like(src, device="cuda")

    def copy(dst: torch.Tensor, s: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            dst.copy_(s, non_blocking=True)
            torch.cuda.synchronize()
        return run

    copy(dev, pinned)()  # warm-up: context creation and first-touch
    h2d = _best(copy(dev, pinned), repeats)
    d2h = _best(copy(pinned, dev), repeats)
    pageable = _best(copy(dev, src), repeats)
    name = torch.cuda.get_device_name()
    return [_row("host -> GPU (pinned)", n, h2d, nominal, nominal_from, f"copy_ non_blocking, {name}"),
            _row("GPU -> host (pinned)", n, d2h, nominal, nominal_from, f"copy_ non_blocking, {name}"),
            _row("host -> GPU (pageable)", n, pageable, nominal, nominal_from, f"copy_ from unpinned memory, {name}")]


def measure_bandwidth(shape: ModelShape, size_mb: float = 64.0, repeats: int = 3, host_tier: Tier | None = None,
                      disk_tier: Tier | None = None, tmp_root: str | Path | None = None) -> pd.DataFrame:
    """Move a KV tensor of ``shape`` through memory, a file and (with CUDA) the host link; GB/s per path.

    size_mb: tensor size in MB (1-256). repeats: best-of timing repeats (1-10). host_tier / disk_tier:
    tiers whose nominal bandwidths sit beside the host-link and disk rows. tmp_root: folder for the
    temporary directory (default: the system temp folder).
    """
    if not 1 <= size_mb <= MAX_MB:
        raise ValueError(f"size_mb must be in [1, {MAX_MB:.0f}] MB, got {size_mb}")
    if not 1 <= repeats <= 10:
        raise ValueError(f"repeats must be in [1, 10], got {repeats}")
    src = kv_tensor(shape, size_mb * 1e6)
    dst = torch.empty_like(src)
    n = src.numel() * src.element_size()
    flat_src, flat_dst = src.view(-1).view(torch.uint8), dst.view(-1).view(torch.uint8)
    flat_dst.copy_(flat_src)  # first touch of the destination pages is not a copy
    memcpy_s = _best(lambda: flat_dst.copy_(flat_src), repeats)
    rows = [_row("host memcpy (DRAM -> DRAM)", n, memcpy_s, 0.0, "",
                 f"torch copy_, {torch.get_num_threads()} threads; reads and writes each byte")]
    disk_read = disk_tier.read_bandwidth if disk_tier else 0.0
    disk_write = disk_tier.write_bandwidth if disk_tier else 0.0
    disk_from = disk_tier.name if disk_tier else ""
    data, buf = memoryview(flat_src.numpy()), memoryview(flat_dst.numpy())
    with tempfile.TemporaryDirectory(prefix="kvlab-bw-", dir=tmp_root) as folder:
        fs = filesystem_of(folder)
        path = Path(folder) / "kv.bin"
        write_s = _best(lambda: _write_file(path, data), min(repeats, 2))
        cached_s = _best(lambda: _read_file(path, buf), repeats)
        cold_s, how = _cold_read(path, n, buf, repeats)
    rows += [_row("disk write + fsync", n, write_s, disk_write, disk_from, f"buffered write, then os.fsync; {fs}"),
             _row("disk read (page cache)", n, cached_s, disk_read, disk_from,
                  f"read right after the write: served from RAM, not the disk; {fs}"),
             _row("disk read (cold)", n, cold_s, disk_read, disk_from, f"{how}; {fs}")]
    link = host_tier.read_bandwidth if host_tier else 0.0
    rows += _cuda_rows(src, repeats, link, host_tier.name if host_tier else "")
    return pd.DataFrame(rows)
