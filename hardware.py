"""What a machine can do, for the planner's step time: compute peaks per GEMM dtype, the
fraction of them a training step achieves, and the time of each collective.

    hw = hardware.profile("h100")                    # or h200, a100: spec sheets, stated below
    hw = hardware.profile("measured")                # this machine, from microbenchmarks (cached)
    hw.compute_s(flops, "bfloat16", world)           # seconds of compute for one rank
    hw.collective_s("all_gather", n, nbytes, calls, world, intra_node=True)

GPU profiles (`h100`, `h200`, `a100`; SXM parts, 8 GPUs per node, one 400 Gb/s (H100,
H200) or 200 Gb/s (A100) InfiniBand NIC per GPU, as in the paper's clusters):
    peak dense FLOP/s: H100 / H200 bf16 989e12, float8 1979e12, float32 67e12 (no TF32:
    PyTorch's default for matmuls); A100 bf16 312e12, float32 19.5e12, no float8;
    achieved: 35% of the peak for bf16 and float32 GEMM FLOPs (the TorchTitan paper's 8B
    runs on 8 H100s reach about 35% MFU at seq 8192), float8 GEMMs 1.5x the bf16 rate
    (torchao's measured linear speedups at 8B shapes: 1.2-1.6x; not 2x, as casts and
    the amax cost time); communication: NCCL ring collectives, a group within a node at
    80% of NVLink's per-direction bandwidth (H100 / H200 450 GB/s, A100 300 GB/s), one
    that spans nodes at 80% of the NIC's (50 / 25 GB/s), plus 15 us per call inside a
    node and 30 us across. These are assumptions, not measurements: no GPU figure has
    been measured by this project (README).

`measured`: this machine, for the planner's tests against real gloo steps:
    * GEMMs: 1024^3 matmuls in float32 and bfloat16, and torch._scaled_mm in float8, at 1
      thread and at every core (metrics.measure_gemm's protocol);
    * achieved fraction: train.py training the debug Llama (dim 256, 4 layers, 8 x 256
      tokens, AdamW) as a 1-rank job, its model FLOPs over its step time against the
      GEMM rate of the same dtype and threads, with as many such jobs at once as the
      cores hold (one of every core's threads, or one per core of 1 thread, as a
      job's ranks share the machine): everything that is not a GEMM (attention, norms,
      the optimizer, the trainer, Python) and the ranks' contention, as a share of the
      step; and the same with per-op selective checkpointing, whose extra time is its
      cost. (So the one-process layout of the debug model is predicted from itself.)
    * collectives: gloo all-gather, reduce-scatter, all-reduce (groups of 2, 4 and 8)
      and send (pairs), timed with every rank of a world of 2, 4 or 8 processes busy in
      its own group at once (as in a training step), at two message sizes: a fit of
      seconds = calls x latency + bytes handed in / bandwidth per (world, group, kind);
    * a rank's compute: ranks get max(1, cores // world) threads each (as tests and
      torchrun run them); with more ranks than cores they take turns: a step takes at
      least world / cores times a rank's compute (planner.step_time), while a rank
      that waits (a pipeline bubble, a collective) lends its core to another.
    Cached in .cache/hardware.json per CPU model, core count and torch version; the
    first `measured` plan takes about a minute.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import llama
import metrics

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "hardware.json")
GEMM_DTYPES = ("float32", "bfloat16", "float8")


@dataclass
class Hardware:
    name: str
    peak: dict  # GEMM dtype -> FLOP/s per device (per thread count for `measured`: {threads: FLOP/s})
    achieved: dict  # training dtype -> fraction of the peak a step runs at
    source: str  # where the figures come from, said in the report
    overlap: bool  # communication runs beside compute (GPU: NCCL on its own streams)
    ranks_per_node: int = 8
    intra_bw: float = 0.0  # bytes / s per rank, ring inside a node
    inter_bw: float = 0.0  # bytes / s per rank, ring across nodes
    intra_latency: float = 0.0  # s per ring step
    inter_latency: float = 0.0
    cores: int = 0  # `measured`: the cores ranks share
    fits: dict = field(default_factory=dict)  # `measured`: "world,n,kind" -> [latency s, s per byte]

    def threads(self, world: int) -> int:
        return max(1, self.cores // world) if self.cores else 1

    def rate(self, dtype: str, world: int) -> float:
        """GEMM FLOP/s one rank of a `world`-rank job gets in `dtype` (bfloat16, float32,
        float8) while it runs; with more ranks than cores (`measured`) they also take turns,
        which planner.step_time adds."""
        if dtype not in self.peak:
            raise ValueError(f"--hardware {self.name}: no {dtype} GEMMs (it has {sorted(self.peak)})")
        peak = self.peak[dtype]
        return _at(peak, self.threads(world)) if self.cores else peak

    def compute_s(self, flops: float, dtype: str, world: int, training_dtype: str) -> float:
        """Seconds for `flops` of one rank's work on GEMMs in `dtype`, at the fraction of
        the peak a training step achieves (achieved_fraction)."""
        return flops / (self.rate(dtype, world) * self.achieved_fraction(dtype, training_dtype, world))

    def op_checkpoint_cost(self, world: int) -> float:
        """What per-op selective checkpointing adds to a step's compute, as a fraction: it
        recomputes the non-GEMM ops and routes every op through a dispatch mode. GPU
        profiles: 5% (an assumption); `measured`: timed on the debug model."""
        got = self.achieved["op_checkpoint"]
        return _at(got, self.threads(world)) if isinstance(got, dict) else got

    def achieved_fraction(self, dtype: str, training_dtype: str, world: int) -> float:
        """GPU profiles: per GEMM dtype (stated). `measured`: the fraction of the GEMM rate
        a whole training step of `training_dtype` ran at, on this many threads."""
        if self.cores:
            return _at(self.achieved[training_dtype], self.threads(world))
        return self.achieved[dtype]

    def collective_s(self, kind: str, n: int, nbytes: float, calls: int, world: int, intra_node: bool) -> float:
        """Seconds for `calls` collectives of `kind` on a group of n ranks handing in
        `nbytes` in all (comm.py's convention)."""
        if n <= 1 or calls == 0:
            return 0.0
        if self.fits:
            key = f"{_calibrated_world(world, self.fits)},{2 if kind == 'send' else n},{_fit_kind(kind)}"
            if key not in self.fits:
                raise ValueError(f"--hardware measured: no calibration of {kind} on {n} of {world} ranks "
                                 f"(calibrated: {sorted(self.fits)}); groups of 2, 4 and 8 are measured")
            latency, per_byte = self.fits[key]
            return calls * latency + nbytes * per_byte
        bw, latency = (self.intra_bw, self.intra_latency) if intra_node else (self.inter_bw, self.inter_latency)
        wire = {"all_gather": n - 1, "reduce_scatter": (n - 1) / n, "all_reduce": 2 * (n - 1) / n}.get(kind, 1)
        return calls * latency + nbytes * wire / bw


def _at(by_threads: dict, threads: int) -> float:
    """A `measured` figure for `threads` threads: calibrated at 1 and at every core, so the
    nearest calibrated count at or below it (else the least)."""
    counts = sorted(int(k) for k in by_threads)
    return by_threads[str(max([c for c in counts if c <= threads], default=counts[0]))]


def _fit_kind(kind: str) -> str:
    return kind if kind in ("all_gather", "reduce_scatter", "all_reduce", "send") else "all_reduce"


def _calibrated_world(world: int, fits: dict) -> int:
    """The smallest calibrated world of at least `world` ranks (its contention is the
    nearest above), else the largest."""
    worlds = sorted({int(k.split(",")[0]) for k in fits})
    return next((w for w in worlds if w >= world), worlds[-1])


def _gpu(name: str, bf16: float, fp8: float | None, fp32: float, nvlink: float, nic: float) -> Hardware:
    peak = {"bfloat16": bf16, "float32": fp32} | ({"float8": fp8} if fp8 else {})
    achieved = {"bfloat16": 0.35, "float32": 0.35, "float8": 0.35 * 1.5 / 2, "op_checkpoint": 0.05}
    return Hardware(name, peak, achieved, f"{name.upper()} SXM spec sheet (hardware.py): 35% of the bf16 peak "
                    "achieved, float8 GEMMs 1.5x bf16, NCCL at 80% of NVLink / InfiniBand",
                    overlap=True, intra_bw=0.8 * nvlink, inter_bw=0.8 * nic, intra_latency=15e-6,
                    inter_latency=30e-6)


PROFILES = {
    "h100": lambda: _gpu("h100", 989e12, 1979e12, 67e12, 450e9, 50e9),
    "h200": lambda: _gpu("h200", 989e12, 1979e12, 67e12, 450e9, 50e9),
    "a100": lambda: _gpu("a100", 312e12, None, 19.5e12, 300e9, 25e9),
    "measured": lambda: measured(),
}


def profile(name: str) -> Hardware:
    if name not in PROFILES:
        raise ValueError(f"--hardware {name!r} is not one of {sorted(PROFILES)}")
    return PROFILES[name]()


# ---------------------------------------------------------------------------------------
# `measured`: microbenchmarks of this machine


def _key() -> str:
    return f"{metrics.cpu_model()} | {os.cpu_count()} cores | torch {torch.__version__}"


def measured(cache_path: str = CACHE, remeasure: bool = False) -> Hardware:
    """This machine's profile, from the cache or measured now (about a minute)."""
    cache = {}
    if os.path.isfile(cache_path):
        try:
            with open(cache_path) as f:
                cache = json.load(f)
        except ValueError:
            cache = {}
    entry = cache.get(_key())
    if entry is None or remeasure:
        print(f"hardware: measuring this machine (GEMMs, a training step, gloo collectives) into {cache_path}",
              flush=True)
        entry = calibrate()
        cache[_key()] = entry
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        tmp = f"{cache_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, cache_path)
    return Hardware("measured", entry["peak"], entry["achieved"], f"this machine ({_key()}), measured "
                    f"{entry['date']}: GEMMs, a debug-model training step, gloo collectives (hardware.py)",
                    overlap=False, ranks_per_node=entry["cores"], cores=entry["cores"], fits=entry["fits"])


def calibrate() -> dict:
    cores = os.cpu_count() or 1
    threads = sorted({1, cores})
    peak, achieved = {}, {}
    before = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            for dtype in GEMM_DTYPES:
                peak.setdefault(dtype, {})[str(t)] = _gemm_rate(dtype)
    finally:
        torch.set_num_threads(before)
    for t in threads:  # cores // t 1-rank jobs of t threads at once, as a job's ranks share the cores
        rates = _run_world(cores // t, _training_rates, threads=t, group=False)
        achieved.setdefault("op_checkpoint", {})[str(t)] = rates.pop("op_checkpoint")
        for dtype, rate in rates.items():
            achieved.setdefault(dtype, {})[str(t)] = rate / peak[dtype][str(t)]
    fits = {}
    for world in (2, 4, 8):
        fits |= _run_world(world, _collective_fits)
    return {"peak": peak, "achieved": achieved, "fits": fits, "cores": cores,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _gemm_rate(dtype: str) -> float:
    return metrics.measure_gemm({"float32": torch.float32, "bfloat16": torch.bfloat16,
                                 "float8": torch.float8_e4m3fn}[dtype])


# The calibration run: train.py on the debug model (dim 256, 4 layers, 8 x 256 tokens a step),
# each process a 1-rank job of its own, as many at once as the cores hold.
CALIBRATION = ["model.name=debug", "data.seq_len=256", "training.batch_size=8", "training.micro_batch_size=8",
               "training.warmup_steps=0", "training.steps=8", "run.log_every=1", "run.eval_every=0",
               "run.overwrite=true"]


def _training_rates(rank: int, world: int) -> dict:
    """FLOP/s of train.main's steps in float32 and bfloat16, and the share per-op selective
    checkpointing adds to a float32 step."""
    step = {name: _train_step_s(overrides) for name, overrides in (
        ("float32", ["training.dtype=float32"]), ("bfloat16", ["training.dtype=bfloat16"]),
        ("op", ["training.dtype=float32", "activation_checkpoint.mode=selective",
                "activation_checkpoint.selective_option=op"]))}
    flops = llama.flops_per_token(llama.model_args("debug"), 256) * 8 * 256
    return {"float32": flops / step["float32"], "bfloat16": flops / step["bfloat16"],
            "op_checkpoint": step["op"] / step["float32"] - 1}


def _train_step_s(overrides: list[str]) -> float:
    """Median seconds per step of train.main (a 1-rank job of its own) from step 3 on."""
    import train

    root = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        records = train.main(["--config", os.path.join(root, "configs/debug.yaml"), *CALIBRATION, *overrides,
                              f"run.dir={tmp}", f"data.cache_dir={os.path.join(root, '.cache/data')}",
                              f"run.peak_cache={os.path.join(root, '.cache/peak_flops.json')}"])
    elapsed = [r["elapsed_s"] for r in records]
    return statistics.median(b - a for a, b in zip(elapsed[1:], elapsed[2:]))


def _collective_fits(rank: int, world: int) -> dict:
    """Every (group size, kind) at two sizes, every group of the world busy at once."""
    out = {}
    for n in (2, 4, 8):
        if n > world:
            continue
        groups = [dist.new_group(list(range(g, g + n))) for g in range(0, world, n)]
        group = groups[rank // n]
        for kind in ("all_gather", "reduce_scatter", "all_reduce") + (("send",) if n == 2 else ()):
            points = []
            for numel in (4096, 1 << 20):  # 16 KiB and 4 MiB of float32 handed in
                x = torch.randn(numel)
                times = []
                for _ in range(7 if numel > 4096 else 25):
                    dist.barrier()
                    t0 = time.perf_counter()
                    _issue(kind, x, group, n)
                    times.append(time.perf_counter() - t0)
                points.append((4 * numel, statistics.median(times)))
            (b0, t0), (b1, t1) = points
            per_byte = max(0.0, (t1 - t0) / (b1 - b0))
            out[f"{world},{n},{kind}"] = [max(0.0, t0 - per_byte * b0), per_byte]
    return out


def _issue(kind: str, x: torch.Tensor, group, n: int) -> None:
    if kind == "all_gather":
        dist.all_gather_into_tensor(x.new_empty(n * x.numel()), x, group=group)
    elif kind == "reduce_scatter":
        dist.reduce_scatter_tensor(x.new_empty(x.numel() // n), x, group=group)
    elif kind == "all_reduce":
        dist.all_reduce(x, group=group)
    else:  # a pair swapping messages, as the pipeline, ring attention and async TP do
        peer = 1 - dist.get_rank(group)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, group=group, group_peer=peer),
                                        dist.P2POp(dist.irecv, torch.empty_like(x), group=group, group_peer=peer)])
        for w in works:
            w.wait()


def _worker(rank: int, world: int, store_path: str, fn, queue, threads: int, group: bool) -> None:
    torch.set_num_threads(threads)
    if group:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        result = fn(rank, world)
        if rank == 0:
            queue.put(result)
    finally:
        if group:
            dist.destroy_process_group()


def _run_world(world: int, fn, threads: int = 1, group: bool = True) -> dict:
    """fn(rank, world) on `world` fresh processes of `threads` threads, in one gloo group
    (or none: each runs alone); rank 0's result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, world, os.path.join(tmp, "store"), fn, queue, threads, group))
                 for r in range(world)]
        for p in procs:
            p.start()
        result = queue.get(timeout=600)
        for p in procs:
            p.join(timeout=60)
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"hardware: the {world}-rank collective benchmark failed")
    return result
