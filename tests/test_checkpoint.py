"""Sharded checkpoints (checkpoint.py) and their use in train.py.

What is proved here, each against an independent reference (never only "it ran"):
  * resharding matrix, done directly on models and optimizers: saved under one process,
    FSDP 2, TP 2, FSDP 2 x TP 2, HSDP 2 x 2 and FSDP 4 with padding (vocab 125, dim 62,
    2-row wk / wv: ranks holding only padding), loaded under other layouts (one process
    included) into models with another init seed and a fresh optimizer: every parameter
    and every AdamW state tensor, gathered by global_offset, is bitwise the saved one;
    FSDP padding rows stay zero; consolidate() gives the same full tensors; RNG states
    come back only under the saving layout (and then exactly);
  * dedup: metadata.json has one chunk per distinct shard (TP-replicated norms, HSDP
    replicas and Adam's scalar step written once, by the lowest rank holding them), the
    chunks tile every tensor exactly, and the files hold no byte twice;
  * exact resume through train.main (float32, CPU, losses compared with ==): one process
    (20 steps straight vs 20 steps saving every 10, step-20 deleted, rerun from latest;
    the rerun's step-20 checkpoint is byte-identical to the first one's) and FSDP 2
    ranks with async save; resume under another layout (TP 2 x FSDP 2 -> one process)
    within the float32 parity bounds of the uninterrupted run;
  * crash safety: a fault raised after a chunk / after the file / before the commit, and
    a real kill (os._exit in a subprocess) at the same points, leave the previous
    checkpoint the latest and loadable; the next save of that step removes the stale
    step-N.tmp; a flipped or truncated byte is reported naming the file (load, verify
    and the verify CLI); keep prunes to the newest ones;
  * async save: the snapshot is taken when save() returns (parameters and optimizer
    state mutated while the writer is held back are saved with their old values); at
    most one save in flight (the next snapshot happens after the previous commit);
    writer errors come back from wait(), the next save and close() as CheckpointError;
  * preemption: SIGTERM to `python train.py` exits 0 with a checkpoint at the last
    logged step, and a rerun from it continues at the next step with the loss the
    uninterrupted run has there (bitwise); under `torchrun --max-restarts 1` with
    checkpoint.load=latest, a SIGKILLed worker makes the job restart from the latest
    checkpoint and finish (exit 0) with the uninterrupted run's losses (bitwise);
  * interop: `python checkpoint.py export` writes a weights_only-loadable dict with
    Meta's Llama names equal to the consolidated weights; load_consolidated fills FSDP,
    TP and FSDP x TP shards with their slices; train.py's checkpoint.initial starts from
    those weights (first loss equal to a direct forward);
  * safety: nothing is unpickled (a pickle whose __reduce__ would create a file creates
    nothing via load_consolidated, metadata.json or a .bin with valid CRCs);
  * bad input: no metadata.json, another model shape, a missing tensor, AdamW into SGD,
    another training.batch_size: clear errors naming what differs.
Edge cases at the end: pruning never removes the checkpoint just saved, a garbled
metadata.json or a missing data file is a CheckpointError.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib

import pytest
import torch
import torch.distributed as dist

import checkpoint
import data
import fsdp
import llama
import parallelize
import tensor_parallel
import config
import train
from checkpoint import CheckpointError
from distributed import PARITY_BOUNDS, run_on_ranks, train_argv, train_rank
from test_fsdp import PADDED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def _fast_setup():
    """Runtime only. (1) One intra-op thread in this process, as in the ranks: the
    models are tiny, and 2 threads on a busy 2-core machine are 5-10x slower. Exact
    comparisons are always between runs made with the same thread count. (2)
    run_on_ranks forks each rank from a forkserver that preloads torch only, so each of
    this module's 7 calls would import train in every rank (fsdp pulls in
    torch._dynamo: 2-5 s a call here). If no module has started the server yet, start
    it preloading train and this module too (no effect otherwise; the ranks are still
    fresh forks, with no state from pytest)."""
    import multiprocessing as mp
    from multiprocessing import forkserver

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed", "train", "test_checkpoint"])
    forkserver.ensure_running()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------
# Helpers for the direct (not train.main) tests; the rank functions run in the ranks.

EVEN = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=128)  # TP 2 divides everything
SHAPES = {"even": EVEN, "padded": PADDED}  # padded: FSDP-only layouts (TP needs divisibility)
# layout -> (dp_replicate, dp_shard, tp), as train.py's [dp_replicate, dp_shard, tp] grid
LAYOUTS = {"single": (1, 1, 1), "fsdp2": (1, 2, 1), "tp2": (1, 1, 2), "fsdp4": (1, 4, 1),
           "fsdp2xtp2": (1, 2, 2), "hsdp2x2": (2, 2, 1)}
TC = config.TrainingConfig(optimizer="adamw", lr=1e-2, weight_decay=0.1)
SAVE_STEP = 7


_GROUPS: dict[str, dict] = {}  # per rank process: layout -> {kind: this rank's group}


def _layout_groups(layout: str) -> dict:
    """This rank's tp / dp_shard_cp / dp_replicate groups (train.py's rank grid), made
    once per layout: every rank creates every group of a kind, in the same order."""
    if layout not in _GROUPS:
        rep, shard, tp = LAYOUTS[layout]
        degrees = dict(pp=1, dp_replicate=rep, dp_shard=shard, cp=1, tp=tp)
        mine = {}
        for kind in ("tp", "dp_shard_cp", "dp_replicate"):
            for ranks in parallelize.group_ranks(degrees, parallelize.GROUPS[kind]):
                group = dist.new_group(ranks)
                if dist.get_rank() in ranks:
                    mine[kind] = group
        _GROUPS[layout] = mine
    return _GROUPS[layout]


def _build(layout: str, shape: str, seed: int) -> llama.Transformer:
    """As train.py: meta model -> TP -> FSDP / HSDP -> materialize -> init (seed)."""
    rep, shard, tp = LAYOUTS[layout]
    world = dist.get_world_size() if dist.is_initialized() else 1
    assert rep * shard * tp == world, (layout, world)
    args = llama.model_args("debug", **SHAPES[shape])
    model = llama.build_model(args, "meta")
    if world > 1:
        groups = _layout_groups(layout)
        if tp > 1:
            tensor_parallel.apply_tp(model, groups["tp"])
        if rep * shard > 1:
            fsdp.apply_fsdp(model, list(model.layers.values()), groups["dp_shard_cp"], groups["dp_replicate"])
    llama.materialize(model, "cpu")
    llama.init_weights(model, args, seed)
    return model


def _place(p: torch.Tensor) -> tuple[tuple, tuple, int]:
    """(global shape, global offset, rows of the local tensor inside the global one)."""
    shape = tuple(getattr(p, "global_shape", p.shape))
    offset = tuple(getattr(p, "global_offset", (0,) * p.dim()))
    rows = max(0, min(p.shape[0], shape[0] - offset[0]))
    return shape, offset, rows


def _set_grads(model: torch.nn.Module, k: int) -> None:
    """Gradient k of every parameter: this rank's slice of a fixed global random tensor
    (zero on FSDP padding rows), so every layout takes the same optimizer steps and
    replicas stay identical, with no forward / backward (no collectives)."""
    for name, p in model.named_parameters():
        shape, offset, rows = _place(p)
        gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{k}".encode()))
        full = torch.randn(shape, generator=gen)
        g = torch.zeros_like(p)
        g[:rows] = full[tuple(slice(o, o + n) for o, n in zip(offset, (rows, *p.shape[1:])))]
        p.grad = g


def _local_state(model: torch.nn.Module, opt: torch.optim.Optimizer | None) -> dict:
    """name -> (global shape, global offset, local tensor without padding), for every
    parameter and optimizer state tensor, named as in the checkpoint."""
    out = {}
    for name, p in model.named_parameters():
        shape, offset, rows = _place(p)
        out[f"model.{name}"] = (shape, offset, p.detach()[:rows].clone())
        for key, v in (opt.state.get(p, {}) if opt is not None else {}).items():
            if v.dim() == 0:
                out[f"optim.{name}.{key}"] = ((), (), v.clone())
            else:
                out[f"optim.{name}.{key}"] = (shape, offset, v[:rows].clone())
    return out


def _padding_nonzero(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    n = 0
    for p in model.parameters():
        _, _, rows = _place(p)
        n += int(p.detach()[rows:].count_nonzero())
        for v in opt.state.get(p, {}).values():
            n += int(v[rows:].count_nonzero()) if v.dim() else 0
    return n


def _close(ck: checkpoint.Checkpointer) -> None:
    """ck.close(), after a barrier on its group. Without it, destroying the group while
    a peer still uses it makes the next Checkpointer's new_group fail now and then
    ("Gloo connectFullMesh failed ... Connection closed by peer"): see the report."""
    if ck.group is not None:
        dist.barrier(group=ck.group)
    ck.close()


def _save_one(layout: str, shape: str, root: str) -> dict:
    rank = dist.get_rank() if dist.is_initialized() else 0
    model = _build(layout, shape, seed=0)
    opt = train.build_optimizer(model, TC)
    for k in range(2):  # optimizer state exists and differs from the init
        _set_grads(model, k)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.manual_seed(1000 + rank)  # the RNG state the checkpoint holds (per rank)
    ck = checkpoint.Checkpointer(root, keep=2)
    ck.save(SAVE_STEP, model, opt, extra={"layout": layout, "shape": shape}, layout=layout)
    _close(ck)
    return dict(state=_local_state(model, opt), rng_next=torch.rand(4))


def _load_one(layout: str, shape: str, path: str) -> dict:
    model = _build(layout, shape, seed=1)  # other weights than the saved ones
    opt = train.build_optimizer(model, TC)  # fresh: no state yet
    torch.manual_seed(999)
    ck = checkpoint.Checkpointer(os.path.dirname(path))
    meta = ck.load(path, model, opt, layout=layout)
    _close(ck)
    return dict(state=_local_state(model, opt), padding=_padding_nonzero(model, opt), step=meta["step"],
                extra=meta["extra"], rng_restored=meta["rng_restored"], rng_next=torch.rand(4))


def _ck_root(root: str, layout: str, shape: str) -> str:
    return os.path.join(root, f"{layout}-{shape}")


def _ck_path(root: str, layout: str, shape: str) -> str:
    return os.path.join(_ck_root(root, layout, shape), f"step-{SAVE_STEP}")


def _matrix_ranks(rank: int, world: int, root: str, saves: list, loads: list, initial: list) -> dict:
    """Saves (layout, shape), then loads ((saved layout, shape), layout), then
    load_consolidated (layout, shape, .pt file); every rank returns its local state."""
    out = {"saved": {}, "loaded": {}, "initial": {}}
    for layout, shape in saves:
        out["saved"][(layout, shape)] = _save_one(layout, shape, _ck_root(root, layout, shape))
    for (saved, shape), layout in loads:
        out["loaded"][((saved, shape), layout)] = _load_one(layout, shape, _ck_path(root, saved, shape))
    for layout, shape, pt in initial:
        model = _build(layout, shape, seed=1)
        checkpoint.load_consolidated(pt, model)
        out["initial"][(layout, shape)] = _local_state(model, None)
    return out


def _assemble(pieces: list[dict]) -> dict[str, torch.Tensor]:
    """Full tensors from per-rank (shape, offset, local) pieces; every element must be
    covered, and pieces held by several ranks must agree."""
    full, cover = {}, {}
    for piece in pieces:
        for name, (shape, offset, t) in piece.items():
            if name not in full:
                full[name] = torch.zeros(shape, dtype=t.dtype)
                cover[name] = torch.zeros(shape, dtype=torch.bool)
            box = tuple(slice(o, o + n) for o, n in zip(offset, t.shape))
            seen = cover[name][box]
            assert torch.equal(full[name][box][seen], t[seen]), f"{name}: replicas differ"
            full[name][box] = t
            cover[name][box] = True
    for name, c in cover.items():
        assert bool(c.all()), f"{name}: {int((~c).sum())} elements held by no rank"
    return full


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), (what, sorted(set(got) ^ set(want)))
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), (what, name)


# ---------------------------------------------------------------------------------------
# 1. Resharding matrix

# (saved layout, shape) -> layouts it is loaded under
_PAIRS = [
    (("single", "even"), "fsdp2"), (("single", "even"), "tp2"), (("single", "even"), "fsdp2xtp2"),
    (("single", "padded"), "fsdp2"), (("single", "padded"), "fsdp4"),
    (("fsdp2", "even"), "fsdp2xtp2"), (("fsdp2", "even"), "single"),
    (("tp2", "even"), "hsdp2x2"), (("tp2", "even"), "single"),
    (("fsdp2xtp2", "even"), "fsdp2xtp2"),  # the same layout: RNG restored too
    (("fsdp2xtp2", "even"), "tp2"), (("fsdp2xtp2", "even"), "fsdp2"), (("fsdp2xtp2", "even"), "single"),
    (("hsdp2x2", "even"), "fsdp2"), (("hsdp2x2", "even"), "single"),
    (("fsdp4", "padded"), "fsdp2"), (("fsdp4", "padded"), "single"),
]
_WORLD = {name: math.prod(d) for name, d in LAYOUTS.items()}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("matrix"))
    saved, loaded, initial = {}, {}, {}

    def merge(results):
        for r in results:
            for key, v in r["saved"].items():
                saved.setdefault(key, []).append(v)
            for key, v in r["loaded"].items():
                loaded.setdefault(key, []).append(v)
            for key, v in r["initial"].items():
                initial.setdefault(key, []).append(v)

    # One process, in this process (no process group: Checkpointer is world 1).
    pts = {}
    for shape in SHAPES:
        saved[("single", shape)] = [_save_one("single", shape, _ck_root(root, "single", shape))]
        pts[shape] = os.path.join(root, f"single-{shape}.pt")
        checkpoint.main(["export", _ck_path(root, "single", shape), pts[shape]])

    def loads(world, ready):
        return [(s, l) for s, l in _PAIRS if _WORLD[l] == world and s in ready and (s, l) not in loaded]

    merge(run_on_ranks(_matrix_ranks, 2, root, [("fsdp2", "even"), ("tp2", "even")],
                       loads(2, set(saved)), [("fsdp2", "padded", pts["padded"]), ("tp2", "even", pts["even"])],
                       timeout=120))
    saves4 = [("fsdp2xtp2", "even"), ("hsdp2x2", "even"), ("fsdp4", "padded")]
    merge(run_on_ranks(_matrix_ranks, 4, root, saves4, loads(4, set(saved) | set(saves4)),
                       [("fsdp2xtp2", "even", pts["even"]), ("fsdp4", "padded", pts["padded"])], timeout=120))
    merge(run_on_ranks(_matrix_ranks, 2, root, [], loads(2, set(saved)), [], timeout=120))
    for (s, shape), layout in loads(1, set(saved)):
        loaded[((s, shape), layout)] = [_load_one(layout, shape, _ck_path(root, s, shape))]
    assert sorted(loaded) == sorted(_PAIRS)
    return root, saved, loaded, initial


@pytest.mark.parametrize("saved_as, load_as", _PAIRS, ids=[f"{s[0]}-{s[1]}-to-{l}" for s, l in _PAIRS])
def test_reshard_is_bitwise(matrix, saved_as, load_as):
    """Every parameter and AdamW state tensor loaded under another layout (another init
    seed, a fresh optimizer) equals the saved one bitwise; padding rows stay zero; the
    RNG states come back exactly under the saving layout only."""
    root, saved, loaded, _ = matrix
    want = _assemble([r["state"] for r in saved[saved_as]])
    assert any(n.endswith(".exp_avg_sq") for n in want) and want["optim.output.weight.step"].item() == 2
    results = loaded[(saved_as, load_as)]
    _assert_same(_assemble([r["state"] for r in results]), want, (saved_as, load_as))
    for rank, r in enumerate(results):
        assert r["padding"] == 0, (rank, "nonzero FSDP padding rows after load")
        assert r["step"] == SAVE_STEP and r["extra"] == {"layout": saved_as[0], "shape": saved_as[1]}
        assert r["rng_restored"] == (load_as == saved_as[0]), rank
        if r["rng_restored"]:  # the draws after load are the draws after save, per rank
            assert torch.equal(r["rng_next"], saved[saved_as][rank]["rng_next"])
        elif rank < len(saved[saved_as]):
            assert not torch.equal(r["rng_next"], saved[saved_as][rank]["rng_next"])


@pytest.mark.parametrize("saved_as", sorted({s for s, _ in _PAIRS}), ids=lambda s: f"{s[0]}-{s[1]}")
def test_chunks_are_deduplicated_and_tile_every_tensor(matrix, saved_as):
    """metadata.json: one chunk per distinct shard, written by the lowest rank holding
    it; the chunks cover every element once; the files hold exactly the tensor bytes
    (plus each rank's RNG state); consolidate() gives the saved full tensors."""
    root, saved, _, _ = matrix
    path = _ck_path(root, *saved_as)
    with open(os.path.join(path, "metadata.json")) as f:
        meta = json.load(f)
    ranks = saved[saved_as]
    assert meta["world_size"] == len(ranks) and meta["layout"] == saved_as[0] and meta["step"] == SAVE_STEP
    holders = {}  # name -> {(offset, shape): lowest rank}
    for rank, r in enumerate(ranks):
        for name, (_, offset, t) in r["state"].items():
            if t.numel():
                holders.setdefault(name, {}).setdefault((tuple(offset), tuple(t.shape)), rank)
    tensors = {n: i for n, i in meta["tensors"].items() if not n.startswith("rng.")}
    assert sorted(tensors) == sorted(ranks[0]["state"])
    for name, info in tensors.items():
        chunks = {(tuple(c["offset"]), tuple(c["shape"])): c["file"] for c in info["chunks"]}
        assert len(chunks) == len(info["chunks"]), (name, "a chunk written twice")
        assert chunks == {box: f"rank-{r:05d}.bin" for box, r in holders[name].items()}, name
        cover = torch.zeros(info["shape"], dtype=torch.int32)
        for offset, shape in chunks:
            cover[tuple(slice(o, o + n) for o, n in zip(offset, shape))] += 1
        assert bool((cover == 1).all()), (name, "chunks do not tile the tensor")
    rng = {n: i for n, i in meta["tensors"].items() if n.startswith("rng.")}
    assert sorted(rng) == [f"rng.rank{r}.cpu" for r in range(len(ranks))]
    tensor_bytes = sum(math.prod(i["shape"]) * 4 for i in tensors.values())
    rng_bytes = sum(math.prod(i["shape"]) for i in rng.values())
    assert sum(f["nbytes"] for f in meta["files"].values()) == tensor_bytes + rng_bytes
    assert sum(os.path.getsize(os.path.join(path, f)) for f in meta["files"]) == tensor_bytes + rng_bytes
    # Spot checks of the expected counts.
    counts = {n: len(i["chunks"]) for n, i in tensors.items()}
    assert all(c == 1 for n, c in counts.items() if n.endswith(".step"))  # Adam's scalar: once
    norm, wq, wk = "model.layers.0.attention_norm.weight", "model.layers.0.attention.wq.weight", \
        "model.layers.0.attention.wk.weight"
    expected = {"single": (1, 1, 1), "fsdp2": (2, 2, 2), "tp2": (1, 2, 2), "fsdp2xtp2": (2, 4, 4),
                "hsdp2x2": (2, 2, 2), "fsdp4": (4, 4, 2)}[saved_as[0]]  # fsdp4 padded: wk has 2 rows
    assert (counts[norm], counts[wq], counts[wk]) == expected
    if saved_as[0] == "hsdp2x2":  # the second replica writes nothing but its RNG state
        assert [meta["files"][f"rank-{r:05d}.bin"]["nbytes"] for r in (2, 3)] == \
            [math.prod(rng[f"rng.rank{r}.cpu"]["shape"]) for r in (2, 3)]
    want = _assemble([r["state"] for r in ranks])
    _assert_same({f"model.{n}": t for n, t in checkpoint.consolidate(path).items()},
                 {n: t for n, t in want.items() if n.startswith("model.")}, saved_as)


@pytest.mark.parametrize("layout, shape", [("tp2", "even"), ("fsdp2", "padded"), ("fsdp2xtp2", "even"),
                                           ("fsdp4", "padded")])
def test_load_consolidated_fills_each_shard_with_its_slice(matrix, layout, shape):
    """An exported file (checkpoint.py export) loaded with load_consolidated into a
    sharded model: the shards gather to the exported (= saved) tensors."""
    root, saved, _, initial = matrix
    want = {n: t for n, t in _assemble([r["state"] for r in saved[("single", shape)]]).items()
            if n.startswith("model.")}
    _assert_same(_assemble(initial[(layout, shape)]), want, layout)


# ---------------------------------------------------------------------------------------
# 2. Exact resume through train.main

STEPS = 20
TRAIN_MODEL = ["model.n_heads=8", "model.n_kv_heads=4", f"training.steps={STEPS}"]  # TP 2 divides the heads
DP2 = ["parallel.dp_shard=2", "training.micro_batch_size=4"]
TP2_DP2 = ["parallel.tp=2", "parallel.dp_shard=2", "training.micro_batch_size=4"]


def _argv(run_dir, *overrides: str) -> list[str]:
    return train_argv(str(run_dir), *TRAIN_MODEL, *overrides)


def _train_stop_at(rank: int, world: int, argv: list[str], stop_step: int) -> list[dict]:
    """train.main, with a SIGTERM raised on rank 0 during step `stop_step` (as a
    preemption): the run finishes that step, saves (if checkpointing) and stops."""
    real = train.lr_at

    def lr_at(step, t):
        if step == stop_step and rank == 0:
            signal.raise_signal(signal.SIGTERM)  # train.main's handler only sets a flag
        return real(step, t)

    train.lr_at = lr_at
    try:
        return train.main(argv)
    finally:
        train.lr_at = real


def _losses(history: list[dict]) -> list[float]:
    return [r["loss"] for r in history]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[dict]:
    """One process, 20 steps, no checkpoint: the uninterrupted run."""
    history = train.main(_argv(tmp_path_factory.mktemp("straight")))
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))
    assert history[-1]["loss"] < history[0]["loss"] - 0.1  # it trains: a wrong resume shows
    return history


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, straight):
    """The same run saving every 10 steps (synchronously): checkpoints step-10, step-20."""
    run_dir = tmp_path_factory.mktemp("saved")
    history = train.main(_argv(run_dir, "checkpoint.interval=10"))
    assert checkpoint.list_checkpoints(str(run_dir / "checkpoints")) == [10, 20]
    return run_dir, history


