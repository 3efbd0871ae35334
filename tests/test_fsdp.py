"""FSDP / HSDP (fsdp.py) against the single-process oracle.

The multi-rank numerics tests compute the single-process reference too (in each rank:
the models are tiny) and compare with it; the others compare with exact formulas
(bytes, element counts) or exact event orders. Nothing here only checks that it ran.
  * float64 exactness: gathered gradients after one forward/backward (every knob:
    W = 2 and 4, reshard after forward on/off, gradient sync off for a micro-batch,
    activation checkpointing, shapes that do not divide by W and a parameter with
    fewer rows than ranks), and parameters after 3 AdamW / SGD steps (FSDP and HSDP;
    HSDP replicas bitwise identical);
  * float32 loss and grad-norm parity through train.main over 10 steps;
  * memory: per-rank bytes of shards + gradients + AdamW state, exactly;
  * communication: the bytes handed to each collective in one step, against the
    formulas of fsdp.py's docstring;
  * life cycle: which units hold full parameters when, prefetch order;
  * bad input;
  * bf16 mixed precision: loss and every gradient by name against the single-process
    bf16 step within bf16 rounding (a gradient off by 2 fails; cosine would pass it).
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

import fsdp
import llama
import config
import train
from distributed import STEP_BOUNDS_FLOAT64, exceeding, loss_parity, run_on_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every dim-0 size divides by 2 and 4 (ffn: 2/3 * 256 -> 192 with multiple_of 64).
EVEN = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128)
# Padding everywhere: vocab 125 and ffn 165 (multiple_of 1) are odd, dim 62 = 2 mod 4,
# and wk / wv have 1 KV head of head_dim 2, i.e. 2 rows: fewer than 4 ranks (ranks 2
# and 3 hold nothing but padding).
PADDED = dict(dim=62, n_layers=2, n_heads=31, n_kv_heads=1, vocab_size=125, multiple_of=1)
SHAPES = {"even": EVEN, "padded": PADDED}

BATCH, SEQ = 8, 16  # global batch of the direct model tests


# ---------------------------------------------------------------------------------------
# Helpers (run inside the ranks)


def _args(shape: str, **overrides) -> llama.ModelArgs:
    return llama.model_args("debug", **{**SHAPES[shape], **overrides})


def _reference(args: llama.ModelArgs, dtype: torch.dtype) -> llama.Transformer:
    """The single-process model: the global weights of init_weights(seed 0)."""
    model = llama.build_model(args, "cpu")
    llama.init_weights(model, args, 0)
    return model.to(dtype)


def _sharded(args: llama.ModelArgs, dtype: torch.dtype, group, **kwargs) -> tuple[llama.Transformer, fsdp.FSDPState]:
    """As train.py: meta model -> apply_fsdp -> materialize -> init the shards."""
    model = llama.build_model(args, "meta")
    state = fsdp.apply_fsdp(model, list(model.layers.values()), group, **kwargs)
    llama.materialize(model, "cpu")
    llama.init_weights(model, args, 0)
    return model.to(dtype), state


def _batches(args: llama.ModelArgs, n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, args.vocab_size, (BATCH, SEQ + 1), generator=gen)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def _micro(batch, micro: int, m: int, dp_rank: int, dp_size: int):
    """Rows of micro-batch m (of `micro`) that data-parallel rank dp_rank reads."""
    inputs, labels = batch
    rows = inputs.shape[0] // (micro * dp_size)
    lo = (m * dp_size + dp_rank) * rows
    return inputs[lo: lo + rows], labels[lo: lo + rows]


def _gather(p: torch.Tensor, group, world: int, grad: bool = False) -> torch.Tensor:
    """The global tensor (of the parameter shard p, or of its gradient) from every rank's
    padded dim-0 shard: all-gather, then drop the padding rows. Collective over group."""
    t = (p.grad if grad else p).detach().contiguous()
    out = t.new_empty((world * t.shape[0], *t.shape[1:]))
    dist.all_gather_single(out, t, group=group)  # comm: test only
    return out[: p.global_shape[0]]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _valid_rows(p: torch.Tensor) -> int:
    """Rows of this shard that lie inside the global tensor (the rest is padding)."""
    return max(0, min(p.shape[0], p.global_shape[0] - p.global_offset[0]))


def _layout_errors(model: nn.Module, rank: int, world: int, check_grad: bool) -> list[str]:
    """Every parameter is a shard of ceil(d0/W) rows at offset rank*c, its padding rows
    (and those of its gradient) exactly zero."""
    errors = []
    for name, p in model.named_parameters():
        c = math.ceil(p.global_shape[0] / world)
        if not getattr(p, "fsdp_shard", False) or p.shape[0] != c or p.global_offset[0] != rank * c:
            errors.append(f"{name}: shape {tuple(p.shape)} offset {p.global_offset} not a shard of "
                          f"{tuple(p.global_shape)}")
        v = _valid_rows(p)
        if p.detach()[v:].count_nonzero():
            errors.append(f"{name}: nonzero padding rows in the shard")
        if check_grad and (p.grad is None or p.grad.shape != p.shape or p.grad[v:].count_nonzero()):
            errors.append(f"{name}: gradient missing, misshaped or with nonzero padding rows")
    return errors


def _step(model, batch, micro: int, dp_rank: int, dp_size: int, state=None, sync_last_only=False) -> torch.Tensor:
    """One optimizer step's forward/backward over `micro` micro-batches; the summed loss."""
    tokens = batch[1].numel()  # the global batch's tokens: the loss denominator
    total = torch.zeros((), dtype=torch.float64)
    for m in range(micro):
        if state is not None and sync_last_only:
            fsdp.set_gradient_sync(state, m == micro - 1)
        inputs, labels = _micro(batch, micro, m, dp_rank, dp_size)
        loss = train.loss_fn(model(inputs), labels, tokens)
        loss.backward()
        total += loss.detach().double()
    return total


