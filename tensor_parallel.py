"""Tensor parallelism (Megatron style) on torch.distributed primitives: column- and row-parallel
linears, sequence parallel, a vocabulary-parallel embedding and cross-entropy (loss parallel), and
async TP (the all-gather / reduce-scatter cut into a ring of point-to-point steps that overlap the
matmuls). For any model that follows a plan (below; LLAMA_PLAN for Meta's Llama layout).

    apply_tp(model, tp_group, sequence_parallel=True, loss_parallel=True, async_tp=False,
             plan=LLAMA_PLAN)                     # checks the model and the numbers first
    check_tp_args(tp, n_heads, n_kv_heads, sizes, seq_len, sp, async_tp)  # config.validate too
    vocab_parallel_cross_entropy(logits_shard, labels, tp_group) -> per-token loss
    reduce_sequence_parallel_grads(params, tp_group)   # after backward, before clipping

Notation: t = TP degree, r = this rank's index in the tp group, B batch, S sequence, s = S/t, D
model dim, F FFN hidden dim, V vocabulary. The loss is REPLICATED over the tp group (every TP rank
computes it), so no gradient is summed over tp except where a rank holds only part of it.

The plan (as TorchTitan's layer plan): module name ("*" = one name component) -> style. W is
stored as nn.Linear does, (out, in). apply_tp's docstring says what the model must provide.
    colwise            Y = X W^T, W split by rows (outputs): rank r holds W_r (out/t, in) and
                       computes Y_r = X W_r^T. backward: dX = sum_r dY_r W_r (all-reduce; reduce-
                       scatter under SP), dW_r = dY_r^T X (local). Run by the holder's
                       `input_proj_fn`: one f / GatherSeq for all its linears (wq, wk, wv).
    rowwise            Y = sum_r X_r W_r^T, W split by columns (inputs): rank r holds W_r (out, in/t)
                       and the input's slice X_r; the partial sums meet in an all-reduce (reduce-
                       scatter under SP). backward: dX_r = dY W_r, dW_r = dY^T X_r, local once dY
                       is whole (all-gathered under SP). Run by the holder's `output_proj_fn`.
    vocab_embedding    rows [r V/t, (r+1) V/t) on rank r (no gather for the lookup); ids outside give
                       zeros; partial sums meet in an all-reduce (reduce-scatter along S under SP).
    vocab_output       colwise over V, run by the holder's `output_fn`: logits (B, S, V/t); with
                       loss parallel the cross-entropy runs on the shards, else GatherVocab.
    sequence_parallel  replicated (norms); under SP their gradients are partial (below).
LLAMA_PLAN: wq, wk, wv colwise at head boundaries (H/t query and Hkv/t KV heads per rank; with
GQA query head j uses KV head j // (H/Hkv): contiguous splits keep them together), wo rowwise, w1,
w3 / w2 colwise / rowwise over F. A colwise -> rowwise pair keeps the activations in between
sharded (heads, FFN units) with no communication: each rank's heads and silu(x W1_r^T) * (x W3_r^T)
need only its slice.

Collectives, as autograd Functions (forward | backward), on the tp group:
    CopyToTP            identity                 | all-reduce      ("f": enter column region)
    ReduceFromTP        all-reduce               | identity        ("g": leave row region)
    GatherSeq           all-gather along seq     | reduce-scatter  (SP: enter column region)
    ReduceScatterSeq    reduce-scatter along seq | all-gather      (SP: leave row region)
    GatherVocab         all-gather along vocab   | take own slice  (logits without loss parallel)
    AllGatherMatmul     ring all-gather + matmul | ring matmul + reduce-scatter, dW  (async TP; plain
    MatmulReduceScatter ring matmul + reduce-sc. | ring all-gather + matmul, dW       or float8 GEMMs)

Sequence parallel (SP): between the TP regions (norms, residual adds) activations are split along
the sequence, (B, s, D) per rank. f/g become an all-gather along the sequence before each colwise
group and a reduce-scatter after each rowwise linear: the bytes of the all-reduce they replace,
but norm and residual activations and work shrink by t. RoPE runs after the gather.

Gradients. Weight shards: local. Replicated parameters (the norms) without SP see replicated
inputs and output gradients: their gradients are identical on every TP rank. With SP a rank's
norm sees only its s tokens: a PARTIAL sum, which `reduce_sequence_parallel_grads` all-reduces
for the parameters marked `tp_partial_grad`, once per step (forget it, and each rank steps with a
different norm weight). Parameters carry `tp_shard_dim` (0 column / vocabulary, 1 row), so
gradient clipping sums sharded squares over tp and counts replicated ones once; and
`global_shape` / `global_offset`, so init fills each rank's slice of the same global weights.

Loss parallel (vocab_parallel_cross_entropy), per token, with z_r the rank's logit slice:
    m   = max_r max_j z_r[j]                    all-reduce MAX of N floats
    se  = sum_r sum_j exp(z_r[j] - m)           } one all-reduce SUM of 2N floats
    zt  = z[target] - m  (from the owning rank) }
    loss = log(se) - zt                          identical on every TP rank
    dz_r = softmax slice - onehot_r(target)      times dloss; local, no communication
instead of an all-gather of N V logits. Computed in float32 (float64 stays float64).

Async TP (`async_tp`, needs SP). The all-gather feeding a colwise group is cut into t ring steps
(ring_all_gather): at step k rank r multiplies the block it holds (rank (r - k) mod t's) by all
the group's weights while that block travels on to r+1 and the next arrives from r-1
(isend/irecv). The reduce-scatter after a rowwise matmul is a travelling accumulator
(ring_reduce_scatter): at step k rank r computes its partial for block b = (r + 1 + k) mod t,
adds the running sum received from r+1 and sends it on to r-1; at k = t-1, b = r and the sum is
complete. Backward runs the same rings the other way (dW block by block meanwhile). Transfer k+1
overlaps matmul k. The rings are generic over a linear's block GEMMs (Matmuls; a Float8Linear
brings its own, float8.Float8RingMatmuls), which PACK a shard once before its ring:
    ring                  moves, t-1 blocks of B s tokens   plain   float8 tensorwise   rowwise
    colwise forward AG    the input x, packed                D a     D (e4m3)            2 D + 4
    rowwise backward AG   the output gradient dY, packed     D a     D (e5m2)            2 D + 4
    colwise backward RS   partial sums of dX                 D a     D a                 D a
    rowwise forward RS    partial sums of Y                  D a     D a                 D a
bytes per token (a = bytes of the compute dtype). Float8 (float8.py has the details): the
sync path's operands and scales, each shard quantized once; tensorwise scales from amaxes
all-reduced over tp first (the same on every rank: none travels); rowwise, each token's row
scaled over the features, its float32 scale, and its row scaled per feature over all tokens
(for dW). Partial sums stay in the compute dtype, as the sync reduce-scatters. Each block's
GEMMs are the sync path's rows; the order of sums differs (dW over t blocks, dX over the
group's weights, t > 2 reductions): async and sync agree to rounding (~1e-15 relative in
float64; float32 rounding with float8), not bit for bit. A colwise group that mixes float8
and plain linears (one too small for float8 once split) runs one ring per kind.

Communication per block per micro-batch, a = bytes per activation element, A = B S D:
    no SP: forward 2 all-reduces, backward 2 all-reduces of A a bytes each
           (a ring all-reduce sends 2 (t-1)/t A a bytes per rank);
    SP:    forward 2 all-gathers + 2 reduce-scatters, backward the same,
           each (t-1)/t A a bytes per rank: 8 (t-1)/t A a per block, equal to no SP.
    async TP: the same bytes, as point-to-point sends; with float8 the four all-gather
           rings (two forward, two backward) carry 1 byte per element (tensorwise) or
           2 + 4/D (rowwise) instead of a; plus float8's amax all-reduces (float8.py).
    Embedding: one all-reduce (reduce-scatter under SP) of A a. Output: one all-gather of
    A a (SP) plus, without loss parallel, an all-gather of B S V a; with loss parallel 3
    floats per token. SP norm gradients: one all-reduce of the norm weights per step.
Memory per rank: weights, gradients and optimizer state of the split modules / t; norms replicated.
Activations inside the column -> row regions / t; with SP, the norm and residual ones / t too.

Requirements (check_tp_args, naming the config keys): t divides H, Hkv, F, V and, with SP, the
tokens of a sequence on one TP group (S, or S / cp under CP: SP cuts a CP rank's two chunks as
one sequence, so a chunk need not divide by t). Async TP needs SP; with float8, B S / t tokens
per ring block divisible by 16 (the weight-gradient GEMM contracts a block's tokens).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

_size, _rank = dist.get_world_size, dist.get_rank  # of the tp group passed in


# ---------------------------------------------------------------------------------------
# 1. Collectives along a dimension (plain tensors; the Functions below wrap them)

def all_reduce(x: torch.Tensor, group: dist.ProcessGroup, op=dist.ReduceOp.SUM) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)  # never reduce a tensor autograd owns
    dist.all_reduce(out, op=op, group=group)  # comm: tp group, |x| bytes, 2(t-1)/t per rank on a ring
    return out


def all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's x concatenated along `dim`, in rank order."""
    t = _size(group)
    out = x.new_empty((t * x.shape[0], *x.shape[1:]))  # rank i's x at rows [i n, (i+1) n)
    dist.all_gather_single(out, x.contiguous(), group=group)  # comm: tp group, (t-1) |x| in
    return torch.cat(out.chunk(t), dim=dim)


def reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum over ranks of x, of which rank r keeps the r-th of t chunks along `dim`."""
    t = _size(group)
    chunks = x.chunk(t, dim=dim)  # chunk i goes to rank i
    stacked = torch.cat(chunks) if dim else x.contiguous()  # chunks along dim 0
    out = stacked.new_empty(chunks[0].shape)
    dist.reduce_scatter_single(out, stacked, op=dist.ReduceOp.SUM, group=group)  # comm: (t-1)/t |x| out
    return out


def _check_divisible(x: torch.Tensor, dim: int, t: int, what: str) -> None:
    if x.shape[dim] % t:
        raise ValueError(f"{what}: size {x.shape[dim]} of dim {dim} of a {tuple(x.shape)} tensor is not "
                         f"divisible by the tensor-parallel degree {t}")


# ---------------------------------------------------------------------------------------
# 2. The region operators as autograd Functions (forward and backward side by side)

class CopyToTP(torch.autograd.Function):
    """f: enter a column-parallel region with a replicated input. Each rank's input
    gradient holds only its output columns' share, so backward sums over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return all_reduce(dy, ctx.group), None


class ReduceFromTP(torch.autograd.Function):
    """g: leave a row-parallel region: sum the partial outputs. The loss is replicated,
    so the output gradient is already whole on every rank: backward is the identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return dy, None


class GatherSeq(torch.autograd.Function):
    """SP -> TP: all-gather the sequence shards (B, s, D) -> (B, S, D). Backward:
    reduce-scatter, summing the partial input gradients of the column-parallel group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return all_gather(x, 1, group)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return reduce_scatter(dy, 1, ctx.group), None


