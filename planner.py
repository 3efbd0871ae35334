"""Dry-run planner: what one rank of a layout holds, computes and sends per step, on paper.

    python planner.py --config configs/llama3_405b.yaml --world-size 512 [--rank R]
    python planner.py --config configs/llama3_70b.yaml --world-size 256 --hardware h100   # + step time
    python planner.py --config configs/debug.yaml --world-size 8 --search --hardware measured --memory-gib 4

What it does
    Validates the config for the requested world size, starts a FAKE process group of
    that size in this one process (torch's "fake" backend: new_group works, collectives
    do nothing), builds the model on the meta device and applies parallelize.parallelize, the
    same chain a real run applies, for ONE rank. Then it reports, for that rank:
      * memory: parameters, gradients and optimizer state, counted on the parallelized
        meta model AND by formula from the global shapes (the two must agree);
      * activations per micro-batch (with the configured activation checkpointing) and
        the number of micro-batches the pipeline schedule keeps in flight;
      * FLOPs per step (model FLOPs, and with the recomputation of checkpointing);
      * bytes per step for every collective on every parallel dimension, found by
        walking this rank's pipeline actions (or micro-steps) through what each technique
        file issues per forward / backward / gather, with the formula of each;
      * the pipeline bubble of the schedule (simulated, and the closed form);
      * with --hardware (hardware.py: h100, h200, a100 from spec sheets, or `measured`,
        this machine microbenchmarked once): the step time (step_time, below);
      * with --search: every layout of the world size that config.validate accepts and
        that fits in --memory-gib, fastest first (search).
    No GPU, no memory, seconds on a laptop, even for 405B on 512 ranks.

Step time (step_time), per step of one rank:
    compute    each part's FLOPs (the blocks' linears, in float8 when on; attention; the
               output projection; checkpointing's recomputed forward) at the achieved
               fraction of the device's GEMM rate in that dtype; per-op checkpointing
               adds its measured (or assumed) cost
    comm       every collective of the bytes above: calls x latency + bytes x ring factor /
               bandwidth (NVLink inside a node, the NIC across: groups by their ranks), or
               `measured`'s fitted gloo costs
    exposed    what compute does not hide, on hardware that overlaps (GPUs): FSDP's
               gathers and reduce-scatters behind all compute but the first unit's gather,
               async TP's ring sends behind the block matmuls, ring attention's sends behind
               attention, the pipeline's sends behind compute; the rest (sync TP, HSDP's
               all-reduce, all-gather CP, the clipping and loss all-reduces) in full
    pipeline   the schedule simulated with each stage's share of the work (the last
               stage holds the output layer), its makespan the step
    cores      `measured` with more ranks than cores: at least world / cores x compute
    The result: step, tokens/s per device, MFU against the dtype's peak. Checked against
    real steps on this machine by bench/planner.py (and tests/test_planner.py, -m slow).

Conventions
    Bytes of a collective are those handed to it (comm.py's docstring); tests/test_planner.py
    checks them, the call counts and memory against real gloo runs of small layouts, and
    the activation estimate against measured peak growth.

Activation formula (bytes kept from forward to backward, per micro-batch on one stage;
a = bytes of an activation, T tokens of the micro-batch on this rank (B x S / cp),
n = T / tp under sequence parallel (else T), D dim, q = H hd / tp, k = Hkv hd / tp,
f = F / tp, h = H / tp heads, V vocabulary):
    per block, no checkpointing (measured exactly on CPU, tests/test_planner.py):
      residual stream and norms  2 n (2 D a + 4)       block input and h, normalized, rsqrt
      linear inputs              2 T D a               norm outputs (gathered under SP)
      attention                  T (2 q + 2 k) a + 4 T h   rotated q, k, v, output, LSE
                                 (all-gather CP: K and V of the whole sequence, 2 cp T k a;
                                 ring CP: plus the copy of the output wo reads, T q a)
      SwiGLU                     4 T f a               w1 out, w3 out, silu, product
    full checkpointing: the block input, n D a; selective "k": so on every k-th block;
    selective "op": the matmul and attention outputs and the block input,
      n D a + T (2 q + 2 k + 2 D + 2 f) a + 4 T h.
    Head (last stage): final norm n (D a + 4) + n D a, output input T D a, logits
    T V/tp a, the loss's float32 softmax T V/tp 4. RoPE tables S/cp hd 4 and token ids
    8 T. Forward peak under checkpointing: what the blocks before kept plus the running
    block's working set T (4 f + 2 D) a + n D a.
    FSDP adds gathered parameters (fsdp_gathered): the root unit from forward to backward
    (every unit without reshard_after_forward), and the running and prefetched units.
    Measured against this (tests/test_planner.py): 0.94-1.06 of the real growth over 17
    layouts, most within 1%. Not modelled: float8 keeps e4m3 copies of linear inputs and
    weights instead of the inputs (tensorwise: 1.06x over on the test model); without
    sequence parallel a TP rank keeps one more D-wide tensor per block (0.94).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import comm
import config
import float8
import hardware
import llama
import metrics
import parallelize
import pipeline
import tensor_parallel

GIB = 2 ** 30


@contextlib.contextmanager
def fake_world(world_size: int, rank: int):
    """A process group of `world_size` ranks that exists only in this process (torch's
    fake backend): groups can be made, collectives return at once without doing anything."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("planner: a process group is already initialized in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# 1. Memory


