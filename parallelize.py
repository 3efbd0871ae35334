"""The parallel layout and the parallelize chain: which ranks form which process
group, and how the model of one rank is built and transformed, step by step.

    degrees = {"pp": 2, "dp_replicate": 1, "dp_shard": 2, "cp": 1, "tp": 2}   # config.validate
    groups = build_groups(degrees, rank)         # {"tp": ..., "dp_shard_cp": ..., ...}
    par = parallelize(cfg, plan, groups, rank_coords(degrees, rank))   # on the meta device

Layout: world ranks are laid out as [pp, dp_replicate, dp_shard, cp, tp], tp innermost
(the ranks of a TP group are neighbours: on a GPU node they share NVLink). Besides one
group per dimension there are three groups over several: FSDP shards over dp_shard x cp
(CP ranks hold the same weights and see different tokens, so their gradients are reduced
together); the loss and metrics reduce over every rank that sees different tokens
(dp_replicate x dp_shard x cp); data loading splits over dp_replicate x dp_shard.

The chain (`parallelize`), in TorchTitan's order, each step seeing the model the previous
one left: float8 swap -> pipeline split -> tensor parallel -> context parallel ->
activation checkpointing -> compile -> FSDP. Each step is one `apply_*` call of the
technique's own file, with the process group it needs; the two transforms that are not a
technique of their own (activation checkpointing, compile) are defined here.

Nothing here issues a collective except `dist.new_group` in build_groups, so
`planner.py` runs `parallelize` for any rank of any world size under a fake process group.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torch.utils.checkpoint import checkpoint as recompute

import config
import context_parallel
import float8
import fsdp
import llama
import pipeline
import tensor_parallel

# ---------------------------------------------------------------------------------------
# The layout: process groups of the [pp, dp_replicate, dp_shard, cp, tp] grid

GROUPS = {d: (d,) for d in config.DIMS} | {
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "loss": ("dp_replicate", "dp_shard", "cp"),
}


def group_ranks(degrees: dict[str, int], dims: tuple[str, ...]) -> list[list[int]]:
    """All groups of world ranks that vary only along `dims` (pure arithmetic).
    E.g. degrees pp2 dp1x2 cp1 tp2, dims ("tp",) -> [[0,1],[2,3],[4,5],[6,7]]."""
    shape = [degrees[d] for d in config.DIMS]
    grid = torch.arange(math.prod(shape)).reshape(shape)  # grid[pp, dpr, dps, cp, tp] = rank
    axes = [config.DIMS.index(d) for d in dims]
    rest = [i for i in range(len(config.DIMS)) if i not in axes]
    size = math.prod(shape[i] for i in axes)
    return grid.permute(rest + axes).reshape(-1, size).tolist()  # one row per group


def rank_coords(degrees: dict[str, int], rank: int) -> dict[str, int]:
    """This rank's index along each dim, e.g. {'pp': 1, 'dp_replicate': 0, ...}."""
    coords, rest = {}, rank
    for d in reversed(config.DIMS):
        coords[d], rest = rest % degrees[d], rest // degrees[d]
    return coords


def build_groups(degrees: dict[str, int], rank: int, timeout: timedelta | None = None) -> dict[str, dist.ProcessGroup]:
    """Create every group of every kind on every rank, in the same order (new_group is
    collective), and return the ones containing this rank. `timeout` bounds every
    collective on them (None: torch's default, 30 minutes)."""
    mine = {}
    for name, dims in GROUPS.items():
        for ranks in group_ranks(degrees, dims):
            group = dist.new_group(ranks, timeout=timeout, group_desc=name)  # the name shows in errors and counters
            if rank in ranks:
                mine[name] = group
    return mine


def destroy_groups(groups: dict[str, dist.ProcessGroup]) -> None:
    for group in set(groups.values()):
        dist.destroy_process_group(group)


# ---------------------------------------------------------------------------------------
# The chain


@dataclass
class Parallelized:
    model: torch.nn.Module  # the Transformer, or pipeline.Stages holding this rank's stages
    stages: dict[int, llama.Transformer]  # stage index -> stage (one entry, 0, without PP)
    fsdp_states: dict[int, object]  # stage index -> fsdp state (empty without FSDP)
    float8_skipped: list[tuple[str, str]]  # (linear, why it stays in high precision)