def test_resume_one_process_is_exact(straight, saved_run, tmp_path):
    """20 steps straight == saving every 10 (saving changes nothing) == 10 steps, then a
    rerun from latest (step-20 deleted): steps 11..20 have the same losses and grad
    norms, bitwise, and the rerun's step-20 checkpoint has the same bytes (parameters,
    AdamW state, RNG) as the first run's."""
    src, history = saved_run
    assert _losses(history) == _losses(straight)
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-20")
    resumed = train.main(_argv(run_dir, "checkpoint.interval=10", "checkpoint.load=latest"))
    assert [r["step"] for r in resumed] == list(range(11, STEPS + 1))
    assert _losses(resumed) == _losses(straight)[10:]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight][10:]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight][10:]
    a, b = src / "checkpoints" / "step-20", run_dir / "checkpoints" / "step-20"
    meta_a, meta_b = (json.loads((p / "metadata.json").read_text()) for p in (a, b))
    assert meta_a["tensors"] == meta_b["tensors"] and meta_a["extra"]["dataloader"] == meta_b["extra"]["dataloader"]
    assert (a / "rank-00000.bin").read_bytes() == (b / "rank-00000.bin").read_bytes()


@pytest.fixture(scope="module")
def fsdp2_straight(tmp_path_factory) -> list[dict]:
    """2 ranks (FSDP 2), 20 steps, no checkpoint: the uninterrupted run."""
    history = run_on_ranks(train_rank, 2, _argv(tmp_path_factory.mktemp("fsdp2"), *DP2), timeout=180)[0]
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))
    return history