def memory(cfg: config.Config, plan: config.Plan, par: parallelize.Parallelized, coords: dict) -> dict:
    """Parameters, gradients and optimizer state of this rank: counted on the parallelized
    model, and by formula from the global shapes (pipeline split, TP split, FSDP rows)."""
    d, t = plan.degrees, cfg.training
    master = 8 if t.dtype == "float64" else 4
    params = list(par.model.parameters())
    counted = sum(p.numel() for p in params)

    # The formula: every global parameter this rank's stages own, its TP-local shape,
    # then ceil(rows / W) rows of it under FSDP.
    W = d["dp_shard"] * d["cp"] if d["dp_shard"] * d["cp"] * d["dp_replicate"] > 1 else 1
    n_stages = d["pp"] * cfg.parallel.pp_stages_per_rank
    split = pipeline.split_layers(plan.model_args.n_layers, n_stages, cfg.parallel.pp_split_points) \
        if d["pp"] > 1 else [list(range(plan.model_args.n_layers))]
    mine = [s for s in range(len(split)) if pipeline.stage_rank(s, d["pp"], cfg.parallel.pp_schedule) == coords["pp"]]
    layers = {str(i) for s in mine for i in split[s]}
    first, last = 0 in mine, len(split) - 1 in mine
    formula = 0
    for name, p in llama.build_model(plan.model_args, "meta").named_parameters():
        parts = name.split(".")
        if parts[0] == "layers" and parts[1] not in layers or parts[0] == "tok_embeddings" and not first \
                or parts[0] in ("norm", "output") and not last:
            continue
        owner = parts[-2]
        shape = tensor_parallel.local_shape(owner, tuple(p.shape), d["tp"]) if d["tp"] > 1 else tuple(p.shape)
        formula += math.ceil(shape[0] / W) * math.prod(shape[1:])
    if formula != counted:
        raise RuntimeError(f"planner: the formula gives {formula} parameters on this rank, the parallelized "
                           f"model holds {counted}: the formula no longer describes the chain")
    if t.optimizer == "adamw":
        opt, opt_formula = 2 * counted * master + 4 * len(params), "2 P x 4 B (exp_avg, exp_avg_sq) + 4 B step per tensor"
    else:
        opt = counted * master if t.momentum > 0 else 0
        opt_formula = "P x 4 B momentum" if t.momentum > 0 else "none (plain SGD)"
    return {"elements": counted, "tensors": len(params), "params": counted * master, "grads": counted * master,
            "optimizer": opt, "optimizer_formula": opt_formula, "W": W, "master": master}


def fsdp_gathered(cfg: config.Config, state) -> dict:
    """Bytes of full (gathered) parameters FSDP holds on a stage. `kept`: from the end of
    forward to backward (the root unit: embeddings, final norm, output; every block unit
    too without reshard_after_forward). `running`: what a running block adds under
    reshard_after_forward (its own gather and the next unit's, prefetched). A gathered
    parameter is its padded block of W ceil(rows / W) rows in the gather dtype."""
    if state is None:
        return {"kept": 0, "running": 0}
    gather = 2 if cfg.training.dtype == "bfloat16" else (8 if cfg.training.dtype == "float64" else 4)

    def full(unit) -> int:
        return sum(unit.world * n * gather for n in unit.numels)
    kept = sum(full(u) for u in state.units if not u.reshard_after_forward)
    running = sorted((full(u) for u in state.units if u.reshard_after_forward), reverse=True)[:2]
    return {"kept": kept, "running": sum(running)}


