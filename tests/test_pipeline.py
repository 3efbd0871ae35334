"""Pipeline parallelism (pipeline.py) against exact formulas and the single-process oracle.

What is proved (nothing here only checks that it ran):
  * schedules, in this process, for every schedule with pp = 2, 3, 4 and m = pp, 2pp,
    2pp + 1 (where allowed; GPipe also m = 1 < pp; zbv also 1 and 2pp - 1), interleaved
    with v = 2 and 3, zbv with v = 2: every (stage, micro-batch) has exactly one F and one
    B (or one F, I, W) on the rank that owns the stage (s % pp; zbv's V: s, or 2pp - 1 - s
    for s >= pp, written here independently of pipeline.stage_rank, which must agree),
    F before B (F before I before W) on that rank; the
    dependency graph (program order + cross-stage data) is acyclic (Kahn, independent of
    `simulate`); every cross-rank dependency has exactly one SEND after its producer and
    one RECV before its consumer, with the right peers, no other SEND / RECV; per
    (sender, receiver) pair the message sequence is identical on both sides (NCCL's
    in-order matching, kinds mixed: pp = 2 interleaved sends F and B over one pair);
    the evaluation schedule (forward_only) passes the same checks;
  * `simulate` (unit costs F 1, B 2, I = W = 1) equals an independent graph replay, and
    its idle slots per rank equal the bubble formulas: 3(p-1) for GPipe / 1F1B, 3(p-1)
    chunk-units for interleaved (= (p-1)(t_F+t_B)/v in full-stage units), p-1 for
    zero-bubble, max(p-1, 2(2p-1-m)) for zbv (every p in 2..5, m in 1..3p); bubble
    fractions (p-1)/(m+p-1), (p-1)/(vm+p-1) and zbv's (p-1)/(6m+p-1) for m >= 2p-1, below
    zero-bubble's and interleaved's for m > p, equal to zero-bubble's at m = p; peak
    in-flight per rank equals the memory formulas (GPipe m; 1F1B p-r; interleaved
    min((v-1)p + 2(p-1-r) + 1, m v) chunks; zero-bubble peak_activations p-r, in-flight
    <= m; zbv min(2p, 2m, m+1+r) chunks, 2p = 1F1B's rank 0 once m >= 2p-1);
  * the docstring's schedule tables are format_schedule's output; the checker above rejects
    broken schedules (it can fail) and `simulate` raises on a cyclic (deadlocking)
    schedule, cross-rank or on one rank;
  * the runner, float64, direct (no train.main), pp = 2 and 4 for every schedule (pp = 4
    interleaved and zbv on an 8-layer model; zbv hands stages p-1 to p over inside one
    rank), m = pp, 2pp, 2pp + 1 (zbv at pp 2: m = 2 < 2p - 1, and m = 3 with 6 layers), an
    explicit uneven split, 6 layers in 4 stages, and pp = 1 with 2 and 4 local stages
    (hand-over without P2P):
    the last stage's loss equals the full-batch reference (1e-12), other ranks return
    exactly 0, every parameter gradient on every rank equals the reference gradient of
    the same name (1e-12), the ranks' parameter names partition the model's; a second
    step without zero_grad gives exactly 2x (no state leaks, no rescaling); a per-micro-
    batch mean loss gives m x the gradients (so the 1e-12 check excludes the classic
    "m times too large" bug); zero-bubble's I leaves every parameter gradient to W;
    the forward-only evaluation runner gives the same loss and no gradients; each rank
    sends exactly one B_mb x S x dim tensor per micro-batch per stage boundary it owns
    (2 m (v p - 1) in all, 2 m (2p - 2) for zbv, at most 2 m v per rank, as the
    docstring says);
  * train.main, float32, 10 steps: loss, grad norm and validation loss within
    distributed.PARITY_BOUNDS (~10x the float32 rounding achieved) of the
    single-process run for every schedule at pp = 2 and 4, micro-batches 4 and 8 (zbv at
    pp 2 with m 2 and 4, at pp 4 with m 8 on 8 layers), SGD and AdamW, PP 2 x FSDP 2
    (uneven split, gradient accumulation) and PP 2 x FSDP 2 x TP 2; zero-bubble at pp 2
    with full activation checkpointing, CP 2 (FSDP over cp too), async TP 2 and FSDP 2;
    every rank logs the same loss;
  * PP x FSDP (1F1B with an uneven split and gradient accumulation; interleaved, two FSDP
    models per rank; zero-bubble with gradient accumulation, where the last backward of a
    stage is its last W): per optimizer step, dist.reduce_scatter_single is called exactly
    once per FSDP unit of the rank's stages (not once per micro-batch or micro-step);
  * zero-bubble's split backward with the rest: float8 linears at pp 2 equal the
    single-process float8 run with the same micro-batches within test_float8's LOSS_ULPS
    (bitwise, measured); in this process (pp 1), float8: I computes no parameter gradient,
    W's float8 dW GEMMs give bitwise the unsplit backward's; full activation checkpointing:
    each block runs forward twice per micro-batch (one recompute: the stage's I is a full
    backward), gradients 1e-12, logged once; a custom Function that computes its weight
    gradient anyway, a tied weight and compiled blocks fall back (logged once each) with
    exact gradients;
  * stages: split_layers even / uneven / explicit, build_stages keeps the model's names,
    embeddings only on stage 0, norm / output only on the last, Stages.named_parameters
    has no prefix; zbv places them in a V (rank 0: the first and the last stage);
  * bad input: ValueErrors naming the keys and numbers (pipeline and config.validate),
    non-positive parallel.pp_microbatches included.
"""

from __future__ import annotations

import collections
import functools
import os
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import config
import float8
import llama
import pipeline
from distributed import exceeding, loss_parity, parity, reference_run, run_on_ranks, train_argv
from pipeline import Action

# `train` is imported only where needed: it imports fsdp -> torch._dynamo (~2.5 s per
# process), which every rank of the direct runner tests would otherwise pay (unless the
# forkserver preloaded it, see _fast_setup).

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = torch.float64
TOL = 1e-12
SEED = 3
B_MB, SEQ = 2, 16  # rows per micro-batch, sequence length of the direct runner tests
MODEL = dict(dim=64, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=128)


@pytest.fixture(scope="module", autouse=True)
def _fast_setup():
    """Runtime only (as test_checkpoint): one intra-op thread in this process (the
    single-process references; the ranks use one too), and, if no module has started
    run_on_ranks' forkserver yet, start it preloading train (fsdp -> torch._dynamo, 2-5 s
    per rank otherwise) and the test modules. The ranks are still fresh forks."""
    import multiprocessing as mp
    from multiprocessing import forkserver

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed", "train", "test_pipeline"])
    forkserver.ensure_running()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------
# 1. Schedules, in this process

def _schedule_cases() -> list[tuple[str, int, int, int]]:
    cases = []
    for name in pipeline.SCHEDULES:
        for pp in (2, 3, 4):
            for v in ((2, 3) if name == "interleaved_1f1b" else (2,) if name == "zbv" else (1,)):
                ms = [pp, 2 * pp, 2 * pp + 1] + ([1] if name == "gpipe" else [1, 2 * pp - 1] if name == "zbv" else [])
                for m in ms:
                    if name == "interleaved_1f1b" and m % pp:
                        continue
                    cases.append((name, pp, m, v))
    return cases


def _deps(kind: str, stage: int, mb: int, n_stages: int, split: bool) -> list[tuple[str, int, int]]:
    """Cross-stage and same-stage data dependencies of a compute action."""
    bwd = "I" if split else "B"
    if kind == "F":
        return [("F", stage - 1, mb)] if stage > 0 else []
    if kind in ("B", "I"):
        return [("F", stage, mb)] + ([(bwd, stage + 1, mb)] if stage < n_stages - 1 else [])
    return [("I", stage, mb)]  # W


