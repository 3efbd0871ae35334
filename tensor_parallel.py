"""Tensor parallelism for Llama (Megatron style) on torch.distributed primitives:
column- and row-parallel linears, sequence parallel, a vocabulary-parallel embedding and
cross-entropy (loss parallel), and async TP (the all-gather / reduce-scatter cut into a
ring of point-to-point steps that overlap the matmuls).

    apply_tp(model, tp_group, sequence_parallel=True, loss_parallel=True, async_tp=False)
    vocab_parallel_cross_entropy(logits_shard, labels, tp_group) -> per-token loss
    reduce_sequence_parallel_grads(params, tp_group)   # after backward, before clipping

Notation: t = TP degree, r = this rank's index in the tp group, B batch, S sequence, s = S/t,
D model dim, F FFN hidden dim, V vocabulary. The loss is REPLICATED over the tp group (every
TP rank computes the same loss), so no gradient is ever summed over tp except where a
rank holds only part of it (see "Gradients" below).

The two styles (W stored as nn.Linear does, (out, in))
    column-parallel  Y = X W^T, W split by rows (outputs): rank r holds W_r (out/t, in) and
                     computes Y_r = X W_r^T, its slice of the output features.
                     backward: dX = sum_r dY_r W_r (a sum over ranks: all-reduce, or a
                     reduce-scatter under SP), dW_r = dY_r^T X (local).
    row-parallel     Y = sum_r X_r W_r^T, W split by columns (inputs): rank r holds
                     W_r (out, in/t) and the matching feature slice X_r of the input, and
                     computes a partial sum; the sum over ranks is an all-reduce (or a
                     reduce-scatter under SP). backward: dX_r = dY W_r, dW_r = dY^T X_r, both
                     local once dY is whole (an all-gather of dY under SP).
A column -> row pair (wq/wk/wv -> wo, w1/w3 -> w2) keeps the intermediate activations
sharded (heads, FFN hidden units) with no communication in between: the local head
attention and silu(x W1_r^T) * (x W3_r^T) need only the rank's own slice.

Collectives, as autograd Functions (forward | backward), on the tp group:
    CopyToTP            identity                 | all-reduce      ("f": enter column region)
    ReduceFromTP        all-reduce               | identity        ("g": leave row region)
    GatherSeq           all-gather along seq     | reduce-scatter  (SP: enter column region)
    ReduceScatterSeq    reduce-scatter along seq | all-gather      (SP: leave row region)
    GatherVocab         all-gather along vocab   | take own slice  (logits without loss parallel)
    AllGatherMatmul     ring all-gather + matmul | ring matmul + reduce-scatter, dW  (async TP)
    MatmulReduceScatter ring matmul + reduce-sc. | ring all-gather + matmul, dW      (async TP)
Per block, the input of attention goes through one f / GatherSeq feeding wq, wk and wv
together, the output of wo through one g / ReduceScatterSeq; the same for w1/w3 and w2.

Llama plan (as TorchTitan's):
    tok_embeddings      vocabulary-parallel: rank r holds rows [r V/t, (r+1) V/t); ids outside
                        the range give zeros; the sum over ranks is an all-reduce (or a
                        reduce-scatter along the sequence under SP). Rows, not columns, so
                        that the lookup needs no gather and the output (B, S, D) is a plain
                        partial sum.
    wq, wk, wv          column-parallel at head boundaries: H/t query heads and Hkv/t KV
                        heads per rank (with GQA, query head j uses KV head j // (H/Hkv), so
                        contiguous head splits keep each rank's query heads with their KV
                        heads). Needs H % t == 0 and Hkv % t == 0.
    wo                  row-parallel (its input columns are the same heads).
    w1, w3 / w2         column / row-parallel over F. Needs F % t == 0.
    norms               replicated (tiny).
    output              column-parallel over V: logits (B, S, V/t). With loss parallel the
                        cross-entropy runs on the shards; without, the logits are gathered.

Sequence parallel (SP): between the TP regions (norms, residual adds) activations are
split along the sequence, (B, s, D) per rank, instead of replicated. f/g become an
all-gather along the sequence before each column-parallel group and a reduce-scatter
after each row-parallel one: the same bytes as the all-reduce they replace
(all-reduce = reduce-scatter + all-gather), but norm and residual activations and work
shrink by t. RoPE runs after the gather, on global positions. Needs S % t == 0.

Gradients. Column/row weight shards: local, nothing to do. Replicated parameters (the
norms): without SP they see replicated inputs and replicated output gradients, so their
gradients are already identical on every TP rank. With SP each rank's norm sees only its
s tokens, so its gradient is a PARTIAL sum: `reduce_sequence_parallel_grads` all-reduces
(sum) the parameters marked `tp_partial_grad` once per step (a classic bug is to forget
it: each rank then steps with a different norm weight).
Parameters carry `tp_shard_dim` (0 column / vocabulary, 1 row) so gradient clipping
sums the squares of sharded gradients over tp and counts replicated ones once; and
`global_shape` / `global_offset`, so initialization fills each rank's slice of the same
global weights (llama.init_weights): shards differ, and the whole equals one process.

Loss parallel (vocab_parallel_cross_entropy), per token, with z_r the rank's logit slice:
    m   = max_r max_j z_r[j]                    all-reduce MAX of N floats
    se  = sum_r sum_j exp(z_r[j] - m)           } one all-reduce SUM of 2N floats
    zt  = z[target] - m  (from the owning rank) }
    loss = log(se) - zt                          identical on every TP rank
    dz_r = softmax slice - onehot_r(target)      times dloss; local, no communication
instead of an all-gather of N V logits. Computed in float32 (float64 stays float64).

Async TP (`async_tp`, needs SP). The all-gather feeding a column-parallel group is cut
into t steps around a ring: at step k rank r multiplies the sequence block it holds,
that of rank (r - k) mod t, by all the group's weights while that block travels on to
rank r+1 and the next arrives from rank r-1 (isend/irecv). The reduce-scatter after a
row-parallel matmul is a travelling accumulator: at step k rank r computes its partial
for block b = (r + 1 + k) mod t, adds the running sum received from rank r+1 (which
worked on the same block one step earlier) and sends it on to rank r-1; at k = t-1,
b = r and the sum is complete. Backward uses the same two rings (the row-parallel
backward gathers dY while computing dX and dW block by block; the column-parallel backward
reduce-scatters dX while computing dW block by block). The bytes equal the synchronous
collectives; what changes is that transfer k+1 overlaps matmul k. Sums run in a different
order from reduce_scatter and the weight gradients are summed block by block, so async and
sync agree to rounding (~1e-15 relative in float64), not bit for bit. Float8 linears are not fused into
the ring: async TP with float8 is refused.

Communication per block per micro-batch, a = bytes per activation element, A = B S D:
    no SP: forward 2 all-reduces, backward 2 all-reduces of A a bytes each
           (a ring all-reduce sends 2 (t-1)/t A a bytes per rank);
    SP:    forward 2 all-gathers + 2 reduce-scatters, backward the same,
           each (t-1)/t A a bytes per rank: 8 (t-1)/t A a per block, equal to no SP.
    Embedding: one all-reduce (reduce-scatter under SP) of A a. Output: one all-gather of
    A a (SP) plus, without loss parallel, an all-gather of B S V a; with loss parallel 3
    floats per token. SP norm gradients: one all-reduce of the norm weights per step.
Memory per rank: linear weights, their gradients and optimizer state / t; norms
replicated; the embedding and output / t. Activations inside the column -> row regions
/ t; with SP, the norm and residual activations / t as well.

Divisibility (checked with errors naming the values): t divides H, Hkv, F, V, and S
(with SP).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _size(group: dist.ProcessGroup) -> int:
    return dist.get_world_size(group)


def _rank(group: dist.ProcessGroup) -> int:
    return dist.get_rank(group)


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
    """The dtype the matmuls run in: autocast's when it is on (bf16 training without
    FSDP), else the input's. The ring Functions cast explicitly and run with autocast
    off, because backward runs outside the autocast context."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Weight gradients sum t block products: in float32 when the compute is 16-bit."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class AllGatherMatmul(torch.autograd.Function):
    """Column-parallel group under async TP: Y_i = AG_seq(X) W_i^T for every weight W_i
    that reads X (wq, wk, wv or w1, w3). x (B, s, D) -> Y_i (B, S, out_i / t).

    forward   ring all-gather of the sequence blocks; block j is multiplied by every W_i
              while it travels on. The gathered X is kept for dW (as the sync path keeps it).
    backward  dX = RS_seq(sum_i dY_i W_i) as a travelling accumulator; dW_i = dY_i^T X,
              computed block by block while the partial sums travel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, *weights: torch.Tensor):
        t, r, dtype = _size(group), _rank(group), _compute_dtype(x)
        B, s, D = x.shape
        ws = [w.to(dtype) for w in weights]
        blocks = x.new_empty((t, B, s, D), dtype=dtype)  # blocks[j]: rank j's sequence shard
        blocks[r] = x
        outs = [x.new_empty((B, t * s, w.shape[0]), dtype=dtype) for w in ws]
        with torch.autocast(x.device.type, enabled=False):
            for step in range(t):
                src = (r - step) % t  # the block this rank holds at this step
                if step < t - 1:  # pass it on to r+1 while multiplying it; r-1's arrives
                    works = _start_ring(blocks[src], blocks[(src - 1) % t], group, 1)
                for w, out in zip(ws, outs):
                    out[:, src * s:(src + 1) * s] = blocks[src] @ w.t()
                if step < t - 1:
                    _wait(works)
        ctx.group, ctx.dtype, ctx.x_dtype = group, dtype, x.dtype
        ctx.w_dtypes = [w.dtype for w in weights]
        ctx.save_for_backward(blocks, *ws)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor):
        blocks, *ws = ctx.saved_tensors
        group, dtype = ctx.group, ctx.dtype
        t, r = _size(group), _rank(group)
        _, B, s, D = blocks.shape
        dys = [torch.zeros((B, t * s, w.shape[0]), dtype=dtype, device=blocks.device) if dy is None
               else dy.to(dtype) for dy, w in zip(dys, ws)]
        dws = [torch.zeros(w.shape, dtype=_accumulate_dtype(dtype), device=w.device) for w in ws]
        works, recv = None, None
        with torch.autocast(blocks.device.type, enabled=False):
            for step in range(t):
                b = (r + 1 + step) % t  # the sequence block this rank adds to now
                dy_b = [dy[:, b * s:(b + 1) * s] for dy in dys]
                part = sum(d @ w for d, w in zip(dy_b, ws))  # my partial dX for block b
                if works is not None:  # the running sum of ranks r+1, r+2, ... for block b
                    _wait(works)
                    part += recv
                if step < t - 1:  # pass it on to r-1; r+1's sum for the next block arrives
                    recv = torch.empty_like(part)
                    works = _start_ring(part, recv, group, -1)
                for dw, d in zip(dws, dy_b):  # weight gradient of block b, overlapping the transfer
                    dw += (d.reshape(-1, d.shape[-1]).t() @ blocks[b].reshape(-1, D)).to(dw.dtype)
        dx = part.to(ctx.x_dtype)  # at the last step b == r: the complete sum for my block
        return (dx, None, *[dw.to(wd) for dw, wd in zip(dws, ctx.w_dtypes)])


class MatmulReduceScatter(torch.autograd.Function):
    """Row-parallel linear under async TP: Y = RS_seq(X W^T). x (B, S, in/t) -> (B, s, D).

    forward   travelling accumulator: the partial product of one sequence block per step.
    backward  ring all-gather of dY's blocks; block j gives dX[:, block j] = dY_j W and its
              share of dW = dY^T X while the next block travels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        t, r, dtype = _size(group), _rank(group), _compute_dtype(x)
        _check_divisible(x, 1, t, "sequence parallel (data.seq_len)")
        s = x.shape[1] // t
        xd, wd = x.to(dtype), w.to(dtype)
        works, recv = None, None
        with torch.autocast(x.device.type, enabled=False):
            for step in range(t):
                b = (r + 1 + step) % t
                part = xd[:, b * s:(b + 1) * s] @ wd.t()  # (B, s, D) my partial for block b
                if works is not None:
                    _wait(works)
                    part += recv
                if step < t - 1:
                    recv = torch.empty_like(part)
                    works = _start_ring(part, recv, group, -1)
        ctx.group, ctx.dtype, ctx.x_dtype, ctx.w_dtype = group, dtype, x.dtype, w.dtype
        ctx.save_for_backward(xd, wd)
        return part

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xd, wd = ctx.saved_tensors
        group, dtype = ctx.group, ctx.dtype
        t, r = _size(group), _rank(group)
        B, s, D = dy.shape
        K = xd.shape[-1]
        blocks = dy.new_empty((t, B, s, D), dtype=dtype)  # blocks[j]: dY of sequence block j
        blocks[r] = dy
        dx = xd.new_empty(xd.shape)
        dw = torch.zeros(wd.shape, dtype=_accumulate_dtype(dtype), device=wd.device)
        with torch.autocast(dy.device.type, enabled=False):
            for step in range(t):
                src = (r - step) % t
                if step < t - 1:
                    works = _start_ring(blocks[src], blocks[(src - 1) % t], group, 1)
                rows = slice(src * s, (src + 1) * s)
                dx[:, rows] = blocks[src] @ wd
                dw += (blocks[src].reshape(-1, D).t() @ xd[:, rows].reshape(-1, K)).to(dw.dtype)
                if step < t - 1:
                    _wait(works)
        return dx.to(ctx.x_dtype), dw.to(ctx.w_dtype), None


