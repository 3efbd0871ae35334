"""What every comparison in bench/ shares: the machine stamp, the rank launcher, timing
statistics, the parity check, a memory measure and the Markdown each bench writes.

Protocol (DESIGN.md, "How speed is shown")
    Ours and the peer (PyTorch's own implementation of the technique, or the stated
    baseline) run on the same model, weights, data, ranks and machine in one run, in
    interleaved rounds (ours, peer, ours, peer, ...), a barrier before each; a
    multi-rank step takes its slowest rank's time. On a shared machine the median and
    the minimum of the same times disagree, so a ratio is given three ways, e.g.
        0.93x median, 0.90x min, spread 0.88-1.01 over 5 rounds
    (ours / peer of the medians, of the minimums, and the lowest and highest ratio of
    the same round). Where a bench claims that ours computes what the peer computes
    (the same losses), it raises unless they agree within `parity_tol`.
    Nothing is monkey-patched: bytes are counted by comm.CommCounter (a dispatch
    mode, the counter the planner's tests use), memory by `peak_bytes` (the CPU
    allocator's own events, through the profiler), time by perf_counter around calls
    the bench makes itself or hooks the technique offers.

Output
    Each bench prints its tables and writes them to docs/bench/NAME.md, stamped with the
    machine, the date and the exact command; bench/all.py also writes docs/benchmarks.md,
    the summary of every bench's headline rows. `--quick` (smoke-test sizes: every code
    path in seconds, never figures) writes to runs/bench/ instead, unless --out says
    where; its files say QUICK.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config  # noqa: E402
import llama  # noqa: E402
import metrics  # noqa: E402
import train  # noqa: E402
from tests.distributed import run_on_ranks  # noqa: E402, F401  (the tests' gloo launcher: forkserver, fast failure)

# The columns of the summary table (docs/benchmarks.md): every bench returns its headline
# figures as rows of these; ours / peer: the two measured sides; result: their ratio.
SUMMARY_COLUMNS = ("technique", "comparison", "ours", "peer", "result", "check")


def machine() -> str:
    """The device, e.g. 'Intel(R) Xeon(R) Processor @ 2.80GHz (AVX512), 2 cores, 24 GiB RAM'."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    ram = "RAM unknown"
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            ram = next((f"{int(line.split()[1]) / 2**20:.0f} GiB RAM" for line in f if line.startswith("MemTotal")),
                       ram)
    return f"{metrics.cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores, {ram}"


def stamp(command: str, quick: bool) -> list[str]:
    """The lines that open every generated file: machine, versions, date, command."""
    lines = [f"- machine: {machine()}; torch {torch.__version__}, Python {platform.python_version()}",
             f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; 1-min load average "
             f"{os.getloadavg()[0]:.1f} (other processes on the machine skew the times)",
             f"- command: `{command}`"]
    if quick:
        lines.insert(0, "**QUICK RUN (`--quick`): smoke-test sizes that check every code path runs. Its numbers "
                        "are not measurements: do not quote them.**\n")
    return lines


# ---------------------------------------------------------------------------------------
# Timing and parity


def slowest(per_rank: list[list[float]]) -> list[float]:
    """Per round, the slowest rank's time: the ranks of a step wait for each other."""
    return [max(ts) for ts in zip(*per_rank)]


def ms(ts: list[float]) -> str:
    return f"{statistics.median(ts) * 1e3:.0f} ms (min {min(ts) * 1e3:.0f})"


def ratio(ours: list[float], peer: list[float]) -> str:
    """'0.93x median, 0.90x min, spread 0.88-1.01 over 5 rounds' (round i of ours
    against round i of the peer: they ran back to back)."""
    rounds = [a / b for a, b in zip(ours, peer)]
    return (f"{statistics.median(ours) / statistics.median(peer):.2f}x median, {min(ours) / min(peer):.2f}x min, "
            f"spread {min(rounds):.2f}-{max(rounds):.2f} over {len(rounds)} rounds")


def parity_tol(dtype: torch.dtype, terms: int, depth: int) -> float:
    """How far apart two correct computations of one value may land when they add in
    different orders (TP's partial sums, FSDP's reduce-scatter, a ring's blocks): a
    reordered sum of n floats moves by at most (n - 1) eps relative to the sum of the
    magnitudes. `terms`: the longest sum (a contraction: dim, ffn_dim, the tokens of a
    loss); `depth`: how many such sums are chained (layers x steps)."""
    return depth * terms * torch.finfo(dtype).eps