def test_resume_fsdp2_with_async_save_is_exact(fsdp2_straight, tmp_path):
    """2 ranks (FSDP 2), async save: a run preempted at step 10 (saves there) and rerun
    from latest has, at steps 11..20, bitwise the losses of the uninterrupted 2-rank run."""
    ref = fsdp2_straight
    argv = _argv(tmp_path / "run", *DP2, "checkpoint.interval=10", "checkpoint.async_save=true")
    first = run_on_ranks(_train_stop_at, 2, argv, 10, timeout=180)[0]
    assert [r["step"] for r in first] == list(range(1, 11)) and _losses(first) == _losses(ref)[:10]
    assert checkpoint.list_checkpoints(str(tmp_path / "run" / "checkpoints")) == [10]
    out = run_on_ranks(train_rank, 2, argv + ["checkpoint.load=latest"], timeout=180)
    assert _losses(out[1]) == _losses(out[0])
    assert [r["step"] for r in out[0]] == list(range(11, STEPS + 1))
    assert _losses(out[0]) == _losses(ref)[10:]


def test_resume_under_another_layout(straight, tmp_path):
    """Saved by 4 ranks (TP 2 x FSDP 2, preempted at step 10), resumed by one process:
    steps 11..20 within distributed.PARITY_BOUNDS of the uninterrupted one-process run
    (float32 rounding only: <= 1.2e-7 loss, 6e-9 gradient norm achieved)."""
    run_on_ranks(_train_stop_at, 4, _argv(tmp_path, *TP2_DP2, "checkpoint.interval=10"), 10, timeout=180)
    meta = checkpoint.read_metadata(str(tmp_path / "checkpoints" / "step-10"))
    assert meta["world_size"] == 4 and meta["layout"] == "pp1 dp1x2 cp1 tp2"
    resumed = train.main(_argv(tmp_path, "checkpoint.load=latest"))
    assert [r["step"] for r in resumed] == list(range(11, STEPS + 1))
    for got, want in zip(resumed, straight[10:]):
        for key in ("loss", "grad_norm"):
            assert abs(got[key] - want[key]) <= PARITY_BOUNDS[key] * want[key], (got["step"], key, got[key], want[key])


