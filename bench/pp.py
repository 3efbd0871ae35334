"""PP: ours (pipeline.py) against torch.distributed.pipelining, schedule by schedule.

    python bench/pp.py [--quick] [--ranks 2] [--micro 4 8] [--schedules zbv ...] [--reps 6] [--dim 256] ...

The same stage modules (pipeline.build_stages: the same weights), the same batch,
float32, gloo, 1 thread per rank. Both: loss per micro-batch = token CE sum / global
tokens, gradients summed (torch: scale_grads=False). A step = forward + backward of m
micro-batches (no optimizer), gradients set to None in between. Checked first: one
step each from zero gradients; the losses and every gradient agree within float32's
reordering bound on every rank, else it raises. Then interleaved reps (ours, torch,
...), a barrier before each; a step's time is its slowest rank's. The measured bubble:
a few more steps of each under the profiler, idle = 1 - busy / wall per rank, busy =
the time of the rank's outermost ops (forward, loss, autograd backward, our W GEMMs)
outside communication, looking through torch's per-action annotations: the same
yardstick for both, nothing patched. Python between the ops counts as idle, so at
small sizes (--quick) both idle fractions are inflated. Against the
closed form of pipeline.py's docstring and its unit-cost replay (pipeline.simulate).
"""

import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import llama
import pipeline
import train
from bench import common

# (label, our schedule, torch.distributed.pipelining schedule, stages per rank). torch's
# interleaved zero bubble (ZB1P) with one stage per rank is ZB-H1, as ours. ZB-V places its
# two stages per rank in a V (pipeline.stage_rank), as torch's ScheduleZBVZeroBubble does.
SCHEDULES = (("GPipe", "gpipe", "ScheduleGPipe", 1), ("1F1B", "1f1b", "Schedule1F1B", 1),
             ("interleaved 1F1B (v=2)", "interleaved_1f1b", "ScheduleInterleaved1F1B", 2),
             ("zero bubble (ZB-H1)", "zero_bubble", "ScheduleInterleavedZeroBubble", 1),
             ("zero bubble V (ZB-V, v=2)", "zbv", "ScheduleZBVZeroBubble", 2))
QUICK = dict(micro=[2], reps=2, warmup=0, profiled=1, dim=64, layers=4, seq=32)
COMM = ("gloo", "c10d", "record_param_comms")  # profiler events that are communication, not work


class PeerStage(torch.nn.Module):
    """torch's PipelineStage calls submod(x): positions default to 0..S-1."""

    def __init__(self, stage: torch.nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x)


