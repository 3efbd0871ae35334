"""FSDP: ours (fsdp.py) against PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard).

    python bench/fsdp.py [--quick] [--ranks 2 4] [--rounds 5] [--dim 256] ...

The same Llama, the same global weights and per-rank data; one unit per block plus the
root (blocks reshard after forward, the root does not); float32 weights, compute and
SUM gradient reductions for both (gloo has no AVG; FSDP2 set to sum, no 1/W); AdamW
and gradient clipping at 1.0; gloo, 1 thread per rank. Checked first: the losses and
gradient norms of the first 3 steps agree within float32's reordering bound, else it
raises. Then interleaved rounds (ours, FSDP2, ...) of `steps` steps each; a round's
time is its slowest rank's mean step. Per rank and step: the bytes handed to each
collective (comm.CommCounter) and what a ring puts on the wire, against fsdp.py's
formula; the peak bytes of a step (all the CPU allocator holds for the system since it
was built, at its peak during the step: what it keeps between steps counts too) and the
steady state of shards + gradients + AdamW state, against the unsharded 16 Psi.
"""

import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702

import argparse
import math
import time

import torch
import torch.distributed as dist

import fsdp
import llama
import comm
import train
from bench import common

IMPLS = ("ours", "FSDP2")
QUICK = dict(ranks=[2], rounds=2, steps=1, dim=64, layers=1, batch=1, seq=32)


def setup(impl: str, args: llama.ModelArgs, state: dict, world: int):
    """The same global weights sharded by ours or by FSDP2 over all ranks; AdamW."""
    model = llama.build_model(args, "cpu")
    model.load_state_dict(state)
    if impl == "ours":
        fsdp.apply_fsdp(model, list(model.layers.values()), dist.group.WORLD)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for block in model.layers.values():
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
        for m in model.modules():
            if isinstance(m, FSDPModule):  # SUM, as ours: no 1/W (gloo has no AVG / PREMUL_SUM)
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)
    optimizer = train.build_optimizer(model, train.config.TrainingConfig(lr=1e-3))
    if impl == "ours":
        fsdp.check_optimizer(optimizer)
    return model, optimizer


class _LocalGrad:
    """train.clip_grad_norm reads p.grad: hand it a DTensor gradient's local shard (a
    view, so the in-place scaling reaches the DTensor)."""

    def __init__(self, p):
        self.grad = None if p.grad is None else getattr(p.grad, "_local_tensor", p.grad)


def step(model, optimizer, micro: list[torch.Tensor], global_tokens: int) -> tuple[float, float]:
    """One optimizer step over the micro-batches: (this rank's loss, global grad norm)."""
    loss_sum = 0.0
    for tokens in micro:
        loss = train.loss_fn(model(tokens[:, :-1]), tokens[:, 1:], global_tokens)
        loss.backward()
        loss_sum += loss.item()
    norm = train.clip_grad_norm([_LocalGrad(p) for p in model.parameters()], 1.0, dist.group.WORLD)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, norm.item()


def shared_weights(args: llama.ModelArgs) -> dict:
    full = llama.build_model(args, "cpu")
    llama.init_weights(full, args, seed=0)
    return full.state_dict()


def rank_main(rank: int, world: int, cfg: dict) -> dict:
    """One rank: both systems from the same weights; first 3 steps (the parity check);
    interleaved rounds; then bytes and memory of one more step each."""
    args = llama.model_args("debug", dim=cfg["dim"], n_layers=cfg["layers"])
    state = shared_weights(args)
    impls = {name: setup(name, args, state, world) for name in IMPLS}
    gen = torch.Generator().manual_seed(1000 + rank)  # this rank's data, the same for both
    micro = [torch.randint(0, args.vocab_size, (cfg["batch"], cfg["seq"] + 1), generator=gen)
             for _ in range(cfg["micro"])]
    tokens = world * cfg["micro"] * cfg["batch"] * cfg["seq"]
    out = {"first": {n: [step(*impls[n], micro, tokens) for _ in range(3)] for n in IMPLS},
           "times": {n: [] for n in IMPLS}, "comm": {}, "peak": {}, "state": {}}
    for _ in range(cfg["rounds"]):
        for name, (model, opt) in impls.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(cfg["steps"]):
                step(model, opt, micro, tokens)
            out["times"][name].append((time.perf_counter() - start) / cfg["steps"])
    del impls
    for name in IMPLS:  # built again under the profiler, so what each holds between steps counts
        dist.barrier()
        out["peak"][name] = common.peak_bytes(lambda: measured(name, args, state, world, micro, tokens, out),
                                              "measured step")
    return out


def measured(name: str, args: llama.ModelArgs, state: dict, world: int, micro: list[torch.Tensor], tokens: int,
             out: dict) -> None:
    """Build, one step (AdamW state exists from here on), then the measured step with
    its collectives counted."""
    model, opt = setup(name, args, state, world)
    step(model, opt, micro, tokens)
    with torch.profiler.record_function("measured step"), comm.CommCounter() as seen:
        step(model, opt, micro, tokens)
    out["comm"][name] = common.by_kind(seen)
    # shards + as many bytes of gradients + AdamW state
    out["state"][name] = common.held_bytes(common.state_tensors(model, opt)) + common.held_bytes(model.parameters())