class ReduceScatterSeq(torch.autograd.Function):
    """TP -> SP: sum the partial outputs of a row-parallel linear and keep this rank's
    sequence shard, (B, S, D) -> (B, s, D). Backward: all-gather the shard gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        _check_divisible(x, 1, _size(group), "sequence parallel (data.seq_len)")
        ctx.group = group
        return reduce_scatter(x, 1, group)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return all_gather(dy, 1, ctx.group), None


class GatherVocab(torch.autograd.Function):
    """Vocabulary-sharded logits (..., V/t) -> whole logits (..., V) on every rank (no loss
    parallel). The loss is replicated, so every rank's logit gradient is the same whole
    tensor; backward keeps this rank's slice, no communication."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.rank, ctx.width = _rank(group), x.shape[-1]
        return all_gather(x, x.dim() - 1, group)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return dy.narrow(-1, ctx.rank * ctx.width, ctx.width), None


# ---------------------------------------------------------------------------------------
# 3. Async TP: rings of point-to-point steps overlapping the matmuls

def _start_ring(send: torch.Tensor, recv: torch.Tensor, group: dist.ProcessGroup, shift: int) -> list:
    """Post the send of `send` to rank r+shift and the receive of `recv` from rank r-shift
    (batched, so both peers may post in any order without deadlock on gloo or NCCL)."""
    t, r = _size(group), _rank(group)
    return dist.batch_isend_irecv([  # comm: tp group, |send| bytes out, |recv| in
        dist.P2POp(dist.isend, send, group=group, group_peer=(r + shift) % t),
        dist.P2POp(dist.irecv, recv, group=group, group_peer=(r - shift) % t),
    ])


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on (bf16 without FSDP), else the
    input's. The rings cast explicitly, autocast off: backward runs outside its context."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Weight gradients sum t block products: in float32 when the compute is 16-bit."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class Matmuls:
    """The three GEMMs of a linear y = x W^T, W (N, K), on blocks of tokens, as the rings
    below call them; plain matmuls in the compute dtype. A float8 linear brings its own
    (its `ring_matmuls(dtype)`: float8.Float8RingMatmuls), with the same methods:
        weight(w) -> state      w prepared once per forward (cast; float8: quantized)
        pack(x, grad, seq_sharded) -> (packed (B, n, c), shared)   an input x or output
                                gradient (grad) prepared ONCE, before its ring: `packed` is
                                what travels (or is kept) row for row, `shared` what every
                                rank holds the same of (float8: scales made equal over tp);
                                seq_sharded: x is this rank's sequence shard
        out(xp, xs, w)          (B, n, N) rows of x W^T from packed rows of x
        grad_x(gp, gs, w)       (B, n, K) rows of dY W from packed rows of dY
        grad_w(gp, gs, xp, xs)  (N, K) dY^T x over those rows, in the accumulation dtype
    `key` says which linears can share one ring (the same packing of the input)."""

    key = "plain"

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def weight(self, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (w.to(self.dtype),)

    def pack(self, x: torch.Tensor, grad: bool, seq_sharded: bool) -> tuple[torch.Tensor, tuple]:
        return x.to(self.dtype), ()

    def out(self, xp: torch.Tensor, xs: tuple, w: tuple) -> torch.Tensor:
        return xp @ w[0].t()

    def grad_x(self, gp: torch.Tensor, gs: tuple, w: tuple) -> torch.Tensor:
        return gp @ w[0]

    def grad_w(self, gp: torch.Tensor, gs: tuple, xp: torch.Tensor, xs: tuple) -> torch.Tensor:
        return (gp.reshape(-1, gp.shape[-1]).t() @ xp.reshape(-1, xp.shape[-1])).to(_accumulate_dtype(self.dtype))


def ring_matmuls(linear: nn.Module, dtype: torch.dtype):
    """The linear's own block GEMMs (a Float8Linear's `ring_matmuls`), else plain ones."""
    make = getattr(linear, "ring_matmuls", None)
    return make(dtype) if make is not None else Matmuls(dtype)


def ring_all_gather(shard: torch.Tensor, group: dist.ProcessGroup,
                    on_block: Callable[[int, torch.Tensor], None]) -> torch.Tensor:
    """All-gather of sequence shards (B, s, c) as t ring steps: at step k this rank holds
    rank j = (r - k) mod t's block and calls on_block(j, block) while passing the block on
    to r+1 and receiving the next from r-1. Returns every rank's block, (t, B, s, c)."""
    t, r = _size(group), _rank(group)
    blocks = shard.new_empty((t, *shard.shape))
    blocks[r] = shard
    for step in range(t):
        src = (r - step) % t
        if step < t - 1:
            works = _start_ring(blocks[src], blocks[(src - 1) % t], group, 1)
        on_block(src, blocks[src])
        if step < t - 1:
            _wait(works)
    return blocks


def ring_reduce_scatter(partial: Callable[[int], torch.Tensor], group: dist.ProcessGroup,
                        meanwhile: Callable[[int], None] | None = None) -> torch.Tensor:
    """Reduce-scatter along the sequence as a travelling accumulator: partial(b) is this
    rank's partial sum for sequence block b. At step k rank r computes it for
    b = (r + 1 + k) mod t, adds the running sum received from r+1 and sends it on to r-1,
    then calls meanwhile(b) (work that overlaps the transfer). At k = t-1, b = r: returns
    the complete sum for this rank's block."""
    t, r = _size(group), _rank(group)
    works, recv = None, None
    for step in range(t):
        b = (r + 1 + step) % t
        part = partial(b)
        if works is not None:  # the running sum of ranks r+1, r+2, ... for block b
            _wait(works)
            part = part + recv  # not in place: selective checkpointing may cache a matmul's output
        if step < t - 1:  # pass it on to r-1; r+1's sum for the next block arrives
            recv = torch.empty_like(part)
            works = _start_ring(part, recv, group, -1)
        if meanwhile is not None:
            meanwhile(b)
    return part


class AllGatherMatmul(torch.autograd.Function):
    """Column-parallel group under async TP: Y_i = AG_seq(X) W_i^T for every weight W_i
    that reads X (wq, wk, wv or w1, w3). x (B, s, D) -> Y_i (B, S, out_i / t). mm: the block
    GEMMs of all W_i (ring_matmuls; None: plain, Matmuls).

    forward   x packed once (mm.pack: plain, the compute dtype; float8, quantized), then a
              ring all-gather of the packed blocks; block j is multiplied by every W_i
              while it travels on. The gathered blocks are kept for dW (as the sync path
              keeps the gathered X, or its float8 copy).
    backward  each dY_i packed once; dX = RS_seq(sum_i dY_i W_i) as a travelling
              accumulator (compute dtype); dW_i = dY_i^T X, block by block while the
              partial sums travel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, mm, *weights: torch.Tensor):
        t, (B, s, _) = _size(group), x.shape
        mm = mm if mm is not None else Matmuls(_compute_dtype(x))
        with torch.autocast(x.device.type, enabled=False):
            packed, shared = mm.pack(x, grad=False, seq_sharded=True)  # (B, s, c), before the ring
            ws = [mm.weight(w) for w in weights]
            outs = [x.new_empty((B, t * s, w.shape[0]), dtype=mm.dtype) for w in weights]

            def on_block(j: int, block: torch.Tensor) -> None:
                for w, out in zip(ws, outs):
                    out[:, j * s:(j + 1) * s] = mm.out(block, shared, w)
            blocks = ring_all_gather(packed, group, on_block)  # (t, B, s, c)
        ctx.group, ctx.mm, ctx.x_dtype, ctx.w_dtypes = group, mm, x.dtype, [w.dtype for w in weights]
        ctx.sizes = (len(shared), len(ws[0]))
        ctx.save_for_backward(blocks, *shared, *[a for w in ws for a in w])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor):
        blocks, *rest = ctx.saved_tensors
        n_shared, n_w = ctx.sizes
        shared, flat = tuple(rest[:n_shared]), rest[n_shared:]
        ws = [tuple(flat[i:i + n_w]) for i in range(0, len(flat), n_w)]
        mm, s = ctx.mm, blocks.shape[2]
        used = [i for i, dy in enumerate(dys) if dy is not None]  # an output without gradient: no dW
        # Only what ctx.needs_input_grad asks for: a zero-bubble pipeline asks for dX in its I
        # pass, for the dW_i in its W pass (pipeline.py); the dW_i alone need no communication.
        want_x, want_w = ctx.needs_input_grad[0], [i for i in used if ctx.needs_input_grad[3 + i]]
        with torch.autocast(blocks.device.type, enabled=False):
            gs = {i: mm.pack(dys[i], grad=True, seq_sharded=False) for i in used}  # (B, S, c_i), once
            dws = dict.fromkeys(want_w, 0)

            def partial(b: int) -> torch.Tensor:  # my partial dX for sequence block b
                return sum(mm.grad_x(gs[i][0][:, b * s:(b + 1) * s], gs[i][1], ws[i]) for i in used)

            def weight_grads(b: int) -> None:  # block b's share of each dW, overlapping the transfer
                for i in want_w:
                    dws[i] += mm.grad_w(gs[i][0][:, b * s:(b + 1) * s], gs[i][1], blocks[b], shared)
            dx = None
            if want_x:
                dx = ring_reduce_scatter(partial, ctx.group, weight_grads).to(ctx.x_dtype)  # my block, complete
            else:
                for b in range(blocks.shape[0]):
                    weight_grads(b)
        grads = [dws[i].to(wd) if i in dws else None for i, wd in enumerate(ctx.w_dtypes)]
        return (dx, None, None, *grads)


class MatmulReduceScatter(torch.autograd.Function):
    """Row-parallel linear under async TP: Y = RS_seq(X W^T). x (B, S, in/t) -> (B, s, D).
    mm: the block GEMMs (ring_matmuls; None: plain, Matmuls).

    forward   x packed once (kept for dW); travelling accumulator of the partial product
              of one sequence block per step (compute dtype).
    backward  dY packed once (float8: quantized), then a ring all-gather of the packed
              blocks; block j gives dX[:, block j] = dY_j W and its share of dW = dY^T X
              while the next block travels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, group: dist.ProcessGroup, mm=None) -> torch.Tensor:
        _check_divisible(x, 1, _size(group), "sequence parallel (data.seq_len)")
        s = x.shape[1] // _size(group)
        mm = mm if mm is not None else Matmuls(_compute_dtype(x))
        with torch.autocast(x.device.type, enabled=False):
            xp, xs = mm.pack(x, grad=False, seq_sharded=False)  # (B, S, c): the whole sequence
            ws = mm.weight(w)
            y = ring_reduce_scatter(lambda b: mm.out(xp[:, b * s:(b + 1) * s], xs, ws), group)  # (B, s, D)
        ctx.group, ctx.mm, ctx.x_dtype, ctx.w_dtype = group, mm, x.dtype, w.dtype
        ctx.sizes = (len(xs), x.shape[-1])
        ctx.save_for_backward(xp, *xs, *ws)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xp, *rest = ctx.saved_tensors
        (n_shared, K), mm, s = ctx.sizes, ctx.mm, dy.shape[1]
        xs, ws = tuple(rest[:n_shared]), tuple(rest[n_shared:])
        B, S = xp.shape[:2]
        want_x, want_w = ctx.needs_input_grad[:2]  # only what is asked for (a zero-bubble I or W)
        dx = dy.new_empty((B, S, K), dtype=mm.dtype) if want_x else None
        acc = {"dw": 0}
        with torch.autocast(dy.device.type, enabled=False):
            gp, gs = mm.pack(dy, grad=True, seq_sharded=True)  # (B, s, c), before the ring

            def on_block(j: int, block: torch.Tensor) -> None:
                rows = slice(j * s, (j + 1) * s)
                if want_x:
                    dx[:, rows] = mm.grad_x(block, gs, ws)
                if want_w:
                    acc["dw"] += mm.grad_w(block, gs, xp[:, rows], xs)
            ring_all_gather(gp, ctx.group, on_block)
        return (dx.to(ctx.x_dtype) if want_x else None), (acc["dw"].to(ctx.w_dtype) if want_w else None), None, None


