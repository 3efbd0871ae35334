"""Float8: Float8Matmul (float8.py, torch._scaled_mm) against a high-precision F.linear.

    python bench/float8.py [--quick] [--M 256] [--reps 3] [--compile] [--shape-div 1]

Forward + backward of one linear (out = x W^T, grad_x, grad_W) on the Llama 3 8B block
shapes: float8 tensorwise and rowwise against F.linear in bf16 (and float32 on CPU),
the same bf16-representable inputs for all. Interleaved repetitions; speedup = the
baseline's time / this one's (> 1: faster), median, min and spread. Numerics: SQNR of
the output, grad_x and grad_W against float64 on the same inputs, from the last
warm-up run. On CUDA this is the speed comparison (the paper's target: float8 >= 1.3x
bf16 on the FFN shapes with --compile on an H100); on CPU, where torch._scaled_mm has no
float8 hardware to use (this table shows how its time compares with bf16 here), only the
numerics mean anything. torchao is not a
dependency; its Float8Linear is the natural peer on a GPU.
"""

import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702

import argparse
import math
import statistics
import time

import torch

import float8
from bench import common

# Llama 3 8B (dim 4096, 32 heads, 8 KV heads, FFN 14336): the distinct (K -> N) shapes of a block.
LINEARS = (("wq, wo", 4096, 4096), ("wk, wv", 4096, 1024), ("w1, w3", 4096, 14336), ("w2", 14336, 4096))
QUICK = dict(M=16, reps=2, warmup=1, shape_div=16)


def impls(cuda: bool) -> dict:
    """name -> (fn(x, w), input dtype)."""
    out = {"bf16": (torch.nn.functional.linear, torch.bfloat16)}
    if not cuda:
        out["fp32"] = (torch.nn.functional.linear, torch.float32)
    out["float8 tensorwise"] = (lambda x, w: float8.Float8Matmul.apply(x, w, "tensorwise", None), torch.bfloat16)
    out["float8 rowwise"] = (lambda x, w: float8.Float8Matmul.apply(x, w, "rowwise", None), torch.bfloat16)
    return out


def sqnr_db(ref: torch.Tensor, y: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - y|^2), in float64."""
    noise = (ref - y.double()).pow(2).sum()
    return float("inf") if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise.item())


def measure(M: int, K: int, N: int, cli: argparse.Namespace, device: torch.device, gen: torch.Generator) -> dict:
    """{impl: (times, SQNRs)} for one shape."""
    x0 = torch.randn(M, K, generator=gen).bfloat16().to(device)
    w0 = (0.02 * torch.randn(N, K, generator=gen)).bfloat16().to(device)
    go0 = torch.randn(M, N, generator=gen).bfloat16().to(device)
    x64, w64, go64 = x0.double(), w0.double(), go0.double()
    ref = (x64 @ w64.t(), go64 @ w64, go64.t() @ x64)  # out, grad_x, grad_W
    runs = {}
    for name, (fn, dtype) in impls(device.type == "cuda").items():
        f = torch.compile(fn, dynamic=False) if cli.compile else fn
        runs[name] = (f, x0.to(dtype, copy=True).requires_grad_(), w0.to(dtype, copy=True).requires_grad_(),
                      go0.to(dtype))

    def run(name: str):
        f, x, w, go = runs[name]
        x.grad = w.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = f(x, w)
        out.backward(go)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, (out.detach(), x.grad, w.grad)

    sqnr = {}
    for name in runs:
        for _ in range(cli.warmup):
            _, outs = run(name)
        sqnr[name] = [sqnr_db(r, o) for r, o in zip(ref, outs)]
    times = {name: [] for name in runs}
    for _ in range(cli.reps):  # interleaved: bf16, (fp32,) tensorwise, rowwise, bf16, ...
        for name in runs:
            times[name].append(run(name)[0])
    return {name: (times[name], sqnr[name]) for name in runs}


def main(argv: list[str] | None = None) -> list[dict]:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--M", type=int, default=8192 if cuda else 256, help="tokens per matmul")
    parser.add_argument("--reps", type=int, default=20 if cuda else 3, help="timed interleaved reps")
    parser.add_argument("--warmup", type=int, default=3 if cuda else 1, help="untimed runs first (at least 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each impl (slow to compile on CPU)")
    parser.add_argument("--shape-div", type=int, default=1, help="divide every K and N (a smoke test)")
    cli = common.parse(parser, argv, QUICK)
    linears = [(label, K // cli.shape_div, N // cli.shape_div) for label, K, N in LINEARS]
    if cli.M % 16 or cli.warmup < 1 or any(K % 16 or N % 16 for _, K, N in linears):
        raise ValueError(f"--M {cli.M} and every K, N {[(K, N) for _, K, N in linears]} must divide by 16 "
                         f"(torch._scaled_mm), --warmup {cli.warmup} must be >= 1 (it gives the numerics)")
    device = torch.device("cuda" if cuda else "cpu")
    where = (f"{'compiled' if cli.compile else 'eager'}" if cuda else "CPU: no float8 hardware, numerics only")
    gen = torch.Generator().manual_seed(0)
    cells, rows = [], []
    for label, K, N in linears:
        torch._dynamo.reset()  # a fresh static-shape compile per shape
        res = measure(cli.M, K, N, cli, device, gen)
        base = [n for n in res if not n.startswith("float8")]
        for name, (times, sqnr) in res.items():
            cells.append([label, f"{cli.M} x {K} -> {N}", name, common.ms(times),
                          f"{6 * cli.M * K * N / statistics.median(times) / 1e12:.3g}",
                          *(common.ratio(res[b][0], times) if b != name else "-" for b in base), " / ".join(f"{s:.1f}" for s in sqnr)])
        f8 = [n for n in res if n.startswith("float8")]
        rows.append(common.row("float8", f"float8 linear vs bf16 F.linear, {label}: {cli.M} x {K} -> {N}, fwd+bwd "
                                         f"({where})", "; ".join(f"{n.split()[1]} {common.ms(res[n][0])}" for n in f8),
                               "; ".join(f"{n} {common.ms(res[n][0])}" for n in base),
                               "bf16 / float8: " + "; ".join(f"{n.split()[1]} {common.ratio(res['bf16'][0], res[n][0])}"
                                                             for n in f8),
                               "SQNR out / grad_x / grad_W (dB): " + "; ".join(
                                   f"{n.split()[-1]} {' / '.join(f'{s:.1f}' for s in res[n][1])}" for n in f8 + ["bf16"])))
    base = [n for n in impls(cuda) if not n.startswith("float8")]
    intro = (("CUDA: the speed comparison" if cuda else "CPU: a NUMERICS demonstration, not a speed result "
              "(a CPU has no float8 matmul hardware; torch._scaled_mm computes in higher precision)") +
             f"; M = {cli.M} tokens; x ~ N(0, 1), W ~ N(0, 0.02^2), grad_out ~ N(0, 1), rounded to bf16 and shared; "
             f"float8 with bf16 inputs and outputs; {'torch.compile' if cli.compile else 'eager'}; {cli.reps} "
             f"interleaved reps after {cli.warmup} warm-up; speedup = baseline time / impl time; SQNR vs float64; "
             "TFLOP/s = 6 M K N / median.")
    table = common.table(["layer", "M x K -> N", "impl", "fwd+bwd", "TFLOP/s", *(f"speedup vs {b}" for b in base),
                          "SQNR out / grad_x / grad_W (dB)"], cells)
    return common.report("float8", "Float8 linear vs high-precision F.linear", intro, [(table, rows)], cli)


if __name__ == "__main__":
    main()