# ---------------------------------------------------------------------------------------
# 1. Gradient parity, float64


# (reshard_after_forward, gradient sync on the last micro-batch only, activation checkpointing)
_GRAD_CASES = [(True, False, False), (False, False, False), (True, True, False), (False, True, False)]


def _grad_parity(rank: int, world: int, shape: str, cases: list[tuple[bool, bool, bool]]) -> dict:
    args = _args(shape)
    batch = _batches(args, 1)[0]
    ref = _reference(args, torch.float64)
    ref_loss = _step(ref, batch, 2, 0, 1)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    group = dist.group.WORLD
    results = {}
    for reshard, sync_last, ac in cases:
        model, state = _sharded(args, torch.float64, group, reshard_after_forward=reshard)
        if ac:
            for block in model.layers.values():
                block.checkpoint_fn = functools.partial(checkpoint, use_reentrant=False)
        for _ in range(2):  # twice: nothing of the first step may leak into the second
            model.zero_grad(set_to_none=True)
            loss = _step(model, batch, 2, rank, world, state, sync_last)
        dist.all_reduce(loss)  # comm: test only
        errors = _layout_errors(model, rank, world, check_grad=True)
        grad_err = {n: _rel(_gather(p, group, world, grad=True), ref_grads[n]) for n, p in model.named_parameters()}
        results[(reshard, sync_last, ac)] = dict(loss_err=abs(loss.item() - ref_loss.item()) / ref_loss.item(),
                                                 grad_err=grad_err, errors=errors)
    return results


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("shape", ["even", "padded"])
def test_gradients_match_single_process_float64(world, shape):
    """Gathered shard gradients equal the single-process gradients by name, for every
    knob; shards have the documented layout with exactly-zero padding."""
    _check_grad_parity(run_on_ranks(_grad_parity, world, shape, _GRAD_CASES, timeout=120), shape, _GRAD_CASES)


def _check_grad_parity(results: list[dict], shape: str, cases: list) -> None:
    names = {n for n, _ in llama.build_model(_args(shape)).named_parameters()}
    for rank, by_case in enumerate(results):
        assert set(by_case) == set(cases)
        for case, r in by_case.items():
            assert r["errors"] == [], (rank, case, r["errors"])
            assert set(r["grad_err"]) == names
            bad = {n: e for n, e in r["grad_err"].items() if not e <= 1e-12}
            assert not bad, (rank, case, bad)
            assert r["loss_err"] <= 1e-13, (rank, case, r["loss_err"])


@pytest.mark.parametrize("reshard", [True, False])
def test_activation_checkpointing_composes_with_fsdp(reshard):
    """Blocks recomputed in backward (non-reentrant checkpoint, as train.py's AC) inside
    FSDP units: the same gradients, float64, with and without reshard after forward
    (the recompute then runs on the re-gathered parameters)."""
    cases = [(reshard, False, True), (reshard, True, True)]
    _check_grad_parity(run_on_ranks(_grad_parity, 2, "padded", cases, timeout=120), "padded", cases)


# ---------------------------------------------------------------------------------------
# 2. Parameters after optimizer steps, float64; HSDP replicas identical


