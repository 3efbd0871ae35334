"""Pipeline parallelism: Llama split into stages by layers, schedules as data (GPipe,
1F1B, interleaved 1F1B, zero-bubble ZB-H1), one small runner over isend / irecv.

    check_stage_args(n_layers, pp, v, None); check_schedule_args("1f1b", pp, m, v)  # config.validate too
    stages = build_stages(model, pp_rank, pp, v)        # {stage: copy of the model on meta}
    actions = build_schedule("1f1b", pp, m, v)          # per rank, with comm
    print(format_schedule(actions))                     # the table
    runner = PipelineRunner(actions[pp_rank], stages, pp * v, pp_group, loss_fn, act_shape, ...)
    loss = runner.step(input_chunks, label_chunks)      # forward + backward

Stages. The model's `layers` (an nn.ModuleDict keyed "0", "1", ... in forward order) are cut
into n = pp * v stages (v = stages per rank), evenly (the first stages get one more layer when
L % n != 0) or at explicit split points. Stage 0 also holds `tok_embeddings`, stage n-1 `norm`
and `output`; a stage sets those it does not own to None, so the model's forward must pass the
hidden state through a missing one and take the RoPE positions as an argument (llama.Transformer
does). build_stages checks the container first: no `layers`, other keys, or other top-level
modules or parameters are a ValueError naming them. Each stage is a copy of the model with the
other layers deleted, so parameter names are the model's own ("layers.17.attention.wq.weight")
on every layout: init and checkpoints do not depend on the split. Placement is looped: stage s
lives on rank s % pp (rank r holds stages r, r + pp, ...), so with v > 1 a rank's stages are not
adjacent (Megatron's interleaving).

Schedules are data. A schedule is a function returning, for every rank, the ordered list of its
compute actions: F (forward of stage s, micro-batch i), B (backward), and for zero-bubble I
(backward for the input only) and W (backward for the weights). `add_communication` then inserts
SEND_F / RECV_F (activations to the next stage) and SEND_B / RECV_B (their gradients to the
previous stage) mechanically from the same global table on every rank: a send right after the
action that produces it, the receives in the order the peer sends them (NCCL matches point-to-point
messages between two ranks in issue order, ignoring tags), each posted no later than just before
the action that needs it. The tables for p = 2 ranks and m = 4 micro-batches, printed by
`format_schedule(build_schedule(name, 2, 4, v))` (compute only; "sXi" = action X of stage s on
micro-batch i; F forward, B backward, I / W backward for input / weights):

    [gpipe]
    rank 0 | 0F0 0F1 0F2 0F3 0B0 0B1 0B2 0B3
    rank 1 | 1F0 1F1 1F2 1F3 1B0 1B1 1B2 1B3
    [1f1b]
    rank 0 | 0F0 0F1 0B0 0F2 0B1 0F3 0B2 0B3
    rank 1 | 1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3
    [interleaved_1f1b] (v = 2: rank 0 holds stages 0 and 2, rank 1 stages 1 and 3)
    rank 0 | 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3
    rank 1 | 1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3
    [zero_bubble]
    rank 0 | 0F0 0F1 0I0 0F2 0I1 0F3 0I2 0W0 0I3 0W1 0W2 0W3
    rank 1 | 1F0 1I0 1F1 1I1 1F2 1I2 1F3 1I3 1W0 1W1 1W2 1W3

The runner executes the list in order: RECV posts an irecv (non-blocking); a run of consecutive
SEND/RECV actions goes out as one batch_isend_irecv; a compute action waits only for its own input.
Sends never block, and every rank's receives follow its peers' send order, so any schedule whose
dependencies are acyclic runs without deadlock on gloo and NCCL.

Bubble and memory, with t_F, t_B = t_I + t_W per stage and micro-batch, m micro-batches,
p ranks, v stages per rank, A = activations of one micro-batch on one rank's layers:
    gpipe             all F, then all B. bubble (p-1)(t_F+t_B), fraction (p-1)/(m+p-1).
                      In flight: m micro-batches (m A).
    1f1b              warm-up p-1-r forwards, then alternate F/B, then the remaining B.
                      Same bubble as GPipe; in flight at most p - r (p A on rank 0).
    interleaved_1f1b  v stages per rank, micro-batches in groups of p per stage
                      (Megatron's order); bubble (p-1)(t_F+t_B)/v, fraction
                      (p-1)/(v m + p-1); warm-up 2(p-1-r) + (v-1)p chunk forwards, in
                      flight A (p + (p-1)/v) on rank 0 (each chunk is A/v). Needs m % p == 0.
    zero_bubble       ZB-H1 (Qi et al. 2023): 1F1B with B split into I and W; I stays on
                      the critical path, W is deferred into the slots where 1F1B would
                      idle (greedily, in a unit-time replay; the rest at the end). Bubble
                      (p-1)(t_F + t_I - t_W): (p-1) units with t_F = t_I = t_W = 1, a
                      third of 1F1B's 3(p-1). Stage activations: at most p - r micro-
                      batches (1F1B's order of F and I); the deferred W's keep each
                      linear's input and output gradient until they run, up to m micro-
                      batches' worth on rank 0 (the paper places W's by hand to bound
                      this; ours trades that memory for a schedule derived mechanically).
`simulate` replays a table with unit costs (F = 1, B = 2, I = W = 1, no communication) and reports
makespan, idle slots and peak in-flight micro-batches per rank; the tests check them against these.
`python pipeline.py draw 1f1b --pp 4 --microbatches 8 --out 1f1b.png` draws its timeline (matplotlib).

Zero-bubble mechanics. F registers, for every nn.Linear of the stage, the layer input x and a hook
on its output that captures the output gradient dy. I runs torch.autograd.grad from the stage
output to the stage input and to the stage's non-linear parameters (norms, embedding) only:
autograd then skips every linear's weight-gradient GEMM. W computes dW = dy^T x for the captured
pairs and adds it to the weights' .grad. With (sync) TP the hooks see each linear's local input and
output shard: TP's collectives sit outside the linears, in the model's replaceable attributes. (Not
combined with FSDP, async TP, float8 or activation checkpointing: there the weight gradient is
produced inside other machinery.)

Loss and gradient scale. Each micro-batch loss is sum(token losses) / tokens in the GLOBAL batch
(the trainer's loss_fn), and gradients SUM over micro-batches, so a step over m micro-batches
equals the full-batch step; the runner never rescales. The last stage returns the loss sum; the
trainer all-reduces it over pp so every rank logs it.

P2P volume per step: each of the m micro-batches crosses v p - 1 stage boundaries forward
(B_mb x S x D activations, / tp with sequence parallel) and the same backward: 2 m (v p - 1)
B_mb S D bytes-per-element in total, 2 m v B_mb S D per rank at most.

With FSDP each stage is its own FSDP model; `grad_sync(stage, last)` is called before each backward
so gradients are reduce-scattered once per step, on the stage's last backward. With TP each stage
is tensor-parallel; the activations sent are the TP rank's sequence shard, to the same TP rank of
the next stage.
"""

