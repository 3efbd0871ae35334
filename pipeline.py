"""Pipeline parallelism: Llama split into stages by layers, schedules as data (GPipe,
1F1B, interleaved 1F1B, zero-bubble ZB-H1 and ZB-V), one small runner over isend / irecv.

    check_stage_args(n_layers, pp, v, None); check_schedule_args("1f1b", pp, m, v)  # config.validate too
    stages = build_stages(model, pp_rank, pp, v, schedule="1f1b")  # {stage: copy of the model on meta}
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
on every layout: init and checkpoints do not depend on the split. Placement belongs to the
schedule, and `stage_rank(stage, pp, schedule)` is the one place that says it. Looped (every
schedule but zbv): stage s lives on rank s % pp (rank r holds stages r, r + pp, ...), so with
v > 1 a rank's stages are not adjacent (Megatron's interleaving). V (zbv, v = 2): rank r holds
stages r and 2p-1-r, so rank 0 holds the first and the last stage, and stages p-1 and p share
rank p-1: that hand-off stays on the rank (no send; the runner passes the tensor over).

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
    [zbv] (v = 2 in a V: rank 0 holds stages 0 and 3, rank 1 stages 1 and 2)
    rank 0 | 0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0F3 0I0 0W0 3F2 3I2 3W2 0I1 0W1 3F3 3I3 3W3 0I2 0W2 0I3 0W3
    rank 1 | 1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1F3 1I1 1W1 2F3 2I2 2W2 1I2 2I3 1I3 1W2 2W3 1W3

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
                      batches (1F1B's order of F and I); the deferred W's keep what the
                      weight nodes saved (the linears' and norms' inputs) and the
                      gradients arriving at them until they run, up to m micro-
                      batches' worth on rank 0 (the paper places W's by hand to bound
                      this; ours trades that memory for a schedule derived mechanically).
    zbv               ZB-V (Qi et al. 2023, section 6; torch's ScheduleZBVZeroBubble, its
                      order): v = 2 stages per rank in a V, B split into I and W as above;
                      warm-up forwards down the V, then the up stage's F I W, a steady
                      state alternating both stages' F I W, a cool-down of I's, then the
                      W's left. With t_F = t_I = t_W = t for one stage (half a rank's
                      layers): bubble max(p-1, 2(2p-1-m)) t, i.e. (p-1) t once m >= 2p-1
                      (rank r waits r t for the first micro-batch and ends p-1-r t early),
                      fraction (p-1)/(6m + p-1): half of zero_bubble's (p-1)/(3m + p-1),
                      a third of interleaved's (p-1)/(2m + p-1); at m = p it equals
                      zero_bubble's. The order is fixed, tuned for equal times only. Built
                      for max(m, 2p-1) micro-batches, those >= m dropped (torch does this;
                      TorchTitan only warns when m < 2p), so any m >= 1 runs. In flight:
                      2p stage-micro-batches (p A) on every rank once m >= 2p-1, 1F1B's
                      rank 0; W mostly follows its I, so the W's hold little more.
`simulate` replays a table with unit costs (F = 1, B = 2, I = W = 1, no communication) and reports
makespan, idle slots and peak in-flight micro-batches per rank; the tests check them against these.
`python pipeline.py draw 1f1b --pp 4 --microbatches 8 --out 1f1b.png` draws its timeline (matplotlib).

Zero-bubble mechanics (zero_bubble and zbv): the stage's autograd graph is split, not its
layers, so whatever computes a weight gradient inside autograd splits too (FSDP, TP, CP, float8).
  I   torch.autograd.grad(stage output, x), graph kept: x is the stage input, on stage 0 the
      embedding's output (the tokens have no gradient; a hook on tok_embeddings records it).
      Autograd runs the nodes on the paths from the output to x, the activation path; a
      "weight node" on it also reads a tensor off it (a weight, or what was made of one: a
      cast, FSDP's gathered parameter), and of such a node autograd runs the input part only
      (the matmul node computes dX = dY W, not dW = dY^T X). A walk of the graph finds the
      weight nodes; a pre-hook keeps the gradient arriving at each. What only the activation
      path saved in F (attention's q, k, v, the norms' statistics, ...) is released after I
      (saved-tensor hooks hold it); what the weight nodes saved (the linears' and norms'
      inputs) stays for W.
  W   per weight node, its weight part alone: autograd.grad from the node, with the kept
      gradient, to its inputs off the path (for a matmul node: the dW GEMM). Then one
      backward from all of those gradients (and, on stage 0, the embedding output's) through
      what lies between them and the leaves: casts, transposes, the embedding lookup, FSDP's
      GatherParams, whose backward reduce-scatters. Autograd captures gradients per node, so
      each weight needs a node of its own there (fsdp.py hands each gathered parameter over
      as a view); a stage where two weight nodes reach a common node (a tied weight) runs
      full backwards instead, said once in the log.
  Custom autograd.Functions compute only what ctx.needs_input_grad asks for (float8's
  Float8Matmul, async TP's rings: standard practice); the runner narrows it per pass (I: the
  activation inputs; W: the weights), so their dW GEMMs run in W with the numbers of the
  unsplit backward (float8: its own float8 GEMM; async TP: block by block, the row-parallel
  ring gathering dY's blocks once more). One that computes its weight gradient anyway is
  seen doing it in I (a hook on its node): W passes that gradient on, said once in the log.
  Activation checkpointing: a stage with a checkpointed block (a module with a checkpoint_fn)
  runs I as a full backward and W as nothing, said once in the log. Its weight nodes read
  the checkpoint's recomputed activations, and torch's checkpoint hands a saved tensor to one
  backward pass only: splitting would recompute the block a second time in W, or keep the
  recomputed activations from I until W, the memory checkpointing is there to save.
  torch.compile: a compiled block's backward is one node that computes input and weight
  gradients together and frees its buffers after one pass; a stage with a compiled module
  runs I as a full backward and W as nothing, said once in the log.
  FSDP: grad_sync marks the stage's last W (an I reaches no weight: GatherParams does not run
  in I), so the reduce-scatter still comes once per step, after every W of the stage.

Loss and gradient scale. Each micro-batch loss is sum(token losses) / tokens in the GLOBAL batch
(the trainer's loss_fn), and gradients SUM over micro-batches, so a step over m micro-batches
equals the full-batch step; the runner never rescales. The last stage returns the loss sum; the
trainer all-reduces it over pp so every rank logs it.

P2P volume per step: each of the m micro-batches crosses v p - 1 stage boundaries forward
(B_mb x S x D activations, / tp with sequence parallel) and the same backward: 2 m (v p - 1)
B_mb S D bytes-per-element in total, 2 m v B_mb S D per rank at most. zbv's V keeps the
boundary between stages p-1 and p on rank p-1: 2 m (2p - 2) in total.

With FSDP each stage is its own FSDP model; `grad_sync(stage, last)` is called before each backward
action so gradients are reduce-scattered once per step, on the stage's last B (or W). With TP each stage
is tensor-parallel; the activations sent are the TP rank's sequence shard, to the same TP rank of
the next stage.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import functools
import itertools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import BackwardCFunction
from torch.autograd.graph import GradientEdge, get_gradient_edge

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


V_SHAPED = ("zbv",)  # schedules whose stages sit in a V; every other schedule loops


def stage_rank(stage: int, pp: int, schedule: str) -> int:
    """The rank holding `stage` under `schedule`: the one placement every user asks
    (build_stages, add_communication, forward_only, the planner). Looped: stage s on
    rank s % pp (rank r: r, r + pp, ...). V (zbv): chunk c = s // pp runs down the ranks
    when c is even and back up when odd (rank r: r and 2 pp - 1 - r)."""
    chunk, i = divmod(stage, pp)
    return pp - 1 - i if schedule in V_SHAPED and chunk % 2 else i


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
                 split_points: list[int] | None = None, schedule: str = "1f1b") -> dict[int, nn.Module]:
    """This rank's stages {stage index: module} of `model` (on meta), placed as `schedule`
    places them (stage_rank), after checking the model's layer container and the numbers."""
    _check_model(model)
    check_stage_args(len(model.layers), pp, stages_per_rank, split_points)
    n = pp * stages_per_rank
    split = split_layers(len(model.layers), n, split_points)
    return {s: build_stage(model, s, n, split[s]) for s in range(n) if stage_rank(s, pp, schedule) == pp_rank}


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