def activations(cfg: config.Config, plan: config.Plan, stage) -> dict:
    """Bytes one micro-batch keeps from forward to backward on one stage (module
    docstring), and the forward's peak: under checkpointing the block being run holds
    its working set (the SwiGLU's four f-wide tensors, the norm output, h and one D-wide
    temporary) on top of what the blocks before it kept."""
    d, args = plan.degrees, plan.model_args
    t, cp = d["tp"], d["cp"]
    dtype, ac = cfg.training.dtype, cfg.activation_checkpoint
    a = {"bfloat16": 2, "float32": 4, "float64": 8}[dtype]
    a32 = 8 if dtype == "float64" else 4
    m = (cfg.parallel.pp_microbatches or d["pp"]) if d["pp"] > 1 else 1
    T = cfg.training.micro_batch_size // m * cfg.data.seq_len // cp
    sp = t > 1 and cfg.parallel.sequence_parallel
    n = T // t if sp else T
    D, V = args.dim, args.vocab_size
    q, k, f, h = (args.n_heads * args.head_dim // t, args.kv_heads * args.head_dim // t, args.ffn_dim // t,
                  args.n_heads // t)
    ring, gathered = cp > 1 and cfg.parallel.cp_rotate == "ring", cp > 1 and cfg.parallel.cp_rotate == "allgather"
    norm = n * (2 * D * a + a32)  # input, normalized, rsqrt
    attention = T * (2 * q + (2 * cp if gathered else 2) * k) * a + T * h * a32  # q, k, v (all of them), out, LSE
    wo_input = T * q * a if ring else 0  # the ring's output is (B, H, S, hd): the reshape copies it
    full_block = 2 * norm + 2 * T * D * a + attention + wo_input + 4 * T * f * a
    op_block = n * D * a + T * (2 * q + 2 * k + 2 * D + 2 * f) * a + T * h * a32  # matmul + attention outputs
    working = T * (4 * f + 2 * D) * a + n * D * a  # SwiGLU's 4 f-wide tensors, norm output, h, one temporary
    # RoPE tables (float32, one row per local position) and, on the first stage, the ids.
    kept = cfg.data.seq_len // cp * args.head_dim * a32 + (T * 8 if stage.tok_embeddings is not None else 0)
    peak = kept  # the most kept while a block runs
    for block in stage.layers.values():
        if ac.mode == "full" or ac.mode == "selective" and ac.selective_option != "op" \
                and (block.layer_id + 1) % ac.selective_option == 0:
            peak = max(peak, kept + working)
            kept += n * D * a
        elif ac.mode == "selective" and ac.selective_option == "op":
            kept += op_block
        else:
            kept += full_block
        peak = max(peak, kept)
    blocks_peak = peak
    if stage.output is not None:
        kept += norm + T * D * a + T * V // t * a + T * V // t * a32  # norm, output input, logits, softmax
    return {"kept": kept, "peak": max(peak, kept), "blocks_peak": blocks_peak, "full_block": full_block,
            "op_block": op_block, "tokens": T, "working": working}


# ---------------------------------------------------------------------------------------
# 2. FLOPs and the pipeline bubble


def recompute_share(cfg: config.Config, args: llama.ModelArgs) -> float:
    """The share of the blocks whose forward checkpointing runs again in backward."""
    ac = cfg.activation_checkpoint
    if ac.mode == "full":
        return 1.0
    if ac.mode == "selective" and ac.selective_option != "op":
        return (args.n_layers // ac.selective_option) / args.n_layers
    return 0.0  # none, or op-level: only norms, RoPE and activations are recomputed


def flops(cfg: config.Config, plan: config.Plan) -> dict:
    """Model FLOPs per step per rank (6 N + 12 L H hd S per token, llama.flops_per_token,
    spread evenly over the ranks) and with checkpointing's recomputed forwards."""
    args, world = plan.model_args, math.prod(plan.degrees.values())
    fpt = llama.flops_per_token(args, cfg.data.seq_len)
    per_rank = fpt * plan.global_tokens / world
    share = recompute_share(cfg, args)
    block = 6 * (llama.num_params(args) - 2 * args.vocab_size * args.dim - args.dim) \
        + 12 * args.n_layers * args.n_heads * args.head_dim * cfg.data.seq_len  # the blocks' share of fpt
    recompute = share * block / 3 * plan.global_tokens / world  # one more forward of those blocks
    return {"per_token": fpt, "per_rank": per_rank, "recompute": recompute}


def bubble(cfg: config.Config, plan: config.Plan, pp_rank: int) -> dict | None:
    """The schedule's idle fraction (simulated with unit costs F 1, B 2 or I 1 + W 1)
    and the textbook closed form."""
    p = cfg.parallel
    pp = plan.degrees["pp"]
    if pp == 1:
        return None
    m, v = p.pp_microbatches or pp, p.pp_stages_per_rank
    orders = pipeline.SCHEDULES[p.pp_schedule](pp, m, v)
    sim = pipeline.simulate(orders, pp * v)
    v_idle = max(pp - 1, 2 * (2 * pp - 1 - m))  # zbv, in units of one stage's F (pipeline.py docstring)
    closed = {"gpipe": ("(p-1)/(m+p-1)", (pp - 1) / (m + pp - 1)),
              "1f1b": ("(p-1)/(m+p-1)", (pp - 1) / (m + pp - 1)),
              "interleaved_1f1b": ("(p-1)/(v m+p-1)", (pp - 1) / (v * m + pp - 1)),
              "zero_bubble": ("ZB-H1: about (p-1)/3 of 1F1B's bubble, here simulated", None),
              "zbv": ("b/(6m+b), b = max(p-1, 2(2p-1-m))", v_idle / (6 * m + v_idle))}[p.pp_schedule]
    return {"schedule": p.pp_schedule, "m": m, "v": v, "makespan": sim["makespan"],
            "idle": sim["idle"][pp_rank], "fraction": sim["idle"][pp_rank] / sim["makespan"],
            "formula": closed[0], "closed": closed[1], "in_flight": sim["peak_activations"][pp_rank], "pp": pp}


# ---------------------------------------------------------------------------------------
# 3. The report


@dataclass
class Report:
    cfg: config.Config
    plan: config.Plan
    rank: int
    coords: dict
    memory: dict
    activations: dict  # stage -> activations()
    flops: dict
    comm: comm.Comm
    logged: comm.Comm
    startup: comm.Comm
    bubble: dict | None
    fsdp: dict  # stage -> FSDP state
    fsdp_held: dict  # stage -> fsdp_gathered()
    float8_linears: int
    build_s: float


def _planned_dtype(cfg: config.Config) -> config.Config:
    if cfg.training.dtype != "auto":
        return cfg
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, dtype="bfloat16"))