# ---------------------------------------------------------------------------------------
# 3. Crash safety (one process: Checkpointer works without a process group)


def _small(seed: int, steps: int = 1):
    model = _build("single", "even", seed)
    opt = train.build_optimizer(model, TC)
    for k in range(steps):
        _set_grads(model, k)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def _loaded(ck_or_root, which: str = "latest") -> dict:
    """The full state a fresh model and optimizer get from loading `which`."""
    model, opt = _small(seed=5, steps=0)
    ck = checkpoint.Checkpointer(ck_or_root) if isinstance(ck_or_root, str) else ck_or_root
    assert ck.load(which, model, opt) is not None
    return _assemble([_local_state(model, opt)])


@pytest.mark.parametrize("stage", ["after_chunk", "after_file", "before_commit"])
def test_a_fault_during_save_leaves_the_previous_checkpoint(tmp_path, stage):
    root = str(tmp_path)
    model, opt = _small(seed=0)
    ck = checkpoint.Checkpointer(root)
    ck.save(1, model, opt)
    first = _assemble([_local_state(model, opt)])
    _set_grads(model, 1)
    opt.step()
    second = _assemble([_local_state(model, opt)])

    def fault(s):
        if s == stage:
            raise OSError(f"injected at {s}")

    ck.fault_hook = fault
    with pytest.raises(CheckpointError, match=f"step-2 was not saved under .*: rank 0: .*: injected at {stage}"):
        ck.save(2, model, opt)
    assert checkpoint.list_checkpoints(root) == [1]
    assert os.path.isdir(os.path.join(root, "step-2.tmp"))
    _assert_same(_loaded(root), first, "after the fault")
    ck.fault_hook = None
    ck.save(2, model, opt)  # the same step again: clears the stale step-2.tmp
    assert sorted(os.listdir(root)) == ["step-1", "step-2"]
    _assert_same(_loaded(root), second, "after the next save")