# ---------------------------------------------------------------------------------------
# 4. The projections of a block (llama's input_proj_fn / output_proj_fn)

def column_parallel(x: torch.Tensor, linears: tuple[nn.Module, ...], *, group: dist.ProcessGroup,
                    sequence_parallel: bool, async_tp: bool) -> list[torch.Tensor]:
    """Column-parallel group reading one input: x is (B, s, D) under SP, else (B, S, D)
    replicated. Returns the local output slices (B, S, out_i / t)."""
    if async_tp:
        return list(AllGatherMatmul.apply(x, group, *[linear.weight for linear in linears]))
    x = GatherSeq.apply(x, group) if sequence_parallel else CopyToTP.apply(x, group)
    return [linear(x) for linear in linears]  # any linear: nn.Linear, Float8Linear


def row_parallel(x: torch.Tensor, linear: nn.Module, *, group: dist.ProcessGroup,
                 sequence_parallel: bool, async_tp: bool) -> torch.Tensor:
    """Row-parallel linear: x (B, S, in/t) -> (B, s, D) under SP, else (B, S, D)."""
    if async_tp:
        return MatmulReduceScatter.apply(x, linear.weight, group)
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
# 6. Applying the plan to a Llama model

# The plan: which dim of each weight is split over tp. 0: rows (output features, or the
# vocabulary of the embedding), column-parallel; 1: columns (input features), row-parallel.
SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1, "tok_embeddings": 0, "output": 0}
WHAT = {"wq": "attention heads (wq rows)", "wk": "KV heads (wk rows)", "wv": "KV heads (wv rows)",
        "wo": "attention heads (wo columns)", "w1": "the FFN hidden dim (w1 rows)",
        "w3": "the FFN hidden dim (w3 rows)", "w2": "the FFN hidden dim (w2 columns)"}