from __future__ import annotations

import argparse
import collections
import copy
import itertools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

COMPUTE = ("F", "B", "I", "W")


# ---------------------------------------------------------------------------------------
# 1. Stages

def check_stage_args(n_layers: int, pp: int, stages_per_rank: int, split_points: list | None) -> None:
    """Everything the stage split needs of the numbers (no collective): a layer per stage at
    least; split_points, the first layers of stages 1..n-1, increasing layer indices."""
    if stages_per_rank < 1:
        raise ValueError(f"parallel.pp_stages_per_rank={stages_per_rank} must be >= 1")
    if pp == 1:
        return
    n = pp * stages_per_rank
    if n_layers < n:
        raise ValueError(f"pipeline: model.n_layers={n_layers} is fewer than the pipeline stages parallel.pp * "
                         f"parallel.pp_stages_per_rank = {pp} * {stages_per_rank} = {n}; each stage needs a layer")
    if split_points is None:
        return
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in split_points):
        raise ValueError(f"parallel.pp_split_points={split_points} must be a list of layer indices")
    bounds = [0, *split_points, n_layers]
    if len(split_points) != n - 1 or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"pipeline: split points {split_points} (parallel.pp_split_points) must be {n - 1} "
                         f"increasing layer indices in (0, {n_layers})")


