"""Async TP: the ring ops of tensor_parallel.py against their synchronous form, one op
at a time, and how much communication they hide.

    python bench/async_tp.py [--quick] [--reps 8] [--no-paper-shapes]

Forward + backward of one TP op on 2 gloo ranks (1 thread each), float32, batch 1, four
ways, interleaved reps (a barrier before each; time = the slowest rank):
    column  x (S/2, D) sequence shard, W (N, D): sync = GatherSeq then x W^T (backward:
            the matmuls, then a reduce-scatter of dX); async = AllGatherMatmul;
    row     x (S, N), W (D, N): sync = x W^T then ReduceScatterSeq; async = MatmulReduceScatter;
    comm    the collectives of the sync form alone; compute: its matmuls alone.
hidden = (T_compute + T_comm - T_op) / T_comm: 1 = all communication hidden, 0 = none,
< 0 = slower than running the two back to back. Checked: async and sync outputs and
gradients agree within float32's reordering bound, else it raises. Shapes: the model's
FFN (as bench/tp.py's default), and TECHNIQUES §3.3's comm-heavy and compute-bound
ones. Then the same comm-heavy op with Float8Linear weights (tensorwise and rowwise):
sync = the high-precision all-gather / reduce-scatter around Float8Matmul, async = the
rings of float8.Float8RingMatmuls (activations and gradients gathered in float8), with
the bytes each hands to its collectives (comm.CommCounter) and the same parity check.
Float8 GEMMs on a CPU are emulated (_scaled_mm: ~6x slower than bf16, TECHNIQUES §5.4),
so these times weigh compute far more than a GPU would. Then §3.3's progress test:
post one ring step, sleep, time the wait.
"""

import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import comm
import float8
import tensor_parallel as tpm
from bench import common

QUICK = dict(reps=2, paper_shapes=False, S=64, D=64, N=128)


def variants(kind: str, S: int, D: int, N: int, gen: torch.Generator) -> dict:
    """name -> (leaves, fn): fn runs forward + backward of one form of the op."""
    g, s = dist.group.WORLD, S // dist.get_world_size()

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).requires_grad_()

    if kind == "column":
        x, w, xf, yd = leaf(1, s, D), leaf(N, D, scale=D**-0.5), leaf(1, S, D), leaf(1, s, D)
        go, go_d = torch.randn(1, S, N, generator=gen), torch.randn(1, S, D, generator=gen)
        return {"sync": ((x, w), lambda: F.linear(tpm.GatherSeq.apply(x, g), w).backward(go)),
                "async": ((x, w), lambda: tpm.AllGatherMatmul.apply(x, g, None, w)[0].backward(go)),
                "comm": ((yd,), lambda: tpm.GatherSeq.apply(yd, g).backward(go_d)),
                "compute": ((xf, w), lambda: F.linear(xf, w).backward(go))}
    x, w, yd = leaf(1, S, N), leaf(D, N, scale=N**-0.5), leaf(1, S, D)
    go, go_d = torch.randn(1, s, D, generator=gen), torch.randn(1, S, D, generator=gen)
    return {"sync": ((x, w), lambda: tpm.ReduceScatterSeq.apply(F.linear(x, w), g).backward(go)),
            "async": ((x, w), lambda: tpm.MatmulReduceScatter.apply(x, w, g).backward(go)),
            "comm": ((yd,), lambda: tpm.ReduceScatterSeq.apply(yd, g).backward(go)),
            "compute": ((x, w), lambda: F.linear(x, w).backward(go_d))}


def float8_variants(kind: str, S: int, D: int, N: int, recipe: str, gen: torch.Generator) -> dict:
    """name -> (leaves, fn), the op with a Float8Linear: "sync" (GatherSeq / ReduceScatterSeq
    in high precision around it) and "async" (its rings, float8 on the wire)."""
    g, s = dist.group.WORLD, S // dist.get_world_size()
    shape = (N, D, D**-0.5) if kind == "column" else (D, N, N**-0.5)
    lin = float8.Float8Linear(shape[1], shape[0], bias=False)
    lin.weight = torch.nn.Parameter(shape[2] * torch.randn(shape[0], shape[1], generator=gen))
    lin.recipe, lin.amax_group = recipe, g
    if kind == "column":
        x, go = torch.randn(1, s, D, generator=gen).requires_grad_(), torch.randn(1, S, N, generator=gen)
        return {name: ((x, lin.weight), lambda a=a: tpm.column_parallel(
                    x, (lin,), group=g, sequence_parallel=True, async_tp=a)[0].backward(go))
                for name, a in (("sync", False), ("async", True))}
    x, go = torch.randn(1, S, N, generator=gen).requires_grad_(), torch.randn(1, s, D, generator=gen)
    return {name: ((x, lin.weight), lambda a=a: tpm.row_parallel(
                x, lin, group=g, sequence_parallel=True, async_tp=a).backward(go))
            for name, a in (("sync", False), ("async", True))}


