"""The one GPU check: every technique's CUDA path and the headline speeds, on ONE GPU.

    python bench/gpu.py [--dry] [--out DIR]     # one CUDA device; sized to take at most 8 minutes

Writes docs/bench/gpu.md, stamped with the device, its NVIDIA driver, torch and CUDA.
Every case runs in its own try: a failure becomes a FAILED row (its traceback on
stderr) and the others still run; the table is written, then the exit status is 1.
1) Llama 3 1B training throughput: the llama3_1b preset, batch 4 x 2048 tokens (chosen
   to fit an 80 GB card without activation checkpointing; the table gives the measured
   peak), one random batch repeated; a step as bench/mfu.py's (float32 master weights,
   bf16 autocast, clipping at 1.0, train.py's AdamW), eager and with torch.compile per
   block (parallelize.apply_compile). 3 warm-up steps (the compile), then 10 timed ones
   (perf_counter around each, synchronized).
   tokens/s and MFU = llama.flops_per_token x tokens/s / the card's dense bf16 peak
   (metrics.PEAK_FLOPS: H100 SXM 989, PCIe 756, H200 989, A100 312 TFLOP/s; another
   card: MFU n/a). Sequential, not interleaved: two 1B models with AdamW at once would
   not fit an 80 GB card. Check: the compiled first loss equals the eager one (bf16).
2) Float8 vs bf16 on the Llama 3 8B FFN shapes (w1 / w3: 4096 -> 14336, w2: 14336 ->
   4096), M = 16384 tokens: the GEMM alone (float8.scaled_mm on operands quantized
   beforehand as Float8Matmul's forward does, tensorwise and rowwise, fast accumulation;
   against torch.mm in bf16), then float8.Float8Linear forward + backward (the three
   GEMMs and the casts, eager) against nn.Linear in bf16. Interleaved reps; speedup =
   bf16 time / float8 time (median, min, spread). Check: SQNR of every output against
   the bf16 one >= 20 dB (float8 gives ~25-28; a wrong scale or layout gives ~0).
   Needs sm89+ (H100, L40, ...): skipped, and said, on older cards.
3) Ring attention's block kernels against F.scaled_dot_product_attention, one block of
   a whole sequence at 8k and 32k tokens, Llama 3 8B's heads (32 query, 8 K/V, head dim
   128), bf16, causal: context_parallel.block_forward + block_backward with the kernel
   block_kernel picks for the device, against SDPA (enable_gqa) forward + backward.
   Time (interleaved) and peak memory above the inputs (max_memory_allocated after
   reset_peak_memory_stats). Check: out, dq, dk, dv within 2e-2 of SDPA's (by norm).
4) Every technique file's code path at world size 1: a 1-rank process group (nccl;
   gloo on CPU), then train.main in-process on configs/debug.yaml (bf16, 6 steps):
   float8 tensorwise and rowwise, activation checkpointing full and selective, compile,
   checkpoint save then load=latest (sync and async: the last checkpoint is deleted
   as if the run had died before it, the resumed losses compared with the first run's);
   fsdp.apply_fsdp on a 1-rank shard group directly (train.py applies FSDP only over 2+
   ranks). Pass: finite losses (and a resume at the right step). What needs 2+ ranks is
   listed as not covered.
--dry: tiny sizes (a 1-layer dim-64 Llama for sections 1 and 4, 64 x 64 -> 224 GEMMs,
128 and 256 tokens of attention), every case constructed and run once or twice: on a
2-core CPU about 30 s once inductor's cache holds the one block it compiles (a first
compile on a machine adds up to a minute); on a GPU, a smoke test of the CUDA paths.
It writes runs/bench/ unless --out, and says DRY RUN: not figures. Without --dry, a
machine with no CUDA device stops with an error: CPU numbers are never reported as a
GPU's.
"""

import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702

import argparse
import contextlib
import functools
import gc
import math
import shutil
import statistics
import subprocess
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import config
import context_parallel
import float8
import fsdp
import llama
import metrics
import parallelize
import train
from bench import common, mfu
from bench import float8 as float8_bench