def split_layers(n_layers: int, n_stages: int, split_points: list[int] | None = None) -> list[list[int]]:
    """Layer indices of each stage. split_points: the first layer of stages 1..n-1."""
    check_stage_args(n_layers, n_stages, 1, split_points)
    if split_points is None:  # even; the first L % n stages get one layer more
        size, extra = divmod(n_layers, n_stages)
        split_points = list(itertools.accumulate(size + (s < extra) for s in range(n_stages - 1)))
    bounds = [0, *split_points, n_layers]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def stage_rank(stage: int, pp: int) -> int:
    """Looped placement: stage s on rank s % pp."""
    return stage % pp


def build_stage(model: nn.Module, stage: int, n_stages: int, layers: list[int]) -> nn.Module:
    """A copy of `model` (built on meta) holding only `layers`; embeddings on the first
    stage, norm and output on the last. Names are kept."""
    part = copy.deepcopy(model)
    for key in list(part.layers.keys()):
        if int(key) not in layers:
            del part.layers[key]
    if stage != 0:
        part.tok_embeddings = None
    if stage != n_stages - 1:
        part.norm = part.output = None
    return part


def _check_model(model: nn.Module) -> None:
    """The model contract of build_stages (see the module docstring), as a ValueError."""
    layers, name = getattr(model, "layers", None), type(model).__name__
    if not isinstance(layers, nn.ModuleDict):
        raise ValueError(f"pipeline: the {name} has no `layers` nn.ModuleDict (got {type(layers).__name__})")
    if list(layers.keys()) != [str(i) for i in range(len(layers))]:
        raise ValueError(f"pipeline: {name}.layers must be keyed '0', '1', ..., got {list(layers.keys())[:8]}")
    other = [n for n, _ in [*model.named_children(), *model.named_parameters(recurse=False)]
             if n not in ("layers", "tok_embeddings", "norm", "output")]
    if other:
        raise ValueError(f"pipeline: the {name} has {other} at the top level besides layers, tok_embeddings, "
                         f"norm and output: no stage would know whether it owns them")


def build_stages(model: nn.Module, pp_rank: int, pp: int, stages_per_rank: int = 1,
                 split_points: list[int] | None = None) -> dict[int, nn.Module]:
    """This rank's stages {stage index: module} of `model` (on meta), after checking the
    model's layer container and the numbers."""
    _check_model(model)
    check_stage_args(len(model.layers), pp, stages_per_rank, split_points)
    n = pp * stages_per_rank
    split = split_layers(len(model.layers), n, split_points)
    return {s: build_stage(model, s, n, split[s]) for s in range(n) if stage_rank(s, pp) == pp_rank}


class Stages(nn.Module):
    """A rank's stages as one module for the optimizer, init and checkpoints: its
    named_parameters are the model's own names (no "stages.N." prefix)."""

    def __init__(self, stages: dict[int, nn.Module]):
        super().__init__()
        self.stages = nn.ModuleDict({str(s): m for s, m in stages.items()})

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for stage in self.stages.values():
            yield from stage.named_parameters(prefix, recurse, remove_duplicate)


# ---------------------------------------------------------------------------------------
# 2. Schedules (compute actions per rank), communication, simulation

@dataclass(frozen=True)
class Action:
    kind: str  # F B I W | SEND_F RECV_F SEND_B RECV_B
    stage: int
    mb: int
    peer: int = -1  # the other rank of a SEND / RECV

    def __str__(self) -> str:
        if self.kind in COMPUTE:
            return f"{self.stage}{self.kind}{self.mb}"
        arrow = "->" if self.kind.startswith("SEND") else "<-"
        return f"{self.kind}({self.stage},{self.mb}){arrow}{self.peer}"


def gpipe(pp: int, m: int, v: int = 1) -> list[list[Action]]:
    return [[Action("F", r, i) for i in range(m)] + [Action("B", r, i) for i in range(m)] for r in range(pp)]


def one_f_one_b(pp: int, m: int, v: int = 1) -> list[list[Action]]:
    orders = []
    for r in range(pp):
        warmup = min(pp - 1 - r, m)
        order = [Action("F", r, i) for i in range(warmup)]
        for i in range(m - warmup):
            order += [Action("F", r, warmup + i), Action("B", r, i)]
        order += [Action("B", r, i) for i in range(m - warmup, m)]
        orders.append(order)
    return orders