def plan_rank(cfg: config.Config, world_size: int, rank: int = 0) -> Report:
    """Everything above for `rank` of a `world_size` layout, under a fake process group.
    training.dtype auto is planned as bfloat16: what it picks on a GPU, the machines a
    layout is planned for."""
    startup = comm.startup_comm(cfg, world_size)
    cfg = _planned_dtype(cfg)
    plan = config.validate(cfg, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"--rank {rank} is not in [0, {world_size})")
    started = time.perf_counter()
    with fake_world(world_size, rank):
        groups = parallelize.build_groups(plan.degrees, rank)
        coords = parallelize.rank_coords(plan.degrees, rank)
        par = parallelize.parallelize(cfg, plan, groups, coords, "meta")
        build_s = time.perf_counter() - started
        step_comm = comm.Walker(cfg, plan, par, coords).step()
        mem = memory(cfg, plan, par, coords)
        acts = {s: activations(cfg, plan, stage) for s, stage in par.stages.items()}
        n_f8 = sum(isinstance(m, float8.Float8Linear) for m in par.model.modules())
        held = {s: fsdp_gathered(cfg, state) for s, state in par.fsdp_states.items()}
    return Report(cfg, plan, rank, coords, mem, acts, flops(cfg, plan), step_comm, comm.logged_step_comm(plan, world_size),
                  startup, bubble(cfg, plan, coords["pp"]), par.fsdp_states, held, n_f8, build_s)


def _gib(n: float) -> str:
    return f"{n / GIB:10.3f} GiB"


DIM_NAMES = {"dp_shard_cp": "FSDP (dp_shard x cp)", "dp_replicate": "HSDP replicas (dp_replicate)",
             "tp": "tensor parallel (tp)", "cp": "context parallel (cp)", "pp": "pipeline (pp)",
             "world": "all ranks", "loss": "data ranks (loss)"}


