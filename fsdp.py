"""Fully sharded data parallel (ZeRO-3, FSDP2-style) and HSDP on plain collectives.

What it does
    `apply_fsdp(model, units, group)` replaces every parameter of `model` by this
    rank's dim-0 shard of it: afterwards the module's parameters ARE the shards, so the
    optimizer, gradient clipping and checkpointing see only shards. Each unit (a module,
    e.g. every transformer block, plus the root for the parameters left over) gathers
    all its parameters with ONE all-gather before it runs and reduces all its gradients
    with ONE reduce-scatter when its backward is done.

Data layout (per parameter of global shape (d0, *rest), shard group of W ranks)
    c = ceil(d0 / W) rows per rank; rank r holds rows [r*c, r*c + c) of the parameter
    padded with zero rows past d0 (torch.chunk's split: the padding sits at the tail, a
    trailing rank may hold only padding). A unit's all-gather input is the concatenation
    of its flattened padded shards, S = sum_i c_i * prod(rest_i) elements; the output
    (W, S) holds, in column block i, parameter i padded and laid out rank by rank, so
        full_i = out.view(W, S)[:, off_i : off_i + c_i*rest_i].reshape(W*c_i, *rest)[:d0]
    The reduce-scatter input is the same layout built from the gradients (zero rows
    for the padding); rank r's output is exactly the gradient of its padded shards.

When the collectives run (the machinery, all visible in this file)
    * forward pre-hook of a unit: `GatherParams.apply` waits for (or issues) the
      unit's all-gather and copies the full parameters out; they are swapped into the
      modules in place of the shards for the unit's forward; the NEXT unit's
      all-gather is issued asynchronously (forward prefetch) while this one computes.
    * reshard_after_forward: the forward hook swaps the shards back and drops the full
      tensors. They are not kept alive by autograd: while the unit runs, a
      saved_tensors_hooks pair replaces any saved full parameter by a placeholder that
      is resolved in backward from the re-gathered parameters.
    * backward: a tensor hook on the unit's output fires before the unit's backward; it
      re-gathers (if resharded) and swaps the full parameters in (so activation
      checkpointing can recompute), and prefetches the all-gather of the unit that ran
      before it. `GatherParams.backward` fires once every gradient of the unit's full
      parameters is complete; it issues the reduce-scatter asynchronously, so it
      overlaps the backward of the units before. A callback queued on the autograd
      engine waits for every reduce-scatter at the end of backward, all-reduces over the
      replicate group (HSDP), and adds the shard gradients into `param.grad`.
    * a split backward (a zero-bubble pipeline, pipeline.py): a pass that asks for input
      gradients only (I) runs the pre-backward hooks but reaches no GatherParams, so its
      end-of-backward callback does nothing; the later pass from the weights (W) reaches
      GatherParams, which queues the callback itself. Each gathered parameter is handed to
      its module as a view with an autograd node of its own, so W can ask autograd for
      one parameter's gradient at a time (autograd captures gradients per node).
    Every collective is issued in the same order on every rank (module order in
    forward, its reverse in backward). A group of size 1 issues no collective.

Mixed precision
    Shards are the master weights (float32, or float64 in exactness runs). The
    all-gather input is cast to `param_dtype` first (bf16 halves the bytes), compute
    runs in `param_dtype`, and gradients are cast to `reduce_dtype` (float32 by
    default) before the reduce-scatter and accumulated into the shards' dtype.

Custom all-gather payloads (how float8.py gathers weights already in float8, without
this file importing it)
    If the module owning a parameter defines
        fsdp_pre_all_gather(name, shard, group) -> (payload, meta) or None
        fsdp_post_all_gather(name, payload_full, meta, dtype) -> full tensor
    the unit gathers `payload` (same shape as the shard, any dtype: e.g. float8 e4m3
    with a scale computed from the amax all-reduced over `group`, so every rank uses
    the same scale) instead of the param_dtype shard, and installs whatever the post
    hook returns (e.g. the dequantized weight carrying the float8 data and scale). The
    shards travel as bytes, so one all-gather carries any mix of dtypes; a float8
    payload is 1 byte per element instead of 2 (bf16) or 4. None: gather as usual.
    The gradient path is unchanged (full-precision gradients, reduce-scattered).

Gradient convention and accumulation
    Every reduction is a plain SUM (the trainer divides each micro-batch loss by the
    global token count), so no world size appears here. `set_gradient_sync(False)`
    makes the next backward passes accumulate unsharded gradients in `reduce_dtype`
    instead of reduce-scattering; the next backward with sync on reduce-scatters the
    sum once. Both ways give the same gradient; RS-every-micro-batch is lean in memory.

Communication per optimizer step and rank (Psi parameters, W shard ranks, R replicas,
b_p / b_r bytes of param_dtype / reduce_dtype, m micro-batches, P padded total)
    forward all-gather:    (W-1)/W * P * b_p       per micro-batch
    backward all-gather:   (W-1)/W * P_r * b_p     per micro-batch, P_r = params of
                                                   resharded units (all but the root)
    reduce-scatter:        (W-1)/W * P * b_r       per micro-batch (once per step with
                                                   gradient sync off until the last)
    HSDP all-reduce:       2(R-1)/R * P/W * b_r    once per reduce-scatter
    (Elements *sent* per rank by a ring algorithm; the test counts the tensor bytes each
    call hands to the collective: AG input P/W*b_p, RS input P*b_r, AR input P/W*b_r.)

Memory per rank
    shards + gradients + AdamW state: 16 * P / W bytes (fp32), instead of 16 * Psi;
    plus transiently the full parameters of the running unit and of the prefetched
    one, or of every unit with reshard_after_forward off between its forward and its
    backward; plus, with gradient sync off, the unsharded gradients of every unit.

Requirements
    Units must be called as modules (their hooks run) in the same order on every rank;
    every parameter must receive a gradient in every backward (true for Llama: a unit
    whose backward never ran, in a pass where another unit's did, raises); the optimizer
    must be built after sharding (`check_optimizer`). A parameter sharded before (tensor
    parallel) records its place in the global tensor in `global_shape` / `global_offset`;
    the shard composes them.

What PyTorch's FSDP2 (TorchTitan) does that this file does not
    DTensor parameters (we use plain tensors plus two attributes), CUDA streams for
    copy-in/copy-out overlap and a caching allocator for the gather buffers (we rely
    on async collectives; on CUDA/NCCL they run on the communicator's stream),
    gradient pre-/post-division (we SUM), fp16 gradient scaling, CPU offload, and
    separate units for embeddings and for norm + output (our root unit holds both).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


def _size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


class FSDPState:
    """What the units of one model share: forward order, pending reduce-scatters."""

    def __init__(self, group, replicate_group, param_dtype, reduce_dtype):
        self.group, self.replicate_group = group, replicate_group
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.units: list[FSDPUnit] = []
        self.forward_order: list[FSDPUnit] = []  # units in the order their forward ran
        self.pending: list[tuple[FSDPUnit, dist.Work | None, torch.Tensor]] = []  # reduce-scatters
        self.callback_queued = False
        self.reduced = False  # a unit's GatherParams backward ran in this backward pass
        self.sync_grads = True
        self.reshard_after_backward = True

    def queue_finish(self) -> None:
        """Have finish_backward run at the end of the running backward pass (once)."""
        if not self.callback_queued:
            self.callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finish_backward)

    def finish_backward(self) -> None:
        """Queued on the autograd engine by the first pre-backward hook or GatherParams
        backward of a pass; runs when that pass is done: wait for every reduce-scatter,
        all-reduce over the replicas (HSDP), add into param.grad, reshard every unit
        (unless reshard_after_backward is off: a pipeline's micro-batches before its
        last). A pass that reached no GatherParams (a zero-bubble pipeline's I, input
        gradients only) leaves all of that to the pass that follows with the weights (W)."""
        self.callback_queued = False
        if not self.reduced:
            return
        self.reduced = False
        for unit, work, out in self.pending:
            if work is not None:
                work.wait()
            if _size(self.replicate_group) > 1:
                # comm: replicate group, all-reduce (SUM) of the reduce-scattered shard, S * b_r bytes
                dist.all_reduce(out, group=self.replicate_group)
            unit.accumulate_shard_grads(out)
        self.pending.clear()
        missing = [type(u.module).__name__ for u in self.forward_order if not u.backward_done]
        if self.reshard_after_backward:
            for unit in self.units:
                unit.swap(unit.shards)
                unit.full = None
        self.forward_order.clear()
        if missing:
            raise RuntimeError(
                f"fsdp: the backward of unit(s) {missing} never ran: every parameter must receive a gradient "
                f"in every backward (a rank that skips a reduce-scatter deadlocks the others)"
            )


class FSDPUnit:
    """One all-gather / reduce-scatter group: the parameters of `module` not owned by
    a unit below it."""

    def __init__(self, state: FSDPState, module: nn.Module, params: list[tuple[nn.Module, str, nn.Parameter]],
                 reshard_after_forward: bool):
        self.state, self.module = state, module
        self.reshard_after_forward = reshard_after_forward
        W, r = _size(state.group), (dist.get_rank(state.group) if state.group is not None else 0)
        self.owners = [(owner, name) for owner, name, _ in params]
        self.shapes = [p.shape for _, _, p in params]  # full (unsharded) shapes
        self.rows = [math.ceil(s[0] / W) for s in self.shapes]  # c_i
        self.numels = [c * math.prod(s[1:]) for c, s in zip(self.rows, self.shapes)]  # padded shard numel
        self.world = W
        self.shards: list[nn.Parameter] = []
        for (owner, name, p), c in zip(params, self.rows):
            shard = torch.zeros((c, *p.shape[1:]), dtype=p.dtype, device=p.device)
            if p.device.type != "meta":  # an already materialized model: keep this rank's rows
                rows = p.detach()[r * c: (r + 1) * c]
                shard[: rows.shape[0]].copy_(rows)
            shard = nn.Parameter(shard, requires_grad=p.requires_grad)
            # The attributes earlier techniques set on p (tensor parallel's tp_shard_dim,
            # tp_partial_grad) carry over; where this shard sits in the global tensor, for
            # layout-independent init and checkpoints, composes with an earlier split of p.
            shard.__dict__.update(p.__dict__)
            offset = tuple(getattr(p, "global_offset", (0,) * p.dim()))
            shard.global_shape = getattr(p, "global_shape", p.shape)
            shard.global_offset = (offset[0] + r * c, *offset[1:])
            shard.fsdp_shard = True
            setattr(owner, name, shard)
            self.shards.append(shard)
        self.full: list[torch.Tensor] | None = None  # full params while unsharded
        self.gather: tuple[dist.Work | None, torch.Tensor] | None = None  # all-gather in flight
        self.accumulated: torch.Tensor | None = None  # unsharded grads while sync is off
        self.backward_done = False
        self.saved_hooks = None

    # -- all-gather -------------------------------------------------------------------

    def start_gather(self) -> None:
        """Issue this unit's all-gather (async) unless it is in flight or done."""
        if self.gather is not None or self.full is not None:
            return
        dtype = self.state.param_dtype or self.shards[0].dtype
        payloads, self.metas = [], []
        for (owner, name), shard in zip(self.owners, self.shards):
            hook = getattr(owner, "fsdp_pre_all_gather", None)  # e.g. float8: cast before the gather
            custom = hook(name, shard.detach(), self.state.group) if hook is not None else None
            payload, meta = custom if custom is not None else (shard.detach().to(dtype), None)
            payloads.append(payload)
            self.metas.append(meta)
        self.payload_dtypes = [p.dtype for p in payloads]
        # The shards travel as bytes, so one all-gather carries any mix of dtypes.
        flat = torch.cat([p.reshape(-1).view(torch.uint8) for p in payloads])  # (S bytes,)
        if self.world == 1:
            self.gather = (None, flat)
            return
        out = flat.new_empty(self.world * flat.numel())  # (W * S,)
        # comm: shard group, all-gather of every parameter's padded shard, S bytes in
        work = dist.all_gather_single(out, flat, group=self.state.group, async_op=True)
        self.gather = (work, out)

    def finish_gather(self) -> list[torch.Tensor]:
        """Wait for the all-gather and copy each full parameter out of the (W, S) layout
        (S bytes per rank), through the owner's fsdp_post_all_gather where it has one.
        Already unsharded (the root, or a unit that does not reshard, run again before its
        backward, e.g. the next pipeline micro-batch): no gather; fresh aliases of the same
        storage, so this forward gets its own gradient path (GatherParams node)."""
        if self.full is not None and self.gather is None:
            aliases = [t.detach() for t in self.full]
            for alias, t in zip(aliases, self.full):
                alias.__dict__.update(t.__dict__)  # e.g. float8's gathered weight and scale
            return aliases
        self.start_gather()
        work, out = self.gather
        self.gather = None
        if work is not None:
            work.wait()
        table = out.view(self.world, -1)  # (W, S): row r = rank r's padded shards, as bytes
        dtype = self.state.param_dtype or self.shards[0].dtype
        full, offset = [], 0
        for (owner, name), shape, c, n, payload_dtype, meta in zip(
                self.owners, self.shapes, self.rows, self.numels, self.payload_dtypes, self.metas):
            nbytes = n * payload_dtype.itemsize
            block = table[:, offset: offset + nbytes].contiguous().view(payload_dtype)  # (W, c_i * rest_i)
            block = block.view(self.world * c, *shape[1:])[: shape[0]]  # drop the padding rows
            full.append(block if meta is None else owner.fsdp_post_all_gather(name, block, meta, dtype))
            offset += nbytes
        return full

    def swap(self, tensors: list[torch.Tensor]) -> None:
        """Point every owner module at `tensors` (full params or the shards)."""
        for (owner, name), t in zip(self.owners, tensors):
            owner._parameters[name] = t

    # -- reduce-scatter -----------------------------------------------------------------

    def reduce_grads(self, grads: tuple[torch.Tensor | None, ...]) -> None:
        """Pack the full gradients into the (W, S) layout in reduce_dtype and issue the
        reduce-scatter (or accumulate them while gradient sync is off)."""
        dtype = self.state.reduce_dtype or self.shards[0].dtype
        blocks = []
        for g, shape, c, n in zip(grads, self.shapes, self.rows, self.numels):
            padded = torch.zeros((self.world * c, *shape[1:]), dtype=dtype, device=self.shards[0].device)
            if g is not None:
                padded[: shape[0]] = g
            blocks.append(padded.view(self.world, n))  # (W, c_i * rest_i)
        packed = torch.cat(blocks, dim=1).reshape(-1)  # (W * S,): rank r's segment is contiguous
        if self.accumulated is not None:
            packed += self.accumulated
        if not self.state.sync_grads:
            self.accumulated = packed
            return
        self.accumulated = None
        if self.world == 1:
            self.state.pending.append((self, None, packed))
            return
        out = packed.new_empty(packed.numel() // self.world)  # (S,)
        # comm: shard group, reduce-scatter (SUM) of every gradient, W * S * b_r bytes in
        work = dist.reduce_scatter_single(out, packed, group=self.state.group, async_op=True)
        self.state.pending.append((self, work, out))

    def accumulate_shard_grads(self, flat: torch.Tensor) -> None:
        offset = 0
        for shard, n in zip(self.shards, self.numels):
            g = flat[offset: offset + n].view(shard.shape).to(shard.dtype)
            shard.grad = g if shard.grad is None else shard.grad + g
            offset += n

    # -- hooks --------------------------------------------------------------------------

    @torch._dynamo.disable
    def pre_forward(self, module: nn.Module, args) -> None:
        state = self.state
        if torch.is_grad_enabled():
            state.forward_order.append(self)
            self.backward_done = False
        full = GatherParams.apply(self, *self.shards)
        self.full = [_own_node(t) for t in ([full] if isinstance(full, torch.Tensor) else full)]
        self.swap(self.full)
        index = state.units.index(self)
        if index + 1 < len(state.units):  # prefetch the next unit while this one computes
            state.units[index + 1].start_gather()
        if self.resharding():
            self.saved_hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
            self.saved_hooks.__enter__()

    @torch._dynamo.disable
    def post_forward(self, module: nn.Module, args, output):
        if self.saved_hooks is not None:
            self.saved_hooks.__exit__(None, None, None)
            self.saved_hooks = None
        if self.resharding():
            self.swap(self.shards)
            self.full = None
        if torch.is_grad_enabled():
            for t in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(self.pre_backward)
        return output

    def resharding(self) -> bool:
        # Without autograd there is no backward to keep the parameters for.
        return self.reshard_after_forward or not torch.is_grad_enabled()

    def pre_backward(self, grad: torch.Tensor) -> None:
        state = self.state
        state.queue_finish()
        if self.full is None:
            self.regather()
        order = state.forward_order
        if self not in order:  # e.g. a pipeline backward after an earlier backward cleared it
            return
        index = len(order) - 1 - order[::-1].index(self)
        if index > 0 and order[index - 1].full is None:  # prefetch the unit that ran before
            order[index - 1].start_gather()

    def regather(self) -> None:
        """Gather again for backward and swap in. The tensors require grad like the
        shards, so an activation-checkpoint recompute saves exactly what the original
        forward saved (an op on a weight without grad would save fewer tensors); their
        gradients go nowhere: the recomputed graph is only used for its saved tensors."""
        self.full = [t.requires_grad_(s.requires_grad) for t, s in zip(self.finish_gather(), self.shards)]
        self.swap(self.full)

    # Saved-tensor hooks: a full parameter (or a view of it) saved by an op in forward
    # is stored as (index, size, stride, offset) and re-created in backward.
    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        for i, p in enumerate(self.full or ()):
            if p.untyped_storage().data_ptr() == ptr and t.device == p.device:
                return (i, t.size(), t.stride(), t.storage_offset())
        return t

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if self.full is None:  # defensive: the pre-backward hook normally gathered already
            self.regather()
        i, size, stride, offset = packed
        return self.full[i].as_strided(size, stride, offset)


def _own_node(t: torch.Tensor) -> torch.Tensor:
    """t as a view with an autograd node of its own (attributes kept, e.g. float8's
    gathered weight): each parameter's gradient then passes a node of its own before
    GatherParams, where a zero-bubble pipeline's W asks autograd for it alone (autograd
    captures gradients per node; at GatherParams it would run every parameter's path)."""
    view = t.view_as(t)
    view.__dict__.update(t.__dict__)
    return view


class GatherParams(torch.autograd.Function):
    """forward: all-gather the unit's shards into full parameters.
    backward: reduce-scatter the full parameters' gradients into the shards.
    The shard gradients are added by the end-of-backward callback (after the async
    reduce-scatter completes), so this returns None for them."""

    @staticmethod
    def forward(ctx, unit: FSDPUnit, *shards: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.unit = unit
        return tuple(unit.finish_gather())

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[None, ...]:
        unit = ctx.unit
        unit.state.reduced = True
        unit.state.queue_finish()  # a pass from the weights alone (zero-bubble W) ran no pre-backward hook
        unit.reduce_grads(grads)
        unit.backward_done = True
        if unit.reshard_after_forward:  # free the re-gathered parameters now
            unit.swap(unit.shards)
            unit.full = None
        return (None,) * (len(grads) + 1)


def apply_fsdp(
    model: nn.Module,
    units: list[nn.Module],
    group: dist.ProcessGroup,
    replicate_group: dist.ProcessGroup | None = None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> FSDPState:
    """Shard every parameter of `model` over `group` (HSDP: replicate over
    `replicate_group`). `units` are submodules in forward order, each gathered as one;
    `model` itself is the root unit for the parameters left over, gathered first and
    kept unsharded until backward (it is needed again at the end of forward).
    Works on the meta device (shards are then empty, for init_weights) or on a
    materialized model (each rank keeps its rows).
    param_dtype: gather and compute dtype (None: the parameters' own). reduce_dtype:
    gradient reduction dtype (None: float32 under a 16-bit param_dtype, else the
    parameters' own)."""
    if group is None:
        raise ValueError("apply_fsdp: pass the shard process group (a group of size 1 is fine)")
    if reduce_dtype is None and param_dtype in (torch.bfloat16, torch.float16):
        reduce_dtype = torch.float32
    state = FSDPState(group, replicate_group, param_dtype, reduce_dtype)
    owned: set[int] = set()
    for module in [*units, model]:
        params = [(owner, name, p) for owner in module.modules() for name, p in owner.named_parameters(recurse=False)
                  if id(p) not in owned and not getattr(p, "fsdp_shard", False)]
        if not params and module is model:  # e.g. a middle pipeline stage: blocks only
            continue
        if not params:
            raise ValueError(f"apply_fsdp: unit {type(module).__name__} has no parameters of its own to shard")
        owned.update(id(p) for _, _, p in params)
        unit = FSDPUnit(state, module, params, reshard_after_forward and module is not model)
        module.register_forward_pre_hook(unit.pre_forward)
        module.register_forward_hook(unit.post_forward)
        state.units.append(unit)
    if state.units[-1].module is model:
        state.units.insert(0, state.units.pop())  # the root runs first
    return state


def set_gradient_sync(state: FSDPState, sync: bool) -> None:
    """sync=False: the following backwards accumulate unsharded gradients; the next
    backward with sync=True reduce-scatters their sum once."""
    state.sync_grads = sync


def set_reshard_after_backward(state: FSDPState, reshard: bool) -> None:
    """reshard=False: units stay unsharded after the following backwards; with
    reshard_after_forward off as well, a unit gathered in the first forward of an
    optimizer step is not gathered again until the backward that reshards (a pipeline
    keeps its stage gathered over all its micro-batches: one all-gather per unit per
    step instead of two per micro-batch, for the memory of the stage's full parameters)."""
    state.reshard_after_backward = reshard


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise if the optimizer holds parameters that are not FSDP shards (built before
    sharding, it would step the replaced full parameters, which get no gradients)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not getattr(p, "fsdp_shard", False):
                raise ValueError(
                    f"optimizer holds an unsharded parameter of shape {tuple(p.shape)}: build the optimizer "
                    f"after apply_fsdp, from model.parameters() (which are then the shards)"
                )