def interleaved_1f1b(pp: int, m: int, v: int) -> list[list[Action]]:
    """Megatron's interleaved order. Forward k (0 <= k < m v) of a rank runs chunk
    (k // p) % v on micro-batch (k // (p v)) p + k % p; backward k the mirror chunk."""
    total = m * v

    def mb(k: int) -> int:
        return (k // (pp * v)) * pp + k % pp

    orders = []
    for r in range(pp):
        def fwd(k: int) -> Action:
            return Action("F", ((k // pp) % v) * pp + r, mb(k))

        def bwd(k: int) -> Action:
            return Action("B", (v - 1 - (k // pp) % v) * pp + r, mb(k))

        warmup = min(2 * (pp - 1 - r) + (v - 1) * pp, total)
        order = [fwd(k) for k in range(warmup)]
        for i in range(total - warmup):
            order += [fwd(warmup + i), bwd(i)]
        order += [bwd(k) for k in range(total - warmup, total)]
        orders.append(order)
    return orders


def zero_bubble(pp: int, m: int, v: int = 1) -> list[list[Action]]:
    """ZB-H1 style, built by replaying 1F1B (with B -> I) in unit time: a rank whose next
    F or I cannot start yet (its input has not arrived) runs a deferred W instead; the
    W's left at the end run last. The F / I order is 1F1B's, so at most p - r micro-
    batches hold their stage activations (F to I), as in 1F1B; the W's hold only the
    linears' inputs and output gradients until they run."""
    main = [[Action("I" if a.kind == "B" else "F", a.stage, a.mb) for a in order] for order in one_f_one_b(pp, m)]
    done: dict[tuple, int] = {}  # (kind, stage, mb) -> end time
    orders: list[list[Action]] = [[] for _ in range(pp)]
    pending = [collections.deque() for _ in range(pp)]
    nxt = [0] * pp
    t = 0
    while any(nxt[r] < len(main[r]) or pending[r] for r in range(pp)):
        for r in range(pp):
            a = main[r][nxt[r]] if nxt[r] < len(main[r]) else None
            if a is not None and a.kind == "F":
                ready = a.stage == 0 or done.get(("F", a.stage - 1, a.mb), t + 1) <= t
            elif a is not None:
                ready = done.get(("F", a.stage, a.mb), t + 1) <= t and (
                    a.stage == pp - 1 or done.get(("I", a.stage + 1, a.mb), t + 1) <= t)
            else:
                ready = False
            if ready:
                nxt[r] += 1
                if a.kind == "I":
                    pending[r].append(Action("W", a.stage, a.mb))
            elif pending[r]:
                a = pending[r].popleft()
            else:
                continue  # idle
            orders[r].append(a)
            done[(a.kind, a.stage, a.mb)] = t + 1
        t += 1
    return orders


def forward_only(pp: int, m: int, v: int = 1) -> list[list[Action]]:
    """Evaluation: every forward, stage by stage on each rank."""
    return [[Action("F", c * pp + r, i) for c in range(v) for i in range(m)] for r in range(pp)]


SCHEDULES: dict[str, Callable[[int, int, int], list[list[Action]]]] = {
    "gpipe": gpipe, "1f1b": one_f_one_b, "interleaved_1f1b": interleaved_1f1b, "zero_bubble": zero_bubble,
}


def check_schedule_args(name: str, pp: int, m: int, v: int) -> None:
    """Clear errors for what a schedule cannot run."""
    if name not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule={name!r} does not exist; choose one of {list(SCHEDULES)}")
    if m < 1 or v < 1:
        raise ValueError(f"pipeline: parallel.pp_microbatches={m} and parallel.pp_stages_per_rank={v} must be >= 1 "
                         f"(pp_microbatches 0 means one per pipeline rank)")
    if name == "interleaved_1f1b":
        if v < 2:
            raise ValueError("parallel.pp_schedule=interleaved_1f1b needs parallel.pp_stages_per_rank >= 2")
        if m % pp:
            raise ValueError(f"parallel.pp_schedule=interleaved_1f1b needs the pipeline micro-batches "
                             f"(parallel.pp_microbatches={m}) to be a multiple of parallel.pp={pp}")
    elif v != 1:
        raise ValueError(f"parallel.pp_stages_per_rank={v}: only interleaved_1f1b runs several stages per rank "
                         f"(parallel.pp_schedule={name})")
    if name in ("1f1b", "interleaved_1f1b", "zero_bubble") and m < pp:
        raise ValueError(f"parallel.pp_schedule={name} needs at least parallel.pp={pp} micro-batches "
                         f"(parallel.pp_microbatches={m}): with fewer the pipeline never fills")


def build_schedule(name: str, pp: int, m: int, v: int = 1) -> list[list[Action]]:
    """Per rank: the schedule's compute actions with the communication inserted."""
    check_schedule_args(name, pp, m, v)
    return add_communication(SCHEDULES[name](pp, m, v), pp, pp * v)


def add_communication(orders: list[list[Action]], pp: int, n_stages: int) -> list[list[Action]]:
    """Insert SEND after each action whose result another rank needs, and RECVs in the
    sender's order, each posted no later than just before its consumer."""
    channels: dict[tuple[int, int, str], list[tuple[int, int]]] = collections.defaultdict(list)
    for r, order in enumerate(orders):  # messages per (sender, receiver, kind), in send order
        for a in order:
            for kind, stage in _outputs(a, n_stages):
                if stage_rank(stage, pp) != r:
                    channels[(r, stage_rank(stage, pp), kind)].append((stage, a.mb))
    out = []
    for r, order in enumerate(orders):
        posted = collections.Counter()
        actions = []
        for a in order:
            need = _input(a, n_stages)
            if need is not None and stage_rank(_source(need, a), pp) != r:
                kind, stage = need
                src = stage_rank(_source(need, a), pp)
                queue = channels[(src, r, kind)]
                k = queue.index((stage, a.mb))
                while posted[(src, kind)] <= k:
                    s, i = queue[posted[(src, kind)]]
                    actions.append(Action(f"RECV_{kind}", s, i, src))
                    posted[(src, kind)] += 1
            actions.append(a)
            for kind, stage in _outputs(a, n_stages):
                if stage_rank(stage, pp) != r:
                    actions.append(Action(f"SEND_{kind}", stage, a.mb, stage_rank(stage, pp)))
        out.append(actions)
    return out


def _outputs(a: Action, n_stages: int) -> list[tuple[str, int]]:
    """(message kind, consuming stage) of what action `a` produces for another stage."""
    if a.kind == "F" and a.stage < n_stages - 1:
        return [("F", a.stage + 1)]
    if a.kind in ("B", "I") and a.stage > 0:
        return [("B", a.stage - 1)]
    return []


def _input(a: Action, n_stages: int) -> tuple[str, int] | None:
    """(message kind, consuming stage) that action `a` must receive, if any."""
    if a.kind == "F" and a.stage > 0:
        return ("F", a.stage)
    if a.kind in ("B", "I") and a.stage < n_stages - 1:
        return ("B", a.stage)
    return None


def _source(need: tuple[str, int], a: Action) -> int:
    kind, stage = need
    return stage - 1 if kind == "F" else stage + 1


def format_schedule(actions: list[list[Action]], compute_only: bool = True) -> str:
    return "\n".join(f"rank {r} | " + " ".join(str(a) for a in order if not compute_only or a.kind in COMPUTE)
                     for r, order in enumerate(actions))


def simulate(actions: list[list[Action]], n_stages: int, cost: dict[str, int] | None = None) -> dict:
    """Replay the compute actions with unit costs (F 1, B 2, I 1, W 1) and free
    communication: makespan, busy and idle time per rank, and per rank the peak number of
    (stage, micro-batch) forwards in flight (weight gradient not done) and holding their
    stage activations (B or I not done); with v stages per rank each counts A / v.
    `times`: per rank, (action, start, end) of each compute action, what `draw` shows."""
    cost = cost or {"F": 1, "B": 2, "I": 1, "W": 1}
    pp = len(actions)
    orders = [[a for a in order if a.kind in COMPUTE] for order in actions]
    backward = "I" if any(a.kind == "I" for order in orders for a in order) else "B"
    end: dict[tuple, int] = {}
    clock, nxt = [0] * pp, [0] * pp
    in_flight, peak = [0] * pp, [0] * pp  # forwarded, weight gradient not done yet
    held, peak_held = [0] * pp, [0] * pp  # forwarded, stage activations not released (B or I)
    times: list[list[tuple[Action, int, int]]] = [[] for _ in range(pp)]
    while any(nxt[r] < len(orders[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            if nxt[r] == len(orders[r]):
                continue
            a = orders[r][nxt[r]]
            deps = []
            if a.kind == "F" and a.stage > 0:
                deps.append(("F", a.stage - 1, a.mb))
            if a.kind in ("B", "I"):
                deps.append(("F", a.stage, a.mb))
                if a.stage < n_stages - 1:
                    deps.append((backward, a.stage + 1, a.mb))
            if a.kind == "W":
                deps.append(("I", a.stage, a.mb))
            if not all(d in end for d in deps):
                continue
            start = max([clock[r]] + [end[d] for d in deps])
            clock[r] = end[(a.kind, a.stage, a.mb)] = start + cost[a.kind]
            times[r].append((a, start, clock[r]))
            if a.kind == "F":
                in_flight[r] += 1
                held[r] += 1
                peak[r], peak_held[r] = max(peak[r], in_flight[r]), max(peak_held[r], held[r])
            in_flight[r] -= a.kind in ("B", "W")
            held[r] -= a.kind in ("B", "I")
            nxt[r] += 1
            progressed = True
        if not progressed:
            stuck = {r: str(orders[r][nxt[r]]) for r in range(pp) if nxt[r] < len(orders[r])}
            raise ValueError(f"schedule deadlocks: every rank waits, next actions {stuck}")
    makespan = max(clock)
    busy = [sum(e - s for _, s, e in row) for row in times]
    return dict(makespan=makespan, busy=busy, idle=[makespan - b for b in busy], peak_in_flight=peak,
                peak_activations=peak_held, times=times)


# ---------------------------------------------------------------------------------------
# 3. The runner

class PipelineRunner:
    """Executes one rank's action list for a step. `stages`: {stage: module}; each
    stage module takes (tokens or hidden, positions) and returns hidden or logits.
    loss_fn(logits, labels) -> this micro-batch's share of the step loss.
    act_shape / act_dtype: the hidden state crossing stage boundaries (per TP rank).
    grad_sync(stage, last): called before each backward of a stage (FSDP: reduce
    gradients only on the stage's last backward of the step)."""

    def __init__(self, actions: list[Action], stages: dict[int, nn.Module], n_stages: int,
                 group: dist.ProcessGroup, loss_fn: Callable, act_shape: tuple[int, ...], act_dtype: torch.dtype,
                 device: torch.device, grad_sync: Callable[[int, bool], None] | None = None):
        self.actions, self.stages, self.n_stages = actions, stages, n_stages
        self.group, self.loss_fn = group, loss_fn
        self.act_shape, self.act_dtype, self.device = act_shape, act_dtype, device
        self.grad_sync = grad_sync
        self.split_backward = any(a.kind == "I" for a in actions)
        self.capture: list | None = None  # zero-bubble: (linear, x) pairs of the running F
        if self.split_backward:
            for stage in stages.values():
                for module in stage.modules():
                    if isinstance(module, nn.Linear):
                        module.register_forward_hook(self._capture_linear)

    def _capture_linear(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if self.capture is None or not torch.is_grad_enabled():
            return
        pair = [module, args[0].detach(), None]  # the output gradient arrives during I
        out.register_hook(lambda g, pair=pair: pair.__setitem__(2, g))
        self.capture.append(pair)

    def step(self, inputs: list[torch.Tensor], labels: list[torch.Tensor],
             positions: torch.Tensor | None = None, sync_grads: bool = True) -> torch.Tensor:
        """Run the action list. inputs / labels: one (B_mb, S) tensor per micro-batch
        (used on the first / last stage). sync_grads: this is the last step before the
        optimizer (gradient accumulation), so grad_sync may reduce on each stage's last
        backward. Returns the sum of the micro-batch losses on the last stage's rank,
        zero elsewhere."""
        x_in, out, losses, recv, pairs = {}, {}, {}, {}, {}
        sends: list[dist.Work] = []
        batch: list[tuple[dist.P2POp, tuple | None]] = []  # consecutive SEND / RECV, posted together
        last_backward = {a.stage: a.mb for a in self.actions if a.kind in ("B", "I")}
        total = torch.zeros((), dtype=torch.float64, device=self.device)

        def flush() -> None:
            if batch:
                works = dist.batch_isend_irecv([op for op, _ in batch])  # comm: pp group, activations / grads
                for (_, key), work in zip(batch, works):
                    if key is None:
                        sends.append(work)
                    else:
                        recv[key] = (recv[key][0], work)
                batch.clear()

        for a in self.actions:
            key = (a.stage, a.mb)
            if a.kind == "SEND_F":  # the output of stage a.stage - 1 for micro-batch a.mb
                t = out[(a.stage - 1, a.mb)] if torch.is_grad_enabled() else out.pop((a.stage - 1, a.mb))
                batch.append((dist.P2POp(dist.isend, self._check(t, a), group=self.group, group_peer=a.peer), None))
                continue
            if a.kind == "SEND_B":  # the input gradient of stage a.stage + 1
                t = x_in.pop((a.stage + 1, a.mb)).grad
                batch.append((dist.P2POp(dist.isend, self._check(t, a), group=self.group, group_peer=a.peer), None))
                continue
            if a.kind.startswith("RECV"):
                buf = torch.empty(self.act_shape, dtype=self.act_dtype, device=self.device)
                recv[(a.kind[-1], a.stage, a.mb)] = (buf, None)
                batch.append((dist.P2POp(dist.irecv, buf, group=self.group, group_peer=a.peer), (a.kind[-1], *key)))
                continue
            flush()
            sends = [w for w in sends if not w.is_completed()]  # drop finished sends' buffers
            stage = self.stages[a.stage]
            if a.kind == "F":
                if a.stage == 0:
                    x = inputs[a.mb]
                else:
                    x = (out[(a.stage - 1, a.mb)].detach() if self.local(a.stage - 1)
                         else self._received("F", *key, recv))
                    x.requires_grad_(torch.is_grad_enabled())
                x_in[key] = x
                if self.split_backward:
                    self.capture = pairs[key] = []
                y = stage(x, positions)
                self.capture = None
                if a.stage == self.n_stages - 1:
                    loss = self.loss_fn(y, labels[a.mb])
                    total += loss.detach().double()
                    if torch.is_grad_enabled():
                        losses[key] = loss
                else:
                    out[key] = y
            elif a.kind in ("B", "I"):
                if self.grad_sync is not None:
                    self.grad_sync(a.stage, sync_grads and a.mb == last_backward[a.stage])
                if a.stage == self.n_stages - 1:
                    outputs, grad = losses.pop(key), None
                else:
                    outputs = out.pop(key)
                    nxt = (a.stage + 1, a.mb)
                    grad = x_in.pop(nxt).grad if self.local(a.stage + 1) else self._received("B", *key, recv)
                if a.kind == "B":
                    torch.autograd.backward(outputs, grad)
                else:
                    self._backward_input(stage, x_in[key], outputs, grad)
                if a.stage == 0:
                    x_in.pop(key)  # the tokens: no gradient to send
            elif a.kind == "W":
                self._backward_weight(pairs.pop(key))
        flush()
        for work in sends:
            work.wait()
        return total

    def local(self, stage: int) -> bool:
        """Whether `stage` runs on this rank (adjacent stages share a rank only if pp = 1)."""
        return stage in self.stages

    def _received(self, kind: str, stage: int, mb: int, recv: dict) -> torch.Tensor:
        buf, work = recv.pop((kind, stage, mb))
        work.wait()
        return buf

    def _check(self, t: torch.Tensor | None, a: Action) -> torch.Tensor:
        """The tensor to send: its shape and dtype must be what the receiver allocated."""
        if t is None or tuple(t.shape) != tuple(self.act_shape) or t.dtype != self.act_dtype:
            got = None if t is None else (tuple(t.shape), t.dtype)
            raise RuntimeError(f"pipeline: {a} sends {got} but the receiver expects "
                               f"{(tuple(self.act_shape), self.act_dtype)}")
        return t.detach().contiguous()

    def _backward_input(self, stage: nn.Module, x: torch.Tensor, outputs: torch.Tensor,
                        grad: torch.Tensor | None) -> None:
        """Zero-bubble I: gradients of the stage input and of the non-linear parameters
        (norms, embedding); the linears' weight-gradient GEMMs are skipped by autograd
        (their weights are not asked for) and done in W from the captured pairs."""
        linear_weights = {id(m.weight) for m in stage.modules() if isinstance(m, nn.Linear)}
        others = [p for p in stage.parameters() if id(p) not in linear_weights and p.requires_grad]
        inputs = ([x] if x.requires_grad else []) + others
        grads = torch.autograd.grad(outputs, inputs, grad, allow_unused=True)
        if x.requires_grad:
            x.grad, grads = grads[0], grads[1:]
        for p, g in zip(others, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    @torch.no_grad()
    def _backward_weight(self, pairs: list) -> None:
        """Zero-bubble W: dW = dy^T x for every linear the micro-batch went through."""
        for module, x, dy in pairs:
            if dy is None:
                continue
            dw = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(dy.dtype)
            w = module.weight
            w.grad = dw.to(w.dtype) if w.grad is None else w.grad + dw.to(w.dtype)


# ---------------------------------------------------------------------------------------
# 4. The picture: `python pipeline.py draw SCHEDULE --pp P --microbatches M --out FILE.png`

def draw(name: str, pp: int, m: int, v: int, out: str) -> list[tuple[int, Action, int, int]]:
    """Draw `simulate`'s timeline of a schedule to a PNG: a row per rank, a box per compute
    action (colour: micro-batch; B / I lighter, W lighter and hatched), idle time blank.
    Returns the boxes drawn, (rank, action, start, end). Needs matplotlib (optional)."""
    try:
        import matplotlib
        from matplotlib.figure import Figure  # no pyplot, no global backend: savefig draws PNGs with Agg
    except ImportError as e:
        raise ImportError("pipeline.draw needs matplotlib: pip install matplotlib") from e
    sim = simulate(build_schedule(name, pp, m, v), pp * v)
    boxes = [(r, a, start, end) for r, row in enumerate(sim["times"]) for a, start, end in row]
    span = sim["makespan"]
    bubble = 1 - sum(end - start for _, _, start, end in boxes) / (pp * span)  # idle / (ranks x makespan)
    colors = matplotlib.colormaps["tab10" if m <= 10 else "tab20"]
    width = min(40.0, max(8.0, 0.28 * span))  # inches; about 0.28 per unit of time
    fig = Figure(figsize=(width, 1.3 + 0.55 * pp), dpi=100)
    ax = fig.subplots()
    for r, a, start, end in boxes:
        color = colors(a.mb % colors.N)[:3]
        if a.kind != "F":  # backward kinds: the micro-batch's colour, mixed with white
            color = tuple(0.45 * c + 0.55 for c in color)
        ax.broken_barh([(start, end - start)], (r - 0.4, 0.8), facecolors=color, edgecolor="black",
                       linewidth=0.6, hatch="///" if a.kind == "W" else None)
        if width / span >= 0.2:  # room for a label
            label = f"{a.kind}{a.mb}" + (f"\ns{a.stage}" if v > 1 else "")
            ax.text((start + end) / 2, r, label, ha="center", va="center", fontsize=7)
    ax.set(xlim=(0, span), ylim=(pp - 0.5, -0.5), yticks=range(pp), yticklabels=[f"rank {r}" for r in range(pp)],
           xlabel="time (unit costs: F 1, B 2, I 1, W 1 per stage; communication free)" +
                  (f"; sN: stage N of {pp * v}" if v > 1 else ""))
    ax.set_title(f"{name}: pp {pp}, {m} micro-batches, {v} stage{'s' * (v > 1)} per rank, bubble {bubble:.1%}")
    fig.savefig(out, bbox_inches="tight")
    return boxes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pipeline.py", description="Pictures of the pipeline schedules.")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("draw", help="a schedule's timeline as `simulate` replays it, to a PNG")
    cmd.add_argument("schedule", help=f"one of {list(SCHEDULES)}")  # check_schedule_args names them
    cmd.add_argument("--pp", type=int, required=True, help="pipeline ranks")
    cmd.add_argument("--microbatches", type=int, required=True)
    cmd.add_argument("--stages-per-rank", type=int, default=1)
    cmd.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    if args.pp < 1:
        cmd.error(f"--pp={args.pp} must be >= 1")
    try:
        boxes = draw(args.schedule, args.pp, args.microbatches, args.stages_per_rank, args.out)
    except (ValueError, ImportError) as e:  # check_schedule_args (in build_schedule), or no matplotlib
        cmd.error(str(e))
    print(f"wrote {args.out}: {len(boxes)} actions on {args.pp} ranks")


if __name__ == "__main__":
    main()