def _owner(stage: int, pp: int, name: str) -> int:
    """The rank of a stage: looped (s % pp), or zbv's V (s, then 2pp - 1 - s)."""
    if name == "zbv":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def test_stage_rank_is_the_placement_of_each_schedule():
    for name in pipeline.SCHEDULES:
        for pp in (1, 2, 3, 4):
            for v in ((2, 3) if name == "interleaved_1f1b" else (2,) if name == "zbv" else (1,)):
                assert [pipeline.stage_rank(s, pp, name) for s in range(pp * v)] == \
                    [_owner(s, pp, name) for s in range(pp * v)], (name, pp, v)
    assert [pipeline.stage_rank(s, 4, "zbv") for s in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]
    assert [pipeline.stage_rank(s, 4, "interleaved_1f1b") for s in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]


def _check_schedule(actions: list[list[Action]], pp: int, m: int, v: int, name: str = "1f1b") -> list[list[tuple]]:
    """Raise AssertionError unless `actions` (with communication) is a valid schedule
    with `name`'s placement (_owner); return the topological order of compute actions
    per rank (for _replay)."""
    n = pp * v
    assert len(actions) == pp
    compute = [[a for a in order if a.kind in pipeline.COMPUTE] for order in actions]
    split = any(a.kind == "I" for order in compute for a in order)
    forward_only = not any(a.kind in ("B", "I") for order in compute for a in order)
    kinds = ("F",) if forward_only else ("F", "I", "W") if split else ("F", "B")
    # Exactly once each, on the owning rank, in dependency order on that rank.
    where: dict[tuple, tuple[int, int]] = {}  # (kind, stage, mb) -> (rank, position)
    for r, order in enumerate(compute):
        for i, a in enumerate(order):
            key = (a.kind, a.stage, a.mb)
            assert a.kind in kinds, (r, str(a))
            assert key not in where, f"{a} twice"
            assert _owner(a.stage, pp, name) == r, f"{a} on rank {r}"
            where[key] = (r, i)
    expected = {(k, s, i) for k in kinds for s in range(n) for i in range(m)}
    assert set(where) == expected, (sorted(expected - set(where))[:5], sorted(set(where) - expected)[:5])
    for s in range(n):
        for i in range(m):
            chain = [where[(k, s, i)][1] for k in kinds]
            assert chain == sorted(chain), f"stage {s} mb {i}: {kinds} at positions {chain}"
    # Acyclic: Kahn over program order + data dependencies.
    preds = {key: set(_deps(*key, n, split)) for key in where}
    for order in compute:
        for a, b in zip(order, order[1:]):
            preds[(b.kind, b.stage, b.mb)].add((a.kind, a.stage, a.mb))
    succ = collections.defaultdict(list)
    for key, ps in preds.items():
        for p in ps:
            succ[p].append(key)
    count = {key: len(ps) for key, ps in preds.items()}
    ready = [key for key, c in count.items() if c == 0]
    topo = []
    while ready:
        key = ready.pop()
        topo.append(key)
        for nxt in succ[key]:
            count[nxt] -= 1
            if count[nxt] == 0:
                ready.append(nxt)
    assert len(topo) == len(where), f"cyclic dependencies: {len(where) - len(topo)} actions can never run"
    # Communication: one SEND after the producer, one RECV before the consumer, per
    # cross-rank dependency; nothing else.
    needed = collections.Counter()  # (sender, receiver, kind, consuming stage, mb)
    for kind, s, i in where:
        if kind == "F" and s < n - 1:
            needed[(_owner(s, pp, name), _owner(s + 1, pp, name), "F", s + 1, i)] += 1
        if kind in ("B", "I") and s > 0:
            needed[(_owner(s, pp, name), _owner(s - 1, pp, name), "B", s - 1, i)] += 1
    needed = {k: c for k, c in needed.items() if k[0] != k[1]}
    sent, received = collections.Counter(), collections.Counter()
    channels = collections.defaultdict(lambda: ([], []))  # (sender, receiver) -> (sent, received) sequences
    for r, order in enumerate(actions):
        pos = {(a.kind, a.stage, a.mb): i for i, a in enumerate(order) if a.kind in pipeline.COMPUTE}
        for i, a in enumerate(order):
            if a.kind in pipeline.COMPUTE:
                continue
            assert a.kind in ("SEND_F", "SEND_B", "RECV_F", "RECV_B"), str(a)
            assert a.peer != r and 0 <= a.peer < pp, str(a)
            msg = a.kind[-1]
            if a.kind.startswith("SEND"):
                producer = ("F", a.stage - 1, a.mb) if msg == "F" else (("I" if split else "B"), a.stage + 1, a.mb)
                assert a.peer == _owner(a.stage, pp, name), str(a)
                assert producer in pos and pos[producer] < i, f"rank {r}: {a} before its producer"
                sent[(r, a.peer, msg, a.stage, a.mb)] += 1
                channels[(r, a.peer)][0].append((msg, a.stage, a.mb))
            else:
                consumer = ("F", a.stage, a.mb) if msg == "F" else (("I" if split else "B"), a.stage, a.mb)
                assert a.peer == _owner(a.stage - 1 if msg == "F" else a.stage + 1, pp, name), str(a)
                assert consumer in pos and pos[consumer] > i, f"rank {r}: {a} after its consumer"
                received[(a.peer, r, msg, a.stage, a.mb)] += 1
                channels[(a.peer, r)][1].append((msg, a.stage, a.mb))
    assert dict(sent) == needed, "SENDs differ from the cross-rank dependencies"
    assert dict(received) == needed, "RECVs differ from the cross-rank dependencies"
    for pair, (s, rcv) in channels.items():
        assert s == rcv, f"channel {pair}: sent {s[:6]}..., received {rcv[:6]}..."
    return topo


def _replay(actions: list[list[Action]], topo: list[tuple], n_stages: int, cost: dict) -> dict:
    """Earliest start of every compute action in topological order (graph longest path),
    and per rank the peak number of chunks forwarded and not yet released."""
    compute = [[a for a in order if a.kind in pipeline.COMPUTE] for order in actions]
    split = any(a.kind == "I" for order in compute for a in order)
    prev, rank_of = {}, {}
    for r, order in enumerate(compute):
        for a, b in zip([None, *order], order):
            prev[(b.kind, b.stage, b.mb)] = None if a is None else (a.kind, a.stage, a.mb)
            rank_of[(b.kind, b.stage, b.mb)] = r
    end = {}
    for key in topo:
        ps = _deps(*key, n_stages, split) + ([prev[key]] if prev[key] else [])
        end[key] = max([0] + [end[p] for p in ps]) + cost[key[0]]
    makespan = max(end.values())
    busy = [sum(cost[a.kind] for a in order) for order in compute]

    def peak(order, release):
        live = best = 0
        for a in order:
            live += a.kind == "F"
            best = max(best, live)
            live -= a.kind in release
        return best

    return dict(makespan=makespan, idle=[makespan - b for b in busy],
                peak_in_flight=[peak(o, ("B", "W")) for o in compute],
                peak_activations=[peak(o, ("B", "I")) for o in compute])