_KILLED_SAVES = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch, checkpoint
statuses = {{}}
for stage in sys.argv[2:]:
    pid = os.fork()  # one process per stage, killed in the middle of its second save
    if pid == 0:
        model = torch.nn.Linear(4, 3)
        with torch.no_grad():
            model.weight.copy_(torch.arange(12.0).reshape(3, 4)); model.bias.copy_(torch.arange(3.0))
        ck = checkpoint.Checkpointer(os.path.join(sys.argv[1], stage))
        ck.save(1, model, None)
        with torch.no_grad():
            model.weight.add_(100.0); model.bias.add_(100.0)
        ck.fault_hook = lambda s: os._exit(17) if s == stage else None
        ck.save(2, model, None)
        os._exit(3)  # not reached
    statuses[stage] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(statuses))
"""


def test_a_killed_save_leaves_the_previous_checkpoint(tmp_path):
    """A real kill (os._exit: no cleanup) mid-file, after the data is written, and after
    metadata.json is in step-2.tmp: step-1 is still the latest, intact, and loads."""
    stages = ["after_chunk", "after_file", "before_commit"]
    out = subprocess.run([sys.executable, "-c", _KILLED_SAVES.format(root=ROOT), str(tmp_path), *stages],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {s: 17 for s in stages}
    for stage in stages:
        root = str(tmp_path / stage)
        assert checkpoint.list_checkpoints(root) == [1], stage
        assert os.path.isdir(os.path.join(root, "step-2.tmp"))
        assert os.path.isfile(os.path.join(root, "step-2.tmp", "metadata.json")) == (stage == "before_commit")
        checkpoint.verify(os.path.join(root, "step-1"))
        model = torch.nn.Linear(4, 3)
        assert checkpoint.Checkpointer(root).load("latest", model, None)["step"] == 1
        assert torch.equal(model.weight.detach(), torch.arange(12.0).reshape(3, 4)), stage
        assert torch.equal(model.bias.detach(), torch.arange(3.0)), stage


def _chunk(path: str, name: str) -> dict:
    return checkpoint.read_metadata(path)["tensors"][name]["chunks"][0]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_file_is_reported_by_name(tmp_path, capsys, damage):
    model, opt = _small(seed=0)
    ck = checkpoint.Checkpointer(str(tmp_path))
    ck.save(1, model, opt)
    path = str(tmp_path / "step-1")
    checkpoint.verify(path)  # intact: passes
    chunk = _chunk(path, "model.layers.1.feed_forward.w2.weight")
    file = os.path.join(path, chunk["file"])
    with open(file, "r+b") as f:
        if damage == "flip":
            f.seek(chunk["byte_offset"] + chunk["nbytes"] // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x01]))  # one bit of one float
        else:  # the rest of the file from the middle of this chunk on
            f.truncate(chunk["byte_offset"] + chunk["nbytes"] // 2)
    fresh, fresh_opt = _small(seed=5, steps=0)
    with pytest.raises(CheckpointError, match=r"rank-00000\.bin"):
        ck.load("latest", fresh, fresh_opt)
    with pytest.raises(CheckpointError, match=r"rank-00000\.bin"):
        checkpoint.verify(path)
    with pytest.raises(SystemExit) as exit_info:
        checkpoint.main(["verify", path])
    assert exit_info.value.code == 2 and "rank-00000.bin" in capsys.readouterr().err


def test_keep_prunes_to_the_newest(tmp_path):
    model, opt = _small(seed=0)
    ck = checkpoint.Checkpointer(str(tmp_path), keep=2)
    for step in (10, 20, 30, 40):
        ck.save(step, model, opt)
    assert sorted(os.listdir(tmp_path)) == ["step-30", "step-40"]
    assert checkpoint.list_checkpoints(str(tmp_path)) == [30, 40]


# ---------------------------------------------------------------------------------------
# 4. Async save


class _HeldWriter:
    """Holds the writer thread at its first barrier (before it writes a byte) until
    released; records the order of snapshots and writer stages."""

    def __init__(self, ck: checkpoint.Checkpointer, monkeypatch):
        self.events, self.release, self.held = [], threading.Event(), threading.Event()
        ck._barrier = self._barrier  # world 1: the real barrier is a no-op
        ck.fault_hook = lambda stage: self.events.append(stage)
        real = checkpoint.local_chunks

        def snapshot(model, optimizer):
            self.events.append("snapshot")
            return real(model, optimizer)

        monkeypatch.setattr(checkpoint, "local_chunks", snapshot)

    def _barrier(self, step, failure):
        assert failure is None
        self.events.append("barrier")
        if self.events.count("barrier") == 1:
            self.held.set()
            assert self.release.wait(60), "never released"


def test_async_snapshot_is_taken_when_save_returns(tmp_path, monkeypatch):
    """Parameters and optimizer state mutated while the writer has not written a byte
    are saved with their values at save()."""
    model, opt = _small(seed=0)
    ck = checkpoint.Checkpointer(str(tmp_path), async_save=True)
    held = _HeldWriter(ck, monkeypatch)
    before = _assemble([_local_state(model, opt)])
    ck.save(1, model, opt)
    assert held.held.wait(60) and ck.thread is not None and ck.thread.is_alive()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0).add_(1.0)
            for v in opt.state[p].values():
                v.add_(7.0)
    assert not torch.equal(model.output.weight.detach(), before["model.output.weight"])
    assert not os.path.exists(tmp_path / "step-1")
    held.release.set()
    ck.wait()
    assert ck.thread is None and held.events[-1] == "barrier"
    _assert_same(_loaded(str(tmp_path)), before, "async snapshot")


def test_at_most_one_async_save_in_flight(tmp_path, monkeypatch):
    """A second save while the first is held: it waits; its snapshot comes after the
    first save's commit, and both checkpoints are complete."""
    model, opt = _small(seed=0)
    ck = checkpoint.Checkpointer(str(tmp_path), async_save=True)
    held = _HeldWriter(ck, monkeypatch)
    ck.save(1, model, opt)
    first_thread = ck.thread
    assert held.held.wait(60)
    second = threading.Thread(target=ck.save, args=(2, model, opt))
    second.start()
    second.join(0.5)
    assert second.is_alive() and ck.thread is first_thread  # blocked in wait(), nothing new started
    assert held.events == ["snapshot", "barrier"]
    held.release.set()
    second.join(60)
    ck.close()
    n_chunks = held.events.index("after_file") - 2
    assert held.events == (["snapshot", "barrier"] + ["after_chunk"] * n_chunks
                           + ["after_file", "before_commit", "barrier"]) * 2, held.events  # (world 1: the
    # gather of the chunk tables after "after_file", which is the multi-rank barrier, is local)
    assert checkpoint.list_checkpoints(str(tmp_path)) == [1, 2]
    checkpoint.verify(str(tmp_path / "step-1"))
    checkpoint.verify(str(tmp_path / "step-2"))