def _groups(world: int, replicate: int):
    """(shard group, replicate group or None, dp_rank) for the [dp_replicate, dp_shard]
    layout of train.py: rank = replica * shard + shard_rank."""
    shard = world // replicate
    rank = dist.get_rank()
    if replicate == 1:
        return dist.group.WORLD, None, rank
    mine = {}
    for kind, lists in (("shard", [[r * shard + s for s in range(shard)] for r in range(replicate)]),
                        ("replicate", [[r * shard + s for r in range(replicate)] for s in range(shard)])):
        for ranks in lists:  # every rank creates every group, in the same order
            g = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = g
    return mine["shard"], mine["replicate"], rank


def _step_parity(rank: int, world: int, shape: str, optimizer: str, replicate: int) -> dict:
    args = _args(shape)
    # SGD without weight decay: the parameters then move by their gradients alone.
    tc = config.TrainingConfig(optimizer=optimizer, lr=1e-2 if optimizer == "adamw" else 2.0, momentum=0.9,
                              weight_decay=0.1 if optimizer == "adamw" else 0.0)
    batches = _batches(args, 3)
    ref = _reference(args, torch.float64)
    ref_opt = train.build_optimizer(ref, tc)
    for batch in batches:
        _step(ref, batch, 1, 0, 1)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    shard_group, replicate_group, dp_rank = _groups(world, replicate)
    W = world // replicate
    model, state = _sharded(args, torch.float64, shard_group, replicate_group=replicate_group)
    opt = train.build_optimizer(model, tc)
    fsdp.check_optimizer(opt)
    for batch in batches:
        _step(model, batch, 1, dp_rank, world, state)
        opt.step()
        opt.zero_grad(set_to_none=True)
    ref_params = dict(ref.named_parameters())
    err = {n: _rel(_gather(p, shard_group, W), ref_params[n]) for n, p in model.named_parameters()}
    start = _reference(args, torch.float64)
    moved = {n: _rel(ref_params[n], p) for n, p in start.named_parameters()}
    return dict(err=err, errors=_layout_errors(model, rank % W, W, check_grad=False), moved=moved,
                shards={n: p.detach().clone() for n, p in model.named_parameters()})


@pytest.mark.parametrize("shape, optimizer, world, replicate", [
    ("even", "adamw", 2, 1),
    ("padded", "sgd", 4, 1),
    ("padded", "adamw", 4, 1),
    ("padded", "adamw", 4, 2),  # HSDP 2 x 2
    ("even", "sgd", 4, 2),  # HSDP 2 x 2
    ("padded", "sgd", 2, 2),  # HSDP with a shard group of 1: a pure all-reduce of the gradients
])
def test_parameters_after_steps_match_single_process_float64(shape, optimizer, world, replicate):
    results = run_on_ranks(_step_parity, world, shape, optimizer, replicate, timeout=120)
    for rank, r in enumerate(results):
        assert r["errors"] == [], (rank, r["errors"])
        bad = {n: e for n, e in r["err"].items() if not e <= STEP_BOUNDS_FLOAT64[optimizer]}
        assert not bad, (rank, bad)
        assert min(r["moved"].values()) > 1e-5, r["moved"]  # every parameter really changed: the steps were not no-ops
    shard = world // replicate
    for rank in range(shard, world):  # HSDP: replica k's shards equal replica 0's, bitwise
        for name, t in results[rank]["shards"].items():
            assert torch.equal(t, results[rank % shard]["shards"][name]), (rank, name)
    if shard > 1:  # while the shard ranks of a replica hold different rows
        assert not torch.equal(results[0]["shards"]["output.weight"], results[1]["shards"]["output.weight"])


# ---------------------------------------------------------------------------------------
# 3. Loss parity through train.main, float32, 10 steps


# The padded model for train.main: the vocab must hold the builtin tokenizer's 4096 ids,
# so 4097 rows (odd), dim 62 (2 mod 4), ffn 165, and wk / wv of 2 rows (< 4 ranks).
PADDED_TRAIN = ["model.vocab_size=4097", "model.dim=62", "model.n_heads=31", "model.n_kv_heads=1",
                "model.multiple_of=1"]
SGD = ["training.optimizer=sgd", "training.lr=0.5", "training.momentum=0.9"]