MODELS = {  # --model: (label, model args)
    "llama3_1b": ("Llama 3 1B-class (llama3_1b preset)", llama.model_args("llama3_1b")),
    "tiny": ("tiny (debug preset, dim 64, 1 layer; --dry)", llama.model_args("debug", dim=64, n_layers=1)),
}
FFN_LINEARS = [lin for lin in float8_bench.LINEARS if lin[0] in ("w1, w3", "w2")]  # (label, K, N), Llama 3 8B
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama 3 8B attention
DEBUG_YAML = os.path.join(common.ROOT, "configs/debug.yaml")
# Section 4: configs/debug.yaml as it is on a GPU (dim 256, 4 layers, 8 x 256 tokens). --dry: section 1's tiny
# model and batch, so that compile=true finds the block already compiled (inductor's cache): one compile in all.
TRAIN = ["training.dtype=bfloat16", "run.eval_every=0", "run.log_every=1", "run.overwrite=true",
         f"data.cache_dir={os.path.join(common.ROOT, '.cache/data')}",
         f"run.peak_cache={os.path.join(common.ROOT, config.RunConfig.peak_cache)}"]
TRAIN_DRY = ["model.dim=64", "model.n_layers=1", "data.seq_len=64", "training.batch_size=2",
             "training.micro_batch_size=2"]
TECHNIQUES = [  # (file, case, overrides): one train.main run each
    ("train.py", "baseline: no technique", []),
    ("float8.py", "float8 tensorwise", ["float8.enabled=true", "float8.recipe=tensorwise"]),
    ("float8.py", "float8 rowwise", ["float8.enabled=true", "float8.recipe=rowwise"]),
    ("parallelize.py", "activation checkpointing full", ["activation_checkpoint.mode=full"]),
    ("parallelize.py", "activation checkpointing selective (op)", ["activation_checkpoint.mode=selective",
                                                                   "activation_checkpoint.selective_option=op"]),
    ("parallelize.py", "torch.compile per block", ["compile=true"]),
]
NOT_COVERED = ("tensor_parallel.py (TP, sequence and loss parallel, async TP): tp >= 2; pipeline.py (every "
               "schedule): pp >= 2; context_parallel.py's ring and all-gather rotations: cp >= 2 (their block "
               "kernels are section 3); fsdp.py's all-gather and reduce-scatter, HSDP's all-reduce and the "
               "float8 all-gather: a shard group of 2+ (at 1 its hooks run but issue no collective); "
               "checkpoint.py's resharding: a second layout")
QUICK = {"model": "tiny", "batch": 2, "seq": 64, "warmup": 1, "steps": 2, "M": 64, "shape_div": 64,
         "tokens": [128, 256], "reps": 2, "train_steps": 4}
SQNR_MIN_DB = 20.0
ATTENTION_TOL = 2e-2  # two bf16 attention kernels, relative by norm (they agree to ~5e-3)


# ---------------------------------------------------------------------------------------
# Device, timing, memory, cases


def driver_version() -> str:
    """The NVIDIA driver, from nvidia-smi (torch reports only the CUDA version); unknown without it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out[0] if out else "unknown"


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        name = f"{p.name} (sm{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
    else:
        name = f"CPU: {common.machine()}"
    return (f"Device: {name}; NVIDIA driver {driver_version()}; torch {torch.__version__}, CUDA "
            f"{torch.version.cuda or 'none (a CPU build)'}.")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object]:
    """(seconds, result) of fn(), the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def interleaved(fns: dict, device: torch.device, warmup: int, reps: int) -> dict[str, list[float]]:
    """Times of each fn over `reps` rounds (a, b, c, a, b, c, ...) after `warmup` runs each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn, device)[0])
    return times


def peak_memory(fn, device: torch.device) -> int:
    """Peak bytes allocated while fn() runs, above what was allocated before (its outputs
    included): CUDA's allocator statistics, or the CPU allocator's profiler events."""
    if device.type == "cpu":
        def region():
            with torch.profiler.record_function("measured"):
                fn()
        return common.peak_bytes(region, "measured")
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def free(device: torch.device) -> None:
    """Drop the last case's tensors (and the cached blocks), so each case's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ms(ts: list[float]) -> str:
    """'2.71 ms (min 2.68)': common.ms at three significant digits (GPU kernels take ms)."""
    return f"{statistics.median(ts) * 1e3:.3g} ms (min {min(ts) * 1e3:.3g})"