# ---------------------------------------------------------------------------------------
# 4. The projections of a block (llama's input_proj_fn / output_proj_fn)

def column_parallel(x: torch.Tensor, linears: tuple[nn.Module, ...], *, group: dist.ProcessGroup,
                    sequence_parallel: bool, async_tp: bool) -> list[torch.Tensor]:
    """Column-parallel group reading one input: x is (B, s, D) under SP, else (B, S, D)
    replicated. Returns the local output slices (B, S, out_i / t). Async TP runs one ring
    per kind of linear in the group (all plain, or all float8 of one recipe: one ring)."""
    if async_tp:
        mms = [ring_matmuls(linear, _compute_dtype(x)) for linear in linears]
        outs = [None] * len(linears)
        for key in dict.fromkeys(mm.key for mm in mms):
            idx = [i for i, mm in enumerate(mms) if mm.key == key]
            ys = AllGatherMatmul.apply(x, group, mms[idx[0]], *[linears[i].weight for i in idx])
            for i, y in zip(idx, ys):
                outs[i] = y
        return outs
    x = GatherSeq.apply(x, group) if sequence_parallel else CopyToTP.apply(x, group)
    return [linear(x) for linear in linears]  # any linear: nn.Linear, Float8Linear


def row_parallel(x: torch.Tensor, linear: nn.Module, *, group: dist.ProcessGroup,
                 sequence_parallel: bool, async_tp: bool) -> torch.Tensor:
    """Row-parallel linear: x (B, S, in/t) -> (B, s, D) under SP, else (B, S, D)."""
    if async_tp:
        return MatmulReduceScatter.apply(x, linear.weight, group, ring_matmuls(linear, _compute_dtype(x)))
    y = linear(x)  # partial sum over this rank's input features
    return ReduceScatterSeq.apply(y, group) if sequence_parallel else ReduceFromTP.apply(y, group)