@pytest.mark.parametrize("name, pp, m, v", _schedule_cases(), ids=lambda x: str(x))
def test_schedule_is_valid_and_matches_the_formulas(name, pp, m, v):
    actions = pipeline.build_schedule(name, pp, m, v)
    topo = _check_schedule(actions, pp, m, v, name)
    zb = name in ("zero_bubble", "zbv")
    cost = {"F": 1, "B": 2, "I": 1, "W": 1}
    sim = pipeline.simulate(actions, pp * v)
    assert {k: sim[k] for k in ("makespan", "idle", "peak_in_flight", "peak_activations")} == \
        _replay(actions, topo, pp * v, cost)
    work = 3 * m * v  # per rank, chunk-units (t_F + t_B = 3, or t_F + t_I + t_W = 3)
    assert sim["busy"] == [work] * pp
    bubble = (pp - 1) if zb else 3 * (pp - 1)  # (p-1)(t_F+t_I-t_W) or (p-1)(t_F+t_B) [/v, full-stage units]
    if name == "zbv":  # the V is built for 2p - 1 micro-batches; fewer leave 2 units each
        bubble = max(pp - 1, 2 * (2 * pp - 1 - m))
    assert sim["idle"] == [bubble] * pp, sim
    assert sim["makespan"] == work + bubble
    if name in ("gpipe", "1f1b"):
        assert Fraction(sim["idle"][0], sim["makespan"]) == Fraction(pp - 1, m + pp - 1)
    if name == "interleaved_1f1b":
        assert Fraction(sim["idle"][0], sim["makespan"]) == Fraction(pp - 1, v * m + pp - 1)
    if name == "zbv" and m >= 2 * pp - 1:
        assert Fraction(sim["idle"][0], sim["makespan"]) == Fraction(pp - 1, 6 * m + pp - 1)
    ranks = range(pp)
    if name == "gpipe":
        assert sim["peak_in_flight"] == [m] * pp
    elif name == "1f1b":
        assert sim["peak_in_flight"] == [pp - r for r in ranks]
    elif name == "interleaved_1f1b":
        assert sim["peak_in_flight"] == [min((v - 1) * pp + 2 * (pp - 1 - r) + 1, m * v) for r in ranks]
    elif name == "zbv":  # W follows I closely: in flight = stage activations, 2p chunks (p A) once filled
        assert sim["peak_activations"] == sim["peak_in_flight"] == [min(2 * pp, 2 * m, m + 1 + r) for r in ranks]
    else:  # ZB-H1: 1F1B's stage activations; deferred W's may keep up to m in flight
        assert sim["peak_activations"] == [pp - r for r in ranks]
        assert all(pp - r <= x <= m for r, x in zip(ranks, sim["peak_in_flight"]))
    if not zb:
        assert sim["peak_activations"] == sim["peak_in_flight"]


@pytest.mark.parametrize("pp", [2, 3, 4])
@pytest.mark.parametrize("v, name", [(1, "1f1b"), (2, "interleaved_1f1b"), (2, "zbv")])
def test_forward_only_schedule_is_valid(pp, v, name):
    """The evaluation schedule (forward_only + add_communication) on the schedule's
    placement: valid by the same checks; with t_F = 1 a rank idles p-1 (m >= p or
    v = 1), v(p-1) with one micro-batch; 2(p-1) on zbv's V (a rank's up stage waits for
    the ranks below it to finish their down stage)."""
    for m in (1, pp, 2 * pp + 1):
        actions = pipeline.add_communication(pipeline.forward_only(pp, m, v, name), pp, pp * v, name)
        topo = _check_schedule(actions, pp, m, v, name)
        sim = pipeline.simulate(actions, pp * v)
        assert sim["makespan"] == _replay(actions, topo, pp * v, {"F": 1})["makespan"]
        idle = 2 * (pp - 1) if name == "zbv" else (pp - 1) * (v if m == 1 else 1)
        assert sim["idle"] == [idle] * pp, (m, sim)


def test_zero_bubble_beats_1f1b_and_interleaving_shrinks_the_bubble():
    """The comparisons the formulas imply, in full-stage time (a chunk is 1/v stage)."""
    for pp, m in ((2, 4), (4, 8)):
        one = pipeline.simulate(pipeline.build_schedule("1f1b", pp, m), pp)
        zb = pipeline.simulate(pipeline.build_schedule("zero_bubble", pp, m), pp)
        inter = pipeline.simulate(pipeline.build_schedule("interleaved_1f1b", pp, m, 2), 2 * pp)
        assert 3 * zb["idle"][0] == one["idle"][0]  # a third of 1F1B's bubble
        assert Fraction(inter["idle"][0], 2) == Fraction(one["idle"][0], 2)  # /v in full-stage units
        assert Fraction(inter["makespan"], 2) < one["makespan"]


def test_zbv_bubble_formula_and_its_place_among_the_others():
    """zbv's idle per rank is max(p-1, 2(2p-1-m)) units of one stage's F for every p in
    2..5 and m in 1..3p; as a fraction of the step it is below zero-bubble's (ZB-H1) and
    interleaved 1F1B's for m > p (the paper's claim, once the V can fill), equal to
    zero-bubble's at m = p."""
    for pp in (2, 3, 4, 5):
        for m in range(1, 3 * pp + 1):
            sim = pipeline.simulate(pipeline.build_schedule("zbv", pp, m, 2), 2 * pp)
            bubble = max(pp - 1, 2 * (2 * pp - 1 - m))
            assert sim["idle"] == [bubble] * pp and sim["makespan"] == 6 * m + bubble, (pp, m, sim["idle"])
            if m < pp:
                continue
            zbv = Fraction(sim["idle"][0], sim["makespan"])
            zb = pipeline.simulate(pipeline.build_schedule("zero_bubble", pp, m), pp)
            zb = Fraction(zb["idle"][0], zb["makespan"])
            assert zbv < zb if m > pp else zbv == zb, (pp, m, zbv, zb)
            if m % pp == 0:
                inter = pipeline.simulate(pipeline.build_schedule("interleaved_1f1b", pp, m, 2), 2 * pp)
                assert zbv < Fraction(inter["idle"][0], inter["makespan"]), (pp, m)


def _docstring_tables() -> dict[str, list[str]]:
    """The docstring's schedule tables: {name: ["rank 0 | ...", "rank 1 | ..."]}."""
    tables, name = {}, None
    for line in (x.strip() for x in pipeline.__doc__.splitlines()):
        if line.startswith("[") and "]" in line:
            name = line[1:line.index("]")]
            tables[name] = []
        elif name is not None and line.startswith("rank "):
            tables[name].append(line)
        else:
            name = None
    return tables


def test_docstring_tables_are_format_schedules_output():
    tables = _docstring_tables()
    assert set(tables) == set(pipeline.SCHEDULES)
    for name, table in tables.items():
        v = 2 if name in ("interleaved_1f1b", "zbv") else 1
        assert "\n".join(table) == pipeline.format_schedule(pipeline.build_schedule(name, 2, 4, v)), name
    assert tables["1f1b"] == ["rank 0 | 0F0 0F1 0B0 0F2 0B1 0F3 0B2 0B3", "rank 1 | 1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3"]
    full = pipeline.format_schedule(pipeline.build_schedule("1f1b", 2, 2), compute_only=False)
    assert full.splitlines() == [
        "rank 0 | 0F0 SEND_F(1,0)->1 0F1 SEND_F(1,1)->1 RECV_B(0,0)<-1 0B0 RECV_B(0,1)<-1 0B1",
        "rank 1 | RECV_F(1,0)<-0 1F0 1B0 SEND_B(0,0)->0 RECV_F(1,1)<-0 1F1 1B1 SEND_B(0,1)->0"]


def _cyclic_cross_rank() -> list[list[Action]]:
    """Rank 0 needs 1B0 before 0F1; rank 1 runs 1F1 (needs 0F1) before 1B0."""
    r0 = [Action("F", 0, 0), Action("B", 0, 0), Action("F", 0, 1), Action("B", 0, 1)]
    r1 = [Action("F", 1, 1), Action("B", 1, 1), Action("F", 1, 0), Action("B", 1, 0)]
    return [r0, r1]


def test_simulate_detects_deadlocks():
    with pytest.raises(ValueError, match="deadlocks"):
        pipeline.simulate(pipeline.add_communication(_cyclic_cross_rank(), 2, 2), 2)
    same_rank = [[Action("F", 0, 0), Action("B", 0, 0)], [Action("B", 1, 0), Action("F", 1, 0)]]
    with pytest.raises(ValueError, match="deadlocks"):
        pipeline.simulate(same_rank, 2)
    zb_w_first = [[Action("F", 0, 0), Action("W", 0, 0), Action("I", 0, 0)], [Action("F", 1, 0), Action("I", 1, 0),
                                                                              Action("W", 1, 0)]]
    with pytest.raises(ValueError, match="deadlocks"):
        pipeline.simulate(zb_w_first, 2)


