"""Context parallelism: the sequence split over the cp ranks, causal attention computed
by ring attention (K/V blocks travel around the ring, partial results merged by their
log-sum-exp), load-balanced so every rank does the same work.

    check_cp_args(cp, seq_len, rotate)                 # the numbers (config.validate calls it too)
    local = shard_sequence(tokens, cp_rank, cp)        # (B, S) -> (B, 2c), c = S / (2 cp)
    pos   = positions(S, cp_rank, cp)                  # the global position of each local token
    apply_cp(model, cp_group, S, rotate="ring")        # swaps every module's attention_fn
    logits = model(local, pos)                         # RoPE at the global positions

What the model must have (apply_cp checks it first): modules with a replaceable attribute
`attention_fn(q, k, v)` computing causal attention, q (B, H, L, hd), k, v (B, Hkv, L, hd);
apply_cp swaps it on every module that has one (Meta Llama: layers.<i>.attention). The
model must take the RoPE positions of its tokens as an argument (here: forward(tokens,
positions)), since a rank's tokens are not contiguous.

Load-balanced layout. The sequence is cut into 2 cp chunks of c = S / (2 cp) tokens;
rank r holds chunks r and 2cp-1-r, concatenated (cp = 2: rank 0 [0, 3], rank 1 [1, 2]).
Under the causal mask a query chunk j sees j + 1 key chunks, so rank r's pair sees
(r + 1) + (2cp - r) = 2cp + 1 chunks whatever r: equal work. Inputs, labels (shifted in
the global order first: the data loader's labels are) and RoPE positions are permuted
the same way; the loss is a sum over tokens, so it does not care. Needs S % (2 cp) == 0
(check_cp_args; with sequence parallel, tp must divide S / cp: tensor_parallel.check_tp_args;
a chunk itself need not divide by tp).

Ring attention (forward), per attention call. Each rank keeps its queries; the packed
(K, V) of every rank visits it once: at step i it holds rank src = (r - i) mod cp's
block, passes it on to r + 1 and receives the next from r - 1 (isend / irecv posted
before the computation, so the transfer overlaps it). The block plan (`block_plan`):
    src == r   all local q against all local k/v with the causal mask: the local pair
               [chunk r | chunk 2cp-1-r] is in increasing position order, so the plain
               causal mask on the concatenation is the exact global mask
    src <  r   all q against the FIRST half of k/v (chunk src, earlier than both query
               chunks; its second half, chunk 2cp-1-src, is later than both: skipped)
    src >  r   the SECOND half of q (chunk 2cp-1-r) against all k/v (both key chunks
               are earlier; the first query chunk r sees neither: skipped)
So after step 0 every step costs half a (2c x 2c) block on every rank, and blocks above
the diagonal are never computed. Each block gives (out_b, lse_b), lse the natural-log
sum of exp(scores) per query row; blocks merge exactly by
    lse = logaddexp(lse, lse_b),  out = out exp(lse_old - lse) + out_b exp(lse_b - lse)
in float32 (or float64). No row is ever fully masked (each query sees itself at step 0),
so no block returns the lse = 0 of an empty row.

Backward, with the FINAL out and lse saved in forward: the gradient of one block needs
only its own scores, exp(q k_b^T s - lse) is the block's exact share of the softmax,
so the per-block flash backward (given out, lse, dout) is exact. The same ring runs
again: dq accumulates locally; dK/dV accumulate in a float32 buffer that travels with
the K/V block, and after cp hops (one more than the K/V) it is back at its owner.
Nothing is recomputed and no rank keeps another rank's K/V beyond the current block.

Kernels (block_kernel chooses, by device and dtype, in one place; KERNELS names them):
on CPU aten's _scaled_dot_product_flash_attention_for_cpu; on CUDA FlashAttention-2
(_scaled_dot_product_flash_attention, bf16 / fp16 on sm80+) or, where it does not apply
(float32, older GPUs), the memory-efficient kernel (_scaled_dot_product_efficient_attention
with compute_log_sumexp). Each returns the block's lse (natural log, float32) and has a
backward op that takes the FINAL (out, lse), as PyTorch's experimental CP calls them:
no block's score matrix is ever built. The plain torch block (scores, logsumexp, softmax)
remains for float64, the exactness oracle, and devices without a wired kernel; the
trainer logs which kernel runs. GQA: fewer K/V heads than query heads (query head j
uses K/V head j // (H / Hkv)): native in the flash kernels; the memory-efficient kernel
gets K/V expanded to every query head and sums their gradients back.

All-gather alternative (`rotate="allgather"`): one all-gather of K and V along the
sequence (backward: reduce-scatter of their gradients), then one attention call over
the whole sequence with the mask pos_q >= pos_k built from the positions. Same bytes, in
one message instead of cp - 1; holds the whole sequence's K/V; computes the masked
half of the scores too (about twice the causal FLOPs).

Communication per attention call and rank (B batch, Hkv KV heads, hd head dim, a bytes
per element): |KV_r| = 2 B Hkv (S/cp) hd a. Forward (cp-1) |KV_r|; backward (cp-1) |KV_r|
plus cp |dKV_r| (float32). Per step: L layers x (forward + backward) x micro-batches.
Memory per rank: activations of S / cp tokens (everything outside attention scales
with the local sequence), plus 2 K/V blocks and 2 dK/dV blocks in flight; the longest
sequence that fits grows ~linearly with cp. Parameters are replicated over cp (they see
different tokens): their gradients are summed over cp, which the trainer does by
folding cp into the FSDP group (dp_shard x cp).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------
# 1. The load-balanced layout

def chunk_ids(cp_rank: int, cp: int) -> tuple[int, int]:
    return cp_rank, 2 * cp - 1 - cp_rank


def positions(seq_len: int, cp_rank: int, cp: int, device=None) -> torch.Tensor:
    """Global positions of this rank's tokens: chunks r and 2cp-1-r."""
    _check_seq_len(cp, seq_len)
    if cp == 1:
        return torch.arange(seq_len, device=device)
    c = seq_len // (2 * cp)
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in chunk_ids(cp_rank, cp)])