def zbv(pp: int, m: int, v: int = 2) -> list[list[Action]]:
    """ZB-V (Qi et al. 2023, section 6), in the order of torch's ScheduleZBVZeroBubble.
    Rank r runs its "down" stage r and its "up" stage 2p-1-r; B is split into I and W.
    Per rank, counting micro-batches per (kind, stage):
      warm-up   2(p-r)-1 down F; then r pairs (up F, down F)
      fill      p-r times up F I W (the first gradients start back up the V)
      steady    [down F while any is left] down I W, up F I W; until all up F are done
      cool-down r pairs (down I, up I); p-r pairs (down I, down W); the r up W, the r down W
    The table is built for n = max(m, 2p-1) micro-batches (the fewest that fill the V)
    and the actions of micro-batches >= m are dropped, as torch does."""
    n = max(m, 2 * pp - 1)
    orders = []
    for r in range(pp):
        stage = {0: r, 1: 2 * pp - 1 - r}  # 0: down, 1: up
        count = collections.Counter()  # (kind, 0 / 1) -> micro-batches issued
        order: list[Action] = []

        def run(*steps: str) -> None:  # e.g. run("F1", "I1", "W1")
            for kind, c in steps:
                order.append(Action(kind, stage[int(c)], count[kind, c]))
                count[kind, c] += 1

        for _ in range(2 * (pp - r) - 1):
            run("F0")
        for _ in range(r):
            run("F1", "F0")
        for _ in range(pp - r):
            run("F1", "I1", "W1")
        while count["F", "1"] < n:
            if count["F", "0"] < n:
                run("F0")
            run("I0", "W0", "F1", "I1", "W1")
        for _ in range(r):
            run("I0", "I1")
        for _ in range(pp - r):
            run("I0", "W0")
        run(*["W1"] * r, *["W0"] * r)
        orders.append([a for a in order if a.mb < m])
    return orders