def parallelize(cfg: config.Config, plan: config.Plan, groups: dict[str, dist.ProcessGroup], coords: dict[str, int],
                device: str | torch.device = "meta") -> Parallelized:
    """Build the model on `device` (meta: shapes only, no memory, no init) and apply the
    techniques in this order, each seeing the model the previous one left:
        float8 swap -> pipeline split -> tensor parallel -> context parallel ->
        activation checkpointing -> compile -> FSDP.
    Float8 comes first so that TP shards a Float8Linear like any linear. AC wraps each
    block before compile so the compiled graph includes the recomputation; compile comes
    before FSDP so FSDP's collectives stay outside the compiled blocks. No collective is
    issued here: the dry-run planner runs this same function under a fake process group."""
    args, degrees, t = plan.model_args, plan.degrees, cfg.training
    model = llama.build_model(args, device=device)
    skipped = []
    if cfg.float8.enabled:
        tp = degrees["tp"]
        skipped = float8.convert_to_float8(
            model, cfg.float8.recipe, fsdp_float8_all_gather=cfg.float8.fsdp_float8_all_gather,
            local_shape=functools.partial(tensor_parallel.local_shape, t=tp) if tp > 1 else None)
    # Pipeline: this rank keeps its stages, placed as the schedule places them
    # (pipeline.stage_rank: r, r + pp, ... looped; r and 2 pp - 1 - r in zbv's V), with the
    # embeddings on stage 0 and norm + output on the last; the techniques below apply to
    # each stage, which is a Transformer with the model's parameter names.
    pp, v = degrees["pp"], cfg.parallel.pp_stages_per_rank
    stages = {0: model}
    if pp > 1:
        stages = pipeline.build_stages(model, coords["pp"], pp, v, cfg.parallel.pp_split_points,
                                       cfg.parallel.pp_schedule)
    fsdp_states = {}
    for s, stage in stages.items():
        # Tensor parallel over tp: column / row-parallel projections, a vocabulary-parallel
        # embedding and output; the norms under sequence parallel get partial gradients,
        # summed over tp after backward (reduce_sequence_parallel_grads).
        if degrees["tp"] > 1:
            tensor_parallel.apply_tp(stage, groups["tp"], cfg.parallel.sequence_parallel, cfg.parallel.loss_parallel,
                                     cfg.parallel.async_tp)
        # Context parallel: each rank holds 2 of the 2 cp chunks of every sequence;
        # attention becomes ring (or all-gather) attention over the cp group.
        if degrees["cp"] > 1:
            context_parallel.apply_cp(stage, groups["cp"], cfg.data.seq_len, cfg.parallel.cp_rotate)
        apply_activation_checkpointing(stage, cfg.activation_checkpoint.mode,
                                       cfg.activation_checkpoint.selective_option)
        if cfg.compile:
            apply_compile(stage)
        # FSDP over dp_shard x cp (CP ranks hold the same weights), replicated over
        # dp_replicate (HSDP): one unit per block plus the root (embeddings, norm, output).
        # Mixed precision: fp32 shards, bf16 gather and compute, fp32 reduce-scatter.
        if degrees["dp_shard"] * degrees["cp"] * degrees["dp_replicate"] > 1:
            fsdp_states[s] = fsdp.apply_fsdp(
                stage, list(stage.layers.values()), groups["dp_shard_cp"], groups["dp_replicate"],
                param_dtype=torch.bfloat16 if config.DTYPES[t.dtype] == torch.bfloat16 else None,
                reshard_after_forward=cfg.parallel.fsdp_reshard_after_forward and not (
                    pp > 1 and cfg.parallel.fsdp_pp_gather_once),  # train.sync_stage_grads reshards once
            )
    if pp > 1:
        model = pipeline.Stages(stages)  # one module for init, optimizer, checkpoints
    return Parallelized(model, stages, fsdp_states, skipped)


# ---------------------------------------------------------------------------------------
# The two transforms defined here: activation checkpointing and compile

# Ops whose outputs selective AC keeps: matmuls and attention (the CPU flash op too;
# without it attention would be silently recomputed on CPU).
_SAC_SAVE = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_mm.default,
}


def _sac_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAC_SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: llama.Transformer, mode: str, option: str | int) -> None:
    """full: keep only each block's input, recompute the block in backward.
    selective "k": full AC on every k-th block (1-based: with k=2, blocks 2, 4, ...).
    selective "op": per op inside every block, keep matmul and attention outputs,
    recompute norms, RoPE and activations. TorchTitan's op policy also recomputes every
    second matmul to save more; we keep all of them (cheaper recompute, simpler rule)."""
    if mode == "none":
        return
    full = functools.partial(recompute, use_reentrant=False, preserve_rng_state=False)
    for block in model.layers.values():  # layer_id: the global index, also on a pipeline stage
        if mode == "full" or (option != "op" and (block.layer_id + 1) % option == 0):
            block.checkpoint_fn = full
        elif option == "op":
            context = functools.partial(create_selective_checkpoint_contexts, _sac_policy)
            block.checkpoint_fn = functools.partial(full, context_fn=context)


def apply_compile(model: llama.Transformer) -> None:
    """Compile each block in place (nn.Module.compile keeps parameter names). The blocks
    share code, so one compiled graph serves them all."""
    for block in model.layers.values():
        block.compile()
