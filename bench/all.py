"""Every comparison in bench/, one after another, and one summary table of their headlines.

    python bench/all.py [--quick] [--only fsdp tp ...] [--out docs]

Each bench runs with its own defaults (or --quick sizes), prints its tables and writes
OUT/bench/NAME.md as when run alone; this file then writes OUT/benchmarks.md: the
machine, date and command, and one row per headline figure. A bench that fails (an
exception, or a parity assertion: ours and the peer computing different things)
becomes a FAILED row, its traceback on stderr, and the exit status is 1.
OUT: docs/, or runs/ with --quick or --only (a trial never overwrites the figures).
"""

import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702

import argparse
import importlib
import time
import traceback

from bench import common

BENCHES = {"mfu": "MFU", "fsdp": "FSDP", "tp": "TP", "async_tp": "async TP", "float8": "float8",
           "checkpoint": "checkpoint", "pp": "PP", "cp": "CP", "fsdp_pp": "FSDP x PP",
           "planner": "planner"}  # module -> its rows' technique

READING = ("Each row: ours against the peer (PyTorch's own implementation, or the stated baseline) on the same "
           "model, ranks and machine in one run, interleaved. Times: median (min). A ratio is ours / peer given "
           "three ways: of the medians, of the minimums, and the spread of the per-round ratios (below 1: ours "
           "takes less); float8's is bf16 / float8 (above 1: faster); CP's sequence ratio is ours / no CP. Where "
           "the check column says asserted, the bench raises if ours and the peer disagree beyond the dtype's "
           "reordering bound. Details per bench: bench/NAME.md next to this file.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (each bench's QUICK): never figures")
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), default=None, help="a subset (a trial)")
    parser.add_argument("--out", default=None, help="folder of benchmarks.md and bench/ (default docs, runs if "
                                                    "--quick or --only)")
    cli = parser.parse_args(argv)
    out = cli.out or os.path.join(common.ROOT, "runs" if cli.quick or cli.only else "docs")
    names = cli.only or list(BENCHES)
    rows, walls, failed = [], {}, []
    for name in names:
        args = (["--quick"] if cli.quick else []) + ["--out", os.path.join(out, "bench")]
        print(f"[all] python bench/{name}.py {' '.join(args)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            rows += importlib.import_module(f"bench.{name}").main(args)
        except Exception as e:
            traceback.print_exc()
            failed.append(name)
            last = ([line for line in str(e).splitlines() if line.strip()] or [""])[-1]
            rows.append(common.row(BENCHES[name], f"python bench/{name}.py", "-", "-",
                                   f"FAILED: {type(e).__name__}: {last}", "traceback on stderr"))
        walls[name] = time.perf_counter() - start
    lines = [READING, *common.table(list(common.SUMMARY_COLUMNS), [[r[c] for c in common.SUMMARY_COLUMNS]
                                                                   for r in rows]),
             "Wall time per bench: " + ", ".join(f"{n} {walls[n]:.0f} s" + (" (FAILED)" if n in failed else "")
                                                 for n in names) + f"; {sum(walls.values()):.0f} s in all."]
    command = " ".join(["python", "bench/all.py", *(sys.argv[1:] if argv is None else argv)])
    common.write(os.path.join(out, "benchmarks.md"), "nanotitan benchmarks: summary", lines, command, cli.quick)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