def test_the_schedule_checker_can_fail():
    """Each corruption of a valid schedule is caught by _check_schedule."""
    good = pipeline.build_schedule("interleaved_1f1b", 2, 4, 2)
    _check_schedule(good, 2, 4, 2)

    def corrupt(fn):
        actions = [list(order) for order in good]
        fn(actions)
        return actions

    def early_recv(actions):  # rank 1 posts its first receive of a gradient from rank 0 first of all:
        order = actions[1]  # still before its consumer, and each kind's order is kept, but the
        a = next(a for a in order if a.kind == "RECV_B")  # pair's sequence (F and B mixed) is not
        order.remove(a)
        order.insert(0, a)

    def drop_send(actions):
        actions[0].remove(next(a for a in actions[0] if a.kind == "SEND_F"))

    def backward_first(actions):  # 0B0 moved to the front of rank 0
        a = next(a for a in actions[0] if a.kind == "B")
        actions[0].remove(a)
        actions[0].insert(0, a)

    def duplicate(actions):
        actions[1].append(Action("F", 1, 0))

    def wrong_rank(actions):
        actions[0].append(Action("F", 1, 9))

    for fn, match in ((early_recv, "channel"), (drop_send, "SENDs differ"), (backward_first, "positions"),
                      (duplicate, "twice"), (wrong_rank, "on rank 0")):
        with pytest.raises(AssertionError, match=match):
            _check_schedule(corrupt(fn), 2, 4, 2)
    with pytest.raises(AssertionError, match="cyclic"):
        _check_schedule(pipeline.add_communication(_cyclic_cross_rank(), 2, 2), 2, 2, 1)


@pytest.mark.parametrize("args, words", [
    (("magic", 2, 2, 1), ["parallel.pp_schedule='magic'", "gpipe", "zero_bubble"]),
    (("1f1b", 4, 3, 1), ["1f1b", "parallel.pp=4", "parallel.pp_microbatches=3"]),
    (("zero_bubble", 4, 2, 1), ["zero_bubble", "parallel.pp=4", "parallel.pp_microbatches=2"]),
    (("interleaved_1f1b", 4, 2, 2), ["parallel.pp_microbatches=2", "multiple of parallel.pp=4"]),
    (("interleaved_1f1b", 2, 3, 2), ["parallel.pp_microbatches=3", "multiple of parallel.pp=2"]),
    (("interleaved_1f1b", 2, 4, 1), ["interleaved_1f1b", "pp_stages_per_rank >= 2"]),
    (("1f1b", 2, 4, 2), ["parallel.pp_stages_per_rank=2", "interleaved_1f1b"]),
    (("gpipe", 2, 4, 2), ["parallel.pp_stages_per_rank=2", "gpipe"]),
    (("zbv", 2, 4, 1), ["parallel.pp_schedule=zbv", "parallel.pp_stages_per_rank=2", "got 1"]),
    (("zbv", 4, 8, 3), ["parallel.pp_schedule=zbv", "parallel.pp_stages_per_rank=2", "got 3"]),
    (("zbv", 2, 0, 2), ["parallel.pp_microbatches=0"]),
])
def test_build_schedule_rejects_what_it_cannot_run(args, words):
    with pytest.raises(ValueError) as err:
        pipeline.build_schedule(*args)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


# ---------------------------------------------------------------------------------------
# 2. Stages

