"""Run a function on N gloo ranks on CPU, each in a fresh process, for multi-rank tests.

    results = run_on_ranks(fn, 4, x, timeout=60)   # fn(rank, 4, x) on ranks 0..3

What it does: starts `world_size` processes with the `forkserver` start method: a
server process that imported torch once forks each rank (no state forked from pytest,
and no 2 s torch import per rank: a 4-rank call costs ~0.3 s instead of ~5 s). It
initializes a gloo process group of
that size in each (size 1 too), calls `fn(rank, world_size, *args, **kwargs)`, and
returns the per-rank return values in rank order.

Rules for `fn`: it must be picklable, i.e. a module-level function of a module the
child can import (a test module under tests/, or a repo-root module such as `llama` or
`train`); lambdas and nested functions are rejected in the parent. Its arguments and
return value must be picklable too (return tensors or plain numbers, not modules).
The child puts the repo root and tests/ at the front of sys.path before unpickling
`fn`, so `python -m pytest tests` from the repo root works.

Failure modes, all fast:
- a rank raises: the call raises RankError with the rank number and its full
  traceback. The other ranks are then usually stuck in a collective that rank never
  joins, so they get _GRACE_S seconds to report (their own tracebacks are appended),
  then are killed.
- a rank dies without reporting (segfault, os._exit): RankError with its exit code.
- not all ranks report within `timeout` seconds (counted from the start, spawn
  included): the stuck ranks dump their Python stacks to stderr (faulthandler on
  SIGUSR1, shown by pytest as captured output), all are killed, and TimeoutError
  names the ranks that did not finish.
No process outlives the call: every child is joined or killed in a `finally`. A child
leaves with os._exit after reporting (torch's interpreter teardown costs ~0.5-1 s), so
atexit hooks do not run in it; stdout and stderr are flushed first.

Each child sets OMP/MKL threads and torch.set_num_threads to `threads_per_rank` before
torch does any work (N ranks share this machine's few cores), and sets MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK as torchrun would. The rendezvous port is
found by binding 127.0.0.1:0 in the parent; another process could take it before rank
0 binds it, which would show as a rank-0 init error (rare; rerun).

Loss parity through train.main (DESIGN.md's oracle), shared by the technique tests:

    err = loss_parity(tmp_path_factory, 4, model_opt, ["parallel.dp_shard=4"])
    assert not exceeding(err), err   # err: largest relative difference per metric

runs the single-process reference in this process (cached per model / optimizer
overrides) and the layout on N ranks, both float32 on test_train's TINY model and data
for 10 steps, checks that every rank logged the same numbers at the same steps, and
returns the largest relative difference from the reference of the loss, the gradient
norm (every step, and step 1 alone) and the validation loss. PARITY_BOUNDS holds the
bounds, each with how it was derived.
"""

import contextlib
import faulthandler
import multiprocessing as mp
import os
import pickle
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_TESTS_DIR)
_GRACE_S = 5.0  # how long the other ranks may still report after one rank failed