def shard_sequence(x: torch.Tensor, cp_rank: int, cp: int, dim: int = 1) -> torch.Tensor:
    """This rank's two chunks of x along `dim` (tokens, labels, or any per-token tensor)."""
    return x.index_select(dim, positions(x.shape[dim], cp_rank, cp, x.device))


def unshard_sequence(parts: list[torch.Tensor], cp: int, dim: int = 1) -> torch.Tensor:
    """Inverse of shard_sequence given every rank's part (for tests and tools)."""
    seq = sum(p.shape[dim] for p in parts)
    order = torch.cat([positions(seq, r, cp) for r in range(cp)])
    return torch.cat(parts, dim=dim).index_select(dim, torch.argsort(order).to(parts[0].device))


def block_plan(step: int, cp_rank: int, cp: int) -> tuple[slice, slice, bool] | None:
    """(query half, key/value half, causal) computed at ring step `step`, as slices of
    the local sequence in units of chunks (0:2 both chunks, 0:1 first, 1:2 second)."""
    src = (cp_rank - step) % cp
    if src == cp_rank:
        return slice(0, 2), slice(0, 2), True
    if src < cp_rank:
        return slice(0, 2), slice(0, 1), False
    return slice(1, 2), slice(0, 2), False


def attention_flops(cp_rank: int, cp: int, c: int) -> int:
    """Query-key pairs scored by this rank over the ring (causal blocks count half,
    as their masked half is skipped by the kernel): the load-balance check."""
    pairs = 0
    for step in range(cp):
        qs, ks, causal = block_plan(step, cp_rank, cp)
        n = ((qs.stop - qs.start) * c) * ((ks.stop - ks.start) * c)
        pairs += n // 2 + (qs.stop - qs.start) * c // 2 if causal else n
    return pairs


# ---------------------------------------------------------------------------------------
# 2. One attention block with its log-sum-exp, forward and backward

def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# The block kernels: each returns the block's (out, lse) and has a backward that takes the
# FINAL (out, lse). Chosen by block_kernel, in one place; only "math" builds a score matrix.
KERNELS = {
    "cpu_flash": "aten._scaled_dot_product_flash_attention_for_cpu (fused, any float dtype)",
    "flash": "aten._scaled_dot_product_flash_attention (FlashAttention-2; bf16 / fp16, sm80+)",
    "efficient": "aten._scaled_dot_product_efficient_attention with compute_log_sumexp (memory-efficient)",
    "math": "the plain torch block (scores, logsumexp, softmax: O(Lq Lk) memory per block)",
}