# ---------------------------------------------------------------------------------------
# 5. Vocabulary parallel: the embedding and the cross-entropy

class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + V/t) of the embedding; the parameter keeps the
    name `weight`, so the model's names stay `tok_embeddings.weight`."""

    def __init__(self, weight: nn.Parameter, vocab_start: int, group: dist.ProcessGroup,
                 sequence_parallel: bool):
        super().__init__()
        self.weight = weight
        self.vocab_start, self.group, self.sequence_parallel = vocab_start, group, sequence_parallel

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)  # (B, S, D), this rank's partial sum
        if self.sequence_parallel:
            return ReduceScatterSeq.apply(out, self.group)  # (B, s, D)
        return ReduceFromTP.apply(out, self.group)  # (B, S, D)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy from vocabulary-sharded logits (N, V/t), labels (N,) global
    ids; returns (N,) losses, the same on every rank. See the module docstring."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, group: dist.ProcessGroup,
                ignore_index: int) -> torch.Tensor:
        v = logits.shape[-1]
        z = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits.clone()
        m = all_reduce(z.detach().amax(dim=-1), group, dist.ReduceOp.MAX)  # (N,)
        z -= m.unsqueeze(-1)
        local = labels - _rank(group) * v
        mine = (local >= 0) & (local < v)  # the target logit lives on this rank
        target = z.gather(1, local.clamp(0, v - 1).unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        probs = z.exp_()  # (N, V/t), in place: z is not needed any more
        sums = all_reduce(torch.stack([probs.sum(-1), target]), group)  # (2, N): sum-exp, target
        valid = labels != ignore_index
        loss = (sums[0].log() - sums[1]).masked_fill(~valid, 0.0)
        probs /= sums[0].unsqueeze(-1)  # this rank's slice of the softmax
        ctx.save_for_backward(probs, local, mine, valid)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, dloss: torch.Tensor):
        probs, local, mine, valid = ctx.saved_tensors
        grad = probs.clone()
        rows = mine.nonzero().squeeze(-1)
        grad[rows, local[rows]] -= 1.0
        grad *= (dloss * valid).unsqueeze(-1).to(grad.dtype)
        return grad.to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group: dist.ProcessGroup,
                                 ignore_index: int = -100) -> torch.Tensor:
    """logits (..., V/t) this rank's vocabulary slice, labels (...) -> per-token loss (N,)."""
    return VocabParallelCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           group, ignore_index)