# (name, model + optimizer overrides, world, layout overrides); each combines knobs so
# that every one of them meets both optimizers and both FSDP degrees somewhere.
_LOSS_RUNS = [
    ("shard2-accum2-reshard", [], 2,
     ["parallel.dp_shard=2", "training.micro_batch_size=2", "parallel.fsdp_reshard_after_forward=true"]),
    ("shard4-noreshard-sgd", SGD, 4,
     ["parallel.dp_shard=4", "training.micro_batch_size=2", "parallel.fsdp_reshard_after_forward=false"]),
    ("hsdp2x2-accum2-reduce-per-step", [], 4,
     ["parallel.dp_replicate=2", "parallel.dp_shard=2", "training.micro_batch_size=1",
      "parallel.fsdp_reduce_per_step=true"]),
    ("shard2-accum2-reduce-per-step-noreshard-sgd", SGD, 2,
     ["parallel.dp_shard=2", "training.micro_batch_size=2", "parallel.fsdp_reduce_per_step=true",
      "parallel.fsdp_reshard_after_forward=false"]),
    ("padded-shard4-accum2-reduce-per-step", PADDED_TRAIN, 4,
     ["parallel.dp_shard=4", "training.micro_batch_size=1", "parallel.fsdp_reduce_per_step=true"]),
    ("padded-hsdp2x2-sgd", PADDED_TRAIN + SGD, 4,
     ["parallel.dp_replicate=2", "parallel.dp_shard=2", "training.micro_batch_size=2"]),
]
@pytest.mark.parametrize("name, model_opt, world, layout", _LOSS_RUNS, ids=[r[0] for r in _LOSS_RUNS])
def test_loss_parity_through_train(tmp_path_factory, name, model_opt, world, layout):
    """DESIGN.md's criterion: same config in float32, same seed, same global batch ->
    the loss and the gradient norm at every one of 10 steps within
    distributed.PARITY_BOUNDS of the single-process run; every rank logs the same."""
    err = loss_parity(tmp_path_factory, world, model_opt, layout, timeout=180)
    assert not exceeding(err), (name, err)


# ---------------------------------------------------------------------------------------
# 4. Memory: shards + gradients + AdamW state per rank


def _memory(rank: int, world: int, shape: str) -> dict:
    args = _args(shape)
    model, state = _sharded(args, torch.float32, dist.group.WORLD)
    opt = train.build_optimizer(model, config.TrainingConfig(optimizer="adamw", lr=1e-3))
    _step(model, _batches(args, 1)[0], 1, rank, world, state)
    opt.step()
    storages, step_bytes, names = {}, 0, set()
    for p in model.parameters():
        tensors = [p, p.grad] + [v for k, v in opt.state[p].items() if k != "step"]
        names.update(k for k in opt.state[p])
        for t in tensors:
            assert t.shape == p.shape and t.dtype == torch.float32
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        step_bytes += opt.state[p]["step"].numel()
    return dict(bytes=sum(storages.values()), steps=step_bytes, state_keys=sorted(names),
                gathered=[u.full is not None or u.gather is not None or u.accumulated is not None
                          for u in state.units],
                layout={n: (tuple(p.shape), _valid_rows(p)) for n, p in model.named_parameters()})


@pytest.mark.parametrize("world, shape", [(2, "even"), (4, "padded")])
def test_memory_per_rank_is_the_padded_shard(world, shape):
    """After one AdamW step, each rank holds exactly 16 bytes (fp32 shard, gradient,
    exp_avg, exp_avg_sq) per element of its padded shards: 16 * (Psi + padding) / W,
    counted by distinct storage (a shard or gradient that is a view of a larger buffer
    would count the whole buffer)."""
    args = _args(shape)
    shapes = [p.shape for p in llama.build_model(args).parameters()]
    psi = llama.num_params(args)
    assert sum(math.prod(s) for s in shapes) == psi
    shard = sum(math.ceil(s[0] / world) * math.prod(s[1:]) for s in shapes)  # padded elements per rank
    padding = world * shard - psi
    assert (padding == 0) == (shape == "even")
    results = run_on_ranks(_memory, world, shape)
    for rank, r in enumerate(results):
        assert r["state_keys"] == ["exp_avg", "exp_avg_sq", "step"]
        assert r["bytes"] == 16 * shard == 16 * (psi + padding) // world, (rank, r["bytes"], 16 * shard)
        assert r["steps"] == len(shapes)  # plus one scalar step count per parameter
        assert r["gathered"] == [False] * len(r["gathered"])  # no full parameters or buffers left behind
    if shape == "padded":  # the padded shapes do what the tests rely on at W=4:
        layout = [r["layout"] for r in results]
        wk = "layers.0.attention.wk.weight"  # 2 rows: ranks 2 and 3 hold only padding
        assert [f[wk] for f in layout] == [((1, 62), 1), ((1, 62), 1), ((1, 62), 0), ((1, 62), 0)]
        assert layout[3]["output.weight"] == ((32, 62), 29)  # 125 rows: 3 padding rows on rank 3
        assert layout[3]["norm.weight"] == ((16,), 14)
        assert layout[3]["layers.1.feed_forward.w1.weight"] == ((42, 62), 39)  # ffn 165


