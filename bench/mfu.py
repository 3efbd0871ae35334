"""MFU of single-process training, and where the step time goes.

    python bench/mfu.py [--quick] [--dtypes float32 bfloat16] [--models debug wide]

Trains the debug model and a wider one on random tokens as train.py does (float32
master weights, AdamW, clipping at 1.0; bfloat16 = autocast) and reports tokens/s and
MFU against the measured GEMM peak of the same dtype on this machine (never a vendor
figure: DESIGN.md), re-measured here and written to the cache train.py reads
(metrics.cpu_peak), and the share of the step's op self time (profiler) in matmuls, in
attention and outside both. There is no peer: the figure is against the hardware.
"""

import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702

import argparse
import functools
import statistics
import time

import torch

import config
import llama
import metrics
import train
from bench import common

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                 "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_backward")
MODELS = {  # name -> (label, model args, batch, seq)
    "debug": ("debug (dim 256, 4 layers)", llama.model_args("debug"), 8, 256),
    "wide": ("wide (dim 1024, 4 layers)", llama.model_args("debug", dim=1024, n_heads=16, n_kv_heads=4,
                                                           multiple_of=256), 4, 256),
    "tiny": ("tiny (dim 64, 1 layer; --quick)", llama.model_args("debug", dim=64, n_layers=1), 2, 32),
}
QUICK = dict(steps=1, warmup=0, models=["tiny"])


def step(model, optimizer, tokens: torch.Tensor, autocast) -> torch.Tensor:
    """One training step on `tokens` (B, S + 1); returns the loss (detached, not synced)."""
    with autocast():
        logits = model(tokens[:, :-1])
    loss = train.loss_fn(logits, tokens[:, 1:], tokens[:, 1:].numel())
    loss.backward()
    train.clip_grad_norm(list(model.parameters()), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def breakdown(run) -> tuple[float, float]:
    """Shares of op self time in matmuls and in attention over 3 runs of `run`."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            run()
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())
    return (sum(self_us.get(k, 0) for k in MATMUL_OPS) / total, sum(self_us.get(k, 0) for k in ATTENTION_OPS) / total)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(config.DTYPES))
    parser.add_argument("--models", nargs="+", default=["debug", "wide"], choices=list(MODELS))
    parser.add_argument("--peak-cache", default=config.RunConfig.peak_cache, help="the peak cache to refresh "
                        "(run.peak_cache)")
    args = common.parse(parser, argv, QUICK)
    torch.manual_seed(0)
    peaks = {d: metrics.cpu_peak(d, args.peak_cache, remeasure=True)[0] for d in args.dtypes}
    rows, cells = [], []
    for name in args.models:
        label, margs, batch, seq = MODELS[name]
        for dtype in args.dtypes:
            autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
            model, optimizer = common.build(margs, config.DTYPES[dtype])
            tokens = torch.randint(0, margs.vocab_size, (batch, seq + 1))
            run = functools.partial(step, model, optimizer, tokens, autocast)
            for _ in range(args.warmup):
                run()
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            mm, attn = breakdown(run)
            tps = batch * seq / statistics.median(times)
            mfu = llama.flops_per_token(margs, seq) * tps / peaks[dtype]
            split = f"matmul {100 * mm:.0f}%, attention {100 * attn:.0f}%, other {100 * (1 - mm - attn):.0f}%"
            cells.append([label, dtype, f"{llama.num_params(margs) / 1e6:.1f}M", f"{batch} x {seq}",
                          common.ms(times), f"{tps:,.0f}", f"{100 * mfu:.1f}%", split])
            rows.append(common.row("MFU", f"{label}, {dtype}, {batch} x {seq} tokens, 1 process: model FLOP/s vs the "
                                          f"measured {dtype} GEMM peak", f"{common.ms(times)} per step, "
                                          f"{tps:,.0f} tokens/s", f"{peaks[dtype] / 1e9:.0f} GFLOP/s (1024^3 GEMM)",
                                   f"MFU {100 * mfu:.1f}%", f"step: {split}"))
    intro = (f"Single process, {torch.get_num_threads()} thread(s); model FLOPs = llama.flops_per_token; peak = the "
             "best of the measured 1024^3 GEMMs: " + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items())
             + f". {args.steps} timed steps after {args.warmup} warm-up; the split is of op self time (profiler, 3 "
             "more steps).")
    table = common.table(["model", "dtype", "params", "batch x seq", "step", "tokens/s", "MFU", "op self time"], cells)
    return common.report("mfu", "MFU: single-process training against this machine's GEMM peak", intro,
                         [(table, rows)], args)


if __name__ == "__main__":
    main()