class RankError(RuntimeError):
    """One or more ranks raised or died; the message holds each one's traceback."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, payload: bytes, conn, threads: int, pg_timeout_s: float) -> None:
    # torch is already imported in the fork server; set_num_threads below applies.
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    for path in (_TESTS_DIR, _REPO_ROOT):
        if path not in sys.path:
            sys.path.insert(0, path)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for stacks on a hang
    dist = None
    try:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout_s))
        fn, args, kwargs = pickle.loads(payload)
        result = ("ok", fn(rank, world_size, *args, **kwargs))
    except BaseException:
        result = ("raised", traceback.format_exc())
    # Plain pickle copies tensors into the bytes; conn.send would share their storage
    # through a file descriptor served by this process, which exits right after.
    try:
        data = pickle.dumps(result)
    except Exception:
        result = ("raised", "could not pickle the return value:\n" + traceback.format_exc())
        data = pickle.dumps(result)
    conn.send_bytes(data)
    conn.close()
    # Reported before teardown, so a teardown that hangs cannot hide the result.
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()
    # Skip the interpreter's teardown of torch (0.5-1 s per call); keep what fn printed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if result[0] == "ok" else 1)


def run_on_ranks(fn, world_size: int, *args, timeout: float = 120.0, pg_timeout_s: float = 60.0,
                 threads_per_rank: int = 1, **kwargs) -> list:
    """Run fn(rank, world_size, *args, **kwargs) on world_size fresh processes with an
    initialized gloo process group; return the per-rank return values (picklable) in
    rank order. Raises RankError if a rank raises or dies, TimeoutError on a hang."""
    try:
        payload = pickle.dumps((fn, args, kwargs))
    except Exception as e:
        raise TypeError(f"run_on_ranks: fn and its arguments must be picklable; fn must be a "
                        f"module-level function of an importable module, got {fn!r}: {e}") from e
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed"])  # takes effect when the server starts
    port = _free_port()
    procs, conns = [], {}  # conns: parent's read end of each rank's pipe -> rank
    results, failures = {}, {}  # rank -> return value / (how, message); failures in arrival order
    stuck = []
    try:
        for rank in range(world_size):
            recv_end, send_end = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, name=f"rank{rank}",
                            args=(rank, world_size, port, payload, send_end, threads_per_rank, pg_timeout_s))
            p.start()
            send_end.close()  # now the child's exit shows as EOF on recv_end
            procs.append(p)
            conns[recv_end] = rank
        deadline, grace_end = time.monotonic() + timeout, float("inf")
        while conns:
            ready = wait(list(conns), timeout=max(0.0, min(deadline, grace_end) - time.monotonic()))
            if not ready:
                break
            for conn in ready:
                rank = conns.pop(conn)
                try:
                    status, value = pickle.loads(conn.recv_bytes())
                except EOFError:  # exited without a word: segfault, os._exit, killed
                    procs[rank].join(timeout=_GRACE_S)
                    code = procs[rank].exitcode
                    how = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"code {code}"
                    status, value = "died", f"exited with {how} without reporting a result"
                conn.close()
                if status == "ok":
                    results[rank] = value
                else:
                    failures[rank] = (status, value)
                    grace_end = min(grace_end, time.monotonic() + _GRACE_S)
        stuck = sorted(conns.values())
        if stuck and not failures:
            for rank in stuck:  # faulthandler in the child prints where it hangs
                with contextlib.suppress(ProcessLookupError):
                    os.kill(procs[rank].pid, signal.SIGUSR1)
            time.sleep(0.5)
    finally:
        for p in procs:
            # All reported: let them finish destroy_process_group and exit. Else kill now.
            p.join(timeout=_GRACE_S if len(results) == world_size else 0.0)
            if p.is_alive():
                p.kill()
            p.join()
        for conn in conns:
            conn.close()
    if failures:
        killed = f"; ranks {stuck} were killed {_GRACE_S:.0f} s later" if stuck else ""
        report = "".join(f"\n--- rank {r} {how}:\n{msg}" for r, (how, msg) in failures.items())
        raise RankError(f"ranks {sorted(failures)} of {world_size} failed{killed}; first reported: "
                        f"rank {next(iter(failures))}{report}")
    if stuck:
        raise TimeoutError(f"ranks {stuck} of {world_size} did not finish within {timeout} s "
                           f"(finished: {sorted(results)}); their Python stacks are on stderr")
    return [results[r] for r in range(world_size)]


# ---------------------------------------------------------------------------------------
# Loss parity through train.main against the single-process run

# The largest relative difference from the single-process run over 10 float32 steps.
# Achieved: the 26 train.main layouts of test_fsdp, test_tensor_parallel,
# test_context_parallel and test_pipeline (and the 153 float32 combinations of
# test_matrix, 3 steps) on an AMD EPYC, the reference with 1 or 2 threads; the same runs
# in float64 agree to <= 7e-15, so all of it is float32 rounding. Each bound is ~10x the
# largest achieved.
PARITY_BOUNDS = {
    # The loss (~6-9) is a float32 sum: one ulp is 6e-8..1.2e-7 of it, and reduction
    # order moves it by 0-2 ulps (<= 2.8e-7 achieved); 2e-6 is ~20 ulps.
    "loss": 2e-6,
    "val_loss": 2e-6,  # as the loss (<= 1.5e-7 achieved)
    # Reduction order in the float32 gradient (~3e-9 of its norm at step 1), grown by up to
    # 10 optimizer steps (AdamW: x1.3 a step at worst): <= 3.4e-8 achieved.
    "grad_norm": 3e-7,
    # Step 1: the gradient at the initial weights, before any optimizer step can amplify a
    # difference; the norm averages the rounding of ~600k elements: <= 5.6e-9 achieved
    # (8.7e-9 in test_matrix's 16-rank layouts). RoPE at the wrong positions under CP
    # moves it by 8.1e-7 (test_context_parallel).
    "grad_norm_step1": 1e-7,
}
# Parameters after 3 optimizer steps in float64 (test_fsdp, test_tensor_parallel), relative
# by norm per parameter. SGD moves them by the gradients alone: a few float64 ulps (2^-53
# = 1.1e-16) of reduction order, <= 4.6e-16 achieved. AdamW divides by sqrt(v), which
# magnifies the rounding of the smallest gradient entries: <= 2.8e-14 achieved.
STEP_BOUNDS_FLOAT64 = {"sgd": 5e-15, "adamw": 3e-13}
_REFERENCES: dict[tuple[str, ...], list[dict]] = {}


def train_argv(run_dir: str, *overrides: str) -> list[str]:
    """train.py's arguments: configs/debug.yaml with test_train's TINY model and data,
    float32, 10 steps, a known peak FLOP/s (no GEMM measurement); overrides last."""
    from test_train import TINY

    return ["--config", os.path.join(_REPO_ROOT, "configs/debug.yaml"), *TINY, "training.steps=10",
            "training.dtype=float32", "run.peak_flops=1e12", f"run.dir={run_dir}",
            f"data.cache_dir={os.path.join(_REPO_ROOT, '.cache/data')}", *overrides]


def train_rank(rank: int, world_size: int, argv: list[str]) -> list[dict]:
    """train.main(argv) on one rank (a run_on_ranks function): its metric records.
    main reuses the harness's default group and destroys only the groups it made."""
    import train

    return train.main(argv)


