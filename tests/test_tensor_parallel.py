"""Tensor parallelism (tensor_parallel.py) against the single-process oracle.

Every multi-rank numerics test computes its single-process reference itself (in each
rank, from the same seeded full tensors: plain torch ops or the unsharded model) and
compares with it; nothing here only checks that it ran. What is shown:
  * per op, float64, tp = 2 and 4: forward output and every gradient (input and weight;
    a sharded weight's gradient against the matching slice of the reference gradient)
    of the column-parallel group (CopyToTP, GatherSeq, async AllGatherMatmul with 3
    weights, and 2 called directly; also with an output that gets no gradient), the
    row-parallel linear
    (ReduceFromTP, ReduceScatterSeq, async MatmulReduceScatter), the vocabulary-parallel
    embedding (with / without SP, ids covering every rank's rows, repeated ids), the
    vocabulary-parallel cross-entropy (ignore_index outside and inside the vocabulary,
    a row of logits near 1000, labels on every rank; the loss bitwise the same on every
    rank; plus a bf16 smoke test) and
    GatherVocab; each region Function on its own with rank-dependent inputs (its sum
    over ranks); async TP equal to the synchronous path to 1e-12;
  * the whole model, float64, one forward/backward at tp = 2 and 4 for SP on/off x loss
    parallel on/off, async TP with and without loss parallel, GQA with 2 and 4 query
    heads per KV head and MHA: the loss, the logits and every parameter gradient equal
    the unsharded model's (slices by global_offset), and each parameter has the
    documented layout (shard dim, shape, offset, tp_partial_grad on SP norms);
  * the SP norm pitfall, negatively: without reduce_sequence_parallel_grads the norm
    gradients are partial sums (wrong, and different on each rank; their sum over ranks
    is right); with it they are right and identical; without SP they need nothing and
    the call leaves them unchanged (not t x);
  * init: shards differ across ranks and gathered along tp_shard_dim equal the
    single-process weights bitwise; apply_tp on a materialized model slices the same;
  * 3 optimizer steps (AdamW, SGD; SP on / off, async TP): parameters equal the
    single-process run's, replicated norms bitwise identical on every TP rank, shards
    different;
  * float32 loss and grad-norm parity through train.main over 10 steps (within
    distributed.PARITY_BOUNDS: ~20 float32 ulps of the loss), for SP / loss parallel / async TP / tp 2 and 4 / FSDP x TP, each optimizer on both
    TP degrees;
  * bad input: the errors of apply_tp, of a sequence that SP cannot split, and of
    config.validate.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import float8
import config
import llama
import tensor_parallel as tp
from distributed import STEP_BOUNDS_FLOAT64, exceeding, loss_parity, run_on_ranks

# `train` is imported inside the functions that need it: it imports fsdp, which imports
# torch._dynamo (~2.5 s per process), a cost every rank of every call would pay.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = torch.float64
TOL = 1e-12  # relative (by norm) in float64

# The model of the direct tests: GQA with head_dim 8; ffn 192 (multiple_of 64), vocab 128:
# every split divides by 2 and 4.
MODEL = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=128)
BATCH, SEQ = 2, 16


# ---------------------------------------------------------------------------------------
# Helpers (run inside the ranks)


def _randn(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def _err(a: torch.Tensor | None, b: torch.Tensor) -> float:
    """Relative difference by norm; inf when a is missing or its shape is not b's."""
    if a is None or a.shape != b.shape:
        return float("inf")
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _chunk(x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    return x.chunk(world, dim)[rank]


def _args(**overrides) -> llama.ModelArgs:
    return llama.model_args("debug", **{**MODEL, **overrides})


def _reference(args: llama.ModelArgs, dtype: torch.dtype = F64) -> llama.Transformer:
    """The single-process model: the global weights of init_weights(seed 0)."""
    model = llama.build_model(args, "cpu")
    llama.init_weights(model, args, 0)
    return model.to(dtype)


def _tp_model(args: llama.ModelArgs, group, dtype: torch.dtype = F64, **kwargs) -> llama.Transformer:
    """As train.py: meta model -> apply_tp -> materialize -> init the shards."""
    model = llama.build_model(args, "meta")
    tp.apply_tp(model, group, **kwargs)
    llama.materialize(model, "cpu")
    llama.init_weights(model, args, 0)
    return model.to(dtype)


def _loss(logits: torch.Tensor, labels: torch.Tensor, group=None) -> torch.Tensor:
    """train.loss_fn: the sum of token cross-entropies / tokens; vocab-parallel over
    `group` (loss parallel) when given."""
    if group is not None:
        return tp.vocab_parallel_cross_entropy(logits, labels, group).sum() / labels.numel()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / labels.numel()


def _batch(args: llama.ModelArgs, seed: int = 1, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, args.vocab_size, (BATCH, seq + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def _slice(p: torch.Tensor) -> tuple:
    """Where the local parameter p sits in its global tensor."""
    offset = getattr(p, "global_offset", (0,) * p.dim())
    return tuple(slice(o, o + n) for o, n in zip(offset, p.shape))


def _linear(weight: torch.Tensor) -> nn.Linear:
    out_features, in_features = weight.shape
    lin = nn.Linear(in_features, out_features, bias=False, dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.clone())
    return lin


# ---------------------------------------------------------------------------------------
# 1. The ops, float64, against plain torch

B, S, D = 2, 8, 16  # S divides by 2 and 4 (SP)
OUTS = (24, 8, 16)  # a column-parallel group of three weights (as wq, wk, wv)


def _column(rank: int, world: int, sp: bool, async_tp: bool, n_used: int = 3) -> tuple[dict, list]:
    """column_parallel(x, linears) vs F.linear per weight; backward only through the
    first n_used outputs (the others get no gradient at all)."""
    group = dist.group.WORLD
    x = _randn(1, B, S, D)
    ws = [_randn(10 + i, o, D, scale=0.2) for i, o in enumerate(OUTS)]
    dys = [_randn(20 + i, B, S, o) for i, o in enumerate(OUTS)]
    xr = x.clone().requires_grad_()
    wr = [w.clone().requires_grad_() for w in ws]
    refs = [F.linear(xr, w) for w in wr]
    torch.autograd.backward(refs[:n_used], dys[:n_used])

    lins = tuple(_linear(_chunk(w, 0, rank, world)) for w in ws)
    xs = (_chunk(x, 1, rank, world) if sp else x).clone().requires_grad_()
    ys = tp.column_parallel(xs, lins, group=group, sequence_parallel=sp, async_tp=async_tp)
    torch.autograd.backward(ys[:n_used], [_chunk(dy, -1, rank, world) for dy in dys[:n_used]])

    errs = {"dx": _err(xs.grad, _chunk(xr.grad, 1, rank, world) if sp else xr.grad)}
    for i, (y, lin, ref, w) in enumerate(zip(ys, lins, refs, wr)):
        errs[f"y{i}"] = _err(y, _chunk(ref.detach(), -1, rank, world))
        ref_dw = _chunk(w.grad, 0, rank, world) if w.grad is not None else torch.zeros_like(lin.weight)
        dw = lin.weight.grad if lin.weight.grad is not None else torch.zeros_like(lin.weight)
        errs[f"dw{i}"] = (dw.abs().max().item() if i >= n_used else _err(dw, ref_dw))
    return errs, [y.detach() for y in ys] + [xs.grad] + [lin.weight.grad for lin in lins[:n_used]]


def _row(rank: int, world: int, sp: bool, async_tp: bool) -> tuple[dict, list]:
    """row_parallel(x_r, linear) vs F.linear: x and W split along the input features."""
    group = dist.group.WORLD
    K = 24  # input features, split over ranks
    x = _randn(2, B, S, K)
    w = _randn(3, D, K, scale=0.2)
    dy = _randn(4, B, S, D)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.linear(xr, wr)
    ref.backward(dy)

    lin = _linear(_chunk(w, 1, rank, world))
    xs = _chunk(x, -1, rank, world).clone().requires_grad_()
    y = tp.row_parallel(xs, lin, group=group, sequence_parallel=sp, async_tp=async_tp)
    y.backward(_chunk(dy, 1, rank, world) if sp else dy)
    errs = dict(y=_err(y, _chunk(ref.detach(), 1, rank, world) if sp else ref.detach()),
                dx=_err(xs.grad, _chunk(xr.grad, -1, rank, world)),
                dw=_err(lin.weight.grad, _chunk(wr.grad, 1, rank, world)))
    return errs, [y.detach(), xs.grad, lin.weight.grad]


def _embedding(rank: int, world: int, sp: bool) -> dict:
    """VocabParallelEmbedding vs F.embedding; ids cover every row of the vocabulary
    (so every rank's shard) and some repeat (gradient accumulation per row)."""
    group = dist.group.WORLD
    V, Sq = 32, 24
    gen = torch.Generator().manual_seed(5)
    ids = torch.cat([torch.randperm(V, generator=gen), torch.randint(0, V, (B * Sq - V,), generator=gen)])
    ids = ids[torch.randperm(ids.numel(), generator=gen)].view(B, Sq)
    w = _randn(6, V, D)
    dy = _randn(7, B, Sq, D)
    wr = w.clone().requires_grad_()
    ref = F.embedding(ids, wr)
    ref.backward(dy)

    rows = V // world
    emb = tp.VocabParallelEmbedding(nn.Parameter(_chunk(w, 0, rank, world).clone()), rank * rows, group, sp)
    y = emb(ids)
    y.backward(_chunk(dy, 1, rank, world) if sp else dy)
    ref_dw = _chunk(wr.grad, 0, rank, world)
    return dict(y=_err(y, _chunk(ref.detach(), 1, rank, world) if sp else ref.detach()),
                dw=_err(emb.weight.grad, ref_dw),
                covered=float(set(ids.flatten().tolist()) == set(range(V))),
                untouched_rows=float((ref_dw.abs().sum(-1) == 0).sum().item()))


def _cross_entropy(rank: int, world: int, ignore_index: int) -> dict:
    """vocab_parallel_cross_entropy vs F.cross_entropy(reduction='none'), float64, with
    a per-token upstream gradient; some labels are ignore_index, every rank owns some
    targets, and one row of logits sits near 1000 (the max subtraction)."""
    group = dist.group.WORLD
    N, V = 24, 32
    gen = torch.Generator().manual_seed(8)
    logits = _randn(9, N, V, scale=3.0)
    logits[5] += 1000.0
    labels = torch.cat([torch.arange(0, V, V // 8), torch.randint(0, V, (N - 8,), generator=gen)])
    labels[[2, 11, 17]] = ignore_index
    dloss = _randn(10, N)
    lr = logits.clone().requires_grad_()
    ref = F.cross_entropy(lr, labels, reduction="none", ignore_index=ignore_index)
    ref.backward(dloss)

    ls = _chunk(logits, -1, rank, world).clone().requires_grad_()
    loss = tp.vocab_parallel_cross_entropy(ls, labels, group, ignore_index=ignore_index)
    loss.backward(dloss)
    every = [torch.empty_like(loss) for _ in range(world)]
    dist.all_gather(every, loss.detach(), group=group)  # comm: test only
    return dict(loss=_err(loss, ref.detach()), grad=_err(ls.grad, _chunk(lr.grad, -1, rank, world)),
                replicated=float(all(torch.equal(x, every[0]) for x in every)),  # the same loss on every rank
                ignored_zero=float(loss[[2, 11, 17]].abs().max().item() == 0.0),
                ignored_grad_zero=float(ls.grad[[2, 11, 17]].abs().max().item() == 0.0))


def _cross_entropy_bf16(rank: int, world: int) -> dict:
    """bf16 logits: the loss comes back in float32, the gradient in bf16, both close to
    F.cross_entropy on the same values in float32."""
    group = dist.group.WORLD
    N, V = 24, 32
    logits = _randn(11, N, V, scale=3.0).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(12))
    labels[3] = -100
    lr = logits.float().requires_grad_()
    ref = F.cross_entropy(lr, labels, reduction="none")
    ref.sum().backward()
    ls = _chunk(logits, -1, rank, world).clone().requires_grad_()
    loss = tp.vocab_parallel_cross_entropy(ls, labels, group)
    loss.sum().backward()
    return dict(loss=_err(loss, ref.detach()), grad=_err(ls.grad, _chunk(lr.grad, -1, rank, world)),
                loss_dtype=str(loss.dtype), grad_dtype=str(ls.grad.dtype))


def _gather_vocab(rank: int, world: int) -> dict:
    group = dist.group.WORLD
    x, dy = _randn(13, B, S, 32), _randn(14, B, S, 32)
    xs = _chunk(x, -1, rank, world).clone().requires_grad_()
    y = tp.GatherVocab.apply(xs, group)
    y.backward(dy)  # the loss is replicated: every rank sees the same whole gradient
    return dict(y=_err(y, x), dx=_err(xs.grad, _chunk(dy, -1, rank, world)))


def _regions(rank: int, world: int) -> dict:
    """Each region Function alone, with a different input and upstream gradient on every
    rank (each rank builds all ranks' tensors from their seeds): f, g, AG and RS along
    the sequence do the sums over ranks their docstrings state."""
    group = dist.group.WORLD
    xs = [_randn(100 + q, B, S, D) for q in range(world)]  # rank q's input
    dys = [_randn(200 + q, B, S, D) for q in range(world)]  # rank q's upstream gradient
    shards = [_chunk(t, 1, q, world) for q, t in enumerate(xs)]
    dshards = [_chunk(t, 1, q, world) for q, t in enumerate(dys)]
    out = {}

    x = xs[rank].clone().requires_grad_()
    y = tp.CopyToTP.apply(x, group)
    y.backward(dys[rank])
    out["CopyToTP.y"], out["CopyToTP.dx"] = _err(y, xs[rank]), _err(x.grad, sum(dys))

    x = xs[rank].clone().requires_grad_()
    y = tp.ReduceFromTP.apply(x, group)
    y.backward(dys[0])  # replicated loss: the same output gradient on every rank
    out["ReduceFromTP.y"], out["ReduceFromTP.dx"] = _err(y, sum(xs)), _err(x.grad, dys[0])

    x = shards[rank].clone().requires_grad_()
    y = tp.GatherSeq.apply(x, group)
    y.backward(dys[rank])
    out["GatherSeq.y"] = _err(y, torch.cat(shards, 1))
    out["GatherSeq.dx"] = _err(x.grad, _chunk(sum(dys), 1, rank, world))

    x = xs[rank].clone().requires_grad_()
    y = tp.ReduceScatterSeq.apply(x, group)
    y.backward(dshards[rank])
    out["ReduceScatterSeq.y"] = _err(y, _chunk(sum(xs), 1, rank, world))
    out["ReduceScatterSeq.dx"] = _err(x.grad, torch.cat(dshards, 1))
    return out


def _ops(rank: int, world: int) -> dict:
    out = {}
    results = {}
    for sp, async_tp in ((False, False), (True, False), (True, True)):
        name = "async" if async_tp else ("sp" if sp else "nosp")
        out[f"column.{name}"], results[("column", name)] = _column(rank, world, sp, async_tp)
        out[f"row.{name}"], results[("row", name)] = _row(rank, world, sp, async_tp)
    out["column.async.2of3"], _ = _column(rank, world, True, True, n_used=2)
    out["column.sp.2of3"], _ = _column(rank, world, True, False, n_used=2)
    out["column.async.2weights"], _ = _column_two(rank, world)
    for kind in ("column", "row"):  # async == sync (both SP), outputs and every gradient
        a, s = results[(kind, "async")], results[(kind, "sp")]
        out[f"{kind}.async_vs_sync"] = {i: _err(x, y) for i, (x, y) in enumerate(zip(a, s))}
    for sp in (False, True):
        out[f"embedding.{'sp' if sp else 'nosp'}"] = _embedding(rank, world, sp)
    out["ce.ignore-100"] = _cross_entropy(rank, world, -100)
    out["ce.ignore_in_vocab"] = _cross_entropy(rank, world, 3)
    out["ce.bf16"] = _cross_entropy_bf16(rank, world)
    out["gather_vocab"] = _gather_vocab(rank, world)
    out["regions"] = _regions(rank, world)
    return out


def _column_two(rank: int, world: int) -> tuple[dict, list]:
    """AllGatherMatmul called directly with two weights (as w1, w3), vs F.linear."""
    group = dist.group.WORLD
    x = _randn(30, B, S, D)
    ws = [_randn(31, 32, D, scale=0.2), _randn(32, 32, D, scale=0.2)]
    dys = [_randn(33, B, S, 32), _randn(34, B, S, 32)]
    xr, wr = x.clone().requires_grad_(), [w.clone().requires_grad_() for w in ws]
    refs = [F.linear(xr, w) for w in wr]
    torch.autograd.backward(refs, dys)
    xs = _chunk(x, 1, rank, world).clone().requires_grad_()
    wl = [_chunk(w, 0, rank, world).clone().requires_grad_() for w in ws]
    ys = tp.AllGatherMatmul.apply(xs, group, None, *wl)
    assert isinstance(ys, tuple) and len(ys) == 2
    torch.autograd.backward(ys, [_chunk(dy, -1, rank, world) for dy in dys])
    errs = {"dx": _err(xs.grad, _chunk(xr.grad, 1, rank, world))}
    for i in range(2):
        errs[f"y{i}"] = _err(ys[i], _chunk(refs[i].detach(), -1, rank, world))
        errs[f"dw{i}"] = _err(wl[i].grad, _chunk(wr[i].grad, 0, rank, world))
    return errs, []


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_ops_match_plain_torch_float64(world):
    """Forward and every gradient of each TP op equal plain torch's to 1e-12 (float64)."""
    for rank, r in enumerate(run_on_ranks(_ops, world, timeout=120)):
        flat = _flatten(r)
        special = {k: flat.pop(k) for k in list(flat) if k.split(".")[-1] in
                   ("covered", "untouched_rows", "ignored_zero", "ignored_grad_zero", "replicated", "loss_dtype",
                    "grad_dtype")}
        bf16 = {k: flat.pop(k) for k in list(flat) if k.startswith("ce.bf16")}
        assert len(flat) > 60, sorted(flat)
        bad = {k: e for k, e in flat.items() if not e <= TOL}
        assert not bad, (rank, bad)
        for k, v in special.items():
            if k.endswith(("covered", "_zero", "replicated")):
                assert v == 1.0, (rank, k)
            elif k.endswith("untouched_rows"):
                assert v == 0.0, (rank, k)  # every row of every shard got a gradient
        assert special["ce.bf16.loss_dtype"] == "torch.float32" and special["ce.bf16.grad_dtype"] == "torch.bfloat16"
        assert bf16["ce.bf16.loss"] <= 1e-5 and bf16["ce.bf16.grad"] <= 1e-2, (rank, bf16)


# ---------------------------------------------------------------------------------------
# The model-level checks (sections 2-5 and apply_tp's errors) run in one call per TP
# degree, cached: a rank that builds a model on meta imports torch._dynamo (nn.init on
# meta goes through torch._refs), ~2.5 s of CPU per process, which would otherwise be
# paid by every rank of every call. Each test below asserts on its own part.

KV_HEADS = {2: [4, 2], 4: [4, None]}  # GQA with 2 and 4 query heads per KV head; MHA
_suites: dict[int, list | BaseException] = {}


def _suite(rank: int, world: int) -> dict:
    return dict(model=_model_parity(rank, world, KV_HEADS[world], _MODEL_CASES),
                pitfall=_norm_pitfall(rank, world),
                init=_init_shards(rank, world),
                steps=_steps(rank, world, _STEP_CASES),
                bad=_bad_input(rank, world) if world == 2 else None)


def _suite_results(world: int, part: str) -> list:
    """Every rank's result of `part`; the call runs once per world (a failure too is
    kept, and raised again by every test that asks)."""
    if world not in _suites:
        try:
            _suites[world] = run_on_ranks(_suite, world, timeout=240)
        except Exception as e:  # noqa: BLE001 - re-raised for every test of this world
            _suites[world] = e
    results = _suites[world]
    if isinstance(results, BaseException):
        raise results
    return [r[part] for r in results]


# ---------------------------------------------------------------------------------------
# 2. The whole model, float64: loss, logits and every gradient

# (sequence_parallel, loss_parallel, async_tp)
_MODEL_CASES = [(False, False, False), (False, True, False), (True, False, False), (True, True, False),
                (True, True, True), (True, False, True)]
_COLUMN = ("wq", "wk", "wv", "w1", "w3")


def _layout_errors(model: nn.Module, args: llama.ModelArgs, rank: int, world: int, sp: bool) -> list[str]:
    """Every projection, the embedding and the output are 1/t slices along the documented
    dim at offset rank * size; the norms are whole, replicated, and marked partial iff SP."""
    errors = []
    full = dict(llama.build_model(args).named_parameters())
    for name, p in model.named_parameters():
        g = full[name].shape
        if name.endswith("norm.weight"):
            if hasattr(p, "tp_shard_dim") or p.shape != g or getattr(p, "tp_partial_grad", False) != sp:
                errors.append(f"{name}: not a replicated norm (partial={getattr(p, 'tp_partial_grad', False)})")
            continue
        leaf = name.split(".")[-2]
        dim = 0 if leaf in _COLUMN or name.startswith(("tok_embeddings", "output")) else 1
        want = list(g)
        want[dim] //= world
        offset = [0, 0]
        offset[dim] = rank * want[dim]
        if (getattr(p, "tp_shard_dim", None) != dim or list(p.shape) != want or tuple(p.global_shape) != tuple(g)
                or tuple(p.global_offset) != tuple(offset)):
            errors.append(f"{name}: shape {tuple(p.shape)} dim {getattr(p, 'tp_shard_dim', None)} offset "
                          f"{getattr(p, 'global_offset', None)}, want {want} dim {dim} offset {offset}")
    return errors


def _model_parity(rank: int, world: int, kv_heads: list[int | None], cases: list[tuple]) -> dict:
    group = dist.group.WORLD
    results = {}
    for n_kv in kv_heads:
        args = _args(n_kv_heads=n_kv)
        tokens, labels = _batch(args)
        ref = _reference(args)
        ref_logits = ref(tokens)
        ref_loss = _loss(ref_logits, labels)
        ref_loss.backward()
        ref_params = dict(ref.named_parameters())
        for sp, lp, async_tp in cases:
            model = _tp_model(args, group, sequence_parallel=sp, loss_parallel=lp, async_tp=async_tp)
            logits = model(tokens)
            loss = _loss(logits, labels, group if lp else None)
            loss.backward()
            tp.reduce_sequence_parallel_grads(model.parameters(), group)
            want_logits = _chunk(ref_logits, -1, rank, world) if lp else ref_logits
            names = [n for n, _ in model.named_parameters()]
            results[(n_kv, sp, lp, async_tp)] = dict(
                loss=abs(loss.item() - ref_loss.item()) / ref_loss.item(),
                logits=_err(logits, want_logits.detach()),
                grads={n: _err(p.grad, ref_params[n].grad[_slice(p)]) for n, p in model.named_parameters()},
                names=names == list(ref_params),
                layout=_layout_errors(model, args, rank, world, sp))
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_model_gradients_match_single_process_float64(world):
    """One forward/backward of the TP model (+ reduce_sequence_parallel_grads) for every
    combination of SP and loss parallel, and async TP: loss, logits (this rank's vocab
    slice under loss parallel) and every parameter gradient equal the unsharded model's
    to 1e-12; every parameter has the documented layout."""
    for rank, by_case in enumerate(_suite_results(world, "model")):
        assert len(by_case) == len(KV_HEADS[world]) * len(_MODEL_CASES)
        for case, r in by_case.items():
            assert r["names"] and r["layout"] == [], (rank, case, r["layout"])
            assert len(r["grads"]) == 3 + 9 * MODEL["n_layers"]
            bad = {n: e for n, e in r["grads"].items() if not e <= TOL}
            assert not bad, (rank, case, bad)
            assert r["loss"] <= 1e-13 and r["logits"] <= TOL, (rank, case, r["loss"], r["logits"])


# ---------------------------------------------------------------------------------------
# 3. The SP norm pitfall (negative test)


def _norm_pitfall(rank: int, world: int) -> dict:
    group = dist.group.WORLD
    args = _args()
    tokens, labels = _batch(args)
    ref = _reference(args)
    _loss(ref(tokens), labels).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if n.endswith("norm.weight")}
    out = {}
    for sp in (True, False):
        model = _tp_model(args, group, sequence_parallel=sp, loss_parallel=True)
        _loss(model(tokens), labels, group).backward()
        norms = {n: p for n, p in model.named_parameters() if n.endswith("norm.weight")}
        before = {n: p.grad.clone() for n, p in norms.items()}
        tp.reduce_sequence_parallel_grads(model.parameters(), group)
        after = {n: p.grad.clone() for n, p in norms.items()}
        out[sp] = dict(before=before, after=after, ref=ref_grads)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_norm_gradients_need_the_tp_reduction(world):
    """With SP each rank's norm sees only its tokens: before reduce_sequence_parallel_grads
    its gradient is a partial sum, wrong and different on every rank (their sum is right);
    after, right and bitwise identical. Without SP the norms' gradients are already right
    and identical, and the call leaves them alone (no t x gradient)."""
    results = _suite_results(world, "pitfall")
    names = list(results[0][True]["ref"])
    assert len(names) == 2 * MODEL["n_layers"] + 1
    for name in names:
        ref = results[0][True]["ref"][name]
        before = [r[True]["before"][name] for r in results]
        for rank in range(world):
            assert _err(before[rank], ref) > 0.05, (name, rank)  # wrong without the reduction
            assert _err(results[rank][True]["after"][name], ref) <= TOL, (name, rank)
            assert torch.equal(results[rank][True]["after"][name], results[0][True]["after"][name]), (name, rank)
            assert _err(results[rank][False]["before"][name], ref) <= TOL, (name, rank)
            assert torch.equal(results[rank][False]["after"][name], results[rank][False]["before"][name]), name
            assert torch.equal(results[rank][False]["before"][name], results[0][False]["before"][name]), name
        for rank in range(1, world):
            assert _err(before[rank], before[0]) > 0.05, (name, rank)  # each rank holds a different part
        assert _err(sum(before), ref) <= TOL, name  # the parts sum to the whole


# ---------------------------------------------------------------------------------------
# 4. Init: layout-independent, shards differ


def _init_shards(rank: int, world: int) -> dict:
    group = dist.group.WORLD
    args = _args()
    meta = _tp_model(args, group, dtype=torch.float32)
    materialized = _reference(args, torch.float32)  # built whole, then sharded in place
    tp.apply_tp(materialized, group)
    other = dict(materialized.named_parameters())
    return {n: dict(value=p.detach().clone(), dim=getattr(p, "tp_shard_dim", None),
                    same_as_materialized=torch.equal(p, other[n]) and getattr(other[n], "tp_shard_dim", None)
                    == getattr(p, "tp_shard_dim", None))
            for n, p in meta.named_parameters()}


@pytest.mark.parametrize("world", [2, 4])
def test_init_shards_differ_and_gather_to_the_single_process_weights(world):
    """meta -> apply_tp -> materialize -> init_weights: the shards concatenated in rank
    order along tp_shard_dim are the single-process weights, bitwise; shards on different
    ranks differ; apply_tp on a materialized model slices out the same shards."""
    results = _suite_results(world, "init")
    ref = dict(_reference(_args(), torch.float32).named_parameters())
    assert set(results[0]) == set(ref)
    sharded = 0
    for name, p in ref.items():
        dim = results[0][name]["dim"]
        parts = [r[name]["value"] for r in results]
        assert all(r[name]["same_as_materialized"] for r in results), name
        if dim is None:
            assert name.endswith("norm.weight")
            assert all(torch.equal(x, p.detach()) for x in parts), name
            continue
        sharded += 1
        assert torch.equal(torch.cat(parts, dim), p.detach()), name
        for rank in range(1, world):
            assert not torch.equal(parts[rank], parts[0]), (name, rank)
    assert sharded == 2 + 7 * MODEL["n_layers"]


# ---------------------------------------------------------------------------------------
# 5. Optimizer steps: parameters match; cross-rank invariants

# (optimizer, sequence_parallel, async_tp): each optimizer with and without SP.
_STEP_CASES = [("adamw", True, False), ("sgd", False, False), ("sgd", True, True), ("adamw", False, False)]


def _optimizer(model: nn.Module, name: str) -> torch.optim.Optimizer:
    """As train.build_optimizer: weight decay on matrices, none on the norms."""
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.5, momentum=0.9, foreach=True)
    return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), foreach=True)


def _steps(rank: int, world: int, cases: list[tuple]) -> dict:
    """3 steps of the reference and of the TP model (reduce_sequence_parallel_grads after
    each backward), float64."""
    group = dist.group.WORLD
    args = _args()
    batches = [_batch(args, seed) for seed in (1, 2, 3)]
    start = dict(_reference(args).named_parameters())
    refs = {}
    for name in {c[0] for c in cases}:
        ref = _reference(args)
        opt = _optimizer(ref, name)
        for tokens, labels in batches:
            _loss(ref(tokens), labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        refs[name] = dict(ref.named_parameters())
    out = {}
    for name, sp, async_tp in cases:
        model = _tp_model(args, group, sequence_parallel=sp, async_tp=async_tp)
        opt = _optimizer(model, name)
        for tokens, labels in batches:
            _loss(model(tokens), labels, group).backward()
            tp.reduce_sequence_parallel_grads(model.parameters(), group)
            opt.step()
            opt.zero_grad(set_to_none=True)
        ref_params = refs[name]
        out[(name, sp, async_tp)] = dict(
            err={n: _err(p, ref_params[n][_slice(p)]) for n, p in model.named_parameters()},
            moved={n: _err(p, start[n]) for n, p in ref_params.items()},
            params={n: (p.detach().clone(), hasattr(p, "tp_shard_dim")) for n, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_steps_match_single_process_and_replicas_stay_identical(world):
    """3 AdamW / SGD steps in float64, with and without SP (and async TP): every
    parameter equals the single-process run's slice; the replicated parameters (norms)
    are bitwise identical on every TP rank, the shards differ."""
    results = _suite_results(world, "steps")
    for case in _STEP_CASES:
        for rank, r in enumerate(results):
            r = r[case]
            bad = {n: e for n, e in r["err"].items() if not e <= STEP_BOUNDS_FLOAT64[case[0]]}
            assert not bad, (case, rank, bad)
            assert min(r["moved"].values()) > 1e-6, (case, r["moved"])  # every parameter really changed
        n_replicated = 0
        for name, (value, sharded) in results[0][case]["params"].items():
            n_replicated += not sharded
            for rank in range(1, world):
                other = results[rank][case]["params"][name][0]
                if sharded:
                    assert not torch.equal(other, value), (case, name, rank)
                else:
                    assert torch.equal(other, value), (case, name, rank)
        assert n_replicated == 2 * MODEL["n_layers"] + 1


# ---------------------------------------------------------------------------------------
# 6. Loss parity through train.main, float32, 10 steps

HEADS = ["model.n_heads=8", "model.n_kv_heads=4"]  # divisible by tp = 2 and 4 (GQA, head_dim 8)
SGD = ["training.optimizer=sgd", "training.lr=0.5", "training.momentum=0.9"]

# (name, model + optimizer overrides, world, layout overrides): each optimizer meets
# tp = 2 and tp = 4, SP on, loss parallel on and off.
_LOSS_RUNS = [
    ("tp2-sp-lp", HEADS, 2, ["parallel.tp=2"]),
    ("tp2-nosp-nolp-sgd", HEADS + SGD, 2,
     ["parallel.tp=2", "parallel.sequence_parallel=false", "parallel.loss_parallel=false"]),
    ("tp4-sp-nolp", HEADS, 4, ["parallel.tp=4", "parallel.loss_parallel=false"]),
    ("tp4-async-sgd", HEADS + SGD, 4, ["parallel.tp=4", "parallel.async_tp=true"]),
    ("tp2xdp2-sgd", HEADS + SGD, 4, ["parallel.tp=2", "parallel.dp_shard=2", "training.micro_batch_size=4"]),
]


@pytest.mark.parametrize("name, model_opt, world, layout", _LOSS_RUNS, ids=[r[0] for r in _LOSS_RUNS])
def test_loss_parity_through_train(tmp_path_factory, name, model_opt, world, layout):
    """DESIGN.md's criterion: same config in float32, same seed, same global batch ->
    the loss and the gradient norm at every one of 10 steps within
    distributed.PARITY_BOUNDS of the single-process run; every rank logs the same."""
    err = loss_parity(tmp_path_factory, world, model_opt, layout, timeout=180)
    assert not exceeding(err), (name, err)


# ---------------------------------------------------------------------------------------
# 7. Bad input


def _bad_input(rank: int, world: int) -> dict:
    group = dist.group.WORLD
    out = {}

    def attempt(key, fn):
        try:
            fn()
            out[key] = None
        except ValueError as e:
            out[key] = str(e)

    attempt("kv_heads", lambda: tp.apply_tp(llama.build_model(_args(n_kv_heads=1)), group))
    attempt("async_no_sp", lambda: tp.apply_tp(llama.build_model(_args()), group, sequence_parallel=False,
                                               async_tp=True))
    attempt("vocab", lambda: tp.apply_tp(llama.build_model(_args(vocab_size=129)), group))
    attempt("ffn", lambda: tp.apply_tp(llama.build_model(_args(multiple_of=1, ffn_dim_multiplier=1.01)), group))
    args = _args()
    tokens, _ = _batch(args, seq=7)  # SP cannot split 7 tokens over the ranks
    for async_tp in (False, True):
        model = _tp_model(args, group, async_tp=async_tp)
        attempt(f"seq_async{async_tp}", lambda: model(tokens))
    return out


def test_apply_tp_rejects_what_it_cannot_split():
    """apply_tp's ValueErrors name the numbers that do not divide; a sequence that SP
    cannot split fails at the first region boundary, before any collective."""
    out = _suite_results(2, "bad")[0]
    expected = {
        "kv_heads": ("parallel.tp=2", "model.n_heads=8", "model.n_kv_heads=1"),
        "async_no_sp": ("async_tp=true needs parallel.sequence_parallel=true",),
        "vocab": ("tok_embeddings.weight's vocabulary", "= 129", "parallel.tp=2"),
        "ffn": ("feed_forward.w1.weight's output features", "= 171", "parallel.tp=2"),
        "seq_asyncFalse": ("sequence parallel", "size 7", "degree 2"),
        "seq_asyncTrue": ("sequence parallel", "size 7", "degree 2"),
    }
    assert set(out) == set(expected)
    for key, words in expected.items():
        assert out[key] is not None, f"{key}: no ValueError"
        missing = [w for w in words if w not in out[key]]
        assert not missing, (key, missing, out[key])


def _cfg(*overrides: str):

    return config.load_config(os.path.join(ROOT, "configs/debug.yaml"), [*HEADS, *overrides])


@pytest.mark.parametrize("overrides, match", [
    (["parallel.tp=4", "model.n_kv_heads=2"], r"parallel.tp=4 must divide model.n_heads=8 and model.n_kv_heads=2"),
    (["parallel.tp=4", "model.vocab_size=4098"], r"parallel.tp=4 must divide model.vocab_size = 4098"),
    (["parallel.tp=4", "model.multiple_of=1"], r"parallel.tp=4 must divide the FFN hidden dim .* = 682"),
    (["parallel.tp=4", "data.seq_len=30"], r"data.seq_len \(/ parallel.cp under context parallel\) = 30 is not divisible by parallel.tp=4"),
    (["parallel.tp=4", "parallel.sequence_parallel=false", "parallel.async_tp=true"],
     r"async_tp=true needs parallel.sequence_parallel=true"),
])
def test_validate_rejects_tp_configs(overrides, match):

    with pytest.raises(ValueError, match=match):
        config.validate(_cfg(*overrides), 4)


def test_validate_accepts_what_tp_can_split():
    """The fixes the messages suggest are accepted: no SP lifts the sequence rule; async
    TP with SP is fine, with float8 linears too (their GEMMs run in the rings); TP x FSDP
    fills the world."""

    assert config.validate(_cfg("parallel.tp=4", "data.seq_len=30", "parallel.sequence_parallel=false"), 4)
    assert config.validate(_cfg("parallel.tp=4", "parallel.async_tp=true"), 4)
    for recipe in float8.RECIPES:
        assert config.validate(_cfg("parallel.tp=4", "parallel.async_tp=true", "float8.enabled=true",
                                    f"float8.recipe={recipe}"), 4)
    assert config.validate(_cfg("parallel.tp=2", "training.micro_batch_size=4"), 4).layout == "pp1 dp1x2 cp1 tp2"