def forward_only(pp: int, m: int, v: int = 1, schedule: str = "1f1b") -> list[list[Action]]:
    """Evaluation: every forward, stage by stage (in stage order) on each rank, the
    stages placed as `schedule` places them."""
    return [[Action("F", s, i) for s in range(pp * v) if stage_rank(s, pp, schedule) == r for i in range(m)]
            for r in range(pp)]


SCHEDULES: dict[str, Callable[[int, int, int], list[list[Action]]]] = {
    "gpipe": gpipe, "1f1b": one_f_one_b, "interleaved_1f1b": interleaved_1f1b, "zero_bubble": zero_bubble,
    "zbv": zbv,
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
    elif name in V_SHAPED:
        if v != 2:
            raise ValueError(f"parallel.pp_schedule={name} needs parallel.pp_stages_per_rank=2 (got {v}): rank r "
                             f"holds stages r and 2 pp - 1 - r of the V")
    elif v != 1:
        raise ValueError(f"parallel.pp_stages_per_rank={v}: only interleaved_1f1b and zbv run several stages per rank "
                         f"(parallel.pp_schedule={name})")
    if name in ("1f1b", "interleaved_1f1b", "zero_bubble") and m < pp:
        raise ValueError(f"parallel.pp_schedule={name} needs at least parallel.pp={pp} micro-batches "
                         f"(parallel.pp_microbatches={m}): with fewer the pipeline never fills")


def build_schedule(name: str, pp: int, m: int, v: int = 1) -> list[list[Action]]:
    """Per rank: the schedule's compute actions with the communication inserted."""
    check_schedule_args(name, pp, m, v)
    return add_communication(SCHEDULES[name](pp, m, v), pp, pp * v, name)


def add_communication(orders: list[list[Action]], pp: int, n_stages: int,
                      schedule: str = "1f1b") -> list[list[Action]]:
    """Insert SEND after each action whose result another rank needs, and RECVs in the
    sender's order, each posted no later than just before its consumer. `schedule`:
    whose placement the table uses (stage_rank); a hand-off within a rank sends nothing.
    The order is kept per pair of ranks, activations and gradients mixed: in zbv's V (and
    interleaved with p = 2) one pair carries both, and NCCL / gloo match a pair's messages
    in issue order, so a gradient received where an activation was sent first would land
    in the wrong buffer. A receive may thus be posted earlier than its consumer needs."""
    def rank(stage: int) -> int:
        return stage_rank(stage, pp, schedule)

    channels: dict[tuple[int, int], list[tuple[str, int, int]]] = collections.defaultdict(list)
    for r, order in enumerate(orders):  # messages per (sender, receiver), in send order
        for a in order:
            for kind, stage in _outputs(a, n_stages):
                if rank(stage) != r:
                    channels[(r, rank(stage))].append((kind, stage, a.mb))
    out = []
    for r, order in enumerate(orders):
        posted = collections.Counter()  # sender -> messages from it already received
        actions = []
        for a in order:
            need = _input(a, n_stages)
            if need is not None and rank(_source(need, a)) != r:
                kind, stage = need
                src = rank(_source(need, a))
                queue = channels[(src, r)]
                k = queue.index((kind, stage, a.mb))
                while posted[src] <= k:  # everything the sender sends before it, in its order
                    actions.append(Action(f"RECV_{queue[posted[src]][0]}", *queue[posted[src]][1:], src))
                    posted[src] += 1
            actions.append(a)
            for kind, stage in _outputs(a, n_stages):
                if rank(stage) != r:
                    actions.append(Action(f"SEND_{kind}", stage, a.mb, rank(stage)))
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


def simulate(actions: list[list[Action]], n_stages: int, cost: dict[str, int] | None = None,
             stage_scale: list[float] | None = None) -> dict:
    """Replay the compute actions with unit costs (F 1, B 2, I 1, W 1) and free
    communication: makespan, busy and idle time per rank, and per rank the peak number of
    (stage, micro-batch) forwards in flight (weight gradient not done) and holding their
    stage activations (B or I not done); with v stages per rank each counts A / v.
    `times`: per rank, (action, start, end) of each compute action, what `draw` shows.
    stage_scale: each stage's actions cost that many times the unit costs (stages of
    unequal work, e.g. the last one with the output layer: the planner's step time)."""
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
            clock[r] = end[(a.kind, a.stage, a.mb)] = start + cost[a.kind] * (stage_scale[a.stage] if stage_scale else 1)
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
    grad_sync(stage, last): called before each backward action of a stage (B, I, W);
    last: this action completes the stage's weight gradients for the optimizer step
    (its last B, or with a split backward its last W), so FSDP reduces them now.
    log(msg): where the runner says, once each, what it runs unsplit (zero-bubble)."""

    def __init__(self, actions: list[Action], stages: dict[int, nn.Module], n_stages: int,
                 group: dist.ProcessGroup, loss_fn: Callable, act_shape: tuple[int, ...], act_dtype: torch.dtype,
                 device: torch.device, grad_sync: Callable[[int, bool], None] | None = None,
                 log: Callable[[str], None] = print):
        self.actions, self.stages, self.n_stages = actions, stages, n_stages
        self.group, self.loss_fn = group, loss_fn
        self.act_shape, self.act_dtype, self.device = act_shape, act_dtype, device
        self.grad_sync, self.log, self.said = grad_sync, log, set()
        self.split_backward = any(a.kind == "I" for a in actions)
        # Zero-bubble: I stops at the stage input, on stage 0 at the embedding's output (the
        # tokens have no gradient), recorded by a hook in F. A stage that cannot split runs
        # I as a full backward and W as nothing (the module docstring says why).
        self.embedded: torch.Tensor | None = None
        self.full_backward: set[int] = set()
        self.released: list | None = None  # during I: holders of saved tensors only the activation path read
        self.in_weight_node = False  # during I: a weight node is running
        unsplit = collections.defaultdict(list)  # why -> stages
        for s, stage in stages.items() if self.split_backward else ():
            modules = list(stage.modules())
            if any(getattr(m, "checkpoint_fn", None) is not None for m in modules):
                unsplit["they recompute activations in backward (activation checkpointing): input and weight "
                        "gradients come from the one recompute; a split would keep the recomputed activations "
                        "until W, or recompute twice"].append(s)
            elif any(getattr(m, "_compiled_call_impl", None) is not None for m in modules):  # nn.Module.compile
                unsplit["they run compiled modules (torch.compile), whose backward is one node that computes "
                        "input and weight gradients together and frees its buffers: it cannot run in two "
                        "passes"].append(s)
            elif s == 0 and getattr(stage, "tok_embeddings", None) is None:
                unsplit["it has no tok_embeddings to stop I at"].append(s)
            elif s == 0:
                stage.tok_embeddings.register_forward_hook(self._record_embedding)
        for why, which in unsplit.items():
            self.full_backward.update(which)
            self._say(f"pipeline: zero-bubble runs stages {which} unsplit (I the full backward, W nothing): {why}")

    def _record_embedding(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            self.embedded = out

    def _say(self, msg: str) -> None:
        if msg not in self.said:
            self.said.add(msg)
            self.log(msg)

    def step(self, inputs: list[torch.Tensor], labels: list[torch.Tensor],
             positions: torch.Tensor | None = None, sync_grads: bool = True) -> torch.Tensor:
        """Run the action list. inputs / labels: one (B_mb, S) tensor per micro-batch
        (used on the first / last stage). sync_grads: this is the last step before the
        optimizer (gradient accumulation), so grad_sync may reduce on each stage's last
        backward. Returns the sum of the micro-batch losses on the last stage's rank,
        zero elsewhere."""
        x_in, out, losses, recv, deferred = {}, {}, {}, {}, {}
        sends: list[dist.Work] = []
        batch: list[tuple[dist.P2POp, tuple | None]] = []  # consecutive SEND / RECV, posted together

        def completes(a: Action) -> bool:  # the actions that produce a stage's weight gradients
            return a.kind == "B" or a.kind == ("I" if a.stage in self.full_backward else "W")

        def reduces(a: Action) -> bool:  # the stage's last of them in the optimizer step
            return sync_grads and completes(a) and a.mb == [b.mb for b in self.actions
                                                            if b.stage == a.stage and completes(b)][-1]

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
                split = self.split_backward and a.stage not in self.full_backward and torch.is_grad_enabled()
                holding = torch.autograd.graph.saved_tensors_hooks(_hold, self._unhold)  # I frees what W will not read
                with holding if split else contextlib.nullcontext():
                    y = stage(x, positions)
                if self.embedded is not None:  # stage 0, zero-bubble: I stops at the embedding's output
                    x_in[key], self.embedded = self.embedded, None
                if a.stage == self.n_stages - 1:
                    loss = self.loss_fn(y, labels[a.mb])
                    total += loss.detach().double()
                    if torch.is_grad_enabled():
                        losses[key] = loss
                else:
                    out[key] = y
            elif a.kind in ("B", "I"):
                if a.stage == self.n_stages - 1:
                    outputs, grad = losses.pop(key), None
                else:
                    outputs = out.pop(key)
                    nxt = (a.stage + 1, a.mb)
                    grad = x_in.pop(nxt).grad if self.local(a.stage + 1) else self._received("B", *key, recv)
                # zero-bubble I: the graph's weight nodes (None: the stage cannot split, B from now on)
                nodes = None if completes(a) else self._weight_nodes(a.stage, x_in[key], outputs)
                if self.grad_sync is not None:
                    self.grad_sync(a.stage, reduces(a))
                if nodes is None:  # B, or I of a stage that does not split
                    torch.autograd.backward(outputs, grad)
                else:
                    deferred[key] = self._backward_input(nodes, x_in[key], outputs, grad)
                if a.stage == 0:
                    x_in.pop(key)  # the tokens (or their embedding): no gradient to send
            elif a.kind == "W" and completes(a):
                if self.grad_sync is not None:
                    self.grad_sync(a.stage, reduces(a))
                self._backward_weight(deferred.pop(key))
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

    def _weight_nodes(self, stage: int, x: torch.Tensor, outputs: torch.Tensor) -> list | None:
        """Zero-bubble: the weight nodes of a micro-batch's graph, (node, its inputs off the
        activation path): the nodes on the paths from the output to x (the stage input; on
        stage 0 the embedding's output) that also read a tensor off those paths (a weight,
        or what was made of one). None, and the stage runs full backwards from now on (said
        once), if a node off the path is reached twice from them (a weight two ops read, a
        node two weights share): autograd captures gradients per node, so W could not ask
        for one weight node's part without running the other's path."""
        x_node = get_gradient_edge(x).node  # a received input's AccumulateGrad; stage 0: the embedding's last op
        on_path = _reaches(outputs.grad_fn, x_node)
        nodes = []
        for node, on in on_path.items():
            if on and node is not x_node:
                weight = [i for i, (n, _) in enumerate(node.next_functions) if n is not None and not on_path[n]]
                if weight:
                    nodes.append((node, weight))
        arrivals, seen = collections.Counter(), set()  # edges into each node off the path
        stack = [node.next_functions[i][0] for node, weight in nodes for i in weight]
        stack += [n for n, _ in x_node.next_functions if n is not None]  # stage 0: the embedding's weight
        while stack:
            n = stack.pop()
            arrivals[n] += 1
            if n not in seen:
                seen.add(n)
                stack += [m for m, _ in n.next_functions if m is not None]
        shared = sorted({type(node).__name__ for node, weight in nodes for i in weight
                         if arrivals[node.next_functions[i][0]] > 1})
        if shared:
            self.full_backward.add(stage)
            self._say(f"pipeline: stage {stage}: the weight gradient of {', '.join(shared)} flows into a node that "
                      f"other gradients reach too (a shared or tied weight), which W cannot ask for alone: its I "
                      f"runs the full backward (B)")
            return None
        return nodes

    def _backward_input(self, nodes: list, x: torch.Tensor, outputs: torch.Tensor, grad: torch.Tensor | None
                        ) -> tuple[list, list]:
        """Zero-bubble I: the gradient of x alone, graph kept. Autograd runs the nodes on the
        activation path and, of a weight node, the input part only (a matmul node computes
        dX = dY W and skips dW = dY^T X); a pre-hook keeps the gradients arriving at each
        weight node. Returns W's work: (weight node, the gradients that arrived at it, its
        inputs off the path, its ctx.needs_input_grad for W if it is a custom Function)
        and (edge, gradient) pairs W only passes on."""
        arriving, early, hooks, plans = {}, {}, [], []
        for node, weight in nodes:
            needs = _function_needs(node, weight) if isinstance(node, BackwardCFunction) else None
            if needs is not None:  # a custom autograd.Function: ask its backward for the input part only
                node.needs_input_grad = needs[0]
            plans.append((node, weight, needs))
            hooks.append(node.register_prehook(functools.partial(self._arrive, arriving, node)))
            hooks.append(node.register_hook(functools.partial(self._leave, early, node, weight)))
        self.released = []
        try:
            (dx,) = torch.autograd.grad(outputs, x, grad, retain_graph=True)
            for holder in self.released:  # what only the activation path saved: W does not read it
                holder[0] = None
        finally:
            self.released = None
            for hook in hooks:
                hook.remove()
        done = []
        if x.is_leaf:
            x.grad = dx  # for SEND_B
        else:  # stage 0: W runs the embedding's backward from here
            done.append((get_gradient_edge(x), dx))
        todo = []
        for node, weight, needs in plans:
            if early.get(node):  # its backward computed the weight gradient anyway: W passes it on
                self._say(f"pipeline: {type(node).__name__} computes its weight gradient with its input gradient "
                          f"(its backward does not follow ctx.needs_input_grad): zero-bubble runs those layers' "
                          f"full backward in I")
                done += [(GradientEdge(*node.next_functions[i]), g) for i, g in early[node]]
            elif node in arriving:
                todo.append((node, arriving[node], weight, needs and needs[1]))
        return todo, done

    def _arrive(self, store: dict, node, grads: tuple) -> None:
        """Pre-hook of a weight node in I: keep the gradients arriving at it."""
        store[node] = grads
        self.in_weight_node = True

    def _leave(self, store: dict, node, weight: list[int], grad_inputs: tuple, grad_outputs: tuple) -> None:
        """Hook of a weight node in I, after it ran: the weight gradients it computed
        anyway (a custom Function that does not follow ctx.needs_input_grad)."""
        self.in_weight_node = False
        got = [(i, grad_inputs[i]) for i in weight if grad_inputs[i] is not None]
        if got:
            store[node] = got

    def _unhold(self, holder: list) -> torch.Tensor:
        """Unpack hook of a split stage's forward. During I, a holder read by a node of the
        activation path (not by a weight node) is emptied once I is done: W runs the weight
        nodes and what lies below them, never that node again."""
        if holder[0] is None:
            raise RuntimeError("pipeline: a tensor saved in forward and released after zero-bubble's I is read again")
        if self.released is not None and not self.in_weight_node:
            self.released.append(holder)
        return holder[0]

    def _backward_weight(self, deferred: tuple[list, list]) -> None:
        """Zero-bubble W: each weight node's weight part alone (autograd.grad from the
        node, with the gradients that arrived at it in I, to its inputs off the path: a
        matmul node computes dW = dY^T X and skips dX), then one backward from all of those
        gradients through what lies between them and the leaves (casts, transposes, FSDP's
        GatherParams, which reduces, stage 0's embedding), accumulating into .grad."""
        todo, done = deferred
        edges, grads = [e for e, _ in done], [g for _, g in done]
        for node, arriving, weight, needs in todo:
            if needs is not None:
                node.needs_input_grad = needs  # a custom autograd.Function: its weight part only
            roots = [(GradientEdge(node, k), g) for k, g in enumerate(arriving) if g is not None]
            targets = [GradientEdge(*node.next_functions[i]) for i in weight]
            got = torch.autograd.grad([e for e, _ in roots], targets, [g for _, g in roots], allow_unused=True)
            edges += [e for e, g in zip(targets, got) if g is not None]
            grads += [g for g in got if g is not None]
        if edges:
            torch.autograd.backward(edges, grads)


def _reaches(top, target) -> dict:
    """Every autograd node below `top` (top included) -> whether `target` is reachable
    from it, i.e. whether it lies on a path from the stage output to the stage input
    (the activation path). Iterative: a stage's graph is deeper than Python's recursion."""
    memo = {target: True}
    stack = [top]
    while stack:
        node = stack[-1]
        if node in memo:
            stack.pop()
            continue
        below = [n for n, _ in node.next_functions if n is not None and n not in memo]
        if below:
            stack += below
            continue
        memo[node] = any(memo[n] for n, _ in node.next_functions if n is not None)
        stack.pop()
    return memo


def _function_needs(node, weight: list[int]) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
    """A custom autograd.Function's node (its ctx): needs_input_grad for I (the inputs on
    the activation path) and for W (the edges `weight`). needs_input_grad has an entry per
    forward argument, next_functions one per tensor argument; in argument order the k-th
    True of the first is the k-th edge of the second that is not None."""
    args = [j for j, need in enumerate(node.needs_input_grad) if need]
    edges = [i for i, (n, _) in enumerate(node.next_functions) if n is not None]
    assert len(args) == len(edges), (type(node).__name__, node.needs_input_grad, node.next_functions)
    for_i, for_w = list(node.needs_input_grad), list(node.needs_input_grad)
    for j, i in zip(args, edges):
        for_i[j], for_w[j] = i not in weight, i in weight
    return tuple(for_i), tuple(for_w)


def _hold(t: torch.Tensor) -> list:
    """Pack hook of a split stage's forward: the saved tensor in a holder that zero-bubble's
    I can empty."""
    return [t]


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