def format_report(r: Report) -> str:
    cfg, plan, d = r.cfg, r.plan, r.plan.degrees
    world = math.prod(d.values())
    out = [f"nanotitan dry run: {cfg.model.name} ({llama.num_params(plan.model_args) / 1e9:.2f}B parameters) on "
           f"{world} ranks, layout {plan.layout}",
           f"rank {r.rank}: " + ", ".join(f"{k} {v}" for k, v in r.coords.items()) +
           f" | parallelized on meta under a fake process group in {r.build_s:.1f} s"
           f" | {len(r.activations)} stage(s) {sorted(r.activations)}, {r.float8_linears} float8 linears",
           f"batch: {cfg.training.batch_size} sequences x {cfg.data.seq_len} tokens = {plan.global_tokens:,} "
           f"tokens/step; {plan.grad_accum} micro-step(s) of {cfg.training.micro_batch_size} sequences per data rank"
           + (f", each cut into {r.bubble['m']} pipeline micro-batches" if r.bubble else ""),
           ""]
    m = r.memory
    out += ["memory per rank (P = parameter elements on this rank, W = FSDP shard ranks = dp_shard x cp = "
            f"{m['W']})",
            f"  parameters  {_gib(m['params'])}   P x {m['master']} B, P = sum over this rank's stages of "
            f"ceil(rows_tp / W) x cols = {m['elements']:,}",
            f"  gradients   {_gib(m['grads'])}   P x {m['master']} B",
            f"  optimizer   {_gib(m['optimizer'])}   {m['optimizer_formula']}",
            f"  total       {_gib(m['params'] + m['grads'] + m['optimizer'])}", ""]
    ac = cfg.activation_checkpoint
    mode = ac.mode + (f" ({ac.selective_option})" if ac.mode == "selective" else "")
    out.append(f"activations per micro-batch ({mode} checkpointing, {cfg.training.dtype}; formula in planner.py's "
               f"docstring)")
    total = 0
    for s, a in r.activations.items():
        out.append(f"  stage {s}: kept {_gib(a['kept'])}, forward peak {_gib(a['peak'])} for T = {a['tokens']:,} "
                   f"tokens (B/m x S/cp); one un-checkpointed block keeps {_gib(a['full_block'])}")
        total += a["kept"]
    for s, state in r.fsdp.items():
        held = r.fsdp_held[s]
        out.append(f"  stage {s}: FSDP holds {_gib(held['kept'])} of gathered parameters from forward to backward "
                   f"(root unit{', every unit: no reshard' if held['running'] == 0 else ''}), "
                   f"{_gib(held['running'])} more while a block runs (it and the prefetched next)")
    if r.bubble:
        per_stage = r.bubble["in_flight"] / r.bubble["v"]
        out.append(f"  the schedule keeps up to {r.bubble['in_flight']} (stage, micro-batch) forwards in flight on "
                   f"this rank: about {_gib(per_stage * total)} of activations at its peak")
    out.append("")
    f = r.flops
    out += ["FLOPs per step per rank",
            f"  model       {f['per_rank'] / 1e12:12.1f} TFLOP   (6 N_matmul + 12 L H hd S) = "
            f"{f['per_token'] / 1e9:.2f} GFLOP/token x {plan.global_tokens:,} tokens / {world} ranks",
            f"  recompute   {f['recompute'] / 1e12:12.1f} TFLOP   one more forward of the checkpointed blocks "
            f"(hardware FLOPs = model + recompute)", ""]
    out.append("bytes per step per parallel dimension (handed to each collective; per-rank wire bytes of a ring: "
               "AG (n-1) x, RS (n-1)/n x, AR 2 (n-1)/n x)")
    sizes = {"dp_shard_cp": d["dp_shard"] * d["cp"], "dp_replicate": d["dp_replicate"], "tp": d["tp"],
             "cp": d["cp"], "pp": d["pp"], "world": world, "loss": d["dp_replicate"] * d["dp_shard"] * d["cp"]}
    for group in DIM_NAMES:
        keys = sorted(k for k in r.comm.bytes if k[0] == group)
        if not keys:
            continue
        n = sizes[group]
        wire = sum(r.comm.bytes[k] * comm.RING[k[1]](n) for k in keys)
        out.append(f"  {DIM_NAMES[group]}, {n} ranks: {_gib(wire)} on the wire per rank")
        for k in keys:
            formulas = collections.Counter(r.comm.formulas[k])
            why = "; ".join(f"{c} x {fm}" if c > 1 else fm for fm, c in formulas.items())
            out.append(f"      {k[1]:15s} {r.comm.calls[k]:6d} calls {_gib(r.comm.bytes[k])} handed in   {why}")
    if not r.comm.bytes:
        out.append("  none (one rank)")
    out.append("  (a logged step adds one float64 all-reduce of the loss over the data ranks; evaluation is not "
               "counted; once at start-up the world broadcasts "
               f"{sum(r.startup.calls.values())} int64 from rank 0)")
    out.append("")
    b = r.bubble
    if b:
        closed = f" (closed form {b['formula']} = {b['closed']:.1%})" if b["closed"] is not None else \
            f" ({b['formula']})"
        out += [f"pipeline bubble: {b['schedule']}, p = {b['pp']}, m = {b['m']}, v = {b['v']}: this rank idles "
                f"{b['idle']} of {b['makespan']} time units = {b['fraction']:.1%}{closed}"]
    else:
        out.append("pipeline bubble: none (pp = 1)")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# 4. Step time


# The collectives a technique runs beside compute (on a device with `overlap`), and the
# compute that can hide them: FSDP's prefetched gathers and its reduce-scatters behind
# the blocks (all but the first unit's gather), async TP's ring sends behind the block
# matmuls, ring attention's K/V sends behind the attention blocks, the pipeline's P2P
# behind the stage's compute. Everything else (sync TP, HSDP's all-reduce, all-gather
# CP, the clip and loss all-reduces, float8 amaxes) is exposed.
HIDDEN_BEHIND = {("dp_shard_cp", "all_gather"): "all", ("dp_shard_cp", "reduce_scatter"): "all",
                 ("tp", "send"): "block matmuls", ("cp", "send"): "attention", ("pp", "send"): "all"}


