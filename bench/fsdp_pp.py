"""FSDP under PP: a stage gathered once per step against gathered for every micro-batch.

    python bench/fsdp_pp.py [--quick] [--rounds 3] [--steps 4] [--micro 4] [--dim 256] [--layers 8]

PP 2 x FSDP 2 on 4 gloo ranks, float32, the debug model on the builtin corpus, trained
by train.main (the real step: schedule, FSDP hooks, optimizer) with
parallel.fsdp_pp_gather_once true (the default: each stage's units stay gathered from
their first forward to their last backward, fsdp.set_reshard_after_backward) and false
(every block gathered again for each micro-batch's forward and backward). Interleaved
rounds (once, per micro-batch, once, ...), the same steps each; a step's time is the
interval between train.py's log lines (every step logged) on the slowest rank, the
first step of each run left out (start-up). Bytes and calls per step: comm.CommCounter
over one run of each, divided by its steps, on rank 0 (a first-stage rank; the other
stage's are alike). Memory: what the planner says each way holds of gathered
parameters (its FSDP line; the tests check its counts against real steps). The losses
of the two ways must agree within float32's reordering bound, else it raises.
"""

import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702

import argparse
import tempfile

import comm
import config
import planner
import train
from bench import common

QUICK = dict(rounds=1, steps=2, micro=2, dim=64, layers=2, seq=32)
WAYS = (("gathered once per step", "true"), ("gathered per micro-batch", "false"))


def argv_for(args: argparse.Namespace, run_dir: str, once: str) -> list[str]:
    return ["--config", os.path.join(common.ROOT, "configs/debug.yaml"), f"run.dir={run_dir}", "run.overwrite=true",
            f"model.dim={args.dim}", f"model.n_layers={args.layers}", f"data.seq_len={args.seq}",
            f"training.steps={args.steps}", "training.warmup_steps=1", "training.dtype=float32",
            "training.batch_size=8", "training.micro_batch_size=4", "parallel.pp=2", "parallel.dp_shard=2",
            f"parallel.pp_microbatches={args.micro}", f"parallel.fsdp_pp_gather_once={once}",
            "run.log_every=1", "run.eval_every=0", "run.peak_flops=1e12",
            f"data.cache_dir={os.path.join(common.ROOT, '.cache/data')}"]


def rank_run(rank: int, world: int, runs: list[list[str]]) -> list[tuple[list[float], list[float], dict]]:
    """Each argv through train.main on this rank: (step times after the first, losses,
    the comm tally of the run per step)."""
    out = []
    for argv in runs:
        with comm.CommCounter() as seen:
            history = train.main(argv)
        elapsed = [r["elapsed_s"] for r in history]
        steps = len(history)
        tally = {kind: (calls / steps, nbytes / steps) for kind, (calls, nbytes) in common.by_kind(seen).items()}
        out.append(([b - a for a, b in zip(elapsed[1:], elapsed[2:])] or [elapsed[-1]],
                    [r["loss"] for r in history], tally))
    return out


def held_gib(argv: list[str]) -> float:
    """The planner's gathered parameters held per rank (rank 0), in GiB."""
    report = planner.plan_rank(config.load_config(argv[1], argv[2:]), 4, 0)
    return sum(h["kept"] + h["running"] for h in report.fsdp_held.values()) / 2**30


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is not timed)")
    parser.add_argument("--micro", type=int, default=4, help="pipeline micro-batches")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    args = common.parse(parser, argv, QUICK)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [argv_for(args, os.path.join(tmp, f"{once}-{r}"), once) for r in range(args.rounds) for _, once in WAYS]
        per_rank = common.run_on_ranks(rank_run, 4, runs, timeout=3600)
    times = {once: [] for _, once in WAYS}
    for i, (_, once) in enumerate(WAYS * args.rounds):
        times[once] += common.slowest([per_rank[r][i][0] for r in range(4)])
    losses = {once: per_rank[3][i][1] for i, (_, once) in enumerate(WAYS)}  # the last stage holds the loss
    tol = common.parity_tol(config.DTYPES["float32"], args.dim * 4, args.layers * args.steps)
    rel = common.check_parity("gathered once vs per micro-batch", losses["true"], losses["false"], tol)
    rows = []
    for (label, once), i in zip(WAYS, range(2)):
        tally = per_rank[0][i][2]
        ag_calls, ag_bytes = tally.get("all_gather", (0, 0))
        rows.append([label, common.ms(times[once]), f"{ag_calls:.0f}", common.mib(ag_bytes),
                     f"{held_gib(runs[i]) * 1024:.2f} MiB"])
    result = common.ratio(times["true"], times["false"])
    intro = (f"PP 2 x FSDP 2 (4 ranks), model dim {args.dim}, {args.layers} layers, seq {args.seq}, "
             f"{args.micro} micro-batches, {args.steps} steps per run, {args.rounds} rounds; losses agree to "
             f"{rel:.1e} (bound {tol:.1e}). All-gathers: calls and bytes handed in per step on rank 0; held: the "
             f"planner's gathered parameters per rank (kept from forward to backward + a running block's).")
    lines = common.table(["FSDP under PP", "step", "all-gathers / step", "all-gather bytes / step", "held"], rows)
    lines += [f"Gathered once / per micro-batch: step time {result}."]
    command = " ".join(["python", "bench/fsdp_pp.py", *args.argv])
    common.write(os.path.join(common.out_dir(args), "fsdp_pp.md"), "FSDP x PP: gather once per step", [intro, *lines],
                 command, args.quick)
    return [common.row("FSDP x PP", "gathered once per step vs per micro-batch", rows[0][1], rows[1][1], result,
                       f"losses asserted equal ({rel:.0e}); all-gathers {rows[0][2]} vs {rows[1][2]} per step, "
                       f"held {rows[0][4]} vs {rows[1][4]}")]


if __name__ == "__main__":
    main()
