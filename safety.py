"""What stops a run safely: a stop signal every rank agrees on, and a step whose loss or
gradient norm is not finite.

    with StopSignal() as stop:
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
"""

from __future__ import annotations

import contextlib
import signal

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