def compute_split(cfg: config.Config, plan: config.Plan) -> dict[str, float]:
    """This rank's FLOPs per step by what runs them (model FLOPs spread evenly over the
    ranks, as flops() does): the blocks' linears, attention, the output projection, and
    checkpointing's recomputed forward of the blocks (their linears and attention)."""
    args, world = plan.model_args, math.prod(plan.degrees.values())
    tokens = plan.global_tokens / world
    linear = 6 * (llama.num_params(args) - 2 * args.vocab_size * args.dim - args.dim) * tokens
    attention = 12 * args.n_layers * args.n_heads * args.head_dim * cfg.data.seq_len * tokens
    recompute = flops(cfg, plan)["recompute"]
    share = recompute / (linear + attention) if linear + attention else 0.0
    return {"block matmuls": linear * (1 + share), "attention": attention * (1 + share),
            "output": 6 * args.vocab_size * args.dim * tokens}


def stage_flops(cfg: config.Config, plan: config.Plan) -> list[float]:
    """Model FLOPs per token of each pipeline stage, with checkpointing's recompute: its
    blocks' linears and attention, and on the last stage the output projection (for a
    small model a large share: the last stage is the slowest)."""
    args, p = plan.model_args, cfg.parallel
    n_stages = plan.degrees["pp"] * p.pp_stages_per_rank
    layer = 6 * (llama.num_params(args) - 2 * args.vocab_size * args.dim - args.dim) / args.n_layers \
        + 12 * args.n_heads * args.head_dim * cfg.data.seq_len
    layer *= 1 + recompute_share(cfg, args) / 3  # one more forward of a checkpointed block
    split = pipeline.split_layers(args.n_layers, n_stages, p.pp_split_points)
    return [len(layers) * layer + (6 * args.vocab_size * args.dim if s == n_stages - 1 else 0)
            for s, layers in enumerate(split)]


def pipeline_makespan(cfg: config.Config, plan: config.Plan, busy: float) -> float:
    """The step of a pipeline whose average rank is busy `busy` seconds: the schedule
    simulated with each stage's actions scaled by its share of the FLOPs (stage_flops),
    so the slowest stage sets the pace."""
    p, pp = cfg.parallel, plan.degrees["pp"]
    m, v = p.pp_microbatches or pp, p.pp_stages_per_rank
    work = stage_flops(cfg, plan)
    unit = busy / (3 * m * v)  # one forward of an average stage: a rank runs m v (F + B) = 3 m v units
    scale = [unit * w * len(work) / sum(work) for w in work]
    return pipeline.simulate(pipeline.SCHEDULES[p.pp_schedule](pp, m, v), pp * v, stage_scale=scale)["makespan"]


def _group_ranks(plan: config.Plan, group: str, rank: int) -> list[int]:
    if group == "world":
        return list(range(math.prod(plan.degrees.values())))
    return next(g for g in parallelize.group_ranks(plan.degrees, parallelize.GROUPS[group]) if rank in g)