def run(leaves, fn) -> list[torch.Tensor]:
    for p in leaves:
        p.grad = None
    fn()
    return [p.grad.clone() for p in leaves]


def rank_main(rank: int, world: int, cfg: dict) -> dict:
    gen = torch.Generator().manual_seed(7 + rank)
    out = {}
    for label, S, D, N, reps in cfg["shapes"]:
        for kind in ("column", "row"):
            forms = variants(kind, S, D, N, gen)
            grads = {name: run(*forms[name]) for name in forms}  # warm-up; the gradients of sync and async
            diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads["async"], grads["sync"]))
            times = {name: [] for name in forms}
            for _ in range(reps):
                for name, (leaves, fn) in forms.items():
                    dist.barrier()
                    start = time.perf_counter()
                    run(leaves, fn)
                    times[name].append(time.perf_counter() - start)
            out[label, kind] = (times, diff)
    label, S, D, N, reps = cfg["float8"]
    for recipe in float8.RECIPES:
        for kind in ("column", "row"):
            forms = float8_variants(kind, S, D, N, recipe, torch.Generator().manual_seed(11 + rank))
            grads = {name: run(*forms[name]) for name in forms}
            diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads["async"], grads["sync"]))
            sent = {}
            for name, (leaves, fn) in forms.items():
                with comm.CommCounter() as seen:
                    run(leaves, fn)
                sent[name] = common.by_kind(seen)
            times = {name: [] for name in forms}
            for _ in range(reps):
                for name, (leaves, fn) in forms.items():
                    dist.barrier()
                    start = time.perf_counter()
                    run(leaves, fn)
                    times[name].append(time.perf_counter() - start)
            out["float8", recipe, kind] = (times, diff, sent)
    _, S, D, _, _ = max(cfg["shapes"], key=lambda o: o[1] * o[2])  # §3.3's progress test, the largest block
    blk = torch.randn(1, S // world, D)
    recv = torch.empty_like(blk)
    dist.barrier()
    start = time.perf_counter()
    tpm._wait(tpm._start_ring(blk, recv, dist.group.WORLD, 1))
    alone = time.perf_counter() - start
    dist.barrier()
    works = tpm._start_ring(blk, recv, dist.group.WORLD, 1)
    time.sleep(max(0.2, 3 * alone))
    start = time.perf_counter()
    tpm._wait(works)
    out["progress"] = (blk.numel() * 4, alone, time.perf_counter() - start)
    return out


def hidden(t: dict, form: str, stat) -> float:
    return (stat(t["compute"]) + stat(t["comm"]) - stat(t[form])) / stat(t["comm"])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=8, help="timed interleaved reps of each form (3x for the model's)")
    parser.add_argument("--S", type=int, default=512, help="the model shape: tokens (bench/tp.py's batch x seq)")
    parser.add_argument("--D", type=int, default=512, help="the model shape: dim")
    parser.add_argument("--N", type=int, default=704, help="the model shape: FFN / 2 (bench/tp.py's dim 512)")
    parser.add_argument("--no-paper-shapes", dest="paper_shapes", action="store_false",
                        help="skip §3.3's comm-heavy and compute-bound shapes")
    cli = common.parse(parser, argv, QUICK)
    shapes = [("model FFN", cli.S, cli.D, cli.N, 3 * cli.reps)]
    if cli.paper_shapes:
        shapes += [("comm-heavy (§3.3)", 4096, 4096, 256, cli.reps), ("compute-bound (§3.3)", 4096, 1024, 1024, cli.reps)]
    f8_shape = shapes[1] if cli.paper_shapes else shapes[0]  # the comm-heavy op (the model's with --quick)
    res = common.run_on_ranks(rank_main, 2, dict(shapes=shapes, float8=f8_shape), timeout=3600, pg_timeout_s=600)
    tol = common.parity_tol(torch.float32, max(D for _, _, D, _, _ in shapes), 2)
    cells, rows = [], []
    for label, S, D, N, reps in shapes:
        async_cells, sync_cells, ratios, hid = [], [], [], []
        for kind in ("column", "row"):
            per_rank = [r[label, kind] for r in res]
            t = {n: common.slowest([pr[0][n] for pr in per_rank]) for n in per_rank[0][0]}
            diff = max(pr[1] for pr in per_rank)
            if not diff <= tol:
                raise RuntimeError(f"async TP {label} {kind}: async and sync gradients differ by {diff:.1e} "
                                   f"(relative), above the reordering bound {tol:.1e}")
            h = {f: (hidden(t, f, statistics.median), hidden(t, f, min)) for f in ("sync", "async")}
            cells.append([label, f"{S} x {D}, {N}", kind, reps, *(common.ms(t[n]) for n in ("sync", "async", "comm",
                          "compute")), *(f"{h[f][0]:.2f} (min {h[f][1]:.2f})" for f in ("sync", "async")),
                          common.ratio(t["async"], t["sync"]), f"{diff:.1e}"])
            async_cells.append(f"{kind} {common.ms(t['async'])}")
            sync_cells.append(f"{kind} {common.ms(t['sync'])}")
            ratios.append(f"{kind} {common.ratio(t['async'], t['sync'])}")
            hid.append(f"{kind} {h['async'][0]:.2f} (sync {h['sync'][0]:.2f})")
        rows.append(common.row("async TP", f"ring op vs its synchronous form, 2 ranks, fwd+bwd of one op: {label}, "
                                           f"S x D, N = {S} x {D}, {N}", "; ".join(async_cells), "; ".join(sync_cells),
                               "; ".join(ratios), "communication hidden, median: " + "; ".join(hid)
                               + f"; asserted: gradients within {tol:.0e}"))
    label, S, D, N, reps = f8_shape
    f8_tol = common.parity_tol(torch.float32, max(S, D), 2)  # dW sums S tokens, dX and Y D or N features
    f8_cells = []
    for recipe in float8.RECIPES:
        async_cells, sync_cells, ratios, sent_cells = [], [], [], []
        for kind in ("column", "row"):
            per_rank = [r["float8", recipe, kind] for r in res]
            t = {n: common.slowest([pr[0][n] for pr in per_rank]) for n in per_rank[0][0]}
            diff = max(pr[1] for pr in per_rank)
            if not diff <= f8_tol:
                raise RuntimeError(f"async TP float8 {recipe} {kind}: async and sync gradients differ by {diff:.1e} "
                                   f"(relative), above the reordering bound {f8_tol:.1e}")
            sent = per_rank[0][2]  # rank 0's bytes handed in, by kind of collective
            size = lambda b: common.mib(b) if b >= 2**20 else f"{b / 1024:.1f} KiB" if b >= 1024 else f"{b} B"  # noqa: E731
            moved = {n: ", ".join(f"{k} {c} call{'s' * (c > 1)} {size(b)}" for k, (c, b) in sorted(sent[n].items()))
                     for n in sent}
            f8_cells.append([recipe, f"{S} x {D}, {N}", kind, reps, common.ms(t["sync"]), common.ms(t["async"]),
                             common.ratio(t["async"], t["sync"]), moved["sync"], moved["async"], f"{diff:.1e}"])
            async_cells.append(f"{kind} {common.ms(t['async'])}")
            sync_cells.append(f"{kind} {common.ms(t['sync'])}")
            ratios.append(f"{kind} {common.ratio(t['async'], t['sync'])}")
            total = {n: sum(b for _, b in sent[n].values()) for n in sent}
            sent_cells.append(f"{kind} {common.mib(total['async'])} vs {common.mib(total['sync'])}")
        rows.append(common.row("async TP + float8", f"ring op vs its synchronous form, both with a Float8Linear "
                                                    f"({recipe}), 2 ranks, fwd+bwd of one op: {label}, S x D, N = "
                                                    f"{S} x {D}, {N}", "; ".join(async_cells), "; ".join(sync_cells),
                               "; ".join(ratios), "bytes handed in per op, async vs sync: " + "; ".join(sent_cells)
                               + f"; asserted: gradients within {f8_tol:.0e}"))
    nbytes, alone, waited = res[0]["progress"]
    intro = (f"2 ranks, float32, batch 1; 1 warm-up, then interleaved reps (sync, async, comm alone, compute alone); "
             f"time = slowest rank. Gradients of async vs sync asserted within {tol:.1e} (float32 eps x D x 2).")
    lines = [*common.table(["shape", "S x D, N", "op", "reps", "sync", "async", "comm alone", "compute alone",
                           "hidden: sync", "hidden: async", "async / sync", "max rel. diff"], cells),
             f"With Float8Linear weights ({label}; float8 GEMMs are emulated on a CPU, ~6x slower than bf16: "
             "the ops are far more compute-bound here than on a GPU). Sync: the high-precision sequence "
             "all-gather / reduce-scatter around the float8 GEMMs; async: the rings quantize each shard once and "
             "move float8 (tensorwise 1 byte per element, rowwise 2 plus a float32 scale per token; partial sums "
             "stay float32). Bytes: rank 0's per op, handed in to each kind of collective (comm.CommCounter; "
             "all_reduce: float8's amaxes). "
             f"Gradients asserted within {f8_tol:.1e} (float32 eps x max(S, D) x 2).",
             *common.table(["recipe", "S x D, N", "op", "reps", "sync", "async", "async / sync", "sync moves",
                            "async moves", "max rel. diff"], f8_cells),
             f"Progress test (§3.3, rank 0): one ring step of {common.mib(nbytes)} took {alone * 1e3:.1f} ms alone; "
             f"posted, then {max(0.2, 3 * alone) * 1e3:.0f} ms of sleep, its wait() took {waited * 1e3:.2f} ms (~0: "
             "gloo moves the data on its own threads, so a missing overlap means no spare core)."]
    return common.report("async_tp", "Async TP: ring ops vs their synchronous form", intro, [(lines, rows)], cli)


if __name__ == "__main__":
    main()