def check_parity(what: str, ours: list[float], peer: list[float], tol: float) -> float:
    """The largest relative difference of ours against the peer; raises above `tol`."""
    rel = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(ours, peer, strict=True))
    if not rel <= tol:
        raise RuntimeError(f"{what}: ours {ours} and the peer {peer} differ by {rel:.1e} (relative), above the "
                           f"reordering bound {tol:.1e}: not the same computation")
    return rel


def by_kind(seen) -> dict[str, tuple[int, int]]:
    """A comm.CommCounter's tally summed over groups: kind -> (calls, bytes handed in)."""
    calls, nbytes = collections.Counter(), collections.Counter()
    for (_, kind), n in seen.calls.items():
        calls[kind] += n
    for (_, kind), n in seen.bytes.items():
        nbytes[kind] += n
    return {kind: (calls[kind], nbytes[kind]) for kind in calls}


# ---------------------------------------------------------------------------------------
# Memory


def peak_bytes(fn, region: str) -> int:
    """Run fn() under the profiler's memory events; return the peak, while fn is inside
    `with torch.profiler.record_function(region)`, of the bytes allocated minus freed
    through the CPU allocator since fn started: every tensor, FSDP2's storage resizes,
    kernel scratch. Buffers gloo allocates itself are unseen. So that what a system
    holds between steps counts, fn builds the system, then runs the measured region."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = list(prof.profiler.kineto_results.events())
    start, end = next((e.start_ns(), e.end_ns()) for e in events if e.name() == region)
    live = peak = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        before, live = live, live + e.nbytes()  # nbytes < 0: a free
        if start <= e.start_ns() <= end:
            peak = max(peak, before, live)
    return peak


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters and optimizer state: what a rank holds between steps."""
    return [*model.parameters(), *(v for st in optimizer.state.values() for v in st.values()
                                   if isinstance(v, torch.Tensor))]


def held_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a DTensor: its local shard)."""
    storages = {}
    for t in tensors:
        s = getattr(t, "_local_tensor", t).untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def build(args: llama.ModelArgs, dtype: torch.dtype = torch.float32, seed: int = 0):
    """One unsharded Llama with train.py's initialization and its AdamW (lr 1e-3)."""
    model = llama.build_model(args, "cpu")
    llama.init_weights(model, args, seed)
    if dtype == torch.float64:
        model.to(torch.float64)
    return model, train.build_optimizer(model, config.TrainingConfig(lr=1e-3))


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


# ---------------------------------------------------------------------------------------
# Command line and Markdown


def parse(parser: argparse.ArgumentParser, argv: list[str] | None, quick: dict) -> argparse.Namespace:
    """The bench's arguments; --quick swaps in the `quick` defaults (flags given win)."""
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes: every code path in seconds; "
                                                             "writes to runs/bench/ unless --out")
    parser.add_argument("--out", default=None, help="folder for NAME.md (default docs/bench, runs/bench if --quick)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    args.argv = argv
    return args


def row(technique: str, comparison: str, ours: str, peer: str, result: str, check: str = "") -> dict[str, str]:
    return dict(zip(SUMMARY_COLUMNS, (technique, comparison, ours, peer, result, check)))


def table(header: list[str], rows: list[list]) -> list[str]:
    def cell(x) -> str:
        return " ".join(str(x).split()).replace("|", "\\|")
    return ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(x) for x in r) + " |" for r in rows), ""]


def out_dir(args: argparse.Namespace) -> str:
    return args.out or os.path.join(ROOT, "runs" if args.quick else "docs", "bench")


def write(path: str, title: str, lines: list[str], command: str, quick: bool) -> None:
    """Print the tables and write them, stamped, to `path`."""
    text = "\n".join([f"# {title}", "", *stamp(command, quick), "", *lines]) + "\n"
    print(text, flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(path, ROOT)}", file=sys.stderr)


def report(name: str, title: str, intro: str, parts, args: argparse.Namespace) -> list[dict]:
    """Run the parts (each gives (lines, summary rows), e.g. one per world size), write
    the intro and their lines to NAME.md, and return their rows. The stamped command is
    how to run the bench alone."""
    lines, rows = [intro], []
    for more, new in parts:
        lines += ["", *more]
        rows += new
    command = " ".join(["python", f"bench/{name}.py", *args.argv])
    write(os.path.join(out_dir(args), f"{name}.md"), title, lines, command, args.quick)
    return rows