# ---------------------------------------------------------------------------------------
# 6. The plan, the checks, and applying them

# Module name -> style ("*": one name component, e.g. a layer index), in Meta's Llama names.
LLAMA_PLAN: dict[str, str] = {
    "tok_embeddings": "vocab_embedding", "norm": "sequence_parallel", "output": "vocab_output",
    "layers.*.attention_norm": "sequence_parallel", "layers.*.ffn_norm": "sequence_parallel",
    "layers.*.attention.wq": "colwise", "layers.*.attention.wk": "colwise", "layers.*.attention.wv": "colwise",
    "layers.*.attention.wo": "rowwise",
    "layers.*.feed_forward.w1": "colwise", "layers.*.feed_forward.w3": "colwise", "layers.*.feed_forward.w2": "rowwise",
}
# Style -> (the weight dim split over tp, what that dim holds, the holder's attribute it sets).
STYLES: dict[str, tuple] = {
    "colwise": (0, "output features", "input_proj_fn"), "rowwise": (1, "input features", "output_proj_fn"),
    "vocab_embedding": (0, "vocabulary", None), "vocab_output": (0, "vocabulary", "output_fn"),
    "sequence_parallel": (None, None, None)}


def check_tp_args(tp: int, n_heads: int, n_kv_heads: int, sizes: dict[str, int], seq_len: int | None,
                  sequence_parallel: bool, async_tp: bool) -> None:
    """Everything TP needs of the numbers, no collective. sizes: {what tp splits: size}, e.g.
    {"model.vocab_size": 128256}; n_heads, n_kv_heads: 0 without attention; seq_len: tokens of
    a sequence on one TP group (data.seq_len / parallel.cp), None: checked at run time."""
    if tp == 1:
        return
    if n_heads % tp or n_kv_heads % tp:
        raise ValueError(f"parallel.tp={tp} must divide model.n_heads={n_heads} and model.n_kv_heads={n_kv_heads} "
                         f"(each TP rank holds whole heads); pick tp from the common divisors")
    for what, size in sizes.items():
        if size % tp:
            raise ValueError(f"parallel.tp={tp} must divide {what} = {size} (tensor parallel splits it)")
    if sequence_parallel and seq_len is not None and seq_len % tp:
        raise ValueError(f"data.seq_len (/ parallel.cp under context parallel) = {seq_len} is not divisible by "
                         f"parallel.tp={tp}: sequence parallel splits each sequence over the tp ranks; change "
                         f"data.seq_len or set parallel.sequence_parallel=false")
    if async_tp and not sequence_parallel:
        raise ValueError("parallel.async_tp=true needs parallel.sequence_parallel=true (async TP overlaps the "
                         "sequence all-gather / reduce-scatter, which exist only with sequence parallel)")


