"""Benchmarks, each printed as a Markdown table with the machine it ran on.

    python bench.py mfu        # single-process training: MFU and where the step time goes

Protocol (DESIGN.md): compare like with like on the same machine in the same run,
interleave repetitions, report the median and the min; on CPU, MFU is against this
machine's measured GEMM peak, never a vendor figure. Later techniques add their
comparisons against PyTorch's own implementations here.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import platform
import statistics
import time

import torch

import llama
import train

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                 "aten::_scaled_dot_product_flash_attention",
                 "aten::_scaled_dot_product_flash_attention_backward")


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{name} ({isa}), {torch.get_num_threads()} thread(s)"


def _train_setup(args: llama.ModelArgs, dtype: torch.dtype, seed: int = 0):
    model = llama.build_model(args, "cpu")
    llama.init_weights(model, args, seed)
    if dtype == torch.float64:
        model.to(torch.float64)
    cfg = train.TrainingConfig(lr=1e-3)
    optimizer = train.build_optimizer(model, cfg)
    return model, optimizer


def _step(model, optimizer, tokens, autocast) -> None:
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    with autocast():
        logits = model(inputs)
    loss = train.loss_fn(logits, labels, labels.numel())
    loss.backward()
    train.clip_grad_norm(list(model.parameters()), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_mfu(steps: int, warmup: int, dtypes: list[str]) -> None:
    """Train the debug model and a wider one on random tokens as train.py does (fp32
    master weights, AdamW; bfloat16 = autocast); report tokens/s, MFU against the
    measured GEMM peak of the same dtype, and the share of step time in matmuls, in
    attention and outside both (profiler self time)."""
    torch.manual_seed(0)
    shapes = {
        "debug (dim 256, 4 layers)": (llama.model_args("debug"), 8, 256),
        "wide (dim 1024, 4 layers)": (llama.model_args("debug", dim=1024, n_heads=16, n_kv_heads=4,
                                                          multiple_of=256), 4, 256),
    }
    peaks = {name: train.measure_gemm_peak(train.DTYPES[name], reps=10) for name in dtypes}
    print(f"\nMFU, single process, {machine()}, torch {torch.__version__}")
    print("peak = measured 1024^3 GEMM: " + ", ".join(f"{n} {p / 1e9:.0f} GFLOP/s" for n, p in peaks.items()))
    print("\n| model | dtype | params | batch x seq | step median (min) | tokens/s | MFU | matmul | attention | other |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (label, (args, batch, seq)), name in itertools.product(shapes.items(), dtypes):
        peak = peaks[name]
        autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=name == "bfloat16")
        model, optimizer = _train_setup(args, train.DTYPES[name])
        tokens = torch.randint(0, args.vocab_size, (batch, seq + 1))
        for _ in range(warmup):
            _step(model, optimizer, tokens, autocast)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            _step(model, optimizer, tokens, autocast)
            times.append(time.perf_counter() - start)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                _step(model, optimizer, tokens, autocast)
        self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
        total = sum(self_us.values())
        mm = sum(self_us.get(k, 0) for k in MATMUL_OPS) / total
        attn = sum(self_us.get(k, 0) for k in ATTENTION_OPS) / total
        median = statistics.median(times)
        tps = batch * seq / median
        mfu = llama.flops_per_token(args, seq) * tps / peak
        n = sum(p.numel() for p in model.parameters())
        print(f"| {label} | {name} | {n / 1e6:.1f}M | {batch} x {seq} | {median * 1e3:.0f} ms ({min(times) * 1e3:.0f}) "
              f"| {tps:,.0f} | {100 * mfu:.1f}% | {100 * mm:.0f}% | {100 * attn:.0f}% | {100 * (1 - mm - attn):.0f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    mfu = sub.add_parser("mfu", help="single-process training MFU and step-time breakdown")
    mfu.add_argument("--steps", type=int, default=10)
    mfu.add_argument("--warmup", type=int, default=3)
    mfu.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(train.DTYPES))
    cli = parser.parse_args()
    if cli.bench == "mfu":
        bench_mfu(cli.steps, cli.warmup, cli.dtypes)


if __name__ == "__main__":
    main()