def local_shape(module_name: str, shape: tuple[int, ...], t: int) -> tuple[int, ...]:
    """The shape of a weight on one of t TP ranks, by the module's (dotted) name: what
    float8.convert_to_float8 checks against _scaled_mm's rules before TP shards it."""
    dim = SHARD_DIM.get(module_name.split(".")[-1])
    if dim is None:
        return tuple(shape)
    return tuple(n // t if d == dim else n for d, n in enumerate(shape))


def _shard(module: nn.Module, name: str, dim: int, group: dist.ProcessGroup, what: str) -> nn.Parameter:
    """Replace module.<name> by this rank's 1/t slice along `dim` (kept on meta for a
    model built on meta, else sliced from the values), recording where it sits."""
    p = getattr(module, name)
    t, r = _size(group), _rank(group)
    if p.shape[dim] % t:
        raise ValueError(f"tensor parallel: {what} has size {p.shape[dim]} along dim {dim}, not divisible "
                         f"by parallel.tp={t}")
    n = p.shape[dim] // t
    if p.device.type == "meta":
        local = torch.empty((*p.shape[:dim], n, *p.shape[dim + 1:]), dtype=p.dtype, device="meta")
    else:
        local = p.detach().narrow(dim, r * n, n).clone()
    shard = nn.Parameter(local, requires_grad=p.requires_grad)
    shard.__dict__.update(p.__dict__)  # attributes earlier techniques set on p
    offset = list(getattr(p, "global_offset", (0,) * p.dim()))
    offset[dim] += r * n
    shard.global_shape = getattr(p, "global_shape", p.shape)
    shard.global_offset = tuple(offset)
    shard.tp_shard_dim = dim
    setattr(module, name, shard)
    return shard


def _set_amax_group(linear: nn.Module, group: dist.ProcessGroup, async_tp: bool, name: str) -> None:
    """Float8 linears (anything with `amax_group`, duck-typed: this file does not import
    float8.py) take their tensorwise scales over the whole logical tensor."""
    if hasattr(linear, "amax_group"):
        if async_tp:
            raise ValueError(f"parallel.async_tp=true with float8: {name} is a {type(linear).__name__}, and "
                             f"the async TP ring runs plain matmuls; set parallel.async_tp=false or "
                             f"float8.enabled=false")
        linear.amax_group = group


def apply_tp(model: nn.Module, group: dist.ProcessGroup, sequence_parallel: bool = True,
             loss_parallel: bool = True, async_tp: bool = False) -> None:
    """Shard `model` (llama.Transformer, on meta or materialized) over `group` in place.
    Works on a pipeline stage too (tok_embeddings / norm / output may be None). With
    loss_parallel the output stays vocabulary-sharded: use vocab_parallel_cross_entropy."""
    if async_tp and not sequence_parallel:
        raise ValueError("parallel.async_tp=true needs parallel.sequence_parallel=true: async TP overlaps the "
                         "sequence all-gather / reduce-scatter, which exist only with sequence parallel")
    t, args = _size(group), model.args
    if args.n_heads % t or args.kv_heads % t:
        raise ValueError(f"tensor parallel: parallel.tp={t} must divide model.n_heads={args.n_heads} and "
                         f"model.n_kv_heads={args.kv_heads} (each rank holds whole query and KV heads)")
    for what, size in (("the vocabulary (model.vocab_size)", args.vocab_size),
                       ("the FFN hidden dim (w1 / w3 rows, w2 columns)", args.ffn_dim)):
        if size % t:  # checked before anything is sharded: an error leaves the model as it was
            raise ValueError(f"tensor parallel: {what} has size {size}, not divisible by parallel.tp={t}")
    proj = dict(group=group, sequence_parallel=sequence_parallel, async_tp=async_tp)
    for layer_name, block in model.layers.items():
        attn, ffn = block.attention, block.feed_forward
        prefix = f"layers.{layer_name}"
        for module, kind in ((attn, "attention"), (ffn, "feed_forward")):
            for name in (("wq", "wk", "wv", "wo") if module is attn else ("w1", "w3", "w2")):
                sub = f"{prefix}.{kind}.{name}"
                _shard(getattr(module, name), "weight", SHARD_DIM[name], group, f"{sub}.weight: {WHAT[name]}")
                _set_amax_group(getattr(module, name), group, async_tp, sub)
        for module in (attn, ffn):
            module.input_proj_fn = functools.partial(column_parallel, **proj)
            module.output_proj_fn = functools.partial(row_parallel, **proj)
        if sequence_parallel:  # the norms see only this rank's tokens: partial gradients
            for norm in (block.attention_norm, block.ffn_norm):
                norm.weight.tp_partial_grad = True

    if model.tok_embeddings is not None:
        emb = model.tok_embeddings
        weight = _shard(emb, "weight", 0, group, "tok_embeddings.weight: the vocabulary (model.vocab_size)")
        model.tok_embeddings = VocabParallelEmbedding(weight, _rank(group) * weight.shape[0], group,
                                                      sequence_parallel)
    if model.norm is not None and sequence_parallel:
        model.norm.weight.tp_partial_grad = True
    if model.output is not None:
        _shard(model.output, "weight", 0, group, "output.weight: the vocabulary (model.vocab_size)")
        _set_amax_group(model.output, group, False, "output")
        model.output.register_forward_pre_hook(functools.partial(
            _output_input_hook, group=group, sequence_parallel=sequence_parallel))
        if not loss_parallel:
            model.output.register_forward_hook(functools.partial(_output_gather_hook, group=group))


def _output_input_hook(module: nn.Module, args: tuple, *, group: dist.ProcessGroup, sequence_parallel: bool):
    (h,) = args
    return (GatherSeq.apply(h, group) if sequence_parallel else CopyToTP.apply(h, group),)


def _output_gather_hook(module: nn.Module, args: tuple, out: torch.Tensor, *, group: dist.ProcessGroup):
    return GatherVocab.apply(out, group)


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
