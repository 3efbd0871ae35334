"""Context parallelism (context_parallel.py) against the single-process oracle.

Every multi-rank numerics test computes its reference itself, in each rank, from the
same seeded full tensors: full causal attention F.scaled_dot_product_attention(
is_causal=True, enable_gqa=True) on the unsharded sequence, or the unsharded Llama;
the reference is then sharded with the same shard_sequence and compared. What is shown:
  * layout: rank r holds chunks r and 2cp-1-r in that order, positions are the global
    ones, the ranks' positions partition 0..S-1, shard_sequence / unshard_sequence round
    trip (dims 1 and 2), and labels shifted in the global order stay the next token;
  * block plan: for every cp in 1..5, chunk size, rank and ring step, the computed
    blocks (with the kernel's local causal mask on the diagonal block) cover every
    visible (q, k) pair of the global causal mask exactly once and no masked pair; the
    local causal mask on the diagonal block is exactly the global mask there; no block
    has a query row that sees no key (the lse = 0 trap);
  * load balance: the visible pairs each rank scores (counted from block_plan, and
    context_parallel.attention_flops) are equal on every rank, and so is the dense
    (Lq x Lk) work per step; the naive contiguous split is imbalanced by (cp-1) blocks;
    the kernels the ring actually calls (recorded in a ring run) follow block_plan;
  * one ring step's pieces (single process): the CPU block kernel's lse is the natural
    log (checked against logsumexp of the scores), per-block backward with the final
    (out, lse) of rows split over two key blocks sums to the full gradients, and the
    merge starts from (0, -inf) exactly and survives lse gaps of 1000 in float32;
  * ring_attention and allgather_attention, cp = 2 and 4, MHA and GQA (2 and 4 query
    heads per KV head), 1, 3 and 8 tokens per chunk, float64 (1e-12) and float32
    (5e-6), plus sharp scores (nearly one-hot softmax, |scores| up to ~120) and
    non-contiguous inputs (the model's transposed q/k/v): output, dq, dk, dv equal the
    full-sequence reference, and the two rotate methods agree; a bfloat16 smoke test;
    also over strided cp subgroups ({0, 2} and {1, 3} at once: group rank != rank);
  * negative (TECHNIQUES 4.7): the same ring, written with autograd through the CPU
    flash op's (out, lse) and an online-softmax merge, has the right output and dv but
    WRONG dq and dk (the non-differentiable lse drops a gradient path); the control, the
    same merge with a differentiable (math) lse, is right: the harness can see the bug;
  * the Llama model, float64, cp = 2 and 4, ring and allgather: loss, logits (unsharded)
    and every parameter gradient (summed over cp) equal the single-process model's; with
    RoPE at arange positions (positions forgotten) or with unpermuted labels the loss is
    wrong (negative);
  * float32 loss, grad-norm and val-loss parity through train.main over 10 steps
    (distributed.PARITY_BOUNDS, ~10x the float32 rounding achieved): cp 2 (SGD), cp 4
    (AdamW), cp 2 x dp_shard 2, cp 2 with cp_rotate=allgather, and the 16-rank 4D
    layout pp 2 x dp_shard 2 x cp 2 x tp 2; negative: RoPE at the local positions fails
    the step-1 gradient-norm bound by 8x (at this model's near-uniform initial
    attention the loss does not see it: DESIGN.md's 1e-4 criterion passes it);
  * bad input: seq_len not divisible by 2 cp (positions, shard_sequence, apply_cp and
    config.validate, with and without sequence parallel: ValueError naming the numbers),
    a non-causal attention_fn, an unknown cp_rotate (apply_cp, config.load_config: the
    config's choices are context_parallel.ROTATE).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import context_parallel as C
import config
import llama
from distributed import PARITY_BOUNDS, exceeding, loss_parity, parity, reference_run, run_on_ranks, train_argv

# `train` is imported inside the functions that need it (as in distributed.train_rank):
# train imports fsdp, which imports torch._dynamo (~2.5 s per rank process).

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-12, F32: 5e-6}  # max |error| / max |reference|
# Sharp scores (q x 10: |s| up to ~40, nearly one-hot softmax) in float32, against the
# exact (float64) result. Where the softmax saturates, dq is small and inherits the
# rounding of out (through rowsum(dout * out)) in relative terms: the single-rank float32
# kernel is off by ~1.5e-6 here, the ring (whose out is merged) by up to ~6e-6.
TOL_SHARP_F32 = 5e-5
B, H, HD = 2, 4, 8  # batch, query heads, head dim of the direct attention tests
CHUNKS = (1, 3, 8)  # tokens per chunk: S = 2 cp c
KV_HEADS = (4, 2, 1)  # MHA, GQA with 2 and 4 query heads per KV head


# ---------------------------------------------------------------------------------------
# Helpers (run inside the ranks)


def _err(a: torch.Tensor | None, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's max abs; inf if a is missing or
    misshaped."""
    if a is None or a.shape != b.shape:
        return float("inf")
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