def test_split_layers():
    assert pipeline.split_layers(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert pipeline.split_layers(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]  # first stages one more
    assert pipeline.split_layers(4, 4) == [[0], [1], [2], [3]]
    assert pipeline.split_layers(4, 3, [1, 3]) == [[0], [1, 2], [3]]
    assert pipeline.split_layers(6, 2, [5]) == [[0, 1, 2, 3, 4], [5]]
    with pytest.raises(ValueError, match=r"model.n_layers=4 is fewer than the pipeline stages .* = 5"):
        pipeline.split_layers(4, 5)
    for points in ([0, 2], [2, 2], [3, 1], [1, 4], [1], [1, 2, 3], [-1, 2]):
        with pytest.raises(ValueError) as err:
            pipeline.split_layers(4, 3, points)
        assert f"split points {points}" in str(err.value) and "2 increasing" in str(err.value), str(err.value)


def test_build_stages_keeps_names_and_places_embeddings_and_output():
    model = llama.build_model(llama.model_args("debug", **MODEL), "meta")
    names = [n for n, _ in model.named_parameters()]
    by_rank = {r: pipeline.build_stages(model, r, 2, 2) for r in range(2)}
    assert {r: sorted(s) for r, s in by_rank.items()} == {0: [0, 2], 1: [1, 3]}  # looped placement
    assert len(model.layers) == 4 and model.tok_embeddings is not None  # the original is untouched
    seen = []
    for r, stages in by_rank.items():
        for s, stage in stages.items():
            own = [n for n, _ in stage.named_parameters()]
            assert {n.split(".")[1] for n in own if n.startswith("layers.")} == {str(s)}
            assert ("tok_embeddings.weight" in own) == (s == 0)
            assert ("norm.weight" in own) == ("output.weight" in own) == (s == 3)
            seen += own
        # Stages: the model's names, no "stages.N." prefix, every stage's parameters
        wrapped = pipeline.Stages(stages)
        assert [n for n, _ in wrapped.named_parameters()] == [n for st in stages.values() for n, _ in
                                                             st.named_parameters()]
        assert len(list(wrapped.parameters())) == len(list(wrapped.named_parameters()))
    assert sorted(seen) == sorted(names)  # a partition of the model's parameters
    uneven = pipeline.build_stages(model, 1, 2, 1, [1])  # layers 1..3 on stage 1
    assert sorted({n.split(".")[1] for n, _ in uneven[1].named_parameters() if n.startswith("layers.")}) == \
        ["1", "2", "3"]
    assert "layers.3.feed_forward.w2.weight" in dict(uneven[1].named_parameters())
    # zbv's V: rank 0 holds the first and the last stage (embeddings and output), rank 1
    # the two middle ones; the names still partition the model's.
    v_shape = {r: pipeline.build_stages(model, r, 2, 2, None, "zbv") for r in range(2)}
    assert {r: sorted(st) for r, st in v_shape.items()} == {0: [0, 3], 1: [1, 2]}
    own = {r: [n for st in stages.values() for n, _ in st.named_parameters()] for r, stages in v_shape.items()}
    assert "tok_embeddings.weight" in own[0] and "output.weight" in own[0] and "norm.weight" in own[0]
    assert sorted(own[0] + own[1]) == sorted(names)


# ---------------------------------------------------------------------------------------
# 3. The runner, float64, against the full-batch single-process reference

def _args(n_layers: int = 4) -> llama.ModelArgs:
    return llama.model_args("debug", **{**MODEL, "n_layers": n_layers})


def _batch(args: llama.ModelArgs, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, args.vocab_size, (B_MB * m, SEQ + 1), generator=torch.Generator().manual_seed(m))
    return tokens[:, :-1], tokens[:, 1:]


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")


def _reference(args: llama.ModelArgs, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict]:
    model = llama.build_model(args, "cpu")
    llama.init_weights(model, args, SEED)
    model.to(F64)
    loss = _ce_sum(model(inputs), labels) / labels.numel()
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _err(a: torch.Tensor | None, b: torch.Tensor) -> float:
    if a is None or a.shape != b.shape:
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _runner_cases(rank: int, world: int, cases: list[tuple]) -> dict:
    """Each case: (schedule, m, v, n_layers, split points, variant). variant: "plain"
    (two steps, the second without zero_grad), "mean" (per-micro-batch mean loss),
    "skip_w" (zero-bubble with W disabled)."""
    refs, out = {}, {}
    for case in cases:
        name, m, v, n_layers, split, variant = case
        args = _args(n_layers)
        inputs, labels = _batch(args, m)
        if (n_layers, m) not in refs:
            refs[(n_layers, m)] = _reference(args, inputs, labels)
        ref_loss, ref_grads = refs[(n_layers, m)]
        stages = pipeline.build_stages(llama.build_model(args, "meta"), rank, world, v, split and list(split), name)
        model = pipeline.Stages(stages)  # as train.py: one module to materialize and init
        llama.materialize(model, "cpu")
        llama.init_weights(model, args, SEED)
        model.to(F64)
        tokens = labels.numel()
        if variant == "mean":  # the classic mistake: each micro-batch's own mean
            loss_fn = lambda logits, y: _ce_sum(logits, y) / y.numel()  # noqa: E731
        else:
            loss_fn = lambda logits, y: _ce_sum(logits, y) / tokens  # noqa: E731
        n = world * v
        runner = pipeline.PipelineRunner(pipeline.build_schedule(name, world, m, v)[rank], stages, n,
                                         dist.group.WORLD, loss_fn, (B_MB, SEQ, args.dim), F64, torch.device("cpu"))
        if variant == "skip_w":
            runner._backward_weight = lambda pairs: None

        def step(run=runner) -> float:
            return run.step(list(inputs.chunk(m)), list(labels.chunk(m)), positions=torch.arange(SEQ)).item()

        params = dict(model.named_parameters())
        r = dict(last=pipeline.stage_rank(n - 1, world, name) == rank, names=sorted(params), ref_loss=ref_loss,
                 stages=sorted(stages))
        if variant == "plain":  # evaluation first: forward only, no gradients
            evaluator = pipeline.PipelineRunner(
                pipeline.add_communication(pipeline.forward_only(world, m, v, name), world, n, name)[rank], stages, n,
                dist.group.WORLD, loss_fn, (B_MB, SEQ, args.dim), F64, torch.device("cpu"))
            with torch.no_grad():
                r["eval_loss"] = step(evaluator)
            r["eval_grads"] = sum(p.grad is not None for p in params.values())
        sent = []  # elements this rank hands to isend in the training step
        real = dist.batch_isend_irecv

        def counted(ops):
            sent.extend(op.tensor.numel() for op in ops if getattr(op.op, "__name__", "") == "isend")
            return real(ops)

        dist.batch_isend_irecv = counted
        try:
            r["loss"] = step()
        finally:
            dist.batch_isend_irecv = real
        r["sent"] = sent
        r["grad_err"] = {k: _err(p.grad, ref_grads[k]) for k, p in params.items()}
        if variant == "plain":
            r["loss2"] = step()  # no zero_grad: gradients accumulate
            r["grad2_err"] = {k: _err(p.grad, 2 * ref_grads[k]) for k, p in params.items()}
        elif variant == "mean":
            r["grad_m_err"] = {k: _err(p.grad, m * ref_grads[k]) for k, p in params.items()}
        else:
            r["no_grad"] = sorted(k for k, p in params.items() if p.grad is None)
        out[case] = r
    return out


def _plain(pp: int) -> list[tuple]:
    cases = []
    for name in ("gpipe", "1f1b", "zero_bubble"):
        for m in (pp, 2 * pp, 2 * pp + 1):
            cases.append((name, m, 1, 4, None, "plain"))
    cases += [("interleaved_1f1b", m, 2, 4 * pp // 2, None, "plain") for m in (pp, 2 * pp)]
    cases += [("zbv", m, 2, 4 * pp // 2, None, "plain") for m in (pp, 2 * pp, 2 * pp + 1)]
    return cases


_RUNNER = {
    # pp = 1: every stage on one rank, adjacent stages hand over locally (no P2P)
    1: [("interleaved_1f1b", 2, 2, 4, None, "plain"), ("interleaved_1f1b", 3, 4, 4, None, "plain")],
    2: _plain(2) + [("gpipe", 1, 1, 4, None, "plain"),  # GPipe with fewer micro-batches than stages
                    ("1f1b", 4, 1, 4, (1,), "plain"),  # explicit uneven split: 1 + 3 layers
                    ("interleaved_1f1b", 2, 2, 6, None, "plain"),  # 6 layers in 4 stages: 2 2 1 1
                    ("1f1b", 4, 1, 4, None, "mean"), ("zero_bubble", 4, 1, 4, None, "skip_w"),
                    ("zbv", 4, 2, 4, None, "skip_w"),
                    ("zbv", 3, 2, 6, None, "plain")],  # m = 2p - 1; 6 layers in 4 stages: 2 2 1 1
    4: _plain(4) + [("1f1b", 8, 1, 4, None, "mean")],  # interleaved at pp = 4: 8 stages of 8 layers
}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_runner_matches_the_full_batch_float64(world):
    results = run_on_ranks(_runner_cases, world, _RUNNER[world], timeout=180)
    for case in _RUNNER[world]:
        name, m, v, n_layers, split, variant = case
        per_rank = [res[case] for res in results]
        model_names = sorted(n for n, _ in llama.build_model(_args(n_layers)).named_parameters())
        assert sorted(n for r in per_rank for n in r["names"]) == model_names, case  # a partition
        assert sum(r["last"] for r in per_rank) == 1
        n = world * v  # the docstring's total: 2 m (v p - 1) messages per step (pp > 1); zbv: 2 m (2p - 2)
        boundaries = n - 1 - (name == "zbv")  # zbv: stages p-1 and p hand over inside rank p-1
        assert sum(len(r["sent"]) for r in per_rank) == (2 * m * boundaries if world > 1 else 0), case
        for rank, r in enumerate(per_rank):
            if variant == "plain":
                bad = {k: e for k, e in r["grad_err"].items() if not e <= TOL}
                assert not bad, (case, rank, bad)
                bad = {k: e for k, e in r["grad2_err"].items() if not e <= TOL}
                assert not bad, (case, rank, "second step", bad)
            elif variant == "mean":  # m x too large: the error the plain check rules out
                bad = {k: e for k, e in r["grad_m_err"].items() if not e <= TOL}
                assert not bad, (case, rank, bad)
                assert min(r["grad_err"].values()) > 0.5 * (m - 1)
            else:  # I computed no parameter gradient: every one is W's (norms and embedding too)
                assert r["no_grad"] == r["names"], (case, rank, r["no_grad"])
            # P2P: one activation per micro-batch out of each stage but the last, one gradient
            # out of each stage but the first; B_mb x S x dim elements each.
            own = set(r["stages"])
            boundaries = sum(s < world * v - 1 and s + 1 not in own for s in own) + sum(
                s > 0 and s - 1 not in own for s in own)
            assert r["sent"] == [B_MB * SEQ * MODEL["dim"]] * (m * boundaries), (case, rank, len(r["sent"]))
            assert len(r["sent"]) <= 2 * m * v  # the docstring's per-rank bound
            if variant == "plain":
                assert r["eval_grads"] == 0, (case, rank)
            if not r["last"]:
                assert r["loss"] == 0.0 and r.get("loss2", 0.0) == r.get("eval_loss", 0.0) == 0.0, (case, rank)
                continue
            if variant == "plain":
                assert abs(r["eval_loss"] - r["ref_loss"]) <= TOL * r["ref_loss"], (case, r["eval_loss"])
            want = r["ref_loss"] * (m if variant == "mean" else 1)
            assert abs(r["loss"] - want) <= TOL * want, (case, r["loss"], want)
            if variant == "plain":
                assert abs(r["loss2"] - want) <= TOL * want, (case, r["loss2"], want)


# ---------------------------------------------------------------------------------------
# 4. Loss parity through train.main, float32, 10 steps

M4 = ["model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "run.eval_every=5", "run.eval_steps=1"]
SGD = ["training.optimizer=sgd", "training.lr=0.5", "training.momentum=0.9"]


def _pp(schedule: str, pp: int, m: int, *extra: str) -> list[str]:
    return [f"parallel.pp={pp}", f"parallel.pp_schedule={schedule}", f"parallel.pp_microbatches={m}", *extra]


# (name, optimizer overrides, world, layout)
_LOSS_RUNS = [
    ("pp2-gpipe-m4", [], 2, _pp("gpipe", 2, 4)),
    ("pp2-1f1b-m8-sgd", SGD, 2, _pp("1f1b", 2, 8)),
    ("pp2-interleaved-m8-sgd", SGD, 2, _pp("interleaved_1f1b", 2, 8, "parallel.pp_stages_per_rank=2")),
    ("pp2-zero_bubble-m8", [], 2, _pp("zero_bubble", 2, 8)),
    ("pp4-gpipe-m8-sgd", SGD, 4, _pp("gpipe", 4, 8)),
    ("pp4-1f1b-m4", [], 4, _pp("1f1b", 4, 4)),
    ("pp4-zero_bubble-m4-sgd", SGD, 4, _pp("zero_bubble", 4, 4)),
    ("pp2-zbv-m4", [], 2, _pp("zbv", 2, 4, "parallel.pp_stages_per_rank=2")),  # 4 stages of 1 layer, in a V
    ("pp2-zbv-m2-sgd", SGD, 2, _pp("zbv", 2, 2, "parallel.pp_stages_per_rank=2")),  # m < 2p - 1
    ("pp4-zbv-m8-8layers", ["model.n_layers=8"], 4, _pp("zbv", 4, 8, "parallel.pp_stages_per_rank=2")),
    ("pp2-dp2-tp2", [], 8, ["parallel.pp=2", "parallel.dp_shard=2", "parallel.tp=2", "training.micro_batch_size=4",
                            "parallel.pp_microbatches=2"]),
    # zero-bubble with the techniques that compute weight gradients in their own machinery
    # (FSDP: _FSDP_RUNS; float8: test_zero_bubble_float8_matches_single_process_float8)
    ("pp2-zero_bubble-ac-full", [], 2, _pp("zero_bubble", 2, 4, "activation_checkpoint.mode=full")),
    ("pp2-zero_bubble-cp2", [], 4, _pp("zero_bubble", 2, 4, "parallel.cp=2")),  # CP: FSDP over cp as well
    ("pp2-zero_bubble-tp2-async", [], 4, _pp("zero_bubble", 2, 4, "parallel.tp=2", "parallel.async_tp=true")),
]


def _reference_run(tmp_path_factory, opt: list[str]) -> list[dict]:
    """The single-process run (distributed.reference_run), evaluating at steps 5 and 10."""
    ref = reference_run(tmp_path_factory, M4 + opt)
    assert [r["step"] for r in ref if "val_loss" in r] == [5, 10]
    return ref


@pytest.mark.parametrize("name, opt, world, layout", _LOSS_RUNS, ids=[r[0] for r in _LOSS_RUNS])
def test_loss_parity_through_train(tmp_path_factory, name, opt, world, layout):
    """The loss (it lives on the last stage; every rank logs it), gradient norm and
    validation loss within distributed.PARITY_BOUNDS of the single-process run."""
    _reference_run(tmp_path_factory, opt)
    err = loss_parity(tmp_path_factory, world, M4 + opt, layout)
    assert not exceeding(err), (name, err)


# ---------------------------------------------------------------------------------------
# 5. PP x FSDP: one reduce-scatter and one all-gather per FSDP unit per optimizer step

def _train_counting_reduce_scatter(rank: int, world: int, argv: list[str]
                                   ) -> tuple[list[dict], list[int], list[int]]:
    """train.main with dist.reduce_scatter_single and dist.all_gather_single counted
    (not those of evaluations); a step ends at clip_grad_norm. Returns the history and the
    number of reduce-scatters and of all-gathers in each step."""
    import train

    events = []
    real_rs, real_ag, real_clip, real_eval = (dist.reduce_scatter_single, dist.all_gather_single,
                                              train.clip_grad_norm, train.evaluate)

    def counted(kind, real):
        def call(*args, **kwargs):
            events.append(kind)
            return real(*args, **kwargs)
        return call

    def clip(*args, **kwargs):
        events.append("step")
        return real_clip(*args, **kwargs)

    def evaluate(*args, **kwargs):
        start = len(events)
        try:
            return real_eval(*args, **kwargs)
        finally:
            del events[start:]

    dist.reduce_scatter_single, dist.all_gather_single = counted("rs", real_rs), counted("ag", real_ag)
    train.clip_grad_norm, train.evaluate = clip, evaluate
    try:
        history = train.main(argv)
    finally:
        dist.reduce_scatter_single, dist.all_gather_single = real_rs, real_ag
        train.clip_grad_norm, train.evaluate = real_clip, real_eval
    per_step, n = [], {"rs": 0, "ag": 0}
    for e in events:
        if e == "step":
            per_step.append(n)
            n = {"rs": 0, "ag": 0}
        else:
            n[e] += 1
    assert n["rs"] == 0, "reduce-scatters after the last step"
    return history, [c["rs"] for c in per_step], [c["ag"] for c in per_step]


_FSDP_RUNS = [  # (name, optimizer, layout, pp_stages_per_rank, split points)
    # 1 + 3 layers, 2 pipeline micro-batches x 2 micro-steps of gradient accumulation
    ("1f1b-split-accum2-sgd", SGD, ["parallel.pp=2", "parallel.dp_shard=2", "training.micro_batch_size=2",
                                    "parallel.pp_microbatches=2", "parallel.pp_split_points=[1]"], 1, [1]),
    # two stages (two FSDP models) per rank; stage 2 is a middle stage without a root unit
    ("interleaved", [], ["parallel.pp=2", "parallel.dp_shard=2", "training.micro_batch_size=4",
                         "parallel.pp_microbatches=4", "parallel.pp_schedule=interleaved_1f1b",
                         "parallel.pp_stages_per_rank=2"], 2, None),
    # split backward: the reduce-scatter comes after the stage's last W, not its last I;
    # 2 micro-batches x 2 micro-steps of gradient accumulation
    ("zero_bubble-accum2", [], ["parallel.pp=2", "parallel.dp_shard=2", "training.micro_batch_size=2",
                                "parallel.pp_microbatches=2", "parallel.pp_schedule=zero_bubble"], 1, None),
]


def test_pp_fsdp_gathers_per_micro_batch_when_told_to(tmp_path_factory):
    """parallel.fsdp_pp_gather_once=false: blocks are gathered again for every forward and
    backward of every micro-batch (2 x 4 micro-batches x blocks, plus the root once), for
    less memory; the training still matches the single-process run."""
    ref = _reference_run(tmp_path_factory, [])
    layout = ["parallel.pp=2", "parallel.dp_shard=2", "training.micro_batch_size=4", "parallel.pp_microbatches=4",
              "parallel.fsdp_pp_gather_once=false"]
    out = run_on_ranks(_train_counting_reduce_scatter, 4,
                       train_argv(str(tmp_path_factory.mktemp("per-mb")), *M4, *layout), timeout=300)
    for rank, (_, scatters, gathers) in enumerate(out):
        blocks = 2  # 4 layers over 2 stages; each rank's stage has a root unit too (first / last)
        assert scatters == [blocks + 1] * 10 and gathers == [2 * 4 * blocks + 1] * 10, (rank, scatters, gathers)
    assert not exceeding(parity([h for h, _, _ in out], ref))


@pytest.mark.parametrize("name, opt, layout, v, split", _FSDP_RUNS, ids=[r[0] for r in _FSDP_RUNS])
def test_pp_fsdp_reduce_scatters_once_per_step(tmp_path_factory, name, opt, layout, v, split):
    """PP 2 x FSDP 2: in every step each rank issues exactly one reduce-scatter and one
    all-gather per FSDP unit of its stages (a unit per block, plus the root of the first /
    last stage), not one per micro-batch (m, or m x micro-steps, times that): the units
    stay gathered from their first forward to their last backward
    (parallel.fsdp_pp_gather_once); and the training matches the single-process run."""
    ref = _reference_run(tmp_path_factory, opt)
    out = run_on_ranks(_train_counting_reduce_scatter, 4,
                       train_argv(str(tmp_path_factory.mktemp(name)), *M4, *opt, *layout), timeout=300)
    n = 2 * v
    layers = pipeline.split_layers(4, n, split)
    units = {r: sum(len(layers[s]) + (s in (0, n - 1)) for s in range(r, n, 2)) for r in range(2)}
    assert units == ({0: 2, 1: 4} if split else {0: 3, 1: 3})
    for rank, (_, scatters, gathers) in enumerate(out):
        assert scatters == [units[rank // 2]] * 10, (rank, scatters)  # rank = pp * 2 + dp_shard
        assert gathers == [units[rank // 2]] * 10, (rank, gathers)
    err = parity([h for h, _, _ in out], ref)
    assert not exceeding(err), (name, err)


# ---------------------------------------------------------------------------------------
# 6. Zero-bubble with the techniques that compute weight gradients in their own machinery
# (FSDP, CP and async TP through train.main: _LOSS_RUNS and _FSDP_RUNS above)

# test_float8.LOSS_ULPS: float32 loss rounding over 10 SGD steps, 10 ulps (~1e-6 relative);
# float8 itself moves the loss by 4.5e-6 - 1e-5 relative, so this bound sees float8.
FLOAT8_LOSS_ULPS = 1e-6
FLOAT8 = ["float8.enabled=true", "float8.recipe=tensorwise"]


def test_zero_bubble_float8_matches_single_process_float8(tmp_path_factory):
    """PP 2 zero-bubble with float8 linears (tensorwise), 4 micro-batches of 2 sequences,
    SGD (test_float8 says why): every Float8Matmul computes grad_x in I and its float8 dW
    GEMM in W, so the run equals the single-process float8 run with the same micro-batches
    (a tensorwise activation scale spans one micro-batch) within test_float8's LOSS_ULPS
    (measured: bitwise), and float8 is in use (the float32 run differs by more)."""
    opt = M4 + SGD + FLOAT8 + ["training.micro_batch_size=2"]  # the reference: 4 micro-steps of 2
    err = loss_parity(tmp_path_factory, 2, opt, _pp("zero_bubble", 2, 4, "training.micro_batch_size=8"))
    assert err["loss"] <= FLOAT8_LOSS_ULPS and err["val_loss"] <= FLOAT8_LOSS_ULPS, err
    assert not exceeding(err), err
    float8_run, float32_run = reference_run(tmp_path_factory, opt), _reference_run(tmp_path_factory, SGD)
    assert max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(float8_run, float32_run)) > FLOAT8_LOSS_ULPS


def _one_rank(schedule: str, v: int, prepare=None, dtype: torch.dtype = F64, skip_w: bool = False, m: int = 2
              ) -> tuple[float, dict]:
    """pp = 1, in this process (no process group: the stages hand over locally): the
    schedule's v stages of the 4-layer model, prepare(stages) after init. Returns the loss
    and every parameter's gradient by name. skip_w: W does nothing."""
    args = _args(4)
    inputs, labels = _batch(args, m)
    stages = pipeline.build_stages(llama.build_model(args, "meta"), 0, 1, v, None, schedule)
    model = pipeline.Stages(stages)
    llama.materialize(model, "cpu")
    llama.init_weights(model, args, SEED)
    model.to(dtype)
    if prepare is not None:
        prepare(stages)
    tokens = labels.numel()
    runner = pipeline.PipelineRunner(pipeline.build_schedule(schedule, 1, m, v)[0], stages, v, None,
                                     lambda logits, y: _ce_sum(logits, y) / tokens, (B_MB, SEQ, args.dim), dtype,
                                     torch.device("cpu"))
    if skip_w:
        runner._backward_weight = lambda deferred: None
    loss = runner.step(list(inputs.chunk(m)), list(labels.chunk(m)), positions=torch.arange(SEQ))
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _exact(grads: dict, m: int = 2) -> dict:
    """Parameters whose gradient is not the float64 full-batch reference's (TOL)."""
    args = _args(4)
    _, ref = _reference(args, *_batch(args, m))
    return {k: _err(g, ref[k]) for k, g in grads.items() if not _err(g, ref[k]) <= TOL}


def test_zero_bubble_with_activation_checkpointing_recomputes_once(capsys):
    """Full activation checkpointing on every block, zbv's two stages: their I runs the
    full backward from the one recompute (a split would recompute again in W), so each
    block runs forward exactly twice per micro-batch (F, recompute); the gradients are the
    reference's; the log says so once."""
    calls = collections.Counter()

    def checkpointed(stages):
        for stage in stages.values():
            for block in stage.layers.values():
                block.checkpoint_fn = functools.partial(checkpoint, use_reentrant=False, preserve_rng_state=False)
                block.attention.register_forward_hook(lambda *_, i=block.layer_id: calls.update([i]))

    _, grads = _one_rank("zbv", 2, checkpointed)
    assert calls == {i: 2 * 2 for i in range(4)}, calls  # 2 micro-batches x (forward + one recompute)
    assert not _exact(grads)
    assert capsys.readouterr().out.count("recompute activations in backward") == 1


class _Unsplit(torch.autograd.Function):
    """y = x w^T, its backward computing both gradients whatever ctx.needs_input_grad says."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        return dy @ w, dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


def test_zero_bubble_falls_back_where_it_cannot_split(capsys):
    """A custom Function that computes its weight gradient in I anyway (the runner sees it
    and W passes it on); a tied weight (two weight nodes lead straight into one node, which
    W cannot ask for one of them alone: the stage runs full backwards); compiled blocks
    (torch.compile: the stage runs full backwards): the gradients are still the
    reference's (tied, compiled: bitwise the unsplit run's), each fallback said once."""
    def unsplit(stages):
        stages[1].layers["3"].feed_forward.output_proj_fn = lambda x, linear: _Unsplit.apply(x, linear.weight)

    _, grads = _one_rank("zbv", 2, unsplit)
    assert not _exact(grads)
    out = capsys.readouterr().out
    assert out.count("_UnsplitBackward computes its weight gradient with its input gradient") == 1, out

    def tied(stages):  # two norms multiply by one weight: both products' nodes lead into its AccumulateGrad
        stages[0].layers["1"].attention_norm.weight = stages[0].layers["0"].attention_norm.weight

    _, split = _one_rank("zero_bubble", 1, tied, m=3)
    _, unsplit_run = _one_rank("gpipe", 1, tied, m=3)
    assert split.keys() == unsplit_run.keys() and all(_err(split[k], unsplit_run[k]) <= TOL for k in split)
    out = capsys.readouterr().out
    assert out.count("stage 0: the weight gradient of") == 1 and "a shared or tied weight" in out, out

    def compiled(stages):  # a compiled block's backward is one node, run in one pass
        for block in stages[0].layers.values():
            block.compile()

    _, split = _one_rank("zero_bubble", 1, compiled, torch.float32)
    _, unsplit_run = _one_rank("gpipe", 1, compiled, torch.float32)
    assert all(torch.equal(split[k], unsplit_run[k]) for k in split)
    assert capsys.readouterr().out.count("run compiled modules (torch.compile)") == 1


def test_zero_bubble_runs_float8_weight_gradients_in_w(capsys):
    """Float8 linears, one stage (stage 0 is the last: I stops at the embedding's output):
    with W disabled no parameter has a gradient (Float8Matmul's dW GEMM is W's), and with
    W the gradients are bitwise those of the unsplit backward (GPipe, the same micro-
    batches); no layer runs unsplit."""
    def to_float8(stages):
        assert len(float8.convert_to_float8(stages[0], "tensorwise")) == 1  # all but the output

    _, unsplit = _one_rank("gpipe", 1, to_float8, torch.float32)
    _, split = _one_rank("zero_bubble", 1, to_float8, torch.float32)
    _, no_w = _one_rank("zero_bubble", 1, to_float8, torch.float32, skip_w=True)
    assert all(g is None for g in no_w.values()), [k for k, g in no_w.items() if g is not None]
    assert all(torch.equal(split[k], unsplit[k]) for k in unsplit)
    assert "weight gradient" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# 7. Bad input through config.validate

def _cfg(*overrides: str):

    return config.load_config(os.path.join(ROOT, "configs/debug.yaml"), list(overrides))


@pytest.mark.parametrize("overrides, world, words", [
    (["parallel.pp=4", "model.n_layers=3"], 4, ["model.n_layers=3", "parallel.pp * parallel.pp_stages_per_rank",
                                                "= 4"]),
    (["parallel.pp=2", "parallel.pp_stages_per_rank=3", "parallel.pp_schedule=interleaved_1f1b"], 2,
     ["model.n_layers=4", "2 * 3 = 6"]),
    (["parallel.pp=4", "parallel.pp_microbatches=2"], 4, ["1f1b", "parallel.pp=4", "parallel.pp_microbatches=2"]),
    (["parallel.pp=4", "parallel.pp_microbatches=3", "parallel.pp_schedule=zero_bubble"], 4,
     ["zero_bubble", "parallel.pp=4", "parallel.pp_microbatches=3"]),
    (["parallel.pp=2", "parallel.pp_microbatches=1", "parallel.pp_schedule=interleaved_1f1b",
      "parallel.pp_stages_per_rank=2"], 2, ["parallel.pp_microbatches=1", "parallel.pp=2"]),
    (["parallel.pp=4", "parallel.pp_microbatches=6", "parallel.pp_schedule=interleaved_1f1b", "model.n_layers=8",
      "parallel.pp_stages_per_rank=2"], 4, ["parallel.pp_microbatches=6", "multiple of parallel.pp=4"]),
    (["parallel.pp=2", "parallel.pp_microbatches=3"], 2, ["training.micro_batch_size=8", "parallel.pp_microbatches=3"]),
    (["parallel.pp=2", "parallel.dp_shard=2", "training.micro_batch_size=4", "parallel.pp_microbatches=8"], 4,
     ["training.micro_batch_size=4", "parallel.pp_microbatches=8"]),
    (["parallel.pp=2", "parallel.pp_stages_per_rank=2"], 2, ["parallel.pp_stages_per_rank=2", "1f1b"]),
    (["parallel.pp=2", "parallel.pp_schedule=zbv"], 2, ["parallel.pp_schedule=zbv", "pp_stages_per_rank=2", "got 1"]),
    (["parallel.pp=2", "parallel.pp_split_points=[0]"], 2, ["split points [0]", "(0, 4)"]),
    (["parallel.pp=2", "parallel.pp_split_points=[4]"], 2, ["split points [4]", "(0, 4)"]),
    (["parallel.pp=2", "parallel.pp_split_points=[1, 2]"], 2, ["split points [1, 2]", "1 increasing"]),
    (["parallel.pp=4", "parallel.pp_split_points=[1, 3, 2]"], 4, ["split points [1, 3, 2]", "3 increasing"]),
    (["parallel.pp=2", "parallel.pp_split_points=[true]"], 2, ["parallel.pp_split_points=[True]", "layer indices"]),
])
def test_validate_rejects_pipeline_configs(overrides, world, words):

    with pytest.raises(ValueError) as err:
        config.validate(_cfg(*overrides), world)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


@pytest.mark.parametrize("overrides, world", [
    (["parallel.dp_shard=2", "training.micro_batch_size=4"], 4),
    (["parallel.dp_replicate=2", "training.micro_batch_size=4"], 4),
    (["float8.enabled=true"], 2), (["activation_checkpoint.mode=full"], 2),
    (["parallel.tp=2", "parallel.async_tp=true"], 4), (["parallel.tp=2"], 4), ([], 2),
])
def test_validate_treats_zbv_as_zero_bubble(overrides, world):
    """Both split the backward into I and W: config.validate accepts or refuses each
    layout for both alike, a message naming the schedule."""
    def verdict(schedule: str, *extra: str) -> str | None:
        try:
            config.validate(_cfg("parallel.pp=2", f"parallel.pp_schedule={schedule}", *extra, *overrides), world)
        except ValueError as e:
            return str(e).replace(schedule, "SCHEDULE")
        return None

    assert verdict("zbv", "parallel.pp_stages_per_rank=2") == verdict("zero_bubble")


def test_nonpositive_microbatches_are_refused():

    with pytest.raises(ValueError, match="pp_microbatches=-1"):
        config.validate(_cfg("parallel.pp=2", "parallel.pp_schedule=gpipe", "parallel.pp_microbatches=-1"), 2)
    with pytest.raises(ValueError):
        pipeline.build_schedule("gpipe", 2, 0)


def test_validate_accepts_what_the_pipeline_can_run():

    ok = [
        (["parallel.pp=2", "parallel.pp_schedule=zero_bubble"], 2, "pp2 dp1x1 cp1 tp1"),
        (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=2",
          "parallel.pp_microbatches=4"], 2, "pp2 dp1x1 cp1 tp1"),
        (["parallel.pp=2", "parallel.pp_schedule=gpipe", "parallel.pp_microbatches=1"], 2, "pp2 dp1x1 cp1 tp1"),
        (["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_stages_per_rank=2", "parallel.pp_microbatches=1"],
         2, "pp2 dp1x1 cp1 tp1"),  # any m >= 1, as torch (the V is built for 2p - 1)
        (["parallel.pp=4", "parallel.pp_microbatches=8", "parallel.pp_split_points=[1, 2, 3]"], 4,
         "pp4 dp1x1 cp1 tp1"),
        (["parallel.pp=2", "parallel.tp=2", "training.micro_batch_size=4", "parallel.pp_microbatches=2"], 8,
         "pp2 dp1x2 cp1 tp2"),
        # zero-bubble composes with everything (once refused: its weight-gradient split ran
        # outside autograd; now it splits the autograd graph)
        (["parallel.pp=2", "parallel.pp_schedule=zero_bubble", "parallel.dp_shard=2", "training.micro_batch_size=4"],
         4, "pp2 dp1x2 cp1 tp1"),
        (["parallel.pp=2", "parallel.pp_schedule=zero_bubble", "parallel.dp_replicate=2",
          "training.micro_batch_size=4"], 4, "pp2 dp2x1 cp1 tp1"),
        (["parallel.pp=2", "parallel.pp_schedule=zero_bubble", "parallel.cp=2"], 4, "pp2 dp1x1 cp2 tp1"),
        (["parallel.pp=2", "parallel.pp_schedule=zero_bubble", "float8.enabled=true"], 2, "pp2 dp1x1 cp1 tp1"),
        (["parallel.pp=2", "parallel.pp_schedule=zero_bubble", "activation_checkpoint.mode=full"], 2,
         "pp2 dp1x1 cp1 tp1"),
        (["parallel.pp=2", "parallel.pp_schedule=zero_bubble", "parallel.tp=2", "parallel.async_tp=true"], 4,
         "pp2 dp1x1 cp1 tp2"),
    ]
    for overrides, world, layout in ok:
        assert config.validate(_cfg(*overrides), world).layout == layout, overrides
