"""TP: ours (tensor_parallel.py, sync and async TP) against PyTorch's DTensor TP
(parallelize_module with TorchTitan's Llama plan), on a whole model.

    python bench/tp.py [--quick] [--ranks 2 4] [--reps 8] [--dim 512] ...

The same Llama, weights and tokens (the same on every TP rank); sequence parallel and
loss parallel for all three; float32; AdamW, clipping at 1.0, each its own way (ours:
the SP norm-gradient all-reduce and train.clip_grad_norm; DTensor: F.cross_entropy
under loss_parallel(), then get_total_norm + full_tensor + clip_grads_with_norm_, as
TorchTitan does); gloo, 1 thread per rank. Checked first: the first 3 losses of DTensor
and of ours async equal ours sync within float32's reordering bound, else it raises.
Then interleaved steps (ours sync, DTensor, ours async, ...), a barrier before each; a
step's time is its slowest rank's. Bytes of one step per kind (comm.CommCounter, for
all three alike: DTensor's functional collectives too), and what a ring puts on the
wire against tensor_parallel.py's formula. The ring ops alone: bench/async_tp.py.
"""

import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702

import argparse
import time

import torch
import torch.distributed as dist

import config
import llama
import comm
import tensor_parallel
import train
from bench import common

IMPLS = ("ours sync", "DTensor", "ours async")
QUICK = dict(ranks=[2], reps=2, dim=64, layers=1, seq=32)


def dtensor_tp(model: llama.Transformer, mesh) -> None:
    """TorchTitan's Llama TP plan (sequence parallel, loss parallel) with DTensor. Our
    Attention.forward takes (x, cos, sin), computed by the Transformer: two None layouts."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)
    parallelize_module(model, mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    })
    for block in model.layers.values():
        parallelize_module(block, mesh, {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        })


def setup(impl: str, args: llama.ModelArgs, state: dict, world: int):
    model = llama.build_model(args, "cpu")
    model.load_state_dict(state)
    if impl == "DTensor":
        from torch.distributed.device_mesh import init_device_mesh
        dtensor_tp(model, init_device_mesh("cpu", (world,)))
    else:
        tensor_parallel.apply_tp(model, dist.group.WORLD, sequence_parallel=True, loss_parallel=True,
                                 async_tp=impl == "ours async")
    return model, train.build_optimizer(model, config.TrainingConfig(lr=1e-3))


def step(impl: str, model, optimizer, tokens: torch.Tensor) -> float:
    """One optimizer step, each system its own way; returns the loss."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel
    params = list(model.parameters())
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    if impl == "DTensor":
        with loss_parallel():
            loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), labels.flatten(),
                                                     reduction="sum") / labels.numel()
            loss.backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm.full_tensor() if isinstance(norm, DTensor) else norm,
                                             foreach=True)
        loss = loss.full_tensor()
    else:
        loss = train.loss_fn(model(inputs), labels, labels.numel(), dist.group.WORLD)
        loss.backward()
        tensor_parallel.reduce_sequence_parallel_grads(params, dist.group.WORLD)
        train.clip_grad_norm(params, 1.0, tp_group=dist.group.WORLD)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def rank_main(rank: int, world: int, cfg: dict) -> dict:
    """One rank: the three from the same weights; 3 checked steps; interleaved timed
    steps; the collectives of one more step each."""
    args = llama.model_args("debug", dim=cfg["dim"], n_layers=cfg["layers"])
    full = llama.build_model(args, "cpu")
    llama.init_weights(full, args, seed=0)
    impls = {name: setup(name, args, full.state_dict(), world) for name in IMPLS}
    tokens = torch.randint(0, args.vocab_size, (cfg["batch"], cfg["seq"] + 1),
                           generator=torch.Generator().manual_seed(1000))  # TP ranks share the batch
    out = {"losses": {n: [step(n, *impls[n], tokens) for _ in range(3)] for n in IMPLS},
           "times": {n: [] for n in IMPLS}, "comm": {}}
    for _ in range(cfg["reps"]):
        for name, (model, opt) in impls.items():
            dist.barrier()
            start = time.perf_counter()
            step(name, model, opt, tokens)
            out["times"][name].append(time.perf_counter() - start)
    for name, (model, opt) in impls.items():
        dist.barrier()
        with comm.CommCounter() as seen:
            step(name, model, opt, tokens)
        out["comm"][name] = common.by_kind(seen)
    return out


def formula(args: llama.ModelArgs, W: int, batch: int, seq: int) -> tuple[float, str]:
    """Ring-sent bytes per rank and step of tensor_parallel.py's docstring (SP + loss
    parallel, float32): 8 (t-1)/t A a per block, the embedding and the output one
    collective of A a each way; loss parallel all-reduces 3 floats per token; the SP
    norm gradients one all-reduce; clipping one float64."""
    a, L, N, f = 4, args.n_layers, batch * seq, (W - 1) / W
    A = N * args.dim
    acts, loss, norms, clip = (8 * L + 4) * f * A * a, 2 * f * 3 * N * a, 2 * f * (2 * L + 1) * args.dim * a, 2 * f * 8
    total = acts + loss + norms + clip
    return total, (f"(8L+4)(t-1)/t A a {common.mib(acts)} + loss parallel 2(t-1)/t 3N a {common.mib(loss)} + SP norm "
                   f"grads 2(t-1)/t (2L+1) D a {common.mib(norms)} + clip 16 (t-1)/t = {common.mib(total)} "
                   f"(A = B S D = {A:,})")


