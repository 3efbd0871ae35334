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
