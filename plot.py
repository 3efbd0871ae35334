"""Training curves of one or more runs, side by side: the picture for "does this parallel
layout train like the single-process run?".

    python plot.py runs/debug runs/fsdp2 --out loss_curves.png

Reads each RUN_DIR/metrics.jsonl (train.py's log_step: one JSON record per logged step
with step, loss, grad_norm, lr, tokens_per_sec, mfu, memory_gb, and val_loss on
evaluation steps) and draws four panels against the step: training loss, validation loss
(the steps that have one), gradient norm, tokens/s. One line per run, labelled by the run
directory's name and, from RUN_DIR/config.yaml, its parallel degrees other than 1
(dp_shard -1, "the rest of the world", is left out: the config does not say the world size).

A missing or empty metrics.jsonl, or a line that is not JSON, is `error:` naming the file
(exit 2). Needs matplotlib (`pip install matplotlib`); train.py and the technique files do not.
"""

from __future__ import annotations

import argparse
import json
import os

import yaml

try:
    from matplotlib.figure import Figure  # no pyplot, no global backend: savefig draws PNGs with Agg
except ImportError as e:
    raise ImportError("plot.py needs matplotlib: pip install matplotlib") from e

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
PANELS = (("loss", "training loss"), ("val_loss", "validation loss"), ("grad_norm", "gradient norm"),
          ("tokens_per_sec", "tokens / s (per device)"))


def read_metrics(run_dir: str) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl; a ValueError naming the file if it has none."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (is {run_dir} a run.dir of train.py?)")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON record ({e})") from e
    if not records:
        raise ValueError(f"{path} is empty: the run logged no step yet")
    return records


def label(run_dir: str) -> str:
    """The directory's name, and its parallel degrees other than 1 from config.yaml."""
    name = os.path.basename(os.path.normpath(run_dir))
    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            parallel = (yaml.safe_load(f) or {}).get("parallel") or {}
    except (OSError, yaml.YAMLError):
        return name
    degrees = [f"{d}={parallel[d]}" for d in DIMS if parallel.get(d, 1) not in (1, -1)]
    if parallel.get("pp", 1) > 1:
        degrees.append(parallel.get("pp_schedule", "?"))
    return f"{name} ({' '.join(degrees)})" if degrees else name


def plot(run_dirs: list[str], out: str) -> None:
    runs = [(label(d), read_metrics(d)) for d in run_dirs]  # every file read before drawing
    fig = Figure(figsize=(11, 7), dpi=100, layout="constrained")
    for ax, (key, title) in zip(fig.subplots(2, 2).flat, PANELS):
        for i, (name, records) in enumerate(runs):  # dashed over solid: identical curves stay visible
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, ("-", "--", ":", "-.")[i % 4], marker="o" if key == "val_loss" else None,
                        markersize=3, label=name)
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {key} in these runs", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        if key == "tokens_per_sec":
            ax.set_ylim(bottom=0)
    fig.axes[0].legend()
    fig.suptitle("  vs  ".join(name for name, _ in runs))
    fig.savefig(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="plot.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a train.py run.dir")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        plot(args.run_dirs, args.out)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