# ---------------------------------------------------------------------------------------
# 5. Communication: bytes handed to each collective in one step

_WATCHED = ("all_gather_single", "reduce_scatter_single", "all_reduce", "all_gather_into_tensor",
            "reduce_scatter_tensor", "all_gather", "reduce_scatter", "all_to_all_single", "all_to_all",
            "broadcast", "reduce", "gather", "scatter", "barrier", "send", "recv", "isend", "irecv",
            "batch_isend_irecv")


def _comm(rank: int, world: int, replicate: int, param_dtype: str | None, reshard: bool, micro: int,
          sync_last_only: bool) -> list[tuple]:
    """Counts every collective of one training step (forward, backward, optimizer step)
    by wrapping the torch.distributed functions in this process only: (phase, name,
    bytes of the tensor handed in, group size)."""
    args = _args("padded")
    shard_group, replicate_group, dp_rank = _groups(world, replicate)
    model, state = _sharded(args, torch.float32, shard_group, replicate_group=replicate_group,
                            param_dtype=getattr(torch, param_dtype) if param_dtype else None,
                            reshard_after_forward=reshard)
    opt = train.build_optimizer(model, config.TrainingConfig(optimizer="adamw", lr=1e-3))
    batch = _batches(args, 1)[0]
    log, phase = [], ["setup"]

    def wrap(name, fn):
        def counted(*a, **k):
            t = a[1] if name in ("all_gather_single", "reduce_scatter_single") else (a[0] if a else None)
            nbytes = t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
            log.append((phase[0], name, nbytes, dist.get_world_size(k.get("group"))))
            return fn(*a, **k)
        return counted

    originals = {n: getattr(dist, n) for n in _WATCHED}
    try:
        for n, fn in originals.items():
            setattr(dist, n, wrap(n, fn))
        tokens = batch[1].numel()
        for m in range(micro):
            if sync_last_only:
                fsdp.set_gradient_sync(state, m == micro - 1)
            inputs, labels = _micro(batch, micro, m, dp_rank, world)
            phase[0] = "forward"
            loss = train.loss_fn(model(inputs), labels, tokens)
            phase[0] = "backward"
            loss.backward()
        phase[0] = "step"
        opt.step()
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)
    return log


def _volumes(world: int) -> dict:
    """Padded elements per rank of all parameters (P/W) and of the block parameters
    (P_r/W: the resharded units), from the shapes alone."""
    per_rank = {"all": 0, "blocks": 0}
    for name, p in llama.build_model(_args("padded")).named_parameters():
        n = math.ceil(p.shape[0] / world) * math.prod(p.shape[1:])
        per_rank["all"] += n
        per_rank["blocks"] += n if name.startswith("layers.") else 0
    return per_rank


def _sum(log, phase, name):
    calls = [e for e in log if e[0] == phase and e[1] == name]
    return len(calls), sum(e[2] for e in calls), {e[3] for e in calls}


_COMM_CASES = {  # name: (world, replicate, param_dtype, reshard, micro-batches, sync on the last only)
    "fp32-reshard-2mb": (2, 1, None, True, 2, False),
    "bf16-reshard-2mb": (2, 1, "bfloat16", True, 2, False),
    "fp32-noreshard-1mb": (2, 1, None, False, 1, False),
    "fp32-reshard-2mb-sync-last": (2, 1, None, True, 2, True),
    "hsdp2x2": (4, 2, None, True, 1, False),
    "replicate2-shard1": (2, 2, None, True, 1, False),
    "world1": (1, 1, None, True, 2, False),
}


@pytest.fixture(scope="module")
def comm_logs():
    return {name: run_on_ranks(_comm, *case) for name, case in _COMM_CASES.items()}


