"""The planner's step time against real steps on this machine.

    python bench/planner.py [--quick] [--steps 10] [--no-ranking]

For each layout of LAYOUTS (together they use every technique: FSDP, HSDP, sync and async
TP with sequence and loss parallel, ring and all-gather CP, every pipeline schedule,
Float8, full and selective activation checkpointing, bf16), the debug Llama (5M
parameters, 8 x 256 tokens a step, float32 unless said) trains `--steps` steps through
train.main on gloo ranks with the threads the planner assumes (hardware.Hardware.threads),
and its step time (the median gap between logged steps 3 onwards) is set against
`planner.py --hardware measured`'s prediction. Then every layout of 4 and of 8 ranks
that `planner.py --search` would rank (activation checkpointing off) is measured the
same way, and the two orders are compared by Spearman's rank correlation.

The hardware profile is measured first (hardware.measured: GEMMs, a training step,
gloo collectives; cached) on the same quiet machine: a machine shared with other work
during either part moves the figures, which is why the test of the ±25% bound
(tests/test_planner.py) is opt-in (-m slow) and this file records what it saw.
"""

import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702

import argparse
import statistics
import tempfile

import config
import hardware
import planner
import train
from bench import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["training.dtype=float32", "training.batch_size=8", "data.seq_len=256", "run.eval_every=0",
         "run.log_every=1", "training.warmup_steps=0", "run.overwrite=true"]
LAYOUTS = [  # (name, ranks, overrides)
    ("one process", 1, []),
    ("FSDP 2", 2, ["parallel.dp_shard=2", "training.micro_batch_size=4"]),
    ("FSDP 2, bf16", 2, ["parallel.dp_shard=2", "training.micro_batch_size=4", "training.dtype=bfloat16"]),
    ("FSDP 2, float8", 2, ["parallel.dp_shard=2", "training.micro_batch_size=4", "float8.enabled=true",
                           "float8.fsdp_float8_all_gather=true"]),
    ("FSDP 2, AC full", 2, ["parallel.dp_shard=2", "training.micro_batch_size=4", "activation_checkpoint.mode=full"]),
    ("HSDP 2 x 2", 4, ["parallel.dp_replicate=2", "parallel.dp_shard=2", "training.micro_batch_size=2"]),
    ("FSDP 2, AC op", 2, ["parallel.dp_shard=2", "training.micro_batch_size=4", "activation_checkpoint.mode=selective",
                          "activation_checkpoint.selective_option=op"]),
    ("TP 2", 2, ["parallel.tp=2"]),
    ("TP 2 async", 2, ["parallel.tp=2", "parallel.async_tp=true"]),
    ("TP 2 async, AC op", 2, ["parallel.tp=2", "parallel.async_tp=true", "activation_checkpoint.mode=selective",
                              "activation_checkpoint.selective_option=op"]),
    ("FSDP 2 x TP 2", 4, ["parallel.dp_shard=2", "parallel.tp=2", "training.micro_batch_size=4"]),
    ("CP 2 ring", 2, ["parallel.cp=2"]),
    ("CP 2 all-gather", 2, ["parallel.cp=2", "parallel.cp_rotate=allgather"]),
    ("PP 2 GPipe", 2, ["parallel.pp=2", "parallel.pp_schedule=gpipe", "parallel.pp_microbatches=4"]),
    ("PP 2 1F1B", 2, ["parallel.pp=2", "parallel.pp_microbatches=4"]),
    ("PP 2 interleaved", 2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                             "parallel.pp_stages_per_rank=2", "parallel.pp_microbatches=4"]),
    ("PP 2 zero bubble", 2, ["parallel.pp=2", "parallel.pp_schedule=zero_bubble", "parallel.pp_microbatches=4"]),
    ("PP 2 ZB-V", 2, ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_stages_per_rank=2",
                      "parallel.pp_microbatches=4"]),
    ("PP 2 x FSDP 2", 4, ["parallel.pp=2", "parallel.dp_shard=2", "training.micro_batch_size=4",
                          "parallel.pp_microbatches=2"]),
]
QUICK = {"steps": 4}


def techniques(overrides: list[str]) -> set[str]:
    """What a layout of LAYOUTS uses, by its overrides (e.g. {"FSDP", "TP", "async TP"})."""
    o = dict(item.split("=", 1) for item in overrides)
    used = {name for name, on in (
        ("FSDP", o.get("parallel.dp_shard", "1") != "1"), ("HSDP", o.get("parallel.dp_replicate", "1") != "1"),
        ("TP", o.get("parallel.tp", "1") != "1"), ("async TP", o.get("parallel.async_tp") == "true"),
        ("CP ring", o.get("parallel.cp", "1") != "1" and o.get("parallel.cp_rotate", "ring") == "ring"),
        ("CP all-gather", o.get("parallel.cp_rotate") == "allgather"), ("Float8", o.get("float8.enabled") == "true"),
        ("bf16", o.get("training.dtype") == "bfloat16")) if on}
    if o.get("parallel.pp", "1") != "1":
        used.add("PP " + o.get("parallel.pp_schedule", "1f1b"))
    if "activation_checkpoint.mode" in o:
        used.add("AC " + (o.get("activation_checkpoint.selective_option", "full")))
    return used


def argv(run_dir: str, overrides: list[str], steps: int) -> list[str]:
    return ["--config", os.path.join(ROOT, "configs/debug.yaml"), *MODEL, f"training.steps={steps}",
            f"run.dir={run_dir}", *overrides]


def _train(rank: int, world: int, args: list[str]) -> list[float]:
    return [r["elapsed_s"] for r in train.main(args)]