def reference_run(tmp_path_factory, overrides: list[str]) -> list[dict]:
    """The single-process run (in this process, a size-1 group), cached per overrides:
    the oracle of every layout with the same model and optimizer."""
    key = tuple(overrides)
    if key not in _REFERENCES:
        history = train_rank(0, 1, train_argv(str(tmp_path_factory.mktemp("ref")), *overrides))
        losses = [r["loss"] for r in history]
        assert losses[-1] < losses[0] - 0.05, losses  # it trains: the comparison can see a bad step
        _REFERENCES[key] = history
    return _REFERENCES[key]


def parity(out: list[list[dict]], ref: list[dict]) -> dict[str, float]:
    """Per-rank records `out` of a layout against the reference records: every rank
    logged the same loss, gradient norm and validation loss (all are reduced over the
    ranks) at the reference's steps; returns the largest relative difference from the
    reference per metric (keys of PARITY_BOUNDS; val_loss only if the runs evaluate)."""
    keys = ("loss", "grad_norm", "val_loss")
    for rank in range(1, len(out)):
        assert [[r.get(k) for k in keys] for r in out[rank]] == [[r.get(k) for k in keys] for r in out[0]], rank
    got = out[0]
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, len(ref) + 1))
    assert [("val_loss" in r) for r in got] == [("val_loss" in r) for r in ref]
    err = {k: max(abs(a[k] - b[k]) / abs(b[k]) for a, b in zip(got, ref) if k in b)
           for k in keys if any(k in b for b in ref)}
    err["grad_norm_step1"] = abs(got[0]["grad_norm"] - ref[0]["grad_norm"]) / ref[0]["grad_norm"]
    return err


def loss_parity(tmp_path_factory, world_size: int, overrides: list[str], layout: list[str],
                timeout: float = 300.0) -> dict[str, float]:
    """train.main with overrides + layout on world_size ranks against the single-process
    run with overrides: parity's differences."""
    ref = reference_run(tmp_path_factory, overrides)
    argv = train_argv(str(tmp_path_factory.mktemp("parity")), *overrides, *layout)
    return parity(run_on_ranks(train_rank, world_size, argv, timeout=timeout), ref)


def exceeding(err: dict[str, float]) -> dict[str, tuple[float, float]]:
    """The metrics of `err` over their PARITY_BOUNDS: name -> (difference, bound)."""
    return {k: (e, PARITY_BOUNDS[k]) for k, e in err.items() if not e <= PARITY_BOUNDS[k]}
