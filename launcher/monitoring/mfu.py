"""Model FLOPs utilisation against an honest peak: a device table, an override, or a measurement.

MFU = (model FLOPs per token x tokens/s per device) / peak FLOP/s of one device, with FLOPs per
token from the PaLM formula (model.gpt.flops_per_token). HFU also counts the forward pass that
activation checkpointing recomputes.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Dense (no sparsity) peak TFLOP/s per device: (bf16/fp16 tensor cores, tf32 tensor cores).
# Vendor datasheets; SXM/OAM parts unless the name says PCIe.
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 494.0),
    "H100 NVL": (835.0, 418.0),
    "H100 PCIE": (756.0, 378.0),
    "H100": (989.0, 494.0),
    "GH200": (989.0, 494.0),
    "B200": (2250.0, 1100.0),
    "A100": (312.0, 156.0),
    "A800": (312.0, 156.0),
    "A40": (149.7, 74.8),
    "A10G": (70.0, 35.0),
    "A10": (125.0, 62.5),
    "L40S": (362.0, 183.0),
    "L40": (181.0, 90.5),
    "L4": (121.0, 60.0),
    "RTX 4090": (165.2, 82.6),
    "RTX 3090": (71.0, 35.6),
    "V100": (125.0, 15.7),  # no tf32: fp32 CUDA cores
    "MI300X": (1307.0, 653.7),
    "MI250X": (383.0, 95.7),
    "MI250": (362.0, 90.5),
}  # fmt: skip


def table_peak(device_name: str, half_precision: bool) -> float | None:
    """Peak FLOP/s for a GPU name from torch.cuda.get_device_name, or None if unknown."""
    name = device_name.upper()
    for key, (half, tf32) in PEAK_TFLOPS.items():  # specific names come before generic ones
        if key in name:
            return (half if half_precision else tf32) * 1e12
    return None


def _cache_file() -> Path:
    root = Path(os.environ.get("ZEROLAUNCH_CACHE", Path.home() / ".cache" / "zerolaunch"))
    return root / "cpu_peak.json"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_peak(
    dtype: torch.dtype,
    size: int = 2048,
    seconds: float = 1.0,
    device: torch.device | None = None,
) -> float:
    """Best FLOP/s of size^3 matmuls on `device` (this process's CPU threads by default) over
    about `seconds`. Its random operands come from a generator of its own: measuring must not
    move the global RNG (rank 0 measures, and its dropout masks would change with the cache)."""
    device = device or torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, dtype=dtype, device=device, generator=generator)
    b = torch.randn(size, size, dtype=dtype, device=device, generator=generator)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)  # warm-up
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


CACHE_MAX_AGE_S = 7 * 86400.0
"""A cached CPU peak older than this is measured again (a new kernel, BIOS, neighbours)."""
TRIALS = 3


def cpu_peak(dtype: torch.dtype, refresh: bool = False) -> float:
    """This CPU's matmul peak at this process's thread count, cached per CPU, thread count,
    dtype and torch version. Measured (best of TRIALS) when missing, older than
    CACHE_MAX_AGE_S, or on `refresh`; a load on the machine can only make a measurement low,
    so the cache keeps the best ever seen."""
    key = f"{cpu_name()}|threads={torch.get_num_threads()}|{dtype}|torch={torch.__version__}"
    cache = _cache_file()
    try:
        known = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    entry = known.get(key)
    if not isinstance(entry, dict):  # missing, or a bare number from an older version
        entry = {"flops": float(entry or 0.0), "measured_at": 0.0}
    if refresh or time.time() - entry["measured_at"] > CACHE_MAX_AGE_S:
        best = max(measure_matmul_peak(dtype, seconds=0.5) for _ in range(TRIALS))
        entry = {"flops": max(best, entry["flops"]), "measured_at": time.time()}
        known[key] = entry
        _write_cache(cache, known)
    return entry["flops"]


def _write_cache(cache: Path, known: dict) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, cache)
    except OSError:
        pass  # an unwritable cache only costs a re-measurement next time


@dataclass(frozen=True)
class Peak:
    """One device's peak FLOP/s, where it came from, and how to measure it again."""

    flops: float
    source: str
    measured: bool
    """Measured here (CPUs, GPUs missing from the table): it can be too low on a busy machine."""

    def remeasured(self, device: torch.device, half_precision: bool) -> Peak:
        """A fresh measurement (the best of it and the cached one, on CPUs)."""
        dtype = torch.bfloat16 if half_precision else torch.float32
        if device.type == "cuda":
            best = max(self.flops, measure_matmul_peak(dtype, size=8192, device=device))
        else:
            best = cpu_peak(dtype, refresh=True)
        return Peak(best, self.source, self.measured)


def device_peak(device: torch.device, half_precision: bool, override: float | None) -> Peak:
    """The peak FLOP/s of one device: monitor.peak_flops, the datasheet, or a measurement."""
    if override is not None:
        return Peak(override, "monitor.peak_flops", measured=False)
    dtype = torch.bfloat16 if half_precision else torch.float32
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak(name, half_precision)
        if peak is not None:
            precision = "bf16/fp16" if half_precision else "tf32"
            return Peak(peak, f"{name} ({precision} datasheet)", measured=False)
        peak = measure_matmul_peak(dtype, size=8192, device=device)
        return Peak(peak, f"{name} (measured: not in the table)", measured=True)
    threads = torch.get_num_threads()
    return Peak(cpu_peak(dtype), f"{cpu_name()}, {threads} thread(s) (measured)", measured=True)


def mfu(flops_per_token: float, tokens_per_sec_per_device: float, peak: float) -> float:
    """Model FLOPs utilisation in percent."""
    return 100.0 * flops_per_token * tokens_per_sec_per_device / peak


def hfu(
    flops_per_token: float,
    forward_flops_per_token: float,
    tokens_per_sec_per_device: float,
    peak: float,
) -> float:
    """Hardware FLOPs utilisation in percent: the recomputed forward counts as work done."""
    return mfu(flops_per_token + forward_flops_per_token, tokens_per_sec_per_device, peak)
