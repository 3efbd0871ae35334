"""What the logged figures are measured against: the device's peak FLOP/s (the MFU
denominator), peak memory, and the compute dtype that `training.dtype: auto` picks.

Peak FLOP/s, in this order:
  * `run.peak_flops` > 0: the user's figure.
  * CUDA: the vendor's dense bf16 figure for the card, as TorchTitan's table; a card not
    in the table has no known peak and MFU prints n/a (never a guess).
  * CPU: no vendor figure applies, so it is measured: the best FLOP/s of 1024^3 GEMMs in
    the training dtype, with the thread count training uses, repeated for at least
    0.5 s. (A single 60 ms burst once measured 67 GFLOP/s on a 2-core machine that does
    164, because another process was busy, and the run printed an MFU of 175%.) The
    figure is cached per machine in a JSON file keyed by CPU model, torch version,
    threads and dtype, so a run pays the 0.5 s once; `python bench/mfu.py` re-measures.
An MFU above 100% cannot be true: the peak was measured while the machine was busy.
train.py then says so, re-measures once (`cpu_peak(..., remeasure=True)` overwrites the
cache), and if the figure is still above 100% marks it as unreliable in the log line
and in metrics.jsonl.

`training.dtype: auto` picks bf16 where the hardware runs bf16 matmuls natively (a GPU;
a CPU whose measured bf16 GEMM beats its fp32 GEMM, e.g. AVX512-BF16 or AMX) and fp32
elsewhere, and says which and why from the measurement (cached as above).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import time
from typing import Callable

import torch

import config

# Dense bf16 peak FLOP/s per device (vendor figures, as TorchTitan's table); the first
# key contained in the device name wins, so the more specific names come first.
PEAK_FLOPS = {"H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12,
              "A100": 312e12, "B200": 2.25e15, "MI300X": 1300e12}


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measure_gemm(dtype: torch.dtype, seconds: float = 0.5, n: int = 1024) -> float:
    """Best FLOP/s of n^3 matmuls in `dtype` on this CPU, repeated for `seconds`; e4m3:
    torch._scaled_mm (second operand column-major, float32 out)."""
    if dtype == torch.float8_e4m3fn:
        a, b, one = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype).t(), torch.ones(())
        def run():
            return torch._scaled_mm(a, b, one, one, out_dtype=torch.float32)
    else:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        def run():
            return a @ b
    run()  # warm up (first-call allocation, kernel selection)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _cache_key(dtype: str) -> str:
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {dtype}"


def _read_cache(path: str) -> dict:
    """The cache, or {} when there is none yet. A file that is not a JSON object (e.g.
    cut short by a crash) is not trusted: it is re-measured and rewritten."""
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def cpu_peak(dtype: str, cache_path: str, remeasure: bool = False) -> tuple[float, str]:
    """(FLOP/s, where it came from) of this CPU's GEMM in `dtype` ("float32", ...): from
    the cache, or measured now (then cached; the file is replaced atomically, so runs
    sharing it never read half a file)."""
    key, cache = _cache_key(dtype), _read_cache(cache_path)
    entry = cache.get(key)
    if entry is None or remeasure:
        entry = {"flops": measure_gemm(config.DTYPES[dtype]), "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        cache[key] = entry
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        tmp = f"{cache_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, cache_path)
    return entry["flops"], (f"{dtype} 1024^3 GEMM on this CPU ({torch.get_num_threads()} threads), best of 0.5 s, "
                            f"measured {entry['measured']}")


def peak_flops(given: float, device: torch.device, dtype: str, cache_path: str) -> tuple[float, str]:
    """(peak FLOP/s per device or 0 if unknown, where the figure came from)."""
    if given > 0:
        return given, "run.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        value = next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)
        return value, f"{name} bf16 spec" if value else f"{name}: unknown peak"
    return cpu_peak(dtype, cache_path)


class Peak:
    """A run's MFU denominator. measure=False (a rank that does not log): no peak, no
    measurement, MFU None."""

    def __init__(self, given: float, device: torch.device, dtype: str, cache_path: str, measure: bool = True):
        self.dtype, self.cache_path, self.remeasured = dtype, cache_path, given > 0 or device.type == "cuda"
        self.flops, self.source = peak_flops(given, device, dtype, cache_path) if measure else (0.0, "not measured")

    def mfu(self, model_flops_per_sec: float, log: Callable[[str], None]) -> tuple[float | None, str | None]:
        """(MFU in %, or None without a peak; a note when the figure cannot be true). Above
        100% the peak is wrong: a measured CPU peak is re-measured once (it was measured
        while the machine was busy); a figure still above 100% comes with the note."""
        if self.flops <= 0:
            return None, None
        mfu = 100 * model_flops_per_sec / self.flops
        if mfu > 100 and not self.remeasured:
            log(f"mfu {mfu:.1f}% is above 100%: the peak {self.flops / 1e9:.1f} GFLOP/s ({self.source}) looks stale, "
                f"measured while the machine was busy; re-measuring")
            self.flops, self.source = cpu_peak(self.dtype, self.cache_path, remeasure=True)
            self.remeasured = True
            log(f"peak now {self.flops / 1e9:.1f} GFLOP/s ({self.source})")
            mfu = 100 * model_flops_per_sec / self.flops
        if mfu > 100:
            return mfu, f"above 100%, not a real MFU: the peak {self.flops / 1e9:.1f} GFLOP/s ({self.source}) is low"
        return mfu, None


def pick_dtype(device: torch.device, cache_path: str) -> tuple[str, str]:
    """training.dtype auto: (dtype, why)."""
    if device.type == "cuda":
        return "bfloat16", "a GPU runs bf16 matmuls natively"
    bf16, _ = cpu_peak("bfloat16", cache_path)
    fp32, _ = cpu_peak("float32", cache_path)
    verdict = "faster" if bf16 > fp32 else "not faster"
    why = (f"this CPU's measured bf16 GEMM ({bf16 / 1e9:.0f} GFLOP/s) is {verdict} than its fp32 GEMM "
           f"({fp32 / 1e9:.0f} GFLOP/s)")
    return ("bfloat16" if bf16 > fp32 else "float32"), why


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