def _matches(pattern: str, name: str) -> bool:
    p, n = pattern.split("."), name.split(".")
    return len(p) == len(n) and all(a in ("*", b) for a, b in zip(p, n))


def local_shape(module_name: str, shape: tuple[int, ...], t: int, plan: dict[str, str] = LLAMA_PLAN):
    """The shape of a module's weight on one of t TP ranks, by the last part of its name
    ("wq"): what float8.convert_to_float8 checks against _scaled_mm's rules before TP."""
    dim = next((STYLES[s][0] for p, s in plan.items() if p.rsplit(".", 1)[-1] == module_name.rsplit(".", 1)[-1]),
               None)
    return tuple(n // t if d == dim else n for d, n in enumerate(shape))


def _resolve(model: nn.Module, plan: dict[str, str]) -> list[tuple[str, str, nn.Module]]:
    """(name, style, module) for every module the plan names, or a ValueError naming what is missing."""
    modules, found = dict(model.named_modules()), []
    for pattern, style in plan.items():
        if style not in STYLES:
            raise ValueError(f"tensor parallel: unknown style {style!r} for {pattern!r}; use one of {list(STYLES)}")
        hits = [(name, style, m) for name, m in modules.items() if _matches(pattern, name)]
        holder, _, attr = pattern.rpartition(".")
        if not hits and ("*" in pattern or getattr(modules.get(holder), attr, 0) is not None):
            raise ValueError(f"tensor parallel: the plan names {pattern!r} ({style}) but the {type(model).__name__} "
                             f"has no such module; pass a plan= with its module names")
        dim, _, hook = STYLES[style]
        for name, _, m in hits:
            holder = name.rpartition(".")[0]
            w = getattr(m, "weight", None)
            if dim is not None and not (isinstance(w, torch.Tensor) and w.dim() == 2):
                raise ValueError(f"tensor parallel: {name} ({style}) has no 2-D `weight` to split")
            if hook is not None and not hasattr(modules[holder], hook):
                raise ValueError(f"tensor parallel: {name} is {style}, so its holder {holder or 'the model'} "
                                 f"({type(modules[holder]).__name__}) needs a replaceable `{hook}` attribute")
        found += hits
    return found


def _shard(module: nn.Module, name: str, dim: int, group: dist.ProcessGroup) -> nn.Parameter:
    """Replace module.<name> by this rank's 1/t slice along `dim` (on meta: shapes only),
    recording where the slice sits."""
    p = getattr(module, name)
    n, r = p.shape[dim] // _size(group), _rank(group)  # check_tp_args saw that t divides it
    shard = nn.Parameter(p.detach().narrow(dim, r * n, n).clone(), requires_grad=p.requires_grad)
    shard.__dict__.update(p.__dict__)  # attributes earlier techniques set on p
    offset = list(getattr(p, "global_offset", (0,) * p.dim()))
    offset[dim] += r * n
    shard.global_shape = getattr(p, "global_shape", p.shape)
    shard.global_offset = tuple(offset)
    shard.tp_shard_dim = dim
    setattr(module, name, shard)
    return shard


def vocab_parallel_output(h: torch.Tensor, linear: nn.Module, *, group: dist.ProcessGroup,
                          sequence_parallel: bool, loss_parallel: bool) -> torch.Tensor:
    """The output projection (llama's output_fn): h (B, s, D) under SP, else (B, S, D) ->
    logits (B, S, V/t) with loss parallel, else gathered to (B, S, V)."""
    (logits,) = column_parallel(h, (linear,), group=group, sequence_parallel=sequence_parallel, async_tp=False)
    return logits if loss_parallel else GatherVocab.apply(logits, group)


def apply_tp(model: nn.Module, group: dist.ProcessGroup, sequence_parallel: bool = True,
             loss_parallel: bool = True, async_tp: bool = False, plan: dict[str, str] = LLAMA_PLAN,
             n_heads: int | None = None, n_kv_heads: int | None = None, seq_len: int | None = None) -> None:
    """Shard `model` (on meta or materialized) over `group` in place, by `plan`. The model must
    have (checked first: a ValueError names what is missing, the model is left as it was)
    every module the plan names (a plain name set to None is skipped: a pipeline stage); a 2-D
    `weight` where one is split; on the module holding it the replaceable attribute its style
    sets: `input_proj_fn(x, linears) -> outputs` (colwise: the linears reading one input),
    `output_proj_fn(x, linear)` (rowwise), `output_fn(h, linear)` (vocab_output). Attention
    must count its heads from its projections' width. n_heads, n_kv_heads: by default
    model.args.n_heads / .kv_heads. seq_len: see check_tp_args. With loss_parallel the logits
    stay vocabulary-sharded: use vocab_parallel_cross_entropy."""
    if n_heads is None or n_kv_heads is None:
        args = getattr(model, "args", None)
        if not (hasattr(args, "n_heads") and hasattr(args, "kv_heads")):
            raise ValueError(f"tensor parallel: pass n_heads= and n_kv_heads= (the {type(model).__name__} has no "
                             f"`args` with them): wq / wk / wv are cut at head boundaries; 0 without attention")
        n_heads, n_kv_heads = args.n_heads, args.kv_heads
    found = _resolve(model, plan)
    sizes = {f"{name}.weight's {STYLES[style][1]} (dim {STYLES[style][0]})": m.weight.shape[STYLES[style][0]]
             for name, style, m in found if STYLES[style][0] is not None}
    check_tp_args(_size(group), n_heads, n_kv_heads, sizes, seq_len, sequence_parallel, async_tp)
    sp = dict(group=group, sequence_parallel=sequence_parallel)
    fns = {"colwise": functools.partial(column_parallel, async_tp=async_tp, **sp),
           "rowwise": functools.partial(row_parallel, async_tp=async_tp, **sp),
           "vocab_output": functools.partial(vocab_parallel_output, loss_parallel=loss_parallel, **sp)}
    for name, style, module in found:
        dim, _, hook = STYLES[style]
        holder, _, attr = name.rpartition(".")
        if style == "sequence_parallel":  # replicated; under SP it sees only this rank's tokens
            for p in module.parameters() if sequence_parallel else ():
                p.tp_partial_grad = True
            continue
        weight = _shard(module, "weight", dim, group)
        if hasattr(module, "amax_group"):  # a Float8Linear (duck-typed): scales over the whole tensor
            module.amax_group = group
        if hook is not None:
            setattr(model.get_submodule(holder), hook, fns[style])
        else:  # vocab_embedding: the module is replaced, its parameter keeps its name
            emb = VocabParallelEmbedding(weight, _rank(group) * weight.shape[0], group, sequence_parallel)
            setattr(model.get_submodule(holder), attr, emb)


@torch.no_grad()
def reduce_sequence_parallel_grads(params, group: dist.ProcessGroup) -> None:
    """Sum over tp the gradients of replicated parameters that saw only this rank's
    sequence shard (`tp_partial_grad`, the norms under SP): one all-reduce per step."""
    marked = [p for p in params if getattr(p, "tp_partial_grad", False)]
    if not marked or _size(group) == 1:
        return
    for p in marked:  # a rank without a gradient contributes zeros (every rank sends the same sizes)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in marked]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)  # comm: tp group, the norm weights' gradients
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))
