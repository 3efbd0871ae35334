"""What keeps a run safe: a stop signal every rank agrees on, a step whose loss or
gradient norm is not finite, a collective that times out, and a run directory that
only one live run writes to.

    with RunDirLock(run_dir), StopSignal() as stop:    # the lock: rank 0 only
        for step in ...:
            with collective_errors(f"step {step}"):    # a timeout names its group and the step
                ...
                stopping, loss_not_finite = stop.agreed(device, loss)   # the same on every rank

* SIGINT / SIGTERM (a preemption, Ctrl-C) only set a flag; the loop finishes the step,
  saves a checkpoint and leaves. Ranks must stop after the same step, so the flag is
  all-reduced (MAX) over the world every step, together with a second flag: this rank's
  loss is NaN or inf. One all-reduce of two float32 per step (comm.py counts it).
* A non-finite gradient norm (already reduced over every rank by clip_grad_norm, so the
  same everywhere) stops the run before the optimizer applies it; a non-finite loss
  stops it after the step, before anything is logged as fine or saved. Either way the
  run ends with NonFiniteError naming the step (`error:` and exit 2 from train.py), and
  a checkpoint of an earlier step still being written in the background is finished
  first: the newest checkpoint is always the newest finite step.
* Every process group gets run.collective_timeout_s (train.py, parallelize.py, the
  checkpointer's group). On gloo a collective that waits longer raises a RuntimeError
  that names neither the group nor the step; `collective_errors(where)` re-raises it as
  CollectiveError naming both (the group is read from the waiting frames). On NCCL the
  watchdog aborts the process itself, with the group's name in its log.
* RunDirLock: run.dir/.lock, held with flock(2) by the live run's rank 0. A second run
  is refused and told which process holds it; the kernel drops the lock of a process
  that dies, so a stale lock (a killed run, a restart) is simply taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import time

import torch
import torch.distributed as dist


class StopSignal(contextlib.AbstractContextManager):
    """SIGINT / SIGTERM set a flag; leaving the `with` restores the previous handlers."""

    def __init__(self):
        self.received: str | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, device: torch.device, loss: torch.Tensor) -> tuple[bool, bool]:
        """(any rank got a signal, any rank's loss is not finite), the same on every rank."""
        flags = torch.stack([torch.tensor(1.0 if self.received else 0.0, device=device),
                             (~torch.isfinite(loss)).float().to(device)])
        if dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # comm: world, two float32 per step
        return bool(flags[0]), bool(flags[1])


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm is NaN or inf: the run stops at that step."""

    def __init__(self, step: int, what: str):
        super().__init__(f"step {step}: the {what} is not finite (NaN or inf), so the run stops and saves nothing "
                         f"of this step; checkpoint.load=latest resumes from the newest checkpoint, an earlier step. "
                         f"Lower training.lr, check the data, or keep training.max_norm > 0")


class CollectiveError(RuntimeError):
    """A collective timed out or lost its peer: another rank is hung or dead."""


@contextlib.contextmanager
def collective_errors(where: str):
    """Re-raise a gloo timeout / closed connection inside the block as CollectiveError
    naming `where` (e.g. "step 5") and the group it was waiting on. Other errors pass."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as e:
        text = str(e)
        if not any(sign in text for sign in ("Timed out", "timeout", "Connection closed by peer", "Connection reset")):
            raise
        group = _waiting_group(e.__traceback__)
        if group is None:
            name = "a group the waiting frames do not tell"
        else:
            desc = "world" if group is dist.group.WORLD else group.group_desc
            name = f"group {desc!r} (ranks {dist.get_process_group_ranks(group)})"
        raise CollectiveError(f"{where}: a collective on {name} failed: {text.splitlines()[-1]}. Another rank is "
                              f"hung or dead (its own log says why); run.collective_timeout_s bounds the wait; "
                              f"checkpoint.load=latest resumes from the newest checkpoint") from None


def _waiting_group(tb) -> dist.ProcessGroup | None:
    """The process group a failed collective was using: the `group` argument of the
    innermost torch.distributed call (None there: the world), or, where the error came
    out of a wait() on an asynchronous op, the innermost frame's process group: a local
    variable, or an attribute of one up to two levels down (self.state.group)."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        if frame.f_code.co_filename.endswith("distributed_c10d.py") and "group" in frame.f_locals:
            return frame.f_locals["group"] or dist.group.WORLD
    for frame in reversed(frames):
        values = list(frame.f_locals.values())
        for _ in range(3):
            for v in values:
                if isinstance(v, dist.ProcessGroup):
                    return v
            values = [a for v in values if hasattr(v, "__dict__") for a in vars(v).values()]
    return None


class RunDirLock(contextlib.AbstractContextManager):
    """run.dir/.lock, held with flock(2) from construction to the end of the `with`.
    Raises RunDirBusy naming the live holder; takes over the lock of a dead one."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, ".lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        previous = os.read(self.fd, 4096).decode(errors="replace")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise RunDirBusy(f"run.dir={run_dir} is in use by {_holder(previous)} (it holds {self.path}): wait for "
                             f"that run to end, stop it, or choose another run.dir") from None
        self.taken_over = _holder(previous) if previous else None  # a dead run's lock
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                       "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)

    def __exit__(self, *exc) -> None:
        os.ftruncate(self.fd, 0)  # a clean exit leaves an empty file: nothing to take over
        os.close(self.fd)  # releases the lock (the file stays: removing it would race a new holder)


class RunDirBusy(ValueError):
    """Another live run holds run.dir."""


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']} (since {h['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"