def attempt(what: str, fn, failures: list[str]) -> tuple[object, str]:
    """(fn(), 'pass'), or (None, 'FAILED: ...') with the traceback on stderr: one broken
    case does not hide the others."""
    try:
        return fn(), "pass"
    except Exception as e:  # noqa: BLE001 (any failure is the case's result)
        traceback.print_exc()
        failures.append(what)
        last = ([line for line in str(e).splitlines() if line.strip()] or [""])[-1]
        return None, f"FAILED: {type(e).__name__}: {last}"


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref||, in float32."""
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


# ---------------------------------------------------------------------------------------
# 1. Llama 1B training throughput


def train_timed(margs: llama.ModelArgs, device: torch.device, args: argparse.Namespace, compiled: bool
                ) -> tuple[list[float], list[float], int]:
    """(timed step seconds, every step's loss, peak bytes allocated) of training on one
    random batch, as bench/mfu.py's step: the model built on meta, materialized on the
    device with train.py's init, compiled per block as train.py's compile option does."""
    torch._dynamo.reset()  # a fresh, static-shape compile
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = llama.build_model(margs)  # meta: no memory until materialized on the device
    llama.materialize(model, device)
    llama.init_weights(model, margs, seed=0)
    if compiled:
        parallelize.apply_compile(model)
    optimizer = train.build_optimizer(model, config.TrainingConfig())
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    tokens = torch.randint(0, margs.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    run = functools.partial(mfu.step, model, optimizer, tokens.to(device), autocast)
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        seconds, loss = timed(run, device)
        times.append(seconds)
        losses.append(loss.item())
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite loss: {losses}")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return times[args.warmup:], losses, peak


def throughput(args: argparse.Namespace, device: torch.device, failures: list[str]) -> tuple[list[str], list[dict]]:
    label, margs = MODELS[args.model]
    peak, source = metrics.peak_flops(0.0, device, "bfloat16", os.path.join(common.ROOT, config.RunConfig.peak_cache))
    flops = llama.flops_per_token(margs, args.seq)
    results, cells = {}, []
    for name, compiled in (("eager", False), ("torch.compile per block", True)):
        def case(compiled=compiled):
            out = train_timed(margs, device, args, compiled)
            if compiled and "eager" in results:  # the same weights and batch: the same first loss
                first, ref = out[1][0], results["eager"][1][0]
                if not abs(first - ref) <= 1e-2 * abs(ref):
                    raise RuntimeError(f"compiled first loss {first:.4f} vs eager {ref:.4f}: not the same model")
            return out
        result, status = attempt(f"1: {name}", case, failures)
        if result is None:
            cells.append([name, status, "-", "-", "-", "-", "-"])
            continue
        results[name] = result
        times, losses, mem = result
        tps = args.batch * args.seq / statistics.median(times)
        mfu_text = f"{100 * flops * tps / peak:.1f}%" if peak else f"n/a ({source})"
        memory = f"{mem / 2**30:.1f} GiB" if device.type == "cuda" else "n/a (CPU)"
        cells.append([name, status, ms(times), f"{tps:,.0f}", mfu_text, memory,
                      f"{losses[0]:.4f} -> {losses[-1]:.4f}"])
    lines = ["## 1. Llama 3 1B training throughput",
             (f"{label}: {llama.num_params(margs) / 1e6:,.0f}M parameters, batch {args.batch} x {args.seq} tokens, "
             f"{flops / 1e9:.3g} GFLOP/token (llama.flops_per_token); float32 master weights, bf16 autocast, AdamW; "
             f"{args.steps} timed steps after {args.warmup} warm-up; peak: {peak / 1e12:.3g} TFLOP/s ({source})."),
             *common.table(["mode", "status", "step", "tokens/s", "MFU", "peak memory", "loss first -> last"], cells)]
    summary = [common.row("GPU check", f"{label}, {args.batch} x {args.seq}, bf16, 1 GPU: {c[0]}", c[3] + " tokens/s",
                          c[2], f"MFU {c[4]}", c[1]) for c in cells]
    return lines, summary


# ---------------------------------------------------------------------------------------
# 2. Float8 vs bf16 on the FFN shapes


def float8_support(device: torch.device) -> str | None:
    """Why float8 matmuls cannot run here, or None."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        return f"skipped: float8 matmuls need sm89+ (this device is sm{major}{minor})"
    return None


def gemms(M: int, K: int, N: int, device: torch.device) -> dict:
    """name -> fn() of out = x W^T: bf16 torch.mm, and float8.scaled_mm on x and W quantized
    beforehand (outside the timing) as Float8Matmul's forward quantizes them."""
    x = torch.randn(M, K, device=device).bfloat16()
    w = (0.02 * torch.randn(N, K, device=device)).bfloat16()
    fns = {"bf16 torch.mm": functools.partial(torch.mm, x, w.t())}
    for recipe in float8.RECIPES:
        dim = None if recipe == "tensorwise" else 1  # rowwise: one scale per row, along K
        x_f8, x_inv = float8.to_float8(x, float8.E4M3, dim=dim, pow2=dim is not None)  # (M, 1) rowwise
        w_f8, w_inv = float8.to_float8(w, float8.E4M3, dim=dim, pow2=dim is not None)  # (N, 1) rowwise
        w_inv = w_inv if dim is None else w_inv.view(1, -1)  # scale_b (1, N)
        fns[f"float8 {recipe} scaled_mm"] = functools.partial(
            float8.scaled_mm, x_f8, x_inv, w_f8.t(), w_inv, float8.mm_out_dtype(recipe, torch.bfloat16), True)
    return fns


def linears(M: int, K: int, N: int, device: torch.device) -> dict:
    """name -> fn() of a linear's forward + backward -> (out, grad_x, grad_W): nn.Linear in
    bf16 and Float8Linear holding the same weight Parameter (convert_to_float8 swaps the
    module, not the weight)."""
    x = torch.randn(M, K, device=device).bfloat16().requires_grad_()
    grad_out = torch.randn(M, N, device=device).bfloat16()
    base = nn.Linear(K, N, bias=False, device=device, dtype=torch.bfloat16)
    modules = {"bf16 nn.Linear": base}
    for recipe in float8.RECIPES:
        holder = nn.ModuleDict({"linear": base})
        skipped = float8.convert_to_float8(holder, recipe, skip=())
        if skipped:
            raise ValueError(f"float8: {skipped}")
        modules[f"float8 {recipe} Float8Linear"] = holder["linear"]

    def fwd_bwd(module: nn.Module):
        x.grad = module.weight.grad = None
        out = module(x)
        out.backward(grad_out)
        return out.detach(), x.grad, module.weight.grad
    return {name: functools.partial(fwd_bwd, m) for name, m in modules.items()}


def compare(what: str, make, M: int, K: int, N: int, flops: int, args, device, failures) -> list[list]:
    """Table rows of one shape: each impl's time, TFLOP/s, speedup over bf16 (the first)
    and SQNR of its outputs against bf16's. An impl that fails loses only its own row."""
    shape = f"{M} x {K} -> {N}"
    fns, status = attempt(f"2: {what} {shape}", lambda: make(M, K, N, device), failures)
    if fns is None:
        return [[what, shape, "-", status, "-", "-", "-", "-"]]
    base, outs, statuses = next(iter(fns)), {}, {}
    for name, fn in fns.items():  # the first run: the outputs, and a warm-up
        outs[name], statuses[name] = attempt(f"2: {what} {shape}: {name}", fn, failures)
    ran = {name: fn for name, fn in fns.items() if outs[name] is not None}
    times = interleaved(ran, device, args.warmup, args.reps)
    rows = []
    for name in fns:
        if name not in ran or base not in ran:
            rows.append([what, shape, name, statuses[name] if name not in ran else "bf16 failed", "-", "-", "-", "-"])
            continue
        ref, got = (outs[base], outs[name]) if isinstance(outs[base], tuple) else ((outs[base],), (outs[name],))
        sqnr = [float8_bench.sqnr_db(r.double(), g) for r, g in zip(ref, got, strict=True)]
        status = "pass" if min(sqnr) >= SQNR_MIN_DB else f"FAILED: SQNR {min(sqnr):.1f} dB < {SQNR_MIN_DB}"
        if status != "pass":
            failures.append(f"2: {what} {shape}: {name}")
        rows.append([what, shape, name, status, ms(times[name]), f"{flops / statistics.median(times[name]) / 1e12:.3g}",
                     "-" if name == base else common.ratio(times[base], times[name]),
                     " / ".join(f"{s:.1f}" for s in sqnr)])
    free(device)
    return rows


def float8_vs_bf16(args: argparse.Namespace, device: torch.device, failures: list[str]
                   ) -> tuple[list[str], list[dict]]:
    shapes = [(label, K // args.shape_div, N // args.shape_div) for label, K, N in FFN_LINEARS]
    skip = float8_support(device)
    cells = []
    for label, K, N in shapes:
        if skip:
            cells.append([label, f"{args.M} x {K} -> {N}", "float8", skip, "-", "-", "-", "-"])
            continue
        cells += compare(f"{label} GEMM", gemms, args.M, K, N, 2 * args.M * K * N, args, device, failures)
        cells += compare(f"{label} linear fwd+bwd", linears, args.M, K, N, 6 * args.M * K * N, args, device,
                         failures)
    lines = ["## 2. Float8 vs bf16 on the Llama 3 8B FFN shapes",
             (f"M = {args.M} tokens; x ~ N(0, 1), W ~ N(0, 0.02^2) in bf16; float8 outputs in "
             f"{float8.mm_out_dtype('rowwise', torch.bfloat16)} (float8.mm_out_dtype); eager (the casts run as "
             f"their own kernels: float8.py leaves their fusion to torch.compile); {args.reps} interleaved reps "
             f"after {args.warmup} warm-up; speedup = bf16 / float8 (above 1: float8 faster); TFLOP/s = 2 M K N "
             f"(GEMM) or 6 M K N (fwd+bwd) / median; SQNR against the bf16 result (out / grad_x / grad_W), pass "
             f"at >= {SQNR_MIN_DB:.0f} dB."),
             *common.table(["what", "M x K -> N", "impl", "status", "time", "TFLOP/s", "speedup vs bf16",
                            "SQNR vs bf16 (dB)"], cells)]
    summary = [common.row("GPU check", f"float8 vs bf16: {c[0]}, {c[1]}", f"{c[2]} {c[4]}", "bf16", c[6], c[3])
               for c in cells if c[2].startswith("float8")]
    return lines, summary


# ---------------------------------------------------------------------------------------
# 3. Ring attention's block kernels vs SDPA


def attention_case(L: int, kernel: str, args: argparse.Namespace, device: torch.device
                   ) -> tuple[dict[str, list[float]], dict[str, int], list[float]]:
    """(times, peak bytes, relative differences of out, dq, dk, dv) of one causal block of
    L tokens: ours (block_forward + block_backward with `kernel`) against SDPA. Raises if
    they disagree beyond ATTENTION_TOL."""
    q = torch.randn(1, HEADS, L, HEAD_DIM, device=device).bfloat16()  # (B, H, L, hd)
    k, v = (torch.randn(1, KV_HEADS, L, HEAD_DIM, device=device).bfloat16() for _ in range(2))  # (B, Hkv, L, hd)
    dout = torch.randn_like(q)
    scale = HEAD_DIM ** -0.5

    def ours():
        out, lse = context_parallel.block_forward(q, k, v, True, scale, kernel)
        return (out, *context_parallel.block_backward(dout, q, k, v, out, lse, True, scale, kernel))

    def sdpa():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
        out.backward(dout)
        return (out.detach(), *(t.grad for t in leaves))

    errs = [rel_err(a, b) for a, b in zip(ours(), sdpa(), strict=True)]
    if not max(errs) <= ATTENTION_TOL:
        raise RuntimeError(f"out, dq, dk, dv differ from SDPA's by {' / '.join(f'{e:.1e}' for e in errs)}")
    fns = {"ours": ours, "SDPA": sdpa}
    return interleaved(fns, device, args.warmup, args.reps), {n: peak_memory(f, device) for n, f in fns.items()}, errs


def attention(args: argparse.Namespace, device: torch.device, failures: list[str]) -> tuple[list[str], list[dict]]:
    kernel, why = context_parallel.block_kernel(device, torch.bfloat16, HEAD_DIM)
    cells = []
    for L in args.tokens:
        result, status = attempt(f"3: attention at {L:,} tokens",
                                 functools.partial(attention_case, L, kernel, args, device), failures)
        if result is None:
            cells.append([f"{L:,}", kernel, status, "-", "-", "-", "-", "-"])
            continue
        times, mem, errs = result
        cells.append([f"{L:,}", kernel, status, ms(times["ours"]), ms(times["SDPA"]),
                      common.ratio(times["ours"], times["SDPA"]),
                      f"{mem['ours'] / 2**20:,.0f} / {mem['SDPA'] / 2**20:,.0f} MiB",
                      " / ".join(f"{e:.1e}" for e in errs)])
        free(device)
    lines = ["## 3. Ring attention's block kernels vs F.scaled_dot_product_attention",
             (f"One causal block of the whole sequence: B 1, {HEADS} query heads, {KV_HEADS} K/V heads, head dim "
             f"{HEAD_DIM}, bf16; ours = context_parallel.block_forward + block_backward with the kernel "
             f"block_kernel picks: {kernel}, {context_parallel.KERNELS[kernel]} ({why}); SDPA = "
             f"F.scaled_dot_product_attention(is_causal, enable_gqa) forward + backward. {args.reps} interleaved "
             f"reps after {args.warmup} warm-up; ratio = ours / SDPA (below 1: ours faster); peak memory above the "
             f"inputs; pass: out, dq, dk, dv within {ATTENTION_TOL} of SDPA's (relative, by norm)."),
             *common.table(["tokens", "kernel", "status", "ours fwd+bwd", "SDPA fwd+bwd", "ours / SDPA",
                            "peak memory ours / SDPA", "rel. diff out / dq / dk / dv"], cells)]
    summary = [common.row("GPU check", f"ring attention block kernel {c[1]} vs SDPA, {c[0]} tokens",
                          c[3], c[4], c[5], c[2]) for c in cells]
    return lines, summary


# ---------------------------------------------------------------------------------------
# 4. Every technique file at world size 1


@contextlib.contextmanager
def one_rank_group(device: torch.device, folder: str):
    """A world of one process (nccl on CUDA, gloo on CPU) that train.main reuses; destroyed
    at the end unless the caller had one already."""
    if dist.is_initialized():
        yield
        return
    store = dist.FileStore(os.path.join(folder, "store"), 1)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def losses(history: list[dict]) -> list[float]:
    out = [r["loss"] for r in history]
    if not out or not all(math.isfinite(x) for x in out):
        raise RuntimeError(f"losses {out}: not finite")
    return out


def resume(argv: list[str], run_dir: str, steps: int, async_save: bool) -> tuple[float, str]:
    """Train `steps` steps saving every steps/2, delete the last checkpoint (as if the run
    had died before it), resume with checkpoint.load=latest: it must continue at steps/2
    + 1. Returns (final loss, detail)."""
    half = steps // 2
    save = [*argv, f"checkpoint.interval={half}", f"checkpoint.async_save={str(async_save).lower()}"]
    first = losses(train.main(save))
    shutil.rmtree(os.path.join(run_dir, "checkpoints", f"step-{steps}"))
    history = train.main([*save, "checkpoint.load=latest"])
    if not history or history[0]["step"] != half + 1:
        raise RuntimeError(f"resumed at step {history[0]['step'] if history else None}, not {half + 1}")
    again = losses(history)
    diff = max(abs(a - b) / abs(b) for a, b in zip(again, first[half:], strict=True))
    return again[-1], f"resumed at step {half + 1}; losses vs the first run's: max rel. diff {diff:.1e}"


def fsdp_one_rank(overrides: list[str], device: torch.device, steps: int) -> tuple[float, str]:
    """fsdp.apply_fsdp over a 1-rank shard group (train.py applies FSDP only over 2+):
    every unit's hooks, the bf16 gather and compute, the shard swap; no collective.
    The section's model, one random batch, a step as bench/mfu.py's."""
    cfg = config.load_config(DEBUG_YAML, overrides)
    margs = config.validate(cfg, 1).model_args
    model = llama.build_model(margs)  # meta: FSDP shards shapes, init fills the shards
    fsdp.apply_fsdp(model, list(model.layers.values()), dist.group.WORLD, param_dtype=torch.bfloat16)
    llama.materialize(model, device)
    llama.init_weights(model, margs, cfg.training.seed)
    optimizer = train.build_optimizer(model, cfg.training)
    fsdp.check_optimizer(optimizer)
    tokens = torch.randint(0, margs.vocab_size, (cfg.training.micro_batch_size, cfg.data.seq_len + 1),
                           generator=torch.Generator().manual_seed(0)).to(device)
    # No autocast: FSDP's bf16 gather makes the compute bf16 (train.initialize does the same).
    out = [mfu.step(model, optimizer, tokens, contextlib.nullcontext).item() for _ in range(steps)]
    losses([{"loss": x} for x in out])
    return out[-1], f"1-rank shard group, bf16 gather; loss {out[0]:.4f} -> {out[-1]:.4f} on one batch"


def techniques(args: argparse.Namespace, device: torch.device, failures: list[str]) -> tuple[list[str], list[dict]]:
    cells, baseline = [], None
    with tempfile.TemporaryDirectory() as tmp, one_rank_group(device, tmp):
        def overrides(name: str, *more: str) -> list[str]:
            return [*TRAIN, *(TRAIN_DRY if args.quick else []), f"training.steps={args.train_steps}",
                    f"run.dir={os.path.join(tmp, name)}", *more]

        def run(name: str, more: list[str]) -> tuple[float, str]:
            torch._dynamo.reset()  # a fresh compile (compile=true)
            history = train.main(["--config", DEBUG_YAML, *overrides(name, *more)])
            return losses(history)[-1], f"{history[-1]['tokens_per_sec']:,.0f} tokens/s"

        # (file, case, fn, whether it trains on the baseline's data and schedule)
        cases = [(f, c, functools.partial(run, f"case{i}", o), True) for i, (f, c, o) in enumerate(TECHNIQUES)]
        cases += [("checkpoint.py", f"checkpoint {mode} save, then load=latest",
                   functools.partial(resume, ["--config", DEBUG_YAML, *overrides(f"ckpt-{mode}")],
                                     os.path.join(tmp, f"ckpt-{mode}"), args.train_steps, mode == "async"), True)
                  for mode in ("sync", "async")]
        cases.append(("fsdp.py", "FSDP at world size 1 (apply_fsdp directly)",
                      functools.partial(fsdp_one_rank, overrides("fsdp"), device, args.train_steps), False))
        for file, case, fn, comparable in cases:
            start = time.perf_counter()
            result, status = attempt(f"4: {case}", fn, failures)
            loss, detail = result if result is not None else (None, "traceback on stderr")
            detail = f"{time.perf_counter() - start:.1f} s; {detail}"
            if file == "train.py":
                baseline = loss
            elif comparable and loss is not None and baseline is not None:
                detail += f"; final loss vs the baseline's: {loss / baseline - 1:+.1e} (relative)"
            cells.append([file, case, status, "-" if loss is None else f"{loss:.4f}", detail])
            free(device)
    cells.append(["context_parallel.py", "ring attention block kernels (block_forward, block_backward)",
                  "see section 3", "-", "one block of the whole sequence, against SDPA"])
    model = "configs/debug.yaml's debug Llama" + (" at dim 64, 1 layer, 2 x 64 tokens (--dry)" if args.quick else "")
    lines = ["## 4. Every technique file at world size 1",
             (f"A 1-rank process group ({'nccl' if device.type == 'cuda' else 'gloo'}); train.main in-process on "
             f"{model}, bf16, {args.train_steps} steps each; pass = finite losses (checkpoint: and the resume "
             f"continues at the right step)."),
             *common.table(["file", "case", "status", "final loss", "detail"], cells),
             f"Not covered at world size 1 (each needs 2+ ranks): {NOT_COVERED}."]
    passed = sum(c[2] == "pass" for c in cells)
    summary = [common.row("GPU check", f"every technique's path at world size 1 ({len(cells) - 1} cases)",
                          f"{passed} pass", "-", f"{len(cells) - 1 - passed} failed", "train.main in-process")]
    return lines, summary


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", dest="quick", action="store_true",
                        help="tiny sizes (--quick): every case runs, on CPU in well under a minute; not figures")
    parser.add_argument("--model", default="llama3_1b", choices=list(MODELS), help="section 1's model")
    parser.add_argument("--batch", type=int, default=4, help="section 1: sequences per step")
    parser.add_argument("--seq", type=int, default=2048, help="section 1: tokens per sequence")
    parser.add_argument("--steps", type=int, default=10, help="section 1: timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (sections 1-3)")
    parser.add_argument("--M", type=int, default=16384, help="section 2: tokens per matmul")
    parser.add_argument("--shape-div", type=int, default=1, help="section 2: divide every K and N (a smoke test)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768], help="section 3: sequence lengths")
    parser.add_argument("--reps", type=int, default=10, help="sections 2-3: timed interleaved reps")
    parser.add_argument("--train-steps", type=int, default=6, help="section 4: steps per run (even)")
    args = common.parse(parser, argv, QUICK)
    if not torch.cuda.is_available() and not args.quick:
        raise SystemExit("error: no CUDA device: run with --dry on CPU (tiny sizes, every case; no figures)")
    if args.train_steps < 2 or args.train_steps % 2:
        raise ValueError(f"--train-steps {args.train_steps} must be even and >= 2 (checkpoint: save at half)")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    failures, parts, walls = [], [], []
    for name, section in (("1", throughput), ("2", float8_vs_bf16), ("3", attention), ("4", techniques)):
        start = time.perf_counter()
        parts.append(section(args, device, failures))
        walls.append(f"{name}: {time.perf_counter() - start:.0f} s")
    parts.append(([f"Wall time per section: {', '.join(walls)}."], []))
    intro = device_line(device)
    if args.quick:
        intro = (f"**DRY RUN (`--dry`) on {device.type.upper()}: tiny sizes that construct and run every case; its "
                 f"numbers are not figures.**\n\n{intro}")
    rows = common.report("gpu", "The one GPU check", intro, parts, args)
    if failures:
        raise RuntimeError(f"bench/gpu.py: {len(failures)} case(s) failed: {'; '.join(failures)} (FAILED rows in the "
                           f"table, tracebacks on stderr)")
    return rows


if __name__ == "__main__":
    main()