def step_time(r: Report, hw) -> dict:
    """Per step of rank r on hardware hw (hardware.Hardware): compute per part, each
    collective's time and its exposed part, the pipeline bubble, the step, tokens/s per
    device and MFU."""
    cfg, plan = r.cfg, r.plan
    world = math.prod(plan.degrees.values())
    dtype = cfg.training.dtype
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"the step time is modelled for training.dtype bfloat16 or float32, not {dtype}")
    parts = compute_split(cfg, plan)
    linear_dtype = "float8" if cfg.float8.enabled else dtype
    compute = {part: hw.compute_s(f, linear_dtype if part == "block matmuls" else dtype, world, dtype)
               for part, f in parts.items()}
    ac = cfg.activation_checkpoint
    if ac.mode == "selective" and ac.selective_option == "op":
        compute["op-level recompute"] = hw.op_checkpoint_cost(world) * sum(compute.values())
    total_compute = sum(compute.values())

    steps = collections.Counter(r.comm.calls)
    nbytes = collections.Counter(r.comm.bytes)
    for key in r.logged.calls:  # a logged step's loss all-reduce, once per run.log_every steps
        steps[key] += r.logged.calls[key] / max(1, cfg.run.log_every)
        nbytes[key] += r.logged.bytes[key] / max(1, cfg.run.log_every)
    comm, exposed = {}, {}
    for (group, kind), calls in steps.items():
        ranks = _group_ranks(plan, group, r.rank)
        intra = len({g // hw.ranks_per_node for g in ranks}) == 1
        comm[group, kind] = hw.collective_s(kind, len(ranks), nbytes[group, kind], calls, world, intra)
    for key, t in comm.items():
        behind = HIDDEN_BEHIND.get(key) if hw.overlap else None
        hiding = 0.0 if behind is None else total_compute if behind == "all" else compute[behind]
        exposed[key] = max(0.0, t - hiding)
    fsdp = [k for k in comm if k[0] == "dp_shard_cp" and k in HIDDEN_BEHIND]
    if hw.overlap and fsdp:  # gathers and reduce-scatters share the compute; the first unit's gather shows
        total = sum(comm[k] for k in fsdp)
        gathers = r.comm.calls.get(("dp_shard_cp", "all_gather"), 0)
        first = comm.get(("dp_shard_cp", "all_gather"), 0.0) / gathers if gathers else 0.0
        shown = max(first, total - total_compute)
        for k in fsdp:
            exposed[k] = shown * comm[k] / total if total else 0.0
    busy = total_compute + sum(exposed.values())
    piped = pipeline_makespan(cfg, plan, busy) if r.bubble else busy
    step = piped
    if hw.cores and world > hw.cores:  # ranks take turns on the cores; a waiting rank lends its core
        step = max(piped, total_compute * world / hw.cores + sum(exposed.values()))
    peak = hw.rate(dtype, world)
    return {"compute": compute, "compute_s": total_compute, "comm": comm, "exposed": exposed,
            "bubble_s": piped - busy, "bubble_fraction": 1 - busy / piped, "sharing_s": step - piped, "step_s": step,
            "tokens_per_s": plan.global_tokens / step / world,
            "mfu": r.flops["per_rank"] / step / peak, "peak": peak, "achieved": hw.achieved_fraction(dtype, dtype, world),
            "linear_dtype": linear_dtype}


def format_step_time(r: Report, hw, t: dict) -> str:
    ms = lambda s: f"{s * 1e3:10.2f} ms"  # noqa: E731
    out = [f"step time on {hw.name}: {hw.source}",
           f"  compute     {ms(t['compute_s'])}   FLOPs at {t['achieved']:.0%} of the GEMM rate of their dtype "
           f"(block matmuls in {t['linear_dtype']}; checkpointing's recompute included)"]
    for part, s in t["compute"].items():
        out.append(f"      {part:15s} {ms(s)}")
    for group in DIM_NAMES:
        keys = sorted(k for k in t["comm"] if k[0] == group)
        if not keys:
            continue
        total, shown = sum(t["comm"][k] for k in keys), sum(t["exposed"][k] for k in keys)
        kinds = ", ".join(f"{k[1]} {t['comm'][k] * 1e3:.2f} ms" for k in keys)
        out.append(f"  {DIM_NAMES[group]:30s} {ms(total)}, exposed {ms(shown)}   ({kinds})")
    exposed = sum(t["exposed"].values())
    out.append(f"  communication exposed {ms(exposed)} of {ms(sum(t['comm'].values()))}"
               + ("" if hw.overlap else " (this device runs no collective beside compute: all exposed)"))
    if t["bubble_fraction"]:
        out.append(f"  pipeline bubble {ms(t['bubble_s'])}   ({t['bubble_fraction']:.1%} of the pipeline's makespan, "
                   "simulated with each stage's work)")
    if t["sharing_s"]:
        out.append(f"  sharing cores   {ms(t['sharing_s'])}   ({math.prod(r.plan.degrees.values())} ranks take turns "
                   f"on {hw.cores} cores)")
    out.append(f"  step        {ms(t['step_s'])}   {t['tokens_per_s']:,.0f} tokens/s per device, MFU "
               f"{t['mfu']:.1%} of {t['peak'] / 1e12:.3g} TFLOP/s {r.cfg.training.dtype}")
    return "\n".join(out)


def memory_gib(r: Report) -> float:
    """The most this rank holds: parameters, gradients, optimizer state, the activations
    its schedule keeps in flight at its peak, and FSDP's gathered parameters."""
    m = r.memory
    acts = max((a["peak"] for a in r.activations.values()), default=0)
    if r.bubble:
        acts = max(acts, r.bubble["in_flight"] / r.bubble["v"] * sum(a["kept"] for a in r.activations.values()))
    held = sum(h["kept"] + h["running"] for h in r.fsdp_held.values())
    return (m["params"] + m["grads"] + m["optimizer"] + acts + held) / GIB


# ---------------------------------------------------------------------------------------
# 5. Layout search


def candidates(cfg: config.Config, world: int) -> list[list[str]]:
    """Overrides of every layout of `world` ranks to try: degrees (powers dividing world),
    async or sync TP, activation checkpointing none or full; the micro-batch is the
    batch over the data-parallel degree (no accumulation). config.validate decides."""
    def divisors(n):
        return [k for k in range(1, n + 1) if n % k == 0]
    out = []
    for pp in divisors(world):
        for dpr in divisors(world // pp):
            for dps in divisors(world // pp // dpr):
                for cp in divisors(world // pp // dpr // dps):
                    tp = world // pp // dpr // dps // cp
                    dp = dpr * dps
                    if cfg.training.batch_size % dp:
                        continue
                    base = [f"parallel.pp={pp}", f"parallel.dp_replicate={dpr}", f"parallel.dp_shard={dps}",
                            f"parallel.cp={cp}", f"parallel.tp={tp}",
                            f"training.micro_batch_size={cfg.training.batch_size // dp}"]
                    if pp > 1 and not cfg.parallel.pp_microbatches:
                        base.append(f"parallel.pp_microbatches={2 * pp}")
                    for async_tp in ((False, True) if tp > 1 else (False,)):
                        for ac in ("none", "full"):
                            out.append(base + [f"parallel.async_tp={str(async_tp).lower()}",
                                               f"activation_checkpoint.mode={ac}"])
    return out


def search(cfg: config.Config, world: int, memory: float, hw, top: int = 10) -> list[dict]:
    """The layouts config.validate accepts that fit in `memory` GiB, fastest first."""
    found, refused, too_big = [], 0, 0
    for overrides in candidates(cfg, world):
        try:
            c = config.with_overrides(cfg, overrides)
            report = plan_rank(c, world)
        except (ValueError, NotImplementedError):
            refused += 1
            continue
        held = memory_gib(report)
        if held > memory:
            too_big += 1
            continue
        t = step_time(report, hw)
        found.append({"layout": report.plan.layout, "overrides": overrides, "step_s": t["step_s"],
                      "tokens_per_s": t["tokens_per_s"], "mfu": t["mfu"], "memory_gib": held,
                      "ac": report.cfg.activation_checkpoint.mode, "async_tp": report.cfg.parallel.async_tp})
    found.sort(key=lambda f: f["step_s"])
    return found, refused, too_big


def format_search(found: list[dict], refused: int, too_big: int, world: int, memory: float, hw, top: int) -> str:
    out = [f"layouts of {world} ranks that fit in {memory:g} GiB on {hw.name}, fastest first "
           f"({len(found)} fit; {too_big} need more memory; {refused} refused by config.validate):",
           f"  {'#':>3} {'tokens/s/device':>16} {'step':>11} {'MFU':>6} {'memory':>10}  layout"]
    for i, f in enumerate(found[:top]):
        extra = (", async TP" if f["async_tp"] else "") + (", AC full" if f["ac"] == "full" else "")
        out.append(f"  {i + 1:3d} {f['tokens_per_s']:16,.0f} {f['step_s'] * 1e3:8.1f} ms {f['mfu']:6.1%} "
                   f"{f['memory_gib']:6.2f} GiB  {f['layout']}{extra}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--world-size", type=int, required=True, help="number of ranks of the layout")
    parser.add_argument("--rank", type=int, default=0, help="which rank to describe (default 0)")
    parser.add_argument("--out", help="also write the report as Markdown to this file (e.g. docs/planner.md), "
                        "stamped with the machine, the date and the command")
    parser.add_argument("--hardware", choices=sorted(hardware.PROFILES),
                        help="also predict the step time on this hardware (hardware.py: spec-sheet GPU profiles, "
                        "or `measured`: this machine, microbenchmarked once and cached)")
    parser.add_argument("--search", action="store_true", help="list the fastest layouts of --world-size ranks "
                        "that fit in --memory-gib (needs --hardware)")
    parser.add_argument("--memory-gib", type=float, default=80.0, help="memory per device for --search (default 80)")
    parser.add_argument("--top", type=int, default=10, help="how many layouts --search lists (default 10)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=4")
    cli = parser.parse_args(argv)
    if cli.world_size < 1:
        raise ValueError(f"--world-size {cli.world_size} must be >= 1")
    cfg = config.load_config(cli.config, cli.overrides)
    if cli.search:
        if not cli.hardware:
            raise ValueError("--search ranks layouts by predicted step time: give --hardware too")
        hw = hardware.profile(cli.hardware)
        found, refused, too_big = search(_planned_dtype(cfg), cli.world_size, cli.memory_gib, hw)
        print(format_search(found, refused, too_big, cli.world_size, cli.memory_gib, hw, cli.top), flush=True)
        return found
    report = plan_rank(cfg, cli.world_size, cli.rank)
    text = format_report(report)
    if cli.hardware:
        text += "\n\n" + format_step_time(report, (hw := hardware.profile(cli.hardware)), step_time(report, hw))
    print(text, flush=True)
    if cli.out:
        command = " ".join(["python planner.py", *(argv if argv is not None else sys.argv[1:])])
        with open(cli.out, "w") as f:
            f.write(f"# Dry run: {cfg.model.name} on {cli.world_size} ranks\n\n{stamp(command)}\n\n```\n{text}\n```\n")
    return report


def stamp(command: str) -> str:
    """Where and when a generated table was made: machine, versions, date, command."""
    cpu = metrics.cpu_model()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f"- machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}, Python "
            f"{platform.python_version()}\n- date: {when}\n- command: `{command}`")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, NotImplementedError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