def _qkvo(seed: int, hkv: int, seq: int, dtype: torch.dtype, q_scale: float = 1.0):
    """Full-sequence q (B, H, S, HD), k, v (B, hkv, S, HD) and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, seq, HD, generator=g, dtype=F64) * q_scale
    k = torch.randn(B, hkv, seq, HD, generator=g, dtype=F64)
    v = torch.randn(B, hkv, seq, HD, generator=g, dtype=F64)
    do = torch.randn(B, H, seq, HD, generator=g, dtype=F64)
    return tuple(t.to(dtype) for t in (q, k, v, do))


def _reference(q, k, v, do):
    """Full causal attention on the whole sequence: (out, dq, dk, dv)."""
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, enable_gqa=True)
    out.backward(do)
    return out.detach(), qr.grad, kr.grad, vr.grad


def _run_cp(attn, q, k, v, do, rank, cp, transposed=False):
    """This rank's shard through attn(q, k, v): (out, dq, dk, dv), all local shards.
    transposed: the leaves are (B, S, H, HD) and attn gets their transposes (strided, as
    Llama's Attention passes them)."""
    shards = [C.shard_sequence(t, rank, cp, dim=2) for t in (q, k, v)]
    if transposed:
        leaves = [s.transpose(1, 2).contiguous().requires_grad_() for s in shards]
        inputs = [x.transpose(1, 2) for x in leaves]
    else:
        leaves = [s.clone().requires_grad_() for s in shards]
        inputs = leaves
    out = attn(*inputs)
    assert out.dtype == q.dtype and out.shape == inputs[0].shape
    out.backward(C.shard_sequence(do, rank, cp, dim=2))
    grads = [x.grad.transpose(1, 2) if transposed else x.grad for x in leaves]
    return (out.detach(), *grads)


def _attention_fns(cp: int, seq: int) -> dict:
    group = dist.group.WORLD
    return {"ring": lambda q, k, v: C.ring_attention(q, k, v, group=group),
            "allgather": lambda q, k, v: C.allgather_attention(q, k, v, group=group, seq_len=seq)}


def _math_block(q, k, v, causal: bool, scale: float):
    """(out, lse) of one block in plain differentiable torch ops."""
    rep = q.shape[1] // k.shape[1]
    scores = (q @ k.repeat_interleave(rep, 1).transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)) @ v.repeat_interleave(rep, 1), lse


def _autograd_merge_attention(q, k, v, *, group, flash: bool):
    """Ring attention as one would write it without a hand-written backward: every
    rank's K/V gathered (differentiably), the same block plan, each block's (out, lse)
    from the CPU flash op (flash=True: its lse carries no gradient) or from plain torch
    ops (flash=False: a differentiable lse), merged out of place with autograd."""
    cp, r = dist.get_world_size(group), dist.get_rank(group)
    c, scale = q.shape[2] // 2, 1.0 / math.sqrt(q.shape[-1])
    k_all, v_all = C.GatherSequence.apply(k, group), C.GatherSequence.apply(v, group)
    outs, lses = [None, None], [None, None]  # per query chunk
    for step in range(cp):
        src = (r - step) % cp
        qs, ks, causal = C.block_plan(step, r, cp)
        kb = k_all[:, :, src * 2 * c + ks.start * c: src * 2 * c + ks.stop * c]
        vb = v_all[:, :, src * 2 * c + ks.start * c: src * 2 * c + ks.stop * c]
        qb = q[:, :, qs.start * c: qs.stop * c]
        if flash:
            out_b, lse_b = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qb, kb, vb, 0.0, causal, scale=scale)
        else:
            out_b, lse_b = _math_block(qb, kb, vb, causal, scale)
        for j, half in enumerate(range(qs.start, qs.stop)):
            ob, lb = out_b[:, :, j * c: (j + 1) * c], lse_b[:, :, j * c: (j + 1) * c]
            if outs[half] is None:
                outs[half], lses[half] = ob, lb
                continue
            new = torch.logaddexp(lses[half], lb)
            outs[half] = (outs[half] * torch.exp(lses[half] - new).unsqueeze(-1)
                          + ob * torch.exp(lb - new).unsqueeze(-1))
            lses[half] = new
    return torch.cat(outs, dim=2)