def measure(overrides: list[str], world: int, steps: int, hw) -> float:
    """Median seconds per step of steps 3 onwards (the first two warm up)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = argv(os.path.join(tmp, "run"), overrides, steps)
        if world == 1:
            import torch
            before = torch.get_num_threads()
            torch.set_num_threads(hw.threads(1))
            try:
                elapsed = _train(0, 1, args)
            finally:
                torch.set_num_threads(before)
        else:
            elapsed = common.run_on_ranks(_train, world, args, timeout=900, threads_per_rank=hw.threads(world))[0]
    return statistics.median(b - a for a, b in zip(elapsed[1:], elapsed[2:]))


def predict(overrides: list[str], world: int, hw) -> float:
    cfg = config.load_config(os.path.join(ROOT, "configs/debug.yaml"), MODEL + overrides)
    return planner.step_time(planner.plan_rank(cfg, world), hw)["step_s"]


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for i, j in enumerate(order):
            r[j] = float(i)
        return r
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def validate(hw, steps: int, layouts=LAYOUTS, rounds: int = 2) -> list[dict]:
    """Each layout measured in `rounds` rounds (every layout once per round): its step is
    the least of the rounds' medians, so a burst of other work on the machine during one
    run does not count as the layout's time."""
    times = [[] for _ in layouts]
    for _ in range(rounds):
        for i, (_, world, overrides) in enumerate(layouts):
            times[i].append(measure(overrides, world, steps, hw))
    rows = []
    for (name, world, overrides), got in zip(layouts, times):
        want = predict(overrides, world, hw)
        rows.append({"name": name, "world": world, "measured": min(got), "predicted": want,
                     "error": want / min(got) - 1, "rounds": got})
        print(f"  {name:22s} {world} ranks: measured {min(got) * 1e3:8.1f} ms (rounds "
              f"{', '.join(f'{t * 1e3:.0f}' for t in got)}), predicted {want * 1e3:8.1f} ms, "
              f"error {want / min(got) - 1:+.1%}", flush=True)
    return rows


def ranking(hw, world: int, steps: int) -> tuple[list[dict], float]:
    cfg = planner._planned_dtype(config.load_config(os.path.join(ROOT, "configs/debug.yaml"), MODEL))
    found, _, _ = planner.search(cfg, world, 1e9, hw)
    rows = []
    for f in found:
        if f["ac"] != "none":
            continue
        overrides = [o for o in f["overrides"] if not o.startswith("activation_checkpoint")]
        got = measure(overrides, world, steps, hw)
        rows.append({"name": f["layout"] + (", async TP" if f["async_tp"] else ""), "world": world,
                     "measured": got, "predicted": f["step_s"], "error": f["step_s"] / got - 1})
        print(f"  {rows[-1]['name']:40s} measured {got * 1e3:8.1f} ms, predicted {f['step_s'] * 1e3:8.1f} ms",
              flush=True)
    return rows, spearman([r["predicted"] for r in rows], [r["measured"] for r in rows])


def main(argv_: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-ranking", action="store_true", help="skip the 4- and 8-rank ranking")
    parser.add_argument("--recalibrate", action="store_true", help="measure the hardware profile again first")
    args = common.parse(parser, argv_, QUICK)
    hw = hardware.measured(remeasure=args.recalibrate)
    layouts = LAYOUTS[:3] if args.quick else LAYOUTS
    print(f"step time: {len(layouts)} layouts, {args.steps} steps each", flush=True)
    rows = validate(hw, args.steps, layouts)
    worst = max(rows, key=lambda r: abs(r["error"]))
    within = sum(abs(r["error"]) <= 0.25 for r in rows)
    covered = set().union(*(techniques(o) for (_, _, o), r in zip(layouts, rows) if abs(r["error"]) <= 0.25))
    parts = [([
        "## Step time, predicted against measured", "",
        f"{hw.source}. Each layout trains the debug model {args.steps} steps (median step from step 3), in 2 "
        f"rounds (the lesser median counts); the "
        f"prediction is `planner.py --hardware measured`. Worst: {worst['name']}, {worst['error']:+.1%}; "
        f"{within} of {len(rows)} within ±25%, and those use every technique here: {', '.join(sorted(covered))}.",
        *common.table(["layout", "ranks", "measured", "predicted", "error"],
                      [[r["name"], r["world"], f"{r['measured'] * 1e3:.1f} ms", f"{r['predicted'] * 1e3:.1f} ms",
                        f"{r['error']:+.1%}"] for r in rows])],
        [common.row("planner", "step time, predicted vs measured", f"{len(rows)} layouts",
                    f"worst {worst['error']:+.1%} ({worst['name']})", f"{within}/{len(rows)} within ±25%")])]
    if not args.no_ranking and not args.quick:
        for world in (4, 8):
            print(f"ranking: every {world}-rank layout", flush=True)
            ranked, rho = ranking(hw, world, args.steps)
            ranked.sort(key=lambda r: r["predicted"])
            parts.append(([
                f"## Ranking of the {world}-rank layouts (activation checkpointing off)", "",
                f"Spearman's rank correlation of predicted and measured step times: {rho:.2f} over "
                f"{len(ranked)} layouts (predicted fastest first).",
                *common.table(["#", "layout", "predicted", "measured", "error"],
                              [[i + 1, r["name"], f"{r['predicted'] * 1e3:.1f} ms", f"{r['measured'] * 1e3:.1f} ms",
                                f"{r['error']:+.1%}"] for i, r in enumerate(ranked)])],
                [common.row("planner", f"ranking of the {world}-rank layouts", f"{len(ranked)} layouts", "",
                            f"Spearman {rho:.2f}")]))
    intro = "\n\n".join(__doc__.split("\n\n")[2:]).strip()
    return common.report("planner", "The planner's step time against real steps", intro, parts, args)


if __name__ == "__main__":
    main()