def summary(tally: dict, W: int) -> tuple[str, float]:
    """'all_gather x MiB (n) / ...' of the bytes handed in, and the ring-sent total."""
    text = " / ".join(f"{k} {common.mib(b)} ({c})" for k, (c, b) in sorted(tally.items()))
    return text, sum(b * comm.RING[k](W) for k, (_, b) in tally.items())


def compare(W: int, args: llama.ModelArgs, cli: argparse.Namespace) -> tuple[list[str], list[dict]]:
    cfg = dict(dim=cli.dim, layers=cli.layers, batch=cli.batch, seq=cli.seq, reps=cli.reps)
    res = common.run_on_ranks(rank_main, W, cfg, timeout=3600, pg_timeout_s=600)
    tol = common.parity_tol(torch.float32, args.ffn_dim, 3 * args.n_layers)
    rel = {n: common.check_parity(f"TP {W} ranks, {n} vs ours sync: first 3 losses", res[0]["losses"][n],
                                  res[0]["losses"]["ours sync"], tol) for n in IMPLS[1:]}
    times = {n: common.slowest([r["times"][n] for r in res]) for n in IMPLS}
    sent_formula, text = formula(args, W, cli.batch, cli.seq)
    tallies = {n: summary(res[0]["comm"][n], W) for n in IMPLS}
    where = f"{W} ranks{' (oversubscribed)' if W > os.cpu_count() else ''}"
    lines = [f"### {where}", "",
             f"First 3 losses vs ours sync, max relative difference: DTensor {rel['DTensor']:.1e}, ours async "
             f"{rel['ours async']:.1e} (asserted within {tol:.1e}, float32 eps x ffn_dim x layers x 3 steps). Formula "
             f"(tensor_parallel.py docstring), ring-sent per rank and step: {text}.",
             *common.table(["impl", "step", "vs DTensor", "vs ours sync", "handed in per kind (calls)",
                            "ring-sent (formula)"],
                           [[n, common.ms(times[n]), common.ratio(times[n], times["DTensor"]) if n != "DTensor" else "",
                             common.ratio(times[n], times["ours sync"]) if n != "ours sync" else "", tallies[n][0],
                             f"{common.mib(tallies[n][1])} ({common.mib(sent_formula)})"] for n in IMPLS])]
    rows = [common.row("TP", f"ours (sync) vs DTensor TP, {where}: step time", common.ms(times["ours sync"]),
                       common.ms(times["DTensor"]), common.ratio(times["ours sync"], times["DTensor"]),
                       f"asserted: first 3 losses within {rel['DTensor']:.0e} (bound {tol:.0e})"),
            common.row("TP", f"{where}: bytes a ring sends per rank and step vs the tensor_parallel.py formula "
                             f"({common.mib(sent_formula)})", common.mib(tallies["ours sync"][1]),
                       common.mib(tallies["DTensor"][1]), f"ours {tallies['ours sync'][1] / sent_formula:.3f}x, DTensor "
                       f"{tallies['DTensor'][1] / sent_formula:.3f}x the formula",
                       f"ours {tallies['ours sync'][0]}; DTensor {tallies['DTensor'][0]}"),
            common.row("async TP", f"ours async vs ours sync TP, {where}: whole-model step time",
                       common.ms(times["ours async"]), common.ms(times["ours sync"]),
                       common.ratio(times["ours async"], times["ours sync"]),
                       f"asserted: first 3 losses within {rel['ours async']:.0e}; bytes "
                       f"{tallies['ours async'][1] / sent_formula:.3f}x the formula")]
    return lines, rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--reps", type=int, default=8, help="timed interleaved steps per implementation")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    cli = common.parse(parser, argv, QUICK)
    args = llama.model_args("debug", dim=cli.dim, n_layers=cli.layers)
    intro = (f"Llama debug dim {cli.dim}, {cli.layers} layers, {args.n_heads} heads ({args.kv_heads} KV), FFN "
             f"{args.ffn_dim}, vocab {args.vocab_size}, {llama.num_params(args) / 1e6:.2f}M parameters; batch "
             f"{cli.batch} x {cli.seq}; SP + loss parallel; float32; AdamW, clip 1.0; gloo, 1 thread per rank; 3 "
             f"checked steps, then {cli.reps} interleaved reps; a step = its slowest rank. Bytes: comm.CommCounter.")
    return common.report("tp", "TP: ours (tensor_parallel.py) vs DTensor TP", intro,
                         (compare(W, args, cli) for W in cli.ranks), cli)


if __name__ == "__main__":
    main()