def _attention_numerics(rank: int, cp: int) -> dict:
    """Every attention check of one cp degree; {case: {what: error}} (this rank's)."""
    results = {}
    cases = [(hkv, c, dtype, 1.0, False) for hkv in KV_HEADS for c in CHUNKS for dtype in (F64, F32)]
    cases += [(2, 3, F64, 30.0, False), (2, 3, F32, 10.0, False),  # sharp scores: |s| up to ~120 / ~40
              (2, 3, F64, 1.0, True), (1, 8, F32, 1.0, True)]  # strided inputs
    for i, (hkv, c, dtype, q_scale, transposed) in enumerate(cases):
        seq = 2 * cp * c
        q, k, v, do = _qkvo(100 + i, hkv, seq, dtype, q_scale)
        # Sharp float32: the float32 kernel's own error grows with |scores|, so both are
        # measured against the exact (float64) attention of the same inputs.
        sharp32 = dtype == F32 and q_scale > 1
        ref = [C.shard_sequence(t, rank, cp, dim=2)
               for t in _reference(*(t.double() if sharp32 else t for t in (q, k, v, do)))]
        got = {name: _run_cp(fn, q, k, v, do, rank, cp, transposed)
               for name, fn in _attention_fns(cp, seq).items()}
        errs = {}
        for name, res in got.items():
            for what, a, b in zip(("out", "dq", "dk", "dv"), res, ref):
                errs[f"{name}.{what}"] = _err(a, b)
                errs[f"{name}.{what}.dtype_ok"] = a.dtype == dtype
        for what, a, b in zip(("out", "dq", "dk", "dv"), got["ring"], got["allgather"]):
            if not sharp32:  # (sharp float32: each is checked against the exact result)
                errs[f"ring-vs-allgather.{what}"] = _err(a, b)
        results[(hkv, c, str(dtype), q_scale, transposed)] = errs

    # bfloat16 smoke test: against the float64 reference, at bfloat16 precision.
    q, k, v, do = _qkvo(7, 2, 2 * cp * 4, F64)
    ref = [C.shard_sequence(t, rank, cp, dim=2) for t in _reference(q, k, v, do)]
    for name, fn in _attention_fns(cp, 2 * cp * 4).items():
        res = _run_cp(fn, *(t.bfloat16() for t in (q, k, v, do)), rank, cp)
        results[("bf16", name)] = {what: _err(a, b) for what, a, b in zip(("out", "dq", "dk", "dv"), res, ref)}

    # Negative: the autograd merge through the flash op's lse (and its control).
    q, k, v, do = _qkvo(11, 2, 2 * cp * 3, F64)
    ref = [C.shard_sequence(t, rank, cp, dim=2) for t in _reference(q, k, v, do)]
    for flash in (True, False):
        fn = lambda q_, k_, v_: _autograd_merge_attention(q_, k_, v_, group=dist.group.WORLD, flash=flash)
        res = _run_cp(fn, q, k, v, do, rank, cp)
        results[("autograd-merge", "flash" if flash else "math")] = {
            what: _err(a, b) for what, a, b in zip(("out", "dq", "dk", "dv"), res, ref)}

    # The kernels the ring really calls: record (query rows, key rows, causal) per call.
    calls = {"fwd": [], "bwd": []}
    block_forward, block_backward = C.block_forward, C.block_backward

    def fwd(q_, k_, v_, causal, scale, kernel):
        calls["fwd"].append((q_.shape[2], k_.shape[2], causal))
        return block_forward(q_, k_, v_, causal, scale, kernel)

    def bwd(dout, q_, k_, v_, out, lse, causal, scale, kernel):
        calls["bwd"].append((q_.shape[2], k_.shape[2], causal))
        return block_backward(dout, q_, k_, v_, out, lse, causal, scale, kernel)

    C.block_forward, C.block_backward = fwd, bwd
    try:
        q, k, v, do = _qkvo(13, 2, 2 * cp * 3, F64)
        _run_cp(_attention_fns(cp, 2 * cp * 3)["ring"], q, k, v, do, rank, cp)
    finally:
        C.block_forward, C.block_backward = block_forward, block_backward
    results["calls"] = calls
    return results


def _subgroup_numerics(rank: int, world: int) -> dict:
    """cp = 2 over the strided groups {0, 2} and {1, 3} (as the cp groups of a layout
    with tp = 2 inside cp): group ranks differ from global ones, and the two groups run
    different data at once. Errors of ring and allgather against the reference."""
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    group, cp_rank = groups[rank % 2], rank // 2
    q, k, v, do = _qkvo(300 + rank % 2, 2, 2 * 2 * 3, F64)
    ref = [C.shard_sequence(t, cp_rank, 2, dim=2) for t in _reference(q, k, v, do)]
    fns = {"ring": lambda q_, k_, v_: C.ring_attention(q_, k_, v_, group=group),
           "allgather": lambda q_, k_, v_: C.allgather_attention(q_, k_, v_, group=group, seq_len=12)}
    return {name: max(_err(a, b) for a, b in zip(_run_cp(fn, q, k, v, do, cp_rank, 2), ref))
            for name, fn in fns.items()}


# The Llama of the direct model tests: GQA (2 query heads per KV head), head_dim 8.
MODEL = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=128)
SHARP = 8.0  # wq is scaled up so attention is far from uniform and RoPE matters


def _llama(args, rotate: str | None, cp_group=None, seq: int = 0) -> llama.Transformer:
    model = llama.build_model(args, "cpu")
    llama.init_weights(model, args, 0)
    model = model.to(F64)
    with torch.no_grad():
        for block in model.layers.values():
            block.attention.wq.weight.mul_(SHARP)
    if rotate is not None:
        C.apply_cp(model, cp_group, seq, rotate)
    return model