@pytest.mark.parametrize("name", list(_COMM_CASES))
def test_communication_matches_the_formulas(comm_logs, name):
    """fsdp.py's docstring, per micro-batch and rank: forward all-gather P/W * b_p in
    one call per unit; backward all-gather P_r/W * b_p (resharded units: all but the
    root); reduce-scatter P * b_r per synced micro-batch; HSDP all-reduce P/W * b_r per
    reduce-scatter. Nothing else, and nothing at all in the optimizer step."""
    world, replicate, param_dtype, reshard, micro, sync_last = _COMM_CASES[name]
    W = world // replicate
    units = _args("padded").n_layers + 1
    v = _volumes(W)
    b_p = 2 if param_dtype == "bfloat16" else 4
    b_r = 4  # float32 reduce (bf16 params reduce in float32 by default)
    synced = 1 if sync_last else micro
    for rank, log in enumerate(comm_logs[name]):
        kinds = {(e[0], e[1]) for e in log}
        if W == 1:  # a shard group of one: no all-gather, no reduce-scatter
            expected_kinds = {("backward", "all_reduce")} if replicate > 1 else set()
        else:
            expected_kinds = {("forward", "all_gather_single"), ("backward", "reduce_scatter_single")}
            expected_kinds |= {("backward", "all_gather_single")} if reshard else set()
            expected_kinds |= {("backward", "all_reduce")} if replicate > 1 else set()
        assert kinds == expected_kinds, (rank, kinds)
        if W > 1:
            assert _sum(log, "forward", "all_gather_single") == (micro * units, micro * v["all"] * b_p, {W})
            if reshard:
                assert _sum(log, "backward", "all_gather_single") == (
                    micro * (units - 1), micro * v["blocks"] * b_p, {W})
            assert _sum(log, "backward", "reduce_scatter_single") == (synced * units, synced * W * v["all"] * b_r, {W})
        if replicate > 1:
            assert _sum(log, "backward", "all_reduce") == (synced * units, synced * v["all"] * b_r, {replicate})


def test_bf16_halves_the_all_gather_bytes(comm_logs):
    fp32, bf16 = comm_logs["fp32-reshard-2mb"][0], comm_logs["bf16-reshard-2mb"][0]
    for phase in ("forward", "backward"):
        n32, b32, _ = _sum(fp32, phase, "all_gather_single")
        n16, b16, _ = _sum(bf16, phase, "all_gather_single")
        assert n16 == n32 and b16 * 2 == b32 > 0
    assert _sum(fp32, "backward", "reduce_scatter_single") == _sum(bf16, "backward", "reduce_scatter_single")


def test_a_group_of_one_issues_no_collective(comm_logs):
    assert comm_logs["world1"] == [[]]


# ---------------------------------------------------------------------------------------
# 6. When parameters are gathered, prefetch order, eval


def _unit_state(model, state) -> dict:
    """Per unit (root first): full parameters alive, all-gather in flight; and the
    names of the model's parameters that are not shards at this moment."""
    return dict(full=[u.full is not None for u in state.units], gather=[u.gather is not None for u in state.units],
                unsharded=sorted(n for n, p in model.named_parameters() if not getattr(p, "fsdp_shard", False)))


def _lifecycle(rank: int, world: int, reshard: bool) -> dict:
    args = _args("even", n_layers=4)
    model, state = _sharded(args, torch.float64, dist.group.WORLD, reshard_after_forward=reshard)
    ref = _reference(args, torch.float64)
    units = state.units
    index = {id(u): i for i, u in enumerate(units)}
    events = []  # ("issue" | "finish" | "compute" | "reduce", unit index, units holding full params)

    def alive():
        return sum(u.full is not None or u.gather is not None for u in units)

    for u in units:
        i = index[id(u)]
        start, finish, reduce = u.start_gather, u.finish_gather, u.reduce_grads

        def start_gather(i=i, u=u, start=start):
            if u.gather is None and u.full is None:
                events.append(("issue", i, alive()))
            return start()

        def finish_gather(i=i, finish=finish):
            events.append(("finish", i, alive()))
            return finish()

        def reduce_grads(grads, i=i, reduce=reduce):
            events.append(("reduce", i, alive()))
            return reduce(grads)

        u.start_gather, u.finish_gather, u.reduce_grads = start_gather, finish_gather, reduce_grads
    for module in [model, *model.layers.values()]:  # runs after FSDP's pre-hook: the unit's compute starts
        i = next(j for j, u in enumerate(units) if u.module is module)
        module.register_forward_pre_hook(lambda m, a, i=i: events.append(("compute", i, alive())))

    inputs, labels = _batches(args, 1)[0]
    inputs, labels = _micro((inputs, labels), 1, 0, rank, world)
    out = dict(units=[type(u.module).__name__ for u in units])
    params = [id(p) for p in model.parameters()]
    loss = train.loss_fn(model(inputs), labels, labels.numel())
    out["after_forward"] = _unit_state(model, state)
    out["forward_events"], events[:] = list(events), []
    loss.backward()
    out["after_backward"] = _unit_state(model, state)
    out["backward_events"], events[:] = list(events), []
    out["grads"] = all(p.grad is not None for p in model.parameters())
    out["same_params"] = [id(p) for p in model.parameters()] == params  # the optimizer's objects
    with torch.no_grad():
        logits = model(inputs)
    out["after_eval"] = _unit_state(model, state)
    out["eval_err"] = _rel(logits, ref(inputs))
    return out