def busy_fraction(fn) -> float:
    """Run fn() under the profiler: the share of its wall time in the outermost ops it
    runs that are not communication. Annotations (record_function spans, as torch's
    schedules wrap each action, waits included) are looked through, not counted."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("pp step"):
            fn()

    def busy(event) -> float:
        if event.is_user_annotation:
            return sum(busy(e) for e in event.cpu_children)
        return 0.0 if event.name.startswith(COMM) else event.time_range.elapsed_us()
    step = next(e for e in prof.events() if e.name == "pp step")
    return busy(step) / step.time_range.elapsed_us()


def pair(full, rank: int, world: int, cfg: dict, ours_name: str, peer_name: str, v: int, m: int):
    """(ours, torch, parameters): step functions of both on the same stage modules."""
    from torch.distributed import pipelining
    n, device, B, S = world * v, torch.device("cpu"), cfg["batch"], cfg["seq"]
    stages = pipeline.build_stages(full, rank, world, v, None, ours_name)  # the schedule's placement
    tokens = torch.randint(0, full.args.vocab_size, (m * B, S + 1), generator=torch.Generator().manual_seed(1234))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def loss_fn(logits, labels):
        return train.loss_fn(logits, labels, y.numel())
    runner = pipeline.PipelineRunner(pipeline.build_schedule(ours_name, world, m, v)[rank], stages, n,
                                     dist.group.WORLD, loss_fn, (B, S, full.args.dim), torch.float32, device)
    peer_stages = [pipelining.PipelineStage(PeerStage(stages[s]), s, n, device, group=dist.group.WORLD)
                   for s in sorted(stages)]
    cls = getattr(pipelining, peer_name)
    multi = issubclass(cls, pipelining.schedules.PipelineScheduleMulti)
    schedule = cls(peer_stages if multi else peer_stages[0], n_microbatches=m, loss_fn=loss_fn, scale_grads=False)
    first, last = 0 in stages, n - 1 in stages

    def ours() -> float:
        return float(runner.step(list(x.chunk(m)), list(y.chunk(m))))

    def peer() -> float:
        losses = []
        schedule.step(*((x,) if first else ()), target=y if last else None, losses=losses, return_outputs=False)
        return float(sum(loss.detach().double() for loss in losses)) if last else 0.0
    return ours, peer, [p for st in stages.values() for p in st.parameters()]


def rank_main(rank: int, world: int, cfg: dict) -> dict:
    """For every (schedule, m): the parity check, interleaved timed steps, profiled steps."""
    args = llama.model_args("debug", dim=cfg["dim"], n_layers=cfg["layers"])
    full = llama.build_model(args, "cpu")
    llama.init_weights(full, args, seed=0)
    out = {}
    for label, ours_name, peer_name, v in SCHEDULES:
        for m in cfg["micro"] if cfg["layers"] >= world * v and ours_name in cfg["schedules"] else []:
            ours, peer, params = pair(full, rank, world, cfg, ours_name, peer_name, v, m)
            impls = {"ours": ours, "torch": peer}

            def run(fn):
                for p in params:
                    p.grad = None
                dist.barrier()
                return fn()
            check = {name: (run(fn), [p.grad.clone() for p in params]) for name, fn in impls.items()}
            out[label, m] = {"loss": (check["ours"][0], check["torch"][0]), "grads": max(
                ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                for a, b in zip(check["ours"][1], check["torch"][1])), "times": {n: [] for n in impls},
                "busy": {n: [] for n in impls}, "peer": peer_name, "ours": ours_name, "v": v}
            for _ in range(cfg["warmup"]):
                for fn in impls.values():
                    run(fn)
            for _ in range(cfg["reps"]):
                for name, fn in impls.items():
                    start = time.perf_counter()
                    run(fn)
                    out[label, m]["times"][name].append(time.perf_counter() - start)
            for _ in range(cfg["profiled"]):
                for name, fn in impls.items():
                    out[label, m]["busy"][name].append(busy_fraction(lambda: run(fn)))
    return out


def formula(name: str, p: int, m: int, v: int) -> str:
    """The bubble of pipeline.py's docstring, and per rank the unit-cost replay of our
    table (pipeline.simulate: F 1, B 2, I = W = 1, free communication)."""
    closed = (p - 1) / (3 * m + p - 1) if name == "zero_bubble" else (p - 1) / (v * m + p - 1)
    if name == "zbv":  # max(p-1, 2(2p-1-m)) units of one stage's F, of 6m + that
        idle = max(p - 1, 2 * (2 * p - 1 - m))
        closed = idle / (6 * m + idle)
    sim = pipeline.simulate(pipeline.build_schedule(name, p, m, v), p * v)
    return f"{100 * closed:.0f}% (sim " + " / ".join(f"{100 * i / sim['makespan']:.0f}%" for i in sim["idle"]) + ")"


def compare(W: int, cli: argparse.Namespace) -> tuple[list[str], list[dict]]:
    cfg = dict(dim=cli.dim, layers=cli.layers, batch=cli.batch, seq=cli.seq, micro=cli.micro, reps=cli.reps,
               warmup=cli.warmup, profiled=cli.profiled, schedules=cli.schedules)
    res = common.run_on_ranks(rank_main, W, cfg, timeout=3600, pg_timeout_s=600)
    args = llama.model_args("debug", dim=cli.dim, n_layers=cli.layers)
    tol = common.parity_tol(torch.float32, args.ffn_dim, args.n_layers)
    cells, rows, per_schedule = [], [], {}
    for key in res[0]:
        label, m = key
        r0 = res[0][key]
        losses = [r[key]["loss"] for r in res if r[key]["loss"][1] != 0.0]  # the last stage's rank
        loss = common.check_parity(f"PP {label} m={m}: step loss", [a for a, _ in losses], [b for _, b in losses], tol)
        grads = max(r[key]["grads"] for r in res)
        if not grads <= tol:
            raise RuntimeError(f"PP {label} m={m}: ours and torch gradients differ by {grads:.1e} (relative), above "
                               f"the reordering bound {tol:.1e}")
        step = {n: common.slowest([r[key]["times"][n] for r in res]) for n in ("ours", "torch")}
        idle = {n: " / ".join(f"{100 * (1 - statistics.median(r[key]['busy'][n])):.0f}%" for r in res)
                for n in ("ours", "torch")}
        closed = formula(r0["ours"], W, m, r0["v"])
        for n in ("ours", "torch"):
            cells.append([label, m, n if n == "ours" else f"torch {r0['peer']}", common.ms(step[n]),
                          common.ratio(step["ours"], step["torch"]) if n == "ours" else "", idle[n], closed])
        per_schedule.setdefault(label, []).append(
            (m, step, f"m={m}: loss {loss:.0e}, grads {grads:.0e}; idle ours {idle['ours']}, torch {idle['torch']}, "
                      f"formula {closed}", r0["peer"]))
    for label, per_m in per_schedule.items():
        rows.append(common.row("PP", f"ours vs torch {per_m[0][3]}, {label}, {W} ranks: step time (fwd+bwd of m "
                                     f"micro-batches)", "; ".join(f"m={m}: {common.ms(s['ours'])}" for m, s, _, _ in per_m),
                               "; ".join(f"m={m}: {common.ms(s['torch'])}" for m, s, _, _ in per_m),
                               "; ".join(f"m={m}: {common.ratio(s['ours'], s['torch'])}" for m, s, _, _ in per_m),
                               f"asserted within {tol:.0e}: " + "; ".join(c for _, _, c, _ in per_m)))
    splits = "; ".join(f"v={v}: {[len(x) for x in pipeline.split_layers(cli.layers, W * v)]}" for v in (1, 2)
                       if W * v <= cli.layers)
    lines = [f"### {W} ranks", "", f"Layers per stage {splits} (embedding on the first, norm + output + loss on the "
             f"last). Losses and every gradient of one step asserted equal within {tol:.1e} (float32 eps x ffn_dim x "
             f"layers). Idle per rank = 1 - busy / wall over {cli.profiled} profiled step(s), median.",
             *common.table(["schedule", "m", "impl", "step", "ours / torch", "idle per rank, measured",
                            "idle: formula (unit-cost sim per rank)"], cells)]
    return lines, rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2], help="pipeline ranks (4 oversubscribes 2 cores)")
    parser.add_argument("--schedules", nargs="+", default=[s[1] for s in SCHEDULES], choices=[s[1] for s in SCHEDULES],
                        help="which of ours to run against torch's (default all)")
    parser.add_argument("--micro", type=int, nargs="+", default=[4, 8], help="micro-batches per step (m)")
    parser.add_argument("--reps", type=int, default=6, help="timed interleaved steps per implementation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps each after the checked one")
    parser.add_argument("--profiled", type=int, default=2, help="profiled steps each, for the measured bubble")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=7, help="7 balances the stages at dim 256 (the output ~ 1.2 "
                                                              "layers): v=1 4+3 layers, v=2 2+2+2+1")
    parser.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--seq", type=int, default=256)
    cli = common.parse(parser, argv, QUICK)
    args = llama.model_args("debug", dim=cli.dim, n_layers=cli.layers)
    intro = (f"Llama debug dim {cli.dim}, {cli.layers} layers, {llama.num_params(args) / 1e6:.2f}M parameters; "
             f"micro-batches of {cli.batch} x {cli.seq} tokens; float32; gloo, 1 thread per rank; step = forward + "
             f"backward of m micro-batches (no optimizer); 1 checked + {cli.warmup} warm-up steps each, then "
             f"{cli.reps} interleaved reps, a barrier before each; step time = slowest rank.")
    return common.report("pp", "PP: ours (pipeline.py) vs torch.distributed.pipelining", intro,
                         (compare(W, cli) for W in cli.ranks), cli)


if __name__ == "__main__":
    main()