def _llama_cp(rank: int, cp: int, seq: int) -> dict:
    """Loss, logits and gradients of the cp model vs the single-process one (float64);
    the loss with RoPE positions forgotten, and with labels left unpermuted."""
    args = llama.model_args("debug", **MODEL)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, args.vocab_size, (2, seq + 1), generator=gen)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]  # shifted in the global order
    ref = _llama(args, None)
    ref_logits = ref(inputs)
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), reduction="sum") / labels.numel()
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    local_in, local_lab = (C.shard_sequence(x, rank, cp) for x in (inputs, labels))
    pos = C.positions(seq, rank, cp)

    def loss_of(model, positions, lab):
        logits = model(local_in, positions)
        loss = F.cross_entropy(logits.flatten(0, 1), lab.flatten(), reduction="sum") / labels.numel()
        return logits, loss

    def summed(t):
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    out = {}
    for rotate in ("ring", "allgather"):
        model = _llama(args, rotate, dist.group.WORLD, seq)
        logits, loss = loss_of(model, pos, local_lab)
        loss.backward()
        parts = [torch.empty_like(logits) for _ in range(cp)]
        dist.all_gather(parts, logits.detach().contiguous())
        grads = {n: _err(summed(p.grad), ref_grads[n]) for n, p in model.named_parameters()}
        out[rotate] = dict(loss=_err(summed(loss), ref_loss.detach()),
                           logits=_err(C.unshard_sequence(parts, cp), ref_logits.detach()),
                           grad=max(grads.values()), n_grads=len(grads))
        with torch.no_grad():
            for key, wrong in (("no_positions", None), ("arange_positions", torch.arange(local_in.shape[1]))):
                bad_logits, bad_loss = loss_of(model, wrong, local_lab)
                out[rotate][key] = _err(summed(bad_loss), ref_loss.detach())
                dist.all_gather(parts, bad_logits.contiguous())
                out[rotate][key + "_logits"] = _err(C.unshard_sequence(parts, cp), ref_logits.detach())
            contiguous = labels[:, rank * 2 * (seq // (2 * cp)): (rank + 1) * 2 * (seq // (2 * cp))]
            out[rotate]["unpermuted_labels"] = _err(summed(loss_of(model, pos, contiguous)[1]), ref_loss.detach())
    return out


def _full_attention(q, k, v):
    """A non-causal attention_fn: what ring attention must not silently replace."""
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _bad_apply_cp(rank: int, world: int) -> dict:
    """The errors of apply_cp, as messages (None: it did not raise ValueError)."""
    args = llama.model_args("debug", **MODEL)

    def error(fn):
        try:
            fn()
        except ValueError as e:
            return str(e)
        return None

    group = dist.group.WORLD
    out = {"seq": error(lambda: C.apply_cp(llama.build_model(args, "cpu"), group, 30, "ring")),
           "rotate": error(lambda: C.apply_cp(llama.build_model(args, "cpu"), group, 32, "ulysses"))}
    model = llama.build_model(args, "cpu")
    model.layers["0"].attention.attention_fn = _full_attention
    out["non_causal"] = error(lambda: C.apply_cp(model, group, 32, "ring"))
    out["non_causal_kept"] = model.layers["0"].attention.attention_fn is _full_attention
    model = llama.build_model(args, "cpu")
    C.apply_cp(model, group, 32, "allgather")  # the good call: no error, every layer swapped
    out["swapped"] = [getattr(b.attention.attention_fn, "func", None) is C.allgather_attention
                      for b in model.layers.values()]
    out["twice"] = error(lambda: C.apply_cp(model, group, 32, "ring"))  # already swapped: not causal_attention
    return out


# ---------------------------------------------------------------------------------------
# 1. Layout


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_layout_chunks_positions_round_trip(cp):
    c = 3
    seq = 2 * cp * c
    x = torch.randn(2, seq, 5, generator=torch.Generator().manual_seed(cp))
    seen = []
    parts1, parts2 = [], []
    for r in range(cp):
        pos = C.positions(seq, r, cp)
        first, second = r, 2 * cp - 1 - r
        assert C.chunk_ids(r, cp) == (first, second)
        assert pos.tolist() == list(range(first * c, (first + 1) * c)) + list(range(second * c, (second + 1) * c))
        assert pos.dtype == torch.int64 and bool((pos[1:] > pos[:-1]).all())  # increasing: the diagonal block is causal
        part = C.shard_sequence(x, r, cp)  # dim 1
        assert torch.equal(part, x[:, pos])
        parts1.append(part)
        parts2.append(C.shard_sequence(x.transpose(1, 2), r, cp, dim=2))
        seen += pos.tolist()
    assert sorted(seen) == list(range(seq))  # the ranks partition the sequence
    assert torch.equal(C.unshard_sequence(parts1, cp), x)
    assert torch.equal(C.unshard_sequence(parts2, cp, dim=2), x.transpose(1, 2))
    # Labels shifted in the global order, then sharded: still the next token of each input.
    stream = torch.arange(seq + 1).unsqueeze(0)
    for r in range(cp):
        inputs, labels = (C.shard_sequence(t, r, cp) for t in (stream[:, :-1], stream[:, 1:]))
        assert torch.equal(inputs[0], C.positions(seq, r, cp)) and torch.equal(labels, inputs + 1)


def test_layout_cp2_example_from_docstring():
    assert [C.chunk_ids(r, 2) for r in range(2)] == [(0, 3), (1, 2)]
    assert C.positions(8, 0, 2).tolist() == [0, 1, 6, 7] and C.positions(8, 1, 2).tolist() == [2, 3, 4, 5]


# ---------------------------------------------------------------------------------------
# 2. Block plan and load balance (pure index arithmetic)


def _computed_pairs(rank: int, cp: int, c: int) -> list[tuple[int, torch.Tensor, bool]]:
    """Per ring step: (src, the (2c x 2c) bool matrix of (local q, src's local k) pairs the
    kernel scores, the block's causal flag), from block_plan. On the causal block the
    kernel skips the local upper triangle."""
    out = []
    for step in range(cp):
        qs, ks, causal = C.block_plan(step, rank, cp)
        computed = torch.zeros(2 * c, 2 * c, dtype=torch.bool)
        computed[qs.start * c: qs.stop * c, ks.start * c: ks.stop * c] = True
        if causal:
            assert (qs, ks) == (slice(0, 2), slice(0, 2))  # only the whole local block is causal
            computed &= torch.ones(2 * c, 2 * c, dtype=torch.bool).tril()
        out.append(((rank - step) % cp, computed, causal))
    return out


@pytest.mark.parametrize("cp, c", [(cp, c) for cp in (1, 2, 3, 4, 5) for c in (1, 2, 3)])
def test_block_plan_covers_the_causal_mask_exactly_once(cp, c):
    seq = 2 * cp * c
    visible = torch.ones(seq, seq, dtype=torch.bool).tril()  # [query pos, key pos]
    count = torch.zeros(seq, seq, dtype=torch.int64)
    for r in range(cp):
        pos_q = C.positions(seq, r, cp)
        srcs = []
        for src, computed, causal in _computed_pairs(r, cp, c):
            srcs.append(src)
            pos_k = C.positions(seq, src, cp)
            mask = visible[pos_q][:, pos_k]  # the global mask on this (q, k) block
            assert causal == (src == r)
            if causal:  # the local causal mask on the diagonal block is the global one
                assert torch.equal(computed, mask), (r, src)
            assert not (computed & ~mask).any(), f"rank {r} scores masked pairs of src {src}"
            rows = computed.any(1)  # query rows in this block
            assert (computed & mask)[rows].any(1).all(), "a computed query row sees no key (lse = 0 trap)"
            count.index_put_((pos_q.unsqueeze(1).expand(-1, 2 * c), pos_k.unsqueeze(0).expand(2 * c, -1)),
                             computed.long(), accumulate=True)
        assert sorted(srcs) == list(range(cp))  # every rank's K/V visits once
    assert torch.equal(count, visible.long()), "some visible pair scored twice or never, or a masked one scored"


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("c", [1, 4, 5])
def test_load_balance(cp, c):
    seq = 2 * cp * c
    visible_pairs, dense = [], []
    for r in range(cp):
        plan = _computed_pairs(r, cp, c)
        visible_pairs.append(sum(int(m.sum()) for _, m, _ in plan))
        dense.append([(qs.stop - qs.start) * c * (ks.stop - ks.start) * c
                      for qs, ks, _ in (C.block_plan(s, r, cp) for s in range(cp))])
        assert C.attention_flops(r, cp, c) == visible_pairs[r]
    assert sum(visible_pairs) == seq * (seq + 1) // 2
    assert len(set(visible_pairs)) == 1, visible_pairs  # exactly equal: within one block a fortiori
    # Chunks j = r and 2cp-1-r see j whole chunks and the lower triangle of their own:
    # (2cp - 1) c^2 + 2 c (c + 1) / 2 = 2 cp c^2 + c, whatever r.
    assert visible_pairs[0] == 2 * cp * c * c + c
    assert all(d == dense[0] for d in dense)  # the same dense block shapes at every step on every rank
    assert all(x == 2 * c * c for d in dense for x in d[1:])  # after step 0: half a (2c x 2c) block
    # The naive contiguous split: rank r holds queries [r L, (r+1) L), L = 2c; its
    # visible pairs counted on the global causal mask.
    L = 2 * c
    visible = torch.ones(seq, seq, dtype=torch.bool).tril()
    naive = [int(visible[r * L: (r + 1) * L].sum()) for r in range(cp)]
    assert naive == [L * r * L + L * (L + 1) // 2 for r in range(cp)]
    assert max(naive) - min(naive) == (cp - 1) * L * L
    if cp > 1:
        assert max(naive) - min(naive) > 2 * c * c  # more than one (half-)block apart


# ---------------------------------------------------------------------------------------
# 3. The pieces of one ring step (single process): block kernels and the merge


@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_block_kernels_lse_and_split_backward(dtype, kernel):
    """block_forward's lse is the natural-log sum of exp(scores) of each query row (not
    log2), its out the block's softmax; per-block backward with the FINAL (out, lse) of
    a row split over two key blocks sums to the full attention's gradients. For the CPU's
    fused kernel and the math block (the CUDA kernels: test_cuda_block_kernels_on_meta)."""
    tol = TOL[dtype]
    fwd = lambda *a: C.block_forward(*a, kernel)  # noqa: E731
    bwd = lambda *a: C.block_backward(*a, kernel)  # noqa: E731
    q, k, v, do = _qkvo(21, 2, 12, dtype)
    scale = 1.0 / math.sqrt(HD)
    for causal in (True, False):
        out, lse = fwd(q, k, v, causal, scale)
        scores = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * scale
        if causal:
            scores = scores.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
        assert lse.shape == q.shape[:3] and lse.is_contiguous()
        assert _err(lse, torch.logsumexp(scores, -1)) <= tol
        assert _err(out, torch.softmax(scores, -1) @ v.double().repeat_interleave(2, 1)) <= tol
    # Queries 8..11 against keys 0..7 (full) and 8..11 (causal): two blocks of one softmax.
    out_ref, dq_ref, dk_ref, dv_ref = _reference(q, k, v, do)
    qb, dob = q[:, :, 8:], do[:, :, 8:]
    o1, l1 = fwd(qb, k[:, :, :8].contiguous(), v[:, :, :8].contiguous(), False, scale)
    o2, l2 = fwd(qb, k[:, :, 8:].contiguous(), v[:, :, 8:].contiguous(), True, scale)
    acc = torch.zeros(qb.shape, dtype=F64 if dtype == F64 else F32)
    lse = torch.full(qb.shape[:3], float("-inf"), dtype=acc.dtype)
    C._merge(acc, lse, o1, l1)
    C._merge(acc, lse, o2, l2)
    assert _err(acc, out_ref[:, :, 8:]) <= tol
    out = acc.to(dtype)
    g1 = bwd(dob, qb, k[:, :, :8].contiguous(), v[:, :, :8].contiguous(), out, lse, False, scale)
    g2 = bwd(dob, qb, k[:, :, 8:].contiguous(), v[:, :, 8:].contiguous(), out, lse, True, scale)
    # Only queries 8..11 here: dk, dv of keys 0..11 from them alone.
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, enable_gqa=True)[:, :, 8:].backward(dob)
    assert _err(g1[0] + g2[0], qr.grad[:, :, 8:]) <= tol
    assert _err(torch.cat([g1[1], g2[1]], 2), kr.grad) <= tol
    assert _err(torch.cat([g1[2], g2[2]], 2), vr.grad) <= tol


# (device, dtype, head dim, capability) -> kernel: on CUDA a fused kernel for every training
# dtype (never a block's score matrix), the math block only for float64.
KERNEL_CHOICES = [
    ("cpu", torch.bfloat16, 128, None, "cpu_flash"), ("cpu", F32, 64, None, "cpu_flash"),
    ("cpu", F64, 16, None, "cpu_flash"),
    ("cuda", torch.bfloat16, 128, (9, 0), "flash"), ("cuda", torch.float16, 64, (8, 0), "flash"),
    ("cuda", torch.bfloat16, 100, (9, 0), "flash"),  # padded to 104
    ("cuda", torch.bfloat16, 128, (7, 5), "efficient"), ("cuda", torch.bfloat16, 512, (9, 0), "efficient"),
    ("cuda", F32, 128, (9, 0), "efficient"), ("cuda", F32, 128, (8, 0), "efficient"),
    ("cuda", F64, 128, (9, 0), "math"), ("mps", torch.bfloat16, 128, None, "math"),
]


@pytest.mark.parametrize("device, dtype, head_dim, capability, kernel", KERNEL_CHOICES)
def test_the_block_kernel_is_chosen_by_device_and_dtype(device, dtype, head_dim, capability, kernel):
    chosen, why = C.block_kernel(device, dtype, head_dim, capability)
    assert chosen == kernel, (device, dtype, head_dim, capability, chosen, why)
    assert chosen in C.KERNELS and why


@pytest.mark.parametrize("kernel", ["flash", "efficient"])
@pytest.mark.parametrize("head_dim", [64, 36])
def test_cuda_block_kernels_on_meta(kernel, head_dim):
    """The CUDA kernels' calls, run on the meta device (their shape functions; no GPU here):
    the arguments are accepted, out / lse / gradients come back in the block's shapes and
    dtypes (lse float32 and contiguous, the memory-efficient kernel's padded rows cut off;
    GQA gradients folded back to the K/V heads; an odd head dim padded and cut back), for
    the square causal block and a non-causal block of other length."""
    dtype = torch.bfloat16 if kernel == "flash" else F32
    B, H, Hkv = 2, 8, 2
    for Lq, Lk, causal in ((40, 40, True), (40, 24, False)):
        q = torch.empty(B, H, Lq, head_dim, device="meta", dtype=dtype)
        k, v = (torch.empty(B, Hkv, Lk, head_dim, device="meta", dtype=dtype) for _ in range(2))
        out, lse = C.block_forward(q, k, v, causal, head_dim ** -0.5, kernel)
        assert out.shape == q.shape and out.dtype == dtype
        assert lse.shape == (B, H, Lq) and lse.dtype == F32 and lse.is_contiguous()
        dq, dk, dv = C.block_backward(torch.empty_like(out), q, k, v, out, lse, causal, head_dim ** -0.5, kernel)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
        assert dq.dtype == dk.dtype == dv.dtype == dtype


def test_merge_is_exact_and_overflow_safe():
    """From the empty state (out 0, lse -inf) the first block is taken as is; lse gaps of
    1000 (exp overflows float32 past 88, float64 past 709: the log(1 + exp(d)) pitfall)
    give the dominant block, no inf or NaN; equal lse give the mean."""
    for dtype in (F32, F64):
        a, b = torch.randn(1, 1, 3, 4, dtype=dtype), torch.randn(1, 1, 3, 4, dtype=dtype)
        out, lse = torch.zeros_like(a), torch.full((1, 1, 3), float("-inf"), dtype=dtype)
        la = torch.tensor([[[0.0, 5.0, -1000.0]]], dtype=dtype)
        C._merge(out, lse, a, la)
        assert torch.equal(out, a) and torch.equal(lse, la)
        lb = torch.tensor([[[1000.0, 5.0, 0.0]]], dtype=dtype)
        C._merge(out, lse, b, lb)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        assert torch.allclose(out[0, 0, 0], b[0, 0, 0], rtol=0, atol=0)  # b dominates by e^1000
        assert torch.allclose(out[0, 0, 1], (a[0, 0, 1] + b[0, 0, 1]) / 2, rtol=1e-6, atol=1e-6)
        assert torch.allclose(out[0, 0, 2], b[0, 0, 2], rtol=0, atol=0)
        assert lse[0, 0, 0] == 1000.0 and abs(lse[0, 0, 1].item() - (5.0 + math.log(2))) < 1e-6
        assert lse[0, 0, 2] == 0.0


# ---------------------------------------------------------------------------------------
# 4. Attention numerics (ring and all-gather), cp = 2 and 4


@pytest.mark.parametrize("cp", [2, 4])
def test_attention_matches_full_causal_attention(cp):
    per_rank = run_on_ranks(_attention_numerics, cp, timeout=120)
    failures = []
    for key in per_rank[0]:
        if key == "calls" or key[0] in ("bf16", "autograd-merge"):
            continue
        hkv, c, dtype, q_scale, _ = key
        tol = TOL_SHARP_F32 if dtype == str(F32) and q_scale > 1 else TOL[getattr(torch, dtype.split(".")[1])]
        for rank, res in enumerate(per_rank):
            for what, e in res[key].items():
                if what.endswith("dtype_ok"):
                    ok = e is True
                else:
                    ok = e <= tol
                if not ok:
                    failures.append((rank, key, what, e))
    assert not failures, failures
    assert len([k for k in per_rank[0] if k[0] in KV_HEADS]) == len(KV_HEADS) * len(CHUNKS) * 2 + 4

    for rank, res in enumerate(per_rank):
        for name in ("ring", "allgather"):  # bfloat16: a smoke test at bf16 precision
            assert max(res[("bf16", name)].values()) < 3e-2, (rank, name, res[("bf16", name)])
        # The control merge (differentiable lse) is right: the harness sees only the bug.
        assert max(res[("autograd-merge", "math")].values()) <= TOL[F64], (rank, res[("autograd-merge", "math")])
        bad = res[("autograd-merge", "flash")]
        assert bad["out"] <= TOL[F64] and bad["dv"] <= TOL[F64], (rank, bad)  # forward and dv are fine ...
    # ... but dq and dk fail the tolerance by orders of magnitude (on some rank: rank 0's
    # first query chunk sees one block only, where nothing is merged).
    worst = {w: max(res[("autograd-merge", "flash")][w] for res in per_rank) for w in ("dq", "dk")}
    assert worst["dq"] > 1e-3 and worst["dk"] > 1e-3, worst

    # The kernels the ring called follow block_plan: step 0 the causal (2c x 2c) block,
    # then half a block per step; the same in backward; the same work on every rank.
    c = 3
    for rank, res in enumerate(per_rank):
        expect = []
        for step in range(cp):
            qs, ks, causal = C.block_plan(step, rank, cp)
            expect.append(((qs.stop - qs.start) * c, (ks.stop - ks.start) * c, causal))
        assert res["calls"]["fwd"] == expect and res["calls"]["bwd"] == expect, (rank, res["calls"])
        work = sum(lq * lk // (2 if causal else 1) for lq, lk, causal in res["calls"]["fwd"])
        assert work == sum(lq * lk // (2 if causal else 1) for lq, lk, causal in per_rank[0]["calls"]["fwd"])


def test_attention_on_strided_cp_subgroups():
    for rank, res in enumerate(run_on_ranks(_subgroup_numerics, 4, timeout=60)):
        assert res["ring"] <= TOL[F64] and res["allgather"] <= TOL[F64], (rank, res)


# ---------------------------------------------------------------------------------------
# 5. The Llama model, float64 (and the positions pitfall)


@pytest.mark.parametrize("cp", [2, 4])
def test_llama_with_cp_matches_single_process(cp):
    seq = 2 * cp * 4
    per_rank = run_on_ranks(_llama_cp, cp, seq, timeout=120)
    for rank, res in enumerate(per_rank):
        for rotate in ("ring", "allgather"):
            r = res[rotate]
            assert r["n_grads"] == 2 + 9 * MODEL["n_layers"] + 1
            assert r["loss"] <= 1e-12 and r["logits"] <= 1e-12 and r["grad"] <= 1e-12, (rank, rotate, r)
            # Negative: forgetting the positions (RoPE at 0..2c-1) or the label permutation
            # is visible in the loss, far above float64 noise.
            for key in ("no_positions", "arange_positions"):
                assert r[key] > 1e-6 and r[key + "_logits"] > 1e-4, (rank, rotate, key, r)
            assert r["unpermuted_labels"] > 1e-3, (rank, rotate, r)


# ---------------------------------------------------------------------------------------
# 6. Loss parity through train.main (float32, 10 steps)

MODEL_OPT = ["model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "run.eval_every=10"]
SGD = ["training.optimizer=sgd", "training.lr=0.5", "training.momentum=0.9"]

# (name, optimizer overrides, world, layout overrides)
_LOSS_RUNS = [
    ("cp2-sgd", SGD, 2, ["parallel.cp=2"]),
    ("cp4-adamw", [], 4, ["parallel.cp=4"]),
    ("cp2-dp_shard2-adamw", [], 4, ["parallel.cp=2", "parallel.dp_shard=2", "training.micro_batch_size=4"]),
    ("cp2-allgather-sgd", SGD, 2, ["parallel.cp=2", "parallel.cp_rotate=allgather"]),
]
_4D = ["parallel.pp=2", "parallel.dp_shard=2", "parallel.cp=2", "parallel.tp=2", "training.micro_batch_size=4",
       "parallel.pp_microbatches=2"]


@pytest.mark.parametrize("name, opt, world, layout", _LOSS_RUNS, ids=[r[0] for r in _LOSS_RUNS])
def test_loss_parity_through_train(tmp_path_factory, name, opt, world, layout):
    """DESIGN.md's criterion: same config in float32, same seed, same global batch ->
    the loss, gradient norm (and step 1's alone) at each of 10 steps and the val loss
    within distributed.PARITY_BOUNDS of the single-process run."""
    err = loss_parity(tmp_path_factory, world, MODEL_OPT + opt, layout)
    assert "val_loss" in err and not exceeding(err), (name, err)


def test_loss_parity_4d_pp2_dp2_cp2_tp2(tmp_path_factory):
    """The full 4D layout on 16 ranks (pp 2 x dp_shard 2 x cp 2 x tp 2, sequence parallel,
    loss parallel, 1F1B with 2 micro-batches). Required, not optional: it is the only run
    where ring attention meets TP's head split, SP and the pipeline; ~30-100 s."""
    err = loss_parity(tmp_path_factory, 16, MODEL_OPT, _4D, timeout=600)
    assert "val_loss" in err and not exceeding(err), ("4d", err)


def _train_forgetting_positions(rank: int, world: int, argv: list[str]) -> list[dict]:
    """train.main with the classic CP bug: the model ignores the positions it is given,
    so each cp rank applies RoPE at 0..S/cp-1 instead of its chunks' global positions."""
    import train

    real = llama.Transformer.forward
    calls = []

    def forward(self, tokens, positions=None):
        calls.append(positions is not None)
        return real(self, tokens)

    llama.Transformer.forward = forward
    try:
        history = train.main(argv)
    finally:
        llama.Transformer.forward = real
    assert calls and all(calls), calls  # the bug was in play: train.main passed positions
    return history


def test_loss_parity_sees_rope_at_the_wrong_positions(tmp_path_factory):
    """Negative: cp 2 with RoPE at the local positions, one step. At init attention is
    nearly uniform, so the loss hardly moves (DESIGN.md's old 1e-4 criterion passes it,
    as would the loss bound); the gradient norm moves by 8.1e-7, 8x its step-1 bound
    (and by up to 2.2e-6 over 10 steps, 7x the gradient-norm bound)."""
    opt = MODEL_OPT + SGD
    ref = reference_run(tmp_path_factory, opt)
    argv = train_argv(str(tmp_path_factory.mktemp("wrong-positions")), *opt, "parallel.cp=2", "training.steps=1",
                      "training.warmup_steps=1", "run.eval_every=0")
    err = parity(run_on_ranks(_train_forgetting_positions, 2, argv, timeout=120), ref[:1])
    assert err["loss"] < 1e-4, err
    assert err["grad_norm_step1"] > 5 * PARITY_BOUNDS["grad_norm_step1"], err
    assert set(exceeding(err)) == {"grad_norm", "grad_norm_step1"}, err


# ---------------------------------------------------------------------------------------
# 7. Bad input


def test_seq_len_not_divisible_by_2cp():
    for fn in (lambda: C.positions(30, 0, 4), lambda: C.shard_sequence(torch.zeros(1, 30), 1, 4)):
        with pytest.raises(ValueError, match=r"seq_len=30 .*divisible by 2 x parallel.cp = 8"):
            fn()
    C.positions(32, 3, 4)  # divisible: fine


    def validate(*overrides, world=4):
        from test_train import TINY
        return config.validate(config.load_config(os.path.join(ROOT, "configs/debug.yaml"), [*TINY, *overrides]), world)

    with pytest.raises(ValueError, match=r"data.seq_len=36 is not divisible by 2 x parallel.cp = 8"):
        validate("data.seq_len=36", "parallel.cp=4")
    assert validate("data.seq_len=40", "parallel.cp=4").degrees["cp"] == 4  # the control passes
    # With sequence parallel, tp must divide the S / cp tokens of a CP rank (SP cuts its two
    # chunks as one sequence; a chunk of S / (2 cp) need not divide by tp).
    heads = ["model.n_kv_heads=4"]
    with pytest.raises(ValueError, match=r"data.seq_len \(/ parallel.cp under context parallel\) = 18 is not "
                                         r"divisible by parallel.tp=4"):
        validate("data.seq_len=36", "parallel.cp=2", "parallel.tp=4", *heads, world=8)
    assert validate("data.seq_len=40", "parallel.cp=2", "parallel.tp=4", *heads, world=8).degrees["tp"] == 4
    assert validate("data.seq_len=36", "parallel.cp=2", "parallel.tp=2").degrees["tp"] == 2  # chunks of 9


def test_apply_cp_bad_input():
    res = run_on_ranks(_bad_apply_cp, 2, timeout=60)
    for r in res:
        assert r["seq"] is not None and "data.seq_len=30" in r["seq"] and "2 x parallel.cp = 4" in r["seq"], r
        assert r["rotate"] is not None and "'ulysses'" in r["rotate"] and "ring" in r["rotate"], r
        assert r["non_causal"] is not None and "layers.0.attention.attention_fn" in r["non_causal"], r
        assert r["non_causal_kept"]
        assert r["swapped"] == [True] * MODEL["n_layers"]
        assert r["twice"] is not None and "causal" in r["twice"]


def test_unknown_cp_rotate_in_config():

    assert tuple(config.CHOICES["parallel.cp_rotate"]) == C.ROTATE
    assert config.load_config(None, ["parallel.cp_rotate=allgather"]).parallel.cp_rotate == "allgather"
    with pytest.raises(ValueError, match=r"parallel.cp_rotate='ulysses' is not one of \['ring', 'allgather'\]"):
        config.load_config(None, ["parallel.cp_rotate=ulysses"])