@pytest.mark.parametrize("reshard", [True, False])
def test_gathered_parameters_life_cycle(reshard):
    """reshard_after_forward=True: after forward only the root unit's parameters are
    gathered (blocks are shards again), the backward re-gathers each block, and at any
    moment at most the root + the running unit + the prefetched one are gathered.
    False: every unit stays gathered until its backward. After backward (and after a
    no_grad forward) every parameter is a shard again and no all-gather is in flight.
    The next unit's all-gather is always issued before the current unit computes."""
    results = run_on_ranks(_lifecycle, 2, reshard)
    r = results[0]
    n = len(r["units"])  # root + 4 blocks
    assert r["units"] == ["Transformer"] + ["TransformerBlock"] * (n - 1)
    root_params = ["norm.weight", "output.weight", "tok_embeddings.weight"]
    if reshard:
        assert r["after_forward"]["full"] == [True] + [False] * (n - 1)
        assert r["after_forward"]["unsharded"] == root_params
    else:
        assert r["after_forward"]["full"] == [True] * n
        assert len(r["after_forward"]["unsharded"]) == len(root_params) + 9 * (n - 1)
    assert r["after_forward"]["gather"] == [False] * n  # no prefetch left dangling
    for when in ("after_backward", "after_eval"):
        assert r[when] == dict(full=[False] * n, gather=[False] * n, unsharded=[]), when
    assert r["grads"] and r["same_params"] and r["eval_err"] <= 1e-13

    fwd = r["forward_events"]
    issued = [i for kind, i, _ in fwd if kind == "issue"]
    assert issued == list(range(n)), fwd  # one all-gather per unit, in module order
    for i in range(n - 1):  # prefetch: unit i+1's all-gather is issued before unit i computes
        assert _pos(fwd, "issue", i + 1) < _pos(fwd, "compute", i) < _pos(fwd, "finish", i + 1), fwd
    bwd = r["backward_events"]
    reduced = [i for kind, i, _ in bwd if kind == "reduce"]
    assert sorted(reduced) == list(range(n)) and reduced[:-1] == list(range(n - 1, 0, -1)), bwd
    if reshard:
        # re-gathered in reverse order; unit i-1's all-gather issued before unit i's gradients are done
        assert [i for kind, i, _ in bwd if kind == "issue"] == list(range(n - 1, 0, -1)), bwd
        for i in range(2, n):
            assert _pos(bwd, "issue", i - 1) < _pos(bwd, "reduce", i), bwd
        assert max(a for _, _, a in fwd + bwd) <= 3, (fwd, bwd)  # root + running + prefetched
    else:
        assert [e for e in bwd if e[0] == "issue"] == [], bwd


def _pos(events, kind, unit):
    return next(j for j, (k, i, _) in enumerate(events) if k == kind and i == unit)


# ---------------------------------------------------------------------------------------
# 7. Bad input


def test_apply_fsdp_needs_a_group():
    model = llama.build_model(_args("even"))
    with pytest.raises(ValueError, match="process group"):
        fsdp.apply_fsdp(model, list(model.layers.values()), None)


def _bad_input(rank: int, world: int) -> dict:
    args = _args("even")
    out = {}
    for case in ("block twice", "identity"):
        model = llama.build_model(args)
        blocks = list(model.layers.values())
        units = blocks + [blocks[-1]] if case == "block twice" else [nn.Identity(), *blocks]
        try:
            fsdp.apply_fsdp(model, units, dist.group.WORLD)
            out[case] = None
        except ValueError as e:
            out[case] = str(e)
    model = _reference(args, torch.float32)
    early = torch.optim.AdamW(model.parameters())  # built before sharding: holds the full parameters
    fsdp.apply_fsdp(model, list(model.layers.values()), dist.group.WORLD)
    try:
        fsdp.check_optimizer(early)
        out["early optimizer"] = None
    except ValueError as e:
        out["early optimizer"] = str(e)
    fsdp.check_optimizer(torch.optim.AdamW(model.parameters()))  # built after: fine

    # A block whose output is cut from the graph: its backward (and that of the block
    # before it) never runs; every rank raises at the end of backward instead of
    # skipping a reduce-scatter that the others would wait for.
    model, _ = _sharded(args, torch.float32, dist.group.WORLD)
    model.layers["1"].checkpoint_fn = lambda fn, *a: fn(*a).detach()
    inputs, labels = _micro(_batches(args, 1)[0], 1, 0, rank, world)
    try:
        train.loss_fn(model(inputs), labels, labels.numel()).backward()
        out["no backward"] = None
    except RuntimeError as e:
        out["no backward"] = str(e)
    return out


