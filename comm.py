"""The collectives of one training step, predicted and measured: what each technique
issues per forward / backward / gather on which group (`Walker`, which replays one
rank's micro-steps and pipeline actions on the parallelized meta model), and
`CommCounter`, the one counter of what a real step issues, which the tests and the
benchmarks use to hold the prediction (and the technique files' formulas) to account.

Conventions
    Bytes of a collective are those of the tensor handed to it, as the technique files
    count them in their `# comm:` comments: the INPUT of an all-gather (this rank's
    shard), the whole INPUT of a reduce-scatter, the tensor of an all-reduce, what a rank
    SENDS in point-to-point. What a ring algorithm puts on the wire per rank follows:
        all-gather (n-1) x in,  reduce-scatter (n-1)/n x in,  all-reduce 2 (n-1)/n x in,
        send: as handed.
    tests/test_planner.py checks the handed-in bytes, call counts and memory against real
    gloo runs of small layouts, and the activation estimate against measured peak growth.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import config
import float8
import parallelize
import pipeline

RING = {"all_gather": lambda n: n - 1, "reduce_scatter": lambda n: (n - 1) / n,
        "all_reduce": lambda n: 2 * (n - 1) / n, "send": lambda n: 1}


@dataclass
class Comm:
    """Collectives per step on one group: calls and bytes handed in, per kind."""
    calls: dict = field(default_factory=lambda: collections.Counter())
    bytes: dict = field(default_factory=lambda: collections.Counter())
    formulas: dict = field(default_factory=dict)

    def add(self, group: str, kind: str, nbytes: int, formula: str, times: int = 1) -> None:
        if times <= 0:
            return
        self.calls[group, kind] += times
        self.bytes[group, kind] += times * int(nbytes)
        self.formulas.setdefault((group, kind), []).append(formula)


class CommCounter(TorchDispatchMode):
    """Measures what `Comm` predicts: calls and bytes handed to every collective issued on
    this thread while active, per (group name, kind), the same keys as Walker's.

        with CommCounter(names={groups["tp"]: "tp", (0, 1, 2, 3): "dp_shard_cp"}) as seen:
            step()
        seen.calls["tp", "all_reduce"], seen.bytes["tp", "all_reduce"]

    It sits at the dispatcher, so nothing is patched: it sees the c10d ops every
    torch.distributed call becomes (dist.all_reduce, all_gather_into_tensor, isend inside
    batch_isend_irecv, ...) and the functional collectives that DTensor, FSDP2's peers and
    loss_parallel issue. As PyTorch's CommDebugMode, it steps aside for tensor subclasses,
    so a DTensor desugars first and its collectives on plain tensors come back here.
    Bytes are those of the tensors handed IN (the input of an all-gather, the whole input
    of a reduce-scatter, the tensor of an all-reduce, what a rank sends), the planner's
    convention. Receives, barriers and waits move no data of their own: not counted.
    A group is named by `names` (keys: a ProcessGroup, its c10d group name, or the tuple
    of its global ranks), else by the description it was created with
    (dist.new_group(..., group_desc="tp")), else "world" for the default group, else
    by its ranks. Collectives issued by other threads (an async checkpoint writer) are
    not seen: dispatch modes are per thread."""

    def __init__(self, names: dict | None = None):
        super().__init__()
        self.names = {getattr(k, "group_name", k): v for k, v in (names or {}).items()}
        self.calls, self.bytes = collections.Counter(), collections.Counter()

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    def _name(self, group) -> str:
        if isinstance(group, str):  # a functional collective names its group
            group = dist.distributed_c10d._resolve_process_group(group)
        else:  # a c10d op holds it boxed as a TorchScript object
            group = dist.ProcessGroup.unbox(group)
        ranks = tuple(dist.get_process_group_ranks(group))
        desc = {"default_pg": "world", "undefined": None}.get(group.group_desc, group.group_desc)
        return self.names.get(group.group_name) or self.names.get(ranks) or desc or str(ranks)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t not in (torch.Tensor, torch.nn.Parameter) for t in types):
            return NotImplemented
        kind = _kind(func.__name__.split(".")[0]) if func.namespace in ("c10d", "_c10d_functional") else None
        if kind is not None:
            schema = [a.name for a in func._schema.arguments]
            values = dict(zip(schema, args)) | (kwargs or {})
            group = values.get("process_group", values.get("group_name"))
            handed = next((values[n] for n in schema if n.startswith("input")), args[0])  # else `tensors`
            key = (self._name(group), kind)
            self.calls[key] += 1
            self.bytes[key] += sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(handed))
        return func(*args, **(kwargs or {}))


def _kind(op: str) -> str | None:
    """The planner's kind of a c10d / functional collective op, None for what moves no
    data of its own (recv, barrier, wait_tensor, ...)."""
    for kind, spellings in (("reduce_scatter", ("reduce_scatter",)), ("all_gather", ("allgather", "all_gather")),
                            ("all_reduce", ("allreduce", "all_reduce")), ("all_to_all", ("alltoall", "all_to_all")),
                            ("broadcast", ("broadcast",))):
        if any(s in op for s in spellings):
            return kind
    return {"send": "send", "isend": "send", "reduce_": "reduce", "gather_": "gather", "scatter_": "scatter"}.get(op)


class Walker:
    """Replays one step of this rank: its micro-steps and pipeline actions, adding what
    every technique issues. Sizes come from the config and the parallelized (meta) model."""

    def __init__(self, cfg: config.Config, plan: config.Plan, par: parallelize.Parallelized, coords: dict):
        self.cfg, self.plan, self.par, self.coords = cfg, plan, par, coords
        d = plan.degrees
        self.t, self.cp, self.pp, self.R = d["tp"], d["cp"], d["pp"], d["dp_replicate"]
        self.W = d["dp_shard"] * d["cp"]
        self.world = math.prod(d.values())
        p, t = cfg.parallel, cfg.training
        self.sp = self.t > 1 and p.sequence_parallel
        self.async_tp = self.t > 1 and p.async_tp
        self.loss_parallel = self.t > 1 and p.loss_parallel
        self.m = (p.pp_microbatches or self.pp) if self.pp > 1 else 1
        self.b = t.micro_batch_size // self.m  # sequences per (pipeline) micro-batch
        self.S = cfg.data.seq_len // self.cp  # local sequence
        self.args = plan.model_args
        dtype = config.DTYPES[t.dtype]
        fsdp_on = bool(par.fsdp_states)
        self.master = 8 if dtype == torch.float64 else 4
        bf16 = dtype == torch.bfloat16
        self.a_mm = 2 if bf16 else self.master  # matmul outputs (autocast or bf16 FSDP gather)
        self.a_res = 2 if bf16 and fsdp_on else self.master  # residual stream, norm outputs, embedding
        self.a_acc = 8 if dtype == torch.float64 else 4  # float32 accumulators (ring dK/dV, loss softmax)
        self.a_pp = 2 if bf16 and fsdp_on else self.master  # the hidden state between stages
        self.fsdp_gather_bytes = 2 if bf16 else self.master
        self.fsdp_reduce_bytes = 4 if bf16 else self.master
        self.comm = Comm()

    # -- per stage: forward and backward collectives of TP, CP, float8 ----------------

    def _tp_entry(self, fwd: bool, tokens: int) -> None:
        """Entering a column-parallel group (attention's wq/wk/wv, FFN's w1/w3, the output)."""
        D, t = self.args.dim, self.t
        if self.sp:
            if fwd:
                self.comm.add("tp", "all_gather", tokens // t * D * self.a_res, "GatherSeq: B S/t D a")
            else:
                self.comm.add("tp", "reduce_scatter", tokens * D * self.a_res, "GatherSeq backward: B S D a")
        elif not fwd:
            self.comm.add("tp", "all_reduce", tokens * D * self.a_res, "CopyToTP backward: B S D a")

    def _tp_exit(self, fwd: bool, tokens: int) -> None:
        """Leaving a row-parallel linear (wo, w2)."""
        D, t = self.args.dim, self.t
        if self.sp:
            if fwd:
                self.comm.add("tp", "reduce_scatter", tokens * D * self.a_mm, "ReduceScatterSeq: B S D a")
            else:
                self.comm.add("tp", "all_gather", tokens // t * D * self.a_mm, "ReduceScatterSeq backward: B S/t D a")
        elif fwd:
            self.comm.add("tp", "all_reduce", tokens * D * self.a_mm, "ReduceFromTP: B S D a")

    def _async_tp(self, block, part: str, fwd: bool, tokens: int) -> None:
        """Async TP in one attention or FFN part: each ring sends t-1 sequence blocks. The
        column group runs one ring per kind of linear (plain, or float8 of one recipe);
        its forward ring and the row linear's backward ring all-gather PACKED blocks
        (tensor_parallel.Matmuls.pack: the compute dtype, or float8.Float8RingMatmuls':
        D bytes per token tensorwise, 2 D + 4 rowwise); the other two move partial sums
        in the compute dtype. Float8 adds its amax all-reduces: tensorwise one float per
        quantized tensor (x once per ring, each weight unless FSDP gathered it in float8,
        each output gradient), rowwise one D-float per-feature amax of a sequence shard
        (x of the column group forward, dY of the row linear backward)."""
        D, t = self.args.dim, self.t
        mod = block.attention if part == "attn" else block.feed_forward
        cols, row = ([mod.wq, mod.wk, mod.wv], mod.wo) if part == "attn" else ([mod.w1, mod.w3], mod.w2)
        partials = tokens // t * D * self.a_mm
        kinds: dict = {}
        for linear in cols:
            kinds.setdefault(getattr(linear, "recipe", None) if isinstance(linear, float8.Float8Linear) else None,
                             []).append(linear)
        rings = [(recipe, linears, True) for recipe, linears in kinds.items()]  # (kind, linears, column?)
        rings.append((getattr(row, "recipe", None) if isinstance(row, float8.Float8Linear) else None, [row], False))
        for recipe, linears, column in rings:
            if fwd != column:  # row forward, column backward: a travelling accumulator of partial sums
                self.comm.add("tp", "send", partials, "async TP ring, partial sums: (t-1) x B S/t D a", times=t - 1)
            elif recipe is None:
                self.comm.add("tp", "send", tokens // t * D * self.a_mm, "async TP ring: (t-1) x B S/t D a",
                              times=t - 1)
            elif recipe == "tensorwise":
                self.comm.add("tp", "send", tokens // t * D, "async TP float8 ring (tensorwise): (t-1) x B S/t D "
                              "x 1 B", times=t - 1)
            else:
                self.comm.add("tp", "send", tokens // t * (2 * D + 4), "async TP float8 ring (rowwise): (t-1) x "
                              "B S/t (2 D + 4) B: two e4m3 rows and a float32 scale per token", times=t - 1)
            if recipe == "tensorwise":
                pre = sum(lin.fsdp_float8_all_gather and bool(self.par.fsdp_states) for lin in linears)
                n = 1 + len(linears) - pre if fwd else len(linears)
                self.comm.add("tp", "all_reduce", 4, "float8 amax (x, w / grads): one float32", times=n)
            elif recipe == "rowwise" and fwd == column:
                self.comm.add("tp", "all_reduce", 4 * D, "float8 rowwise per-feature amax of a sequence shard: D "
                              "float32")

    def _attention(self, fwd: bool, tokens: int) -> None:
        if self.cp == 1:
            return
        kv = 2 * tokens * self.args.kv_heads // self.t * self.args.head_dim  # K and V elements, local heads
        if self.cfg.parallel.cp_rotate == "ring":
            self.comm.add("cp", "send", kv * self.a_mm, "ring: (cp-1) x 2 B Hkv/t S/cp hd a", times=self.cp - 1)
            if not fwd:
                self.comm.add("cp", "send", kv * self.a_acc, "ring backward: cp x dK/dV float32", times=self.cp)
        elif fwd:
            self.comm.add("cp", "all_gather", kv // 2 * self.a_mm, "all-gather K, V: B Hkv/t S/cp hd a", times=2)
        else:
            self.comm.add("cp", "reduce_scatter", self.cp * kv // 2 * self.a_mm,
                          "reduce-scatter dK, dV: cp B Hkv/t S/cp hd a", times=2)

    def _float8_amax(self, fwd: bool, linears: list) -> None:
        """Tensorwise float8 under TP: the amax of x (and of w, unless FSDP gathered it in
        float8) forward, of the output gradient backward, all-reduced (MAX) over tp."""
        for linear in linears:
            if linear.amax_group is None or linear.recipe != "tensorwise":
                continue
            pre = linear.fsdp_float8_all_gather and bool(self.par.fsdp_states)
            n = (1 if pre else 2) if fwd else 1
            self.comm.add("tp", "all_reduce", 4, "float8 amax (x, w / grad): one float32", times=n)

    def _block(self, block, fwd: bool, tokens: int, recompute: bool = False) -> None:
        """recompute: checkpointing's re-run of the forward, which stops as soon as it has
        re-made every tensor backward needs (early stop): the FFN's closing reduce-scatter
        (or all-reduce) saves nothing, so it is not re-issued; async TP's ring is a matmul
        that saves its inputs, so it is."""
        f8 = [m for m in block.modules() if isinstance(m, float8.Float8Linear)]
        attn, ffn = [f for f in f8 if f in set(block.attention.modules())], \
            [f for f in f8 if f in set(block.feed_forward.modules())]
        order = [("attn", attn), ("ffn", ffn)] if fwd else [("ffn", ffn), ("attn", attn)]
        for part, linears in order:
            if self.t > 1 and self.async_tp:
                self._async_tp(block, part, fwd, tokens)  # entry ring(s) + exit ring, float8's amaxes
            elif self.t > 1:
                self._tp_entry(fwd, tokens)
                if not (recompute and part == "ffn"):
                    self._tp_exit(fwd, tokens)
                self._float8_amax(fwd, linears)
            if part == "attn":
                self._attention(fwd, tokens)

    def _recomputed(self, block) -> bool:
        ac = self.cfg.activation_checkpoint
        if ac.mode == "full" or (ac.mode == "selective" and ac.selective_option == "op"):
            return True
        return ac.mode == "selective" and (block.layer_id + 1) % ac.selective_option == 0

    def stage_comm(self, stage, fwd: bool) -> None:
        tokens = self.b * self.S
        D, V, t = self.args.dim, self.args.vocab_size, self.t
        if fwd:
            if stage.tok_embeddings is not None and t > 1:
                kind = "reduce_scatter" if self.sp else "all_reduce"
                self.comm.add("tp", kind, tokens * D * self.a_res, "vocab-parallel embedding: B S D a")
            for block in stage.layers.values():
                self._block(block, True, tokens)
            if stage.output is not None and t > 1:
                self._tp_entry(True, tokens)
                if self.loss_parallel:
                    self.comm.add("tp", "all_reduce", tokens * self.a_acc, "loss parallel max: N floats")
                    self.comm.add("tp", "all_reduce", 2 * tokens * self.a_acc, "loss parallel sums: 2N floats")
                else:
                    self.comm.add("tp", "all_gather", tokens * V // t * self.a_mm, "logits gather: B S V/t a")
            return
        if stage.output is not None and t > 1:
            self._tp_entry(False, tokens)
        for block in reversed(list(stage.layers.values())):
            if self._recomputed(block):
                self._block(block, True, tokens, recompute=True)  # checkpointing re-runs the forward
            self._block(block, False, tokens)
        if stage.tok_embeddings is not None and self.sp:
            self.comm.add("tp", "all_gather", tokens // t * D * self.a_res, "embedding backward: B S/t D a")

    # -- FSDP: gathers, reduce-scatters, HSDP all-reduces -----------------------------

    def _unit_bytes(self, unit) -> tuple[int, int]:
        """(all-gather input bytes, padded shard elements) of an FSDP unit."""
        gather, elems = 0, 0
        for (owner, name), n in zip(unit.owners, unit.numels):
            f8 = isinstance(owner, float8.Float8Linear) and owner.fsdp_float8_all_gather and name == "weight" \
                and owner.recipe == "tensorwise"
            gather += n * (1 if f8 else self.fsdp_gather_bytes)
            elems += n
        return gather, elems

    def _gather(self, unit) -> None:
        """A unit's all-gather, unless it is still unsharded (the root, or any unit without
        reshard_after_forward, between its forward and the end of a backward)."""
        if id(unit) in self.gathered:
            return
        if not unit.reshard_after_forward:
            self.gathered.add(id(unit))
        if self.W > 1:
            nbytes, _ = self._unit_bytes(unit)
            self.comm.add("dp_shard_cp", "all_gather", nbytes, "FSDP all-gather: sum ceil(rows/W) cols x b_p")
        for (owner, name) in unit.owners:  # float8 weights gathered in float8: scale over the groups
            if isinstance(owner, float8.Float8Linear) and owner.fsdp_float8_all_gather and name == "weight" \
                    and owner.recipe == "tensorwise":
                if self.W > 1:
                    self.comm.add("dp_shard_cp", "all_reduce", 4, "float8 weight amax: one float32")
                if owner.amax_group is not None:
                    self.comm.add("tp", "all_reduce", 4, "float8 weight amax: one float32")

    def fsdp_forward(self, s: int) -> None:
        state = self.par.fsdp_states.get(s)
        if state is None:
            return
        for unit in state.units:  # the root first, then the blocks in forward order
            self._gather(unit)

    def fsdp_backward(self, s: int, sync: bool, reshard: bool = True) -> None:
        state = self.par.fsdp_states.get(s)
        if state is None:
            return
        for unit in [state.units[0], *reversed(state.units[1:])]:
            self._gather(unit)  # re-gathered for backward unless still unsharded
            if sync:
                _, elems = self._unit_bytes(unit)
                if self.W > 1:
                    self.comm.add("dp_shard_cp", "reduce_scatter", self.W * elems * self.fsdp_reduce_bytes,
                                  "FSDP reduce-scatter: W sum ceil(rows/W) cols x b_r")
                if self.R > 1:
                    self.comm.add("dp_replicate", "all_reduce", elems * self.fsdp_reduce_bytes,
                                  "HSDP all-reduce: sum ceil(rows/W) cols x b_r")
        if reshard:  # the end-of-backward callback reshards all (under PP: the stage's last backward only)
            self.gathered -= {id(unit) for unit in state.units}

    # -- the step ------------------------------------------------------------------------

    def step(self) -> Comm:
        p = self.cfg.parallel
        self.gathered: set[int] = set()  # ids of the FSDP units holding full parameters now
        stages = self.par.stages
        act = self.b * self.S // (self.t if self.sp else 1) * self.args.dim * self.a_pp
        accum = self.plan.grad_accum
        for micro in range(accum):
            last_micro = micro == accum - 1
            if self.pp == 1:
                sync = last_micro or not p.fsdp_reduce_per_step
                self.fsdp_forward(0)
                self.stage_comm(stages[0], True)
                self.fsdp_backward(0, sync)
                self.stage_comm(stages[0], False)
                continue
            v = p.pp_stages_per_rank
            actions = pipeline.build_schedule(p.pp_schedule, self.pp, self.m, v)[self.coords["pp"]]
            last_backward = {}
            for a in actions:
                if a.kind in ("B", "I"):
                    last_backward[a.stage] = a.mb
            for a in actions:
                if a.kind == "F":
                    self.fsdp_forward(a.stage)
                    self.stage_comm(stages[a.stage], True)
                elif a.kind in ("B", "I"):
                    last = last_micro and a.mb == last_backward[a.stage]
                    self.fsdp_backward(a.stage, last, reshard=last)  # train.sync_stage_grads
                    self.stage_comm(stages[a.stage], False)
                elif a.kind in ("SEND_F", "SEND_B"):
                    what = "activations" if a.kind == "SEND_F" else "activation gradients"
                    self.comm.add("pp", "send", act, f"{what}: B/m S/cp(/t) D a")
        # Once per step: SP norm gradients, gradient clipping, the stop flag, the loss.
        if self.sp:
            n = sum(q.numel() for q in self.par.model.parameters() if getattr(q, "tp_partial_grad", False))
            self.comm.add("tp", "all_reduce", n * self.master, "SP norm gradients: norm weights x master bytes")
        if self.t > 1:
            self.comm.add("tp", "all_reduce", 8, "grad-norm square: one float64")
        if self.W > 1:
            self.comm.add("dp_shard_cp", "all_reduce", 8, "grad-norm square: one float64")
        if self.pp > 1:
            self.comm.add("pp", "all_reduce", 8, "grad-norm square: one float64")
            self.comm.add("pp", "all_reduce", 8, "step loss from the last stage: one float64")
        if self.world > 1:
            self.comm.add("world", "all_reduce", 8, "stop-signal and non-finite-loss flags (safety.py): two float32")
        return self.comm


def startup_comm(cfg: config.Config, world: int) -> Comm:
    """What a run sends once before its first step (train.py), besides building groups."""
    comm = Comm()
    if world > 1:
        if cfg.training.dtype == "auto":
            comm.add("world", "broadcast", 8, "training.dtype auto: rank 0's choice, one int64")
        comm.add("world", "broadcast", 8, "run.dir claimed or refused by rank 0: one int64")
    return comm


def logged_step_comm(plan: config.Plan, world: int) -> Comm:
    """What a logged step adds: the loss reduced over the data ranks."""
    comm = Comm()
    d = plan.degrees
    if d["dp_replicate"] * d["dp_shard"] * d["cp"] > 1:
        comm.add("loss", "all_reduce", 8, "step loss: one float64")
    return comm