def block_kernel(device, dtype: torch.dtype, head_dim: int, capability: tuple[int, int] | None = None
                 ) -> tuple[str, str]:
    """(kernel, why) for blocks of `dtype` on `device`: the CPU's fused kernel on CPU; on
    CUDA FlashAttention-2 for bf16 / fp16 on sm80+ with head dims up to 256, else the
    memory-efficient kernel (float32, older GPUs); the math block only for float64 (the
    exactness oracle) and devices without a wired kernel. capability: CUDA's (major,
    minor), read from the device when None. A head dim not divisible by 8 is padded with
    zeros for the CUDA kernels (scores and outputs unchanged; the scale is explicit)."""
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu_flash", "the CPU's fused attention returns the log-sum-exp"
    if device.type != "cuda":
        return "math", f"no fused kernel with a log-sum-exp is wired for {device.type}"
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return "math", f"{dtype}: no fused CUDA kernel takes it (float64 is for exactness tests)"
    major, minor = capability if capability is not None else torch.cuda.get_device_capability(device)
    padded = -(-head_dim // 8) * 8
    if dtype != torch.float32 and major >= 8 and padded <= 256:
        return "flash", f"{dtype}, head dim {head_dim}, sm{major}{minor}"
    why = ("float32" if dtype == torch.float32 else
           f"sm{major}{minor} < sm80" if major < 8 else f"head dim {head_dim} > 256")
    return "efficient", f"{why}: FlashAttention-2 does not take it"


def _pad_head_dim(*ts: torch.Tensor) -> list[torch.Tensor]:
    pad = -ts[0].shape[-1] % 8
    return [F.pad(t, (0, pad)) if pad else t.contiguous() for t in ts]


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.repeat_interleave(heads // t.shape[1], 1) if t.shape[1] != heads else t


def block_forward(q, k, v, causal: bool, scale: float, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of q (B, H, Lq, hd) against k, v (B, Hkv, Lk, hd), lse (B, H, Lq) natural
    log, float32 (float64 for float64 on CPU / math), contiguous."""
    hd, Lq = q.shape[-1], q.shape[2]
    if kernel == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse.contiguous()
    if kernel == "flash":  # GQA natively (FlashAttention-2 maps query head j to K/V head j // (H / Hkv))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            *_pad_head_dim(q, k, v), 0.0, causal, False, scale=scale)[:2]
        return out[..., :hd], lse.contiguous()
    if kernel == "efficient":  # K/V heads expanded: the kernel wants as many as q has
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            *_pad_head_dim(q, _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])), None, True, 0.0, causal,
            scale=scale)[:2]
        return out[..., :hd], lse[..., :Lq].contiguous()  # its lse rows are padded to a multiple of 32
    acc = _acc_dtype(q)
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q.to(acc) @ kk.to(acc).transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.exp(scores - lse.unsqueeze(-1)) @ vv.to(acc)).to(q.dtype), lse


def _fold_heads(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum the query heads' gradients of each K/V head (the backward of _expand_kv)."""
    return t if t.shape[1] == kv_heads else t.unflatten(1, (kv_heads, t.shape[1] // kv_heads)).sum(2)


def block_backward(dout, q, k, v, out, lse, causal: bool, scale: float, kernel: str):
    """(dq, dk, dv) of one block given the FINAL out and lse of its query rows."""
    hd, (Lq, Lk) = q.shape[-1], (q.shape[2], k.shape[2])
    if kernel == "cpu_flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), 0.0, causal, scale=scale)
    if kernel == "flash":  # no dropout: the RNG state arguments are not read
        rng = (torch.empty(2, dtype=torch.uint64, device=q.device), torch.empty((), dtype=torch.uint64, device=q.device))
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            *_pad_head_dim(dout, q, k, v, out), lse.contiguous(), None, None, Lq, Lk, 0.0, causal, *rng, scale=scale)
        return tuple(g[..., :hd] for g in grads)
    if kernel == "efficient":
        rows = -(-Lq // 32) * 32  # the lse the forward kernel wrote had rows padded to a multiple of 32
        seed = torch.empty((), dtype=torch.int64, device=q.device)
        kk, vv = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        dout_, q_, kk, vv, out_ = _pad_head_dim(dout, q, kk, vv, out)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout_, q_, kk, vv, None, out_, F.pad(lse, (0, rows - Lq)).contiguous(), seed, seed, 0.0,
            [True, True, True, False], causal, scale=scale)
        return dq[..., :hd], _fold_heads(dk[..., :hd], k.shape[1]), _fold_heads(dv[..., :hd], k.shape[1])
    acc = _acc_dtype(q)
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1).to(acc), v.repeat_interleave(rep, 1).to(acc)
    scores = (q.to(acc) @ kk.transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.exp(scores - lse.unsqueeze(-1))
    do = dout.to(acc)
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ vv.transpose(-1, -2) - (do * out.to(acc)).sum(-1, keepdim=True))
    dq, dk = (ds @ kk) * scale, (ds.transpose(-1, -2) @ q.to(acc)) * scale
    return dq.to(q.dtype), _fold_heads(dk, k.shape[1]).to(k.dtype), _fold_heads(dv, k.shape[1]).to(v.dtype)


def _merge(out, lse, out_b, lse_b):
    """Online-softmax merge of a block into the running (out, lse), in place."""
    new = torch.logaddexp(lse, lse_b)
    out.mul_(torch.exp(lse - new).unsqueeze(-1)).add_(out_b.to(out.dtype) * torch.exp(lse_b - new).unsqueeze(-1))
    lse.copy_(new)


# ---------------------------------------------------------------------------------------
# 3. Ring attention

def _exchange(send: torch.Tensor, recv: torch.Tensor, group: dist.ProcessGroup) -> list:
    """Send to rank r+1, receive from rank r-1 (batched: no deadlock on gloo or NCCL)."""
    cp, r = dist.get_world_size(group), dist.get_rank(group)
    return dist.batch_isend_irecv([  # comm: cp group, |send| bytes out, |recv| in
        dist.P2POp(dist.isend, send, group=group, group_peer=(r + 1) % cp),
        dist.P2POp(dist.irecv, recv, group=group, group_peer=(r - 1) % cp),
    ])


def _rows(t: torch.Tensor, part: slice, c: int) -> torch.Tensor:
    return t[:, :, part.start * c: part.stop * c]


class RingAttention(torch.autograd.Function):
    """Causal attention over the load-balanced sequence shards of the cp group.
    q (B, H, 2c, hd), k, v (B, Hkv, 2c, hd) -> (B, H, 2c, hd)."""

    @staticmethod
    def forward(ctx, q, k, v, group: dist.ProcessGroup):
        cp, r = dist.get_world_size(group), dist.get_rank(group)
        c, scale = q.shape[2] // 2, 1.0 / math.sqrt(q.shape[-1])
        acc_dtype, kernel = _acc_dtype(q), block_kernel(q.device, q.dtype, q.shape[-1])[0]
        out = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc_dtype, device=q.device)
        kv = torch.stack([k, v]).contiguous()  # (2, B, Hkv, 2c, hd): one message per step
        for step in range(cp):
            if step < cp - 1:  # pass this block on while computing with it
                nxt = torch.empty_like(kv)
                works = _exchange(kv, nxt, group)
            qs, ks, causal = block_plan(step, r, cp)
            out_b, lse_b = block_forward(_rows(q, qs, c).contiguous(), _rows(kv[0], ks, c).contiguous(),
                                         _rows(kv[1], ks, c).contiguous(), causal, scale, kernel)
            _merge(_rows(out, qs, c), _rows(lse, qs, c), out_b, lse_b)
            if step < cp - 1:
                for w in works:
                    w.wait()
                kv = nxt
        out = out.to(q.dtype)
        ctx.group, ctx.scale = group, scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        cp, r = dist.get_world_size(group), dist.get_rank(group)
        c = q.shape[2] // 2
        acc_dtype, kernel = _acc_dtype(q), block_kernel(q.device, q.dtype, q.shape[-1])[0]
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        dkv = torch.zeros(kv.shape, dtype=acc_dtype, device=q.device)  # travels with kv
        for step in range(cp):
            if step < cp - 1:  # the next K/V block moves while this one is used
                nxt = torch.empty_like(kv)
                kv_works = _exchange(kv, nxt, group)
            qs, ks, causal = block_plan(step, r, cp)
            dq_b, dk_b, dv_b = block_backward(
                _rows(dout, qs, c), _rows(q, qs, c).contiguous(), _rows(kv[0], ks, c).contiguous(),
                _rows(kv[1], ks, c).contiguous(), _rows(out, qs, c), _rows(lse, qs, c),
                causal, scale, kernel)
            _rows(dq, qs, c).add_(dq_b)
            _rows(dkv[0], ks, c).add_(dk_b)
            _rows(dkv[1], ks, c).add_(dv_b)
            # The accumulator for this block goes on to r + 1 (after the last step, that
            # is the block's owner); r - 1's accumulator for the next block arrives.
            nxt_dkv = torch.empty_like(dkv)
            acc_works = _exchange(dkv, nxt_dkv, group)
            if step < cp - 1:
                for w in kv_works:
                    w.wait()
                kv = nxt
            for w in acc_works:
                w.wait()
            dkv = nxt_dkv
        dk, dv = dkv[0].to(k.dtype), dkv[1].to(v.dtype)
        return dq.to(q.dtype), dk, dv, None


# ---------------------------------------------------------------------------------------
# 4. The all-gather alternative

class GatherSequence(torch.autograd.Function):
    """All-gather along the sequence dim 2 (rank order); backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        cp = dist.get_world_size(group)
        out = x.new_empty((cp, *x.shape))
        dist.all_gather_single(out.view(cp * x.shape[0], *x.shape[1:]), x.contiguous(), group=group)  # comm: cp
        return torch.cat(out.unbind(0), dim=2)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cp = dist.get_world_size(ctx.group)
        stacked = torch.stack(dy.chunk(cp, dim=2)).contiguous()
        out = stacked.new_empty(stacked.shape[1:])
        dist.reduce_scatter_single(out, stacked.view(-1, *stacked.shape[2:]), group=ctx.group)  # comm: cp
        return out, None


def allgather_attention(q, k, v, *, group: dist.ProcessGroup, seq_len: int):
    cp, r = dist.get_world_size(group), dist.get_rank(group)
    k_all, v_all = GatherSequence.apply(k, group), GatherSequence.apply(v, group)
    pos_q = positions(seq_len, r, cp, q.device)
    pos_k = torch.cat([positions(seq_len, i, cp, q.device) for i in range(cp)])
    mask = torch.zeros((pos_q.numel(), pos_k.numel()), dtype=q.dtype, device=q.device)
    mask.masked_fill_(pos_q.unsqueeze(1) < pos_k.unsqueeze(0), float("-inf"))
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)


def ring_attention(q, k, v, *, group: dist.ProcessGroup):
    return RingAttention.apply(q, k, v, group)


# ---------------------------------------------------------------------------------------
# 5. The checks, and applying it to a model

ROTATE = ("ring", "allgather")


def check_cp_args(cp: int, seq_len: int, rotate: str) -> None:
    """Everything context parallelism needs of the numbers (no collective): a known
    rotate method, and the sequence cut into 2 cp chunks of whole tokens."""
    if rotate not in ROTATE:
        raise ValueError(f"parallel.cp_rotate={rotate!r} is not one of {list(ROTATE)}")
    if cp > 1:
        _check_seq_len(cp, seq_len)


def _check_seq_len(cp: int, seq_len: int) -> None:
    if seq_len % (2 * cp):
        raise ValueError(f"context parallel: data.seq_len={seq_len} is not divisible by 2 x parallel.cp = {2 * cp} "
                         f"(the load-balanced layout cuts each sequence into 2 x cp chunks); change data.seq_len "
                         f"or parallel.cp")


def apply_cp(model: nn.Module, group: dist.ProcessGroup, seq_len: int, rotate: str = "ring") -> None:
    """Swap the attention function of `model` for the context-parallel one (the model file is
    not edited). The contract: every module of `model` that has an `attention_fn` attribute
    (Meta Llama: layers.<i>.attention) calls it as attention_fn(q, k, v) with q (B, H, S_local,
    hd), k, v (B, Hkv, S_local, hd) and plain causal attention in it; none, or one that is
    not causal, is a ValueError naming it (checked before anything changes). The model must
    then be called with this rank's shard of the sequence and its positions (shard_sequence,
    positions), and apply RoPE at those positions."""
    check_cp_args(dist.get_world_size(group), seq_len, rotate)
    owners = [(name, m) for name, m in model.named_modules() if hasattr(m, "attention_fn")]
    if not owners:
        raise ValueError(f"context parallel: no module of the {type(model).__name__} has an `attention_fn` "
                         f"attribute to swap for ring attention (llama.Attention has one: a replaceable "
                         f"attention_fn(q, k, v))")
    for name, m in owners:  # check every one before changing any
        if not _is_causal(m.attention_fn):
            raise ValueError(f"context parallel: {name or 'the model'}.attention_fn is {m.attention_fn!r}, which "
                             f"does not compute causal attention; ring attention here implements the causal mask "
                             f"only")
    for _, m in owners:
        m.attention_fn = (functools.partial(ring_attention, group=group) if rotate == "ring" else
                          functools.partial(allgather_attention, group=group, seq_len=seq_len))


def _is_causal(fn) -> bool:
    """Whether fn(q, k, v) is plain causal attention: checked on a small random probe
    (with GQA) against F.scaled_dot_product_attention(is_causal=True), not by name."""
    if getattr(fn, "func", None) in (ring_attention, allgather_attention):
        return False  # already context-parallel: probing it would issue collectives
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 6, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    try:
        out = fn(q, k, v)
    except Exception:  # e.g. an attention that needs arguments the probe does not have
        return False
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return isinstance(out, torch.Tensor) and out.shape == ref.shape and torch.allclose(out, ref, atol=1e-10)