def test_bad_units_optimizer_built_before_sharding_and_a_skipped_backward():
    out = run_on_ranks(_bad_input, 2)[0]
    assert "TransformerBlock has no parameters of its own" in out["block twice"]
    assert "Identity has no parameters of its own" in out["identity"]
    assert "after apply_fsdp" in out["early optimizer"] and "unsharded parameter" in out["early optimizer"]
    assert "['TransformerBlock', 'TransformerBlock'] never ran" in out["no backward"], out["no backward"]


@pytest.mark.parametrize("overrides, world, match", [
    (["parallel.dp_shard=3"], 4, "multiply to 3"),
    (["parallel.dp_replicate=2", "parallel.dp_shard=2"], 2, "multiply to 4"),
    (["parallel.dp_replicate=3"], 4, "not divisible"),
    (["parallel.dp_shard=4", "training.micro_batch_size=4"], 4, "batch_size=8 is not divisible"),
])
def test_degrees_that_do_not_fit_the_world_are_rejected(overrides, world, match):
    cfg = config.load_config(os.path.join(ROOT, "configs/debug.yaml"), ["training.batch_size=8", *overrides])
    with pytest.raises(ValueError, match=match):
        config.validate(cfg, world)


# ---------------------------------------------------------------------------------------
# 8. Mixed precision: bf16 gather and compute, float32 shards and reduce

# The oracle is the single-process bf16 step on the same (bf16-rounded) weights. bf16 keeps
# 8 significant bits: one rounding is off by at most u = 2^-8 = 3.9e-3 relative.
# Gradients, by norm per parameter: the reference's bf16 gradient carries one rounding,
# each rank's bf16 local gradient another before the float32 reduce-scatter (and a sum of
# W of them can cancel): 4u = 1.6e-2; achieved <= 2.9e-3 (~0.6u, W = 2 and 4). A gradient
# off by a factor 2 or 1/W is off by 0.5-1, with cosine similarity still 1.
BF16_GRAD_BOUND = 4 * 2.0 ** -8
# The loss: both sides take the float32 mean of the same bf16 logits (the forward is
# row-wise), so only float32 order differs: <= 4.5e-8 achieved. Rounding the weights to
# bf16 at all moves it by 8e-5, 80x the bound.
BF16_LOSS_BOUND = 1e-6


def _bf16(rank: int, world: int) -> dict:
    args = _args("padded")
    batch = _batches(args, 1)[0]
    ref = _reference(args, torch.float32).to(torch.bfloat16)  # the same weights, rounded to bf16
    ref_loss = _step(ref, batch, 1, 0, 1)
    model, state = _sharded(args, torch.float32, dist.group.WORLD, param_dtype=torch.bfloat16)
    loss = _step(model, batch, 1, rank, world, state)
    dist.all_reduce(loss)  # comm: test only
    out = dict(loss=loss.item(), ref_loss=ref_loss.item(), err={}, err_x2={}, cos_x2={}, dtypes=set())
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        out["dtypes"].add((p.dtype, p.grad.dtype))
        g, want = _gather(p, dist.group.WORLD, world, grad=True), q.grad.float()
        out["err"][name] = _rel(g, want)
        out["err_x2"][name] = _rel(2 * g, want)  # a gradient off by a factor W = 2
        out["cos_x2"][name] = torch.nn.functional.cosine_similarity(2 * g.flatten(), want.flatten(), dim=0).item()
    return out


def test_bf16_mixed_precision_gradients_match_single_process_bf16():
    """bf16 all-gather and compute, float32 master shards, float32 reduce-scatter: the
    loss and every gathered gradient by name equal the single-process bf16 step's within
    bf16 rounding; twice the gradient fails the bound (cosine similarity passes it)."""
    for r in run_on_ranks(_bf16, 2):
        assert abs(r["loss"] - r["ref_loss"]) <= BF16_LOSS_BOUND * r["ref_loss"], (r["loss"], r["ref_loss"])
        bad = {n: e for n, e in r["err"].items() if not e <= BF16_GRAD_BOUND}
        assert not bad and len(r["err"]) == 2 + 9 * 2 + 1, (bad, len(r["err"]))
        assert min(r["err_x2"].values()) > 50 * BF16_GRAD_BOUND, r["err_x2"]  # the bound sees a wrong scale ...
        assert min(r["cos_x2"].values()) > 0.999, r["cos_x2"]  # ... which cosine similarity cannot
        assert r["dtypes"] == {(torch.float32, torch.float32)}  # master shards and their gradients