@pytest.mark.parametrize("reported_by", ["wait", "next_save", "close"])
def test_async_writer_errors_are_reraised(tmp_path, reported_by):
    model, opt = _small(seed=0)
    ck = checkpoint.Checkpointer(str(tmp_path), async_save=True)
    ck.save(1, model, opt)
    ck.wait()

    def fault(stage):
        if stage == "after_file":
            raise OSError("disk full (injected)")

    ck.fault_hook = fault
    ck.save(2, model, opt)  # returns: the error happens in the writer
    call = {"wait": ck.wait, "close": ck.close, "next_save": lambda: ck.save(3, model, opt)}[reported_by]
    with pytest.raises(CheckpointError, match="disk full") as info:
        call()
    assert "asynchronous checkpoint save failed: step-2 was not saved" in str(info.value)
    assert checkpoint.list_checkpoints(str(tmp_path)) == [1]  # the failed save never committed, 3 never began
    ck.fault_hook = None
    ck.wait()  # reported once
    ck.save(2, model, opt)
    ck.close()
    assert checkpoint.list_checkpoints(str(tmp_path)) == [1, 2]


# ---------------------------------------------------------------------------------------
# 5. Preemption: SIGTERM to python train.py


def test_sigterm_saves_and_the_rerun_continues(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # as this process: the same numerics
    argv = train_argv(str(run_dir), "training.steps=200", "checkpoint.interval=1000")
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    logged = [json.loads(x) for x in metrics.read_text().splitlines()]
    last = logged[-1]["step"]
    assert 3 <= last < 200 and f"stopping after step {last}" in out, out
    root = str(run_dir / "checkpoints")
    assert checkpoint.list_checkpoints(root) == [last]
    assert checkpoint.read_metadata(os.path.join(root, f"step-{last}"))["extra"]["dataloader"]["step"] == last
    # The uninterrupted run's loss at step last + 1 depends only on the weights after
    # step `last` and that step's batch (not on the schedule's length).
    ref = _train_stop_at(0, 1, train_argv(str(tmp_path / "ref"), "training.steps=200"), last + 1)
    assert _losses(ref[:last]) == _losses(logged)
    resumed = train.main(train_argv(str(run_dir), f"training.steps={last + 2}", "checkpoint.load=latest"))
    assert [r["step"] for r in resumed] == [last + 1, last + 2]
    assert resumed[0]["loss"] == ref[last]["loss"]


def _workers(marker: str) -> list[int]:
    """Pids of processes with LOCAL_RANK=1 in their environment and `marker` in their
    command line (torchrun's rank-1 worker of one job)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:  # gone, or not ours
            continue
        if b"LOCAL_RANK=1" in environ and marker.encode() in cmdline:
            pids.append(int(entry))
    return pids


def test_torchrun_restarts_a_killed_worker_from_the_latest_checkpoint(fsdp2_straight, tmp_path):
    """torchrun --max-restarts 1 with checkpoint.load=latest: SIGKILL one worker once a
    checkpoint exists; the job restarts from the latest checkpoint and finishes (exit 0)
    with, at every step it ran after the restart, the loss of the uninterrupted run."""
    run_dir = tmp_path / "run"
    argv = _argv(run_dir, *DP2, "checkpoint.interval=2", "checkpoint.load=latest")
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with the store shared between torchrun's
    # rendezvous and the workers (the default), the restarted workers read the killed
    # ones' gloo addresses for their subgroups and fail to connect (pytorch/pytorch#135712).
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "--max-restarts", "1", "--monitor-interval", "0.1", "train.py", *argv],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, killed = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None and killed is None:
            if checkpoint.list_checkpoints(str(run_dir / "checkpoints")):
                pids = _workers(f"run.dir={run_dir}")
                if len(pids) == 1:
                    os.kill(pids[0], signal.SIGKILL)
                    killed = pids[0]
            time.sleep(0.02)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed is not None, "the job finished before a worker could be killed"
    assert proc.returncode == 0, out
    # metrics.jsonl: the first attempt's steps, then the restarted job's (a resumed run
    # appends) from the step after the checkpoint it loaded
    first = int(re.search(r"continuing at step (\d+)", out).group(1))
    assert first > 2, out
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = records[len(records) - (STEPS - first + 1):]
    assert [r["step"] for r in resumed] == list(range(first, STEPS + 1))
    assert [r["step"] for r in records[:first - 1]] == list(range(1, first))
    assert _losses(resumed) == _losses(fsdp2_straight)[first - 1:]


# ---------------------------------------------------------------------------------------
# 6. Interop: export, and starting from consolidated weights


def _meta_names(n_layers: int) -> list[str]:
    block = ["attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
             "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
             "attention_norm.weight", "ffn_norm.weight"]
    return sorted(["tok_embeddings.weight", "norm.weight", "output.weight",
                   *(f"layers.{i}.{b}" for i in range(n_layers) for b in block)])


@pytest.fixture(scope="module")
def exported(saved_run, tmp_path_factory) -> str:
    run_dir, _ = saved_run
    out = str(tmp_path_factory.mktemp("export") / "step10.pt")
    result = subprocess.run([sys.executable, "checkpoint.py", "export", str(run_dir / "checkpoints" / "step-10"), out],
                            cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and not os.path.exists(out + ".tmp")
    return out


def test_export_writes_meta_names_and_the_consolidated_weights(saved_run, exported):
    run_dir, _ = saved_run
    state = torch.load(exported, weights_only=True)
    assert isinstance(state, dict) and sorted(state) == _meta_names(2)
    want = checkpoint.consolidate(str(run_dir / "checkpoints" / "step-10"))
    assert state["layers.0.attention.wk.weight"].shape == (32, 64) and state["output.weight"].shape == (4096, 64)
    _assert_same(state, want, "export")


def test_training_starts_from_the_initial_weights(straight, exported, tmp_path):
    """checkpoint.initial: the first loss is the direct forward of a model holding the
    exported weights on the first batch (and not the random init's loss)."""
    argv = _argv(tmp_path, f"checkpoint.initial={exported}", "training.steps=2")
    first = train.main(argv)[0]["loss"]
    cfg = config.load_config(argv[1], argv[2:])
    args = config.validate(cfg, 1).model_args
    model = llama.build_model(args, "cpu")
    llama.init_weights(model, args, 3)
    checkpoint.load_consolidated(exported, model)
    tokenizer = data.load_tokenizer(cfg.data.tokenizer)
    ds = data.load_dataset(cfg.data.dataset, tokenizer, "train", cfg.data.seq_len, cfg.data.cache_dir)
    t = cfg.training
    inputs, labels = next(data.DataLoader(ds, cfg.data.seq_len, t.batch_size, t.micro_batch_size, 0, 1, t.seed))
    with torch.no_grad():
        direct = train.loss_fn(model(inputs), labels, labels.numel()).double().item()
    assert first == direct
    assert first < straight[0]["loss"] - 0.05  # trained weights beat the init on the same batch


# ---------------------------------------------------------------------------------------
# 7. Safety: nothing is unpickled


class _Evil:
    """Unpickling this creates the file `marker` (code execution)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_runs_pickled_code(tmp_path):
    canary = str(tmp_path / "canary")
    pickle.loads(pickle.dumps(_Evil(canary)))  # the payload does run under a plain unpickler
    assert os.path.exists(canary)
    model, opt = _small(seed=0)
    # (a) a consolidated .pt holding the payload
    marker = str(tmp_path / "marker-pt")
    pt = str(tmp_path / "evil.pt")
    torch.save({"tok_embeddings.weight": _Evil(marker)}, pt)
    with pytest.raises(Exception):
        checkpoint.load_consolidated(pt, model)
    assert not os.path.exists(marker)
    # (b) metadata.json replaced by the payload (protocol 0: text, so it even decodes)
    ck = checkpoint.Checkpointer(str(tmp_path / "ck"))
    ck.save(1, model, opt)
    path = str(tmp_path / "ck" / "step-1")
    meta_file = os.path.join(path, "metadata.json")
    good_meta = open(meta_file).read()
    marker = str(tmp_path / "marker-json")
    with open(meta_file, "wb") as f:
        f.write(pickle.dumps(_Evil(marker), protocol=0))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ck.load("latest", model, opt)
    assert not os.path.exists(marker)
    # (c) the data file replaced by the payload, with CRCs that match it: the bytes are
    # read as numbers, nothing runs
    marker = str(tmp_path / "marker-bin")
    meta = json.loads(good_meta)
    size = meta["files"]["rank-00000.bin"]["nbytes"]
    payload = pickle.dumps(_Evil(marker), protocol=5)
    blob = (payload * (size // len(payload) + 1))[:size]
    with open(os.path.join(path, "rank-00000.bin"), "wb") as f:
        f.write(blob)
    for info in meta["tensors"].values():
        for c in info["chunks"]:
            c["crc32"] = zlib.crc32(blob[c["byte_offset"]: c["byte_offset"] + c["nbytes"]])
    meta["files"]["rank-00000.bin"]["crc32"] = zlib.crc32(blob)
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    fresh, fresh_opt = _small(seed=5, steps=0)
    ck.load("latest", fresh, fresh_opt, layout="another")  # (not the RNG state: it would be garbage)
    checkpoint.verify(path)
    assert not os.path.exists(marker)
    c = meta["tensors"]["model.tok_embeddings.weight"]["chunks"][0]
    got = fresh.tok_embeddings.weight.detach().contiguous().view(torch.uint8).reshape(-1)
    assert bytes(got.numpy()) == blob[c["byte_offset"]: c["byte_offset"] + c["nbytes"]]


# ---------------------------------------------------------------------------------------
# 8. Bad input


def test_load_of_a_directory_without_metadata(tmp_path):
    empty = tmp_path / "step-5"
    empty.mkdir()
    (empty / "rank-00000.bin").write_bytes(b"\0" * 8)
    with pytest.raises(CheckpointError, match=re.escape(f"{empty} is not a committed checkpoint (no metadata.json)")):
        train.main(_argv(tmp_path / "run", f"checkpoint.load={empty}"))
    assert not dist.is_initialized()
    # "latest" with nothing saved yet is not an error: a fresh start
    assert checkpoint.Checkpointer(str(tmp_path / "none")).load("latest", *_small(0, 0)) is None


def test_load_into_another_model_or_optimizer(tmp_path):
    model, opt = _small(seed=0)
    ck = checkpoint.Checkpointer(str(tmp_path))
    ck.save(1, model, opt)
    # another shape: the error names the tensor and both shapes
    other = llama.build_model(llama.model_args("debug", **{**EVEN, "vocab_size": 96}), "cpu")
    with pytest.raises(CheckpointError, match=r"another model: model\.tok_embeddings\.weight has shape \[128, 64\] "
                                              r"there, \[96, 64\] here"):
        ck.load("latest", other, None)
    # a tensor the checkpoint does not have
    deeper = llama.build_model(llama.model_args("debug", **{**EVEN, "n_layers": 3}), "cpu")
    with pytest.raises(CheckpointError, match=r"another model: model\.layers\.2\.\S+ is not in the checkpoint"):
        ck.load("latest", deeper, None)
    # AdamW state into SGD
    fresh = _build("single", "even", 1)
    sgd = train.build_optimizer(fresh, config.TrainingConfig(optimizer="sgd", momentum=0.9))
    with pytest.raises(CheckpointError, match="AdamW.*SGD"):
        ck.load("latest", fresh, sgd)
    # a consolidated file of another shape
    pt = str(tmp_path / "w.pt")
    torch.save(checkpoint.consolidate(str(tmp_path / "step-1")), pt)
    with pytest.raises(CheckpointError, match=r"tok_embeddings\.weight has shape \(128, 64\), the model wants "
                                              r"\(96, 64\)"):
        checkpoint.load_consolidated(pt, other)


def test_data_loader_state_mismatch(saved_run, tmp_path):
    """Resuming with another global batch size: refused as a config change, and with
    checkpoint.allow_config_change=true by the loader: ValueError naming both values."""
    run_dir, _ = saved_run
    step10 = run_dir / "checkpoints" / "step-10"
    argv = _argv(tmp_path, f"checkpoint.load={step10}", "training.batch_size=16", "training.micro_batch_size=16")
    with pytest.raises(ValueError, match="training.batch_size: 8 -> 16"):
        train.main(argv)
    with pytest.raises(ValueError, match="global_batch_size is 8 in the checkpoint but 16 now"):
        train.main([*argv, "checkpoint.allow_config_change=true"])


# ---------------------------------------------------------------------------------------
# Edge cases found while writing these tests (fixed in checkpoint.py)


def test_keep_never_prunes_the_checkpoint_just_saved(tmp_path):
    model, opt = _small(seed=0)
    ck = checkpoint.Checkpointer(str(tmp_path), keep=1)
    ck.save(20, model, opt)
    ck.save(10, model, opt)  # e.g. checkpoint.load=.../step-10 in a run dir that also holds step-20
    assert checkpoint.list_checkpoints(str(tmp_path)) == [10, 20]  # later-numbered ones are left alone


@pytest.mark.parametrize("content", [b"\x80\x04K\x01.", b"[1, 2]"], ids=["binary", "json-list"])
def test_a_garbled_metadata_file_is_a_checkpoint_error(tmp_path, content):
    model, opt = _small(seed=0)
    ck = checkpoint.Checkpointer(str(tmp_path))
    ck.save(1, model, opt)
    (tmp_path / "step-1" / "metadata.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="metadata.json"):
        ck.load("latest", model, opt)


def test_a_missing_data_file_is_a_checkpoint_error(tmp_path):
    model, opt = _small(seed=0)
    ck = checkpoint.Checkpointer(str(tmp_path))
    ck.save(1, model, opt)
    os.remove(tmp_path / "step-1" / "rank-00000.bin")
    with pytest.raises(CheckpointError, match="rank-00000.bin"):
        ck.load("latest", model, opt)