def formula(args: llama.ModelArgs, W: int, micro: int) -> tuple[float, str]:
    """Ring-sent bytes per rank and step of fsdp.py's docstring: all-gather (W-1)/W
    (P + P_r) b, reduce-scatter (W-1)/W P b per micro-batch; P padded parameters, P_r
    those of the units that reshard after forward (they are gathered again for backward)."""
    P = P_r = 0
    for name, p in llama.build_model(args, "meta").named_parameters():
        padded = math.ceil(p.shape[0] / W) * W * math.prod(p.shape[1:])
        P, P_r = P + padded, P_r + (padded if name.startswith("layers.") else 0)
    sent = (W - 1) / W * (2 * P + P_r) * 4 * micro
    return sent, f"(W-1)/W (2P + P_r) 4 B x {micro} = {common.mib(sent)} (P {P:,}, P_r {P_r:,})"


def handed(tally: dict, W: int) -> tuple[str, float]:
    """'AG x / RS y / AR z (calls)' of the bytes handed in, and the ring-sent total."""
    text = " / ".join(f"{k} {common.mib(tally.get(k, (0, 0))[1])} ({tally.get(k, (0, 0))[0]})"
                      for k in ("all_gather", "reduce_scatter", "all_reduce"))
    return text, sum(b * comm.RING[k](W) for k, (_, b) in tally.items())


def compare(W: int, args: llama.ModelArgs, cli: argparse.Namespace) -> tuple[list[str], list[dict]]:
    cfg = dict(dim=cli.dim, layers=cli.layers, batch=cli.batch, seq=cli.seq, micro=cli.micro, steps=cli.steps,
               rounds=cli.rounds)
    res = common.run_on_ranks(rank_main, W, cfg, timeout=3600, pg_timeout_s=600)
    tol = common.parity_tol(torch.float32, args.ffn_dim, 3 * args.n_layers)
    loss = common.check_parity(f"FSDP {W} ranks, first 3 losses", *(
        [s[0] for r in res for s in r["first"][n]] for n in IMPLS), tol)
    norm = common.check_parity(f"FSDP {W} ranks, first 3 grad norms", *(
        [s[1] for r in res for s in r["first"][n]] for n in IMPLS), tol)
    times = {n: common.slowest([r["times"][n] for r in res]) for n in IMPLS}
    peak = {n: max(r["peak"][n] for r in res) for n in IMPLS}
    state = {n: max(r["state"][n] for r in res) for n in IMPLS}
    sent_formula, text = formula(args, W, cli.micro)
    tallies = {n: handed(res[0]["comm"][n], W) for n in IMPLS}
    psi16 = 16 * llama.num_params(args)
    where = f"{W} ranks{' (oversubscribed)' if W > os.cpu_count() else ''}"
    lines = [f"### {where}", "",
             f"First 3 steps, ours vs FSDP2, max relative difference: loss {loss:.1e}, grad norm {norm:.1e} "
             f"(bound {tol:.1e}: float32 eps x ffn_dim x layers x 3 steps). Formula (fsdp.py docstring), ring-sent per "
             f"rank and step: {text}. Unsharded float32 AdamW state 16 Psi = {common.mib(psi16)}.",
             *common.table(["impl", "step", "ours / FSDP2", "peak bytes in a step", "shards + grads + AdamW",
                            "handed in: AG / RS / AR (calls)", "ring-sent (formula)"],
                           [[n, common.ms(times[n]), common.ratio(times[n], times["FSDP2"]) if n == "ours" else "",
                             f"{common.mib(peak[n])} ({peak[n] / peak['FSDP2']:.2f}x FSDP2's)", common.mib(state[n]),
                             tallies[n][0], f"{common.mib(tallies[n][1])} ({common.mib(sent_formula)})"] for n in IMPLS])]
    rows = [common.row("FSDP", f"ours vs FSDP2 (fully_shard), {where}: step time", common.ms(times["ours"]),
                       common.ms(times["FSDP2"]), common.ratio(times["ours"], times["FSDP2"]),
                       f"asserted: first 3 losses within {loss:.0e}, grad norms {norm:.0e} (bound {tol:.0e})"),
            common.row("FSDP", f"{where}: bytes a ring sends per rank and step vs the fsdp.py formula "
                               f"({common.mib(sent_formula)})", common.mib(tallies["ours"][1]),
                       common.mib(tallies["FSDP2"][1]), f"ours {tallies['ours'][1] / sent_formula:.3f}x, FSDP2 "
                       f"{tallies['FSDP2'][1] / sent_formula:.3f}x the formula", f"ours {tallies['ours'][0]}"),
            common.row("FSDP", f"{where}: peak bytes per rank in a step (CPU allocator, since built)",
                       common.mib(peak["ours"]), common.mib(peak["FSDP2"]), f"{peak['ours'] / peak['FSDP2']:.2f}x",
                       f"shards + grads + AdamW {common.mib(state['ours'])} = {state['ours'] / psi16:.3f} x "
                       f"16 Psi (1/W = {1 / W:.3f})")]
    return lines, rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per implementation")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch per rank")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro", type=int, default=1, help="micro-batches per step")
    cli = common.parse(parser, argv, QUICK)
    args = llama.model_args("debug", dim=cli.dim, n_layers=cli.layers)
    intro = (f"Llama debug dim {cli.dim}, {cli.layers} layers, {llama.num_params(args) / 1e6:.2f}M parameters; "
             f"{cli.micro} micro-batch(es) of {cli.batch} x {cli.seq} tokens per rank; float32; AdamW, clip 1.0; "
             f"gloo, 1 thread per rank; 3 checked steps, then {cli.rounds} interleaved rounds of {cli.steps} steps; "
             "a round's time = its slowest rank's mean step. Bytes: comm.CommCounter at the dispatcher.")
    return common.report("fsdp", "FSDP: ours (fsdp.py) vs FSDP2 (fully_shard)", intro,
                         (compare(W, args, cli) for W in cli.ranks), cli)


if __name__ == "__main__":
    main()
