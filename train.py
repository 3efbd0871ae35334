"""Pretrain Llama 3 with composable parallelism: the recipe, read top to bottom.

    python train.py --config configs/debug.yaml                          # one process
    torchrun --nproc_per_node 4 train.py --config configs/debug.yaml \
        training.micro_batch_size=2 parallel.dp_replicate=2          # HSDP 2 x 2

`main()` is a numbered recipe: config -> distributed init -> process groups -> data ->
model on the meta device -> parallelize (fixed order) -> materialize and init ->
optimizer -> loop. The parallel techniques live one per file and take their process
groups as arguments; this is the only file that reads the environment.

Config (config.py): YAML sections mirror typed dataclasses one to one; `key.sub=value` on the
command line overrides. An unknown key, a wrong type or an impossible layout stops the
run before any work, with a message naming the key, the value and the fix.

Loss and gradients (DESIGN.md): every micro-batch loss is the SUM of its token losses
divided by the number of tokens in the GLOBAL batch, so summing gradients over
micro-batches and ranks (plain SUM reductions everywhere) gives exactly the gradient of
the mean loss over the global batch, the same as one process computes.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import resource
import signal
import sys
import time
import typing
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torch.utils.checkpoint import checkpoint as recompute

import checkpoint
import config
import context_parallel
import data
import float8
import fsdp
import llama
import pipeline
import tensor_parallel

# ---------------------------------------------------------------------------------------
# 3. Process groups for the [pp, dp_replicate, dp_shard, cp, tp] layout

# Groups over several dims: FSDP shards over dp_shard x cp (CP ranks hold the same
# weights, see different tokens); the loss and metrics reduce over every rank that
# sees different tokens; data loading ranks are dp_replicate x dp_shard.
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


def build_groups(degrees: dict[str, int], rank: int) -> dict[str, dist.ProcessGroup]:
    """Create every group of every kind on every rank, in the same order (new_group is
    collective), and return the ones containing this rank."""
    mine = {}
    for name, dims in GROUPS.items():
        for ranks in group_ranks(degrees, dims):
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[name] = group
    return mine


# ---------------------------------------------------------------------------------------
# 4. Model transforms applied by this file: activation checkpointing and compile

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


# ---------------------------------------------------------------------------------------
# 5. The parallelize chain


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
    # Pipeline: this rank keeps its stages (layers r, r + pp, ... of the split, with the
    # embeddings on stage 0 and norm + output on the last); the techniques below apply to
    # each stage, which is a Transformer with the model's parameter names.
    pp, v = degrees["pp"], cfg.parallel.pp_stages_per_rank
    stages = {0: model}
    if pp > 1:
        stages = pipeline.build_stages(model, coords["pp"], pp, v, cfg.parallel.pp_split_points)
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
                reshard_after_forward=cfg.parallel.fsdp_reshard_after_forward,
            )
    if pp > 1:
        model = pipeline.Stages(stages)  # one module for init, optimizer, checkpoints
    return Parallelized(model, stages, fsdp_states, skipped)



# ---------------------------------------------------------------------------------------
# 6. Optimizer, schedule, loss


def build_optimizer(model: torch.nn.Module, t: config.TrainingConfig) -> torch.optim.Optimizer:
    """Weight decay on matrices (embeddings, projections), none on norm weights."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": t.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, foreach=True)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, foreach=True)


def lr_at(step: int, t: config.TrainingConfig) -> float:
    """LR for optimizer step `step` (1-based): linear warmup to lr over warmup_steps,
    then decay to lr * min_lr_ratio at the last step (cosine, linear, or WSD: constant,
    then linear over the last wsd_decay_fraction of the steps)."""
    if step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    min_lr = t.lr * t.min_lr_ratio
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)  # (0, 1]
    if t.decay == "cosine":
        return min_lr + (t.lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if t.decay == "linear":
        return t.lr - (t.lr - min_lr) * progress
    decay_start = 1 - t.wsd_decay_fraction
    if progress <= decay_start:
        return t.lr
    return t.lr - (t.lr - min_lr) * (progress - decay_start) / t.wsd_decay_fraction


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, global_tokens: int,
            vocab_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum of token cross-entropies / tokens in the global batch (float32 or better).
    vocab_group: the logits are this rank's vocabulary shard (loss parallel over tp)."""
    if vocab_group is not None:
        return tensor_parallel.vocab_parallel_cross_entropy(logits, labels, vocab_group).sum() / global_tokens
    logits = logits.flatten(0, 1)  # (B*S, vocab)
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return F.cross_entropy(logits, labels.flatten(), reduction="sum") / global_tokens


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float, shard_group: dist.ProcessGroup | None = None,
                   tp_group: dist.ProcessGroup | None = None, pp_group: dist.ProcessGroup | None = None
                   ) -> torch.Tensor:
    """Global L2 norm of all gradients; scales them down to max_norm if above (and
    max_norm > 0). With FSDP every rank of `shard_group` holds disjoint shards (padding
    rows have zero gradient), so the squared norms are summed over it; replicas (HSDP)
    hold the same shards and are not summed. With TP, the squares of tensor-parallel
    shards (`tp_shard_dim` set) are summed over `tp_group`; replicated parameters (the
    norms) hold the same gradient on every TP rank and count once. With PP every stage's
    parameters are distinct: summed over `pp_group`."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]

    def squares(ps: list) -> torch.Tensor:
        return sum((torch.linalg.vector_norm(p.grad, dtype=torch.float64) ** 2 for p in ps),
                   torch.zeros((), dtype=torch.float64, device=grads[0].device))

    square = squares([p for p in params if not hasattr(p, "tp_shard_dim")])
    tp_square = squares([p for p in params if hasattr(p, "tp_shard_dim")])
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(tp_square, group=tp_group)  # comm: tp group, one float64
    square = square + tp_square
    if shard_group is not None and dist.get_world_size(shard_group) > 1:
        dist.all_reduce(square, group=shard_group)  # comm: FSDP shard group, one float64
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(square, group=pp_group)  # comm: pp group, one float64
    norm = square.sqrt()
    if max_norm > 0:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(grads[0].dtype))
    return norm


# ---------------------------------------------------------------------------------------
# 7. Metrics: FLOPs peak, memory, the log line

# bf16 dense peak FLOP/s per device (vendor figures, as TorchTitan's table).
PEAK_FLOPS = {"H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12,
              "A100": 312e12, "B200": 2.25e15, "MI300X": 1300e12}


def measure_gemm_peak(dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of the best of `reps` n^3 matmuls on this CPU in `dtype`: the MFU
    denominator on CPU, where no vendor peak applies."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops(cfg: config.Config, device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s per device or 0 if unknown, where the figure came from)."""
    if cfg.run.peak_flops > 0:
        return cfg.run.peak_flops, "run.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value, f"{name} bf16 spec"
        return 0.0, f"{name}: unknown peak"
    return measure_gemm_peak(dtype), f"measured {str(dtype).removeprefix('torch.')} 1024^3 GEMM on this CPU"


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------
# 8. The recipe


def init_distributed() -> tuple[int, int, torch.device, bool]:
    """Initialize the default process group from torchrun's environment, or a size-1
    group for a plain `python train.py`, so every code path is the same. The last value
    says whether this call created the group (then the caller destroys it)."""
    if "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local_rank = 0, 1, 0
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if dist.is_initialized():  # e.g. a test harness that set up the group already
        return rank, world, device, False
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timedelta(minutes=10))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return rank, world, device, True


class StopSignal:
    """SIGINT / SIGTERM set a flag; the loop finishes the current step, then stops."""

    def __init__(self):
        self.received: str | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank got a signal (ranks must stop together)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # comm: world, one float per step
        return bool(flag.item())


def all_reduce_sum(value: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    if dist.get_world_size(group) > 1:
        dist.all_reduce(value, group=group)  # comm: loss group, one scalar
    return value


@torch.no_grad()
def evaluate(model, loader: data.DataLoader, micro_steps: int, group: dist.ProcessGroup, autocast,
             local_batch: typing.Callable, positions: torch.Tensor, vocab_group: dist.ProcessGroup | None = None,
             runner: pipeline.PipelineRunner | None = None, pp_group: dist.ProcessGroup | None = None) -> float:
    """Mean token loss over the next `micro_steps` validation micro-batches of every rank
    (through the pipeline's forward-only schedule when there is one). local_batch: this
    rank's part of a loader batch (context parallel), on the device."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=positions.device)  # (loss sum, tokens)
    for _ in range(micro_steps):
        inputs, labels = local_batch(next(loader))
        with autocast():
            if runner is not None:
                m = len([a for a in runner.actions if a.kind == "F"]) // len(runner.stages)
                totals[0] += runner.step(list(inputs.chunk(m)), list(labels.chunk(m)), positions)
            else:
                totals[0] += loss_fn(model(inputs, positions), labels, 1, vocab_group).double()
        totals[1] += labels.numel()
    model.train()
    if runner is not None:  # the loss is on the last stage
        totals[0] = all_reduce_sum(totals[0].clone(), pp_group)
    totals = all_reduce_sum(totals, group)
    return (totals[0] / totals[1]).item()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.steps=20")
    parser.add_argument("--dry-run", action="store_true", help="print what one rank of the layout holds, computes "
                        "and sends per step (planner.py), without training or any real process group")
    parser.add_argument("--world-size", type=int, help="with --dry-run: the number of ranks of the layout")
    parser.add_argument("--rank", type=int, default=0, help="with --dry-run: the rank to describe (default 0)")
    cli = parser.parse_args(argv)

    # 1. Config, validated before any work.
    cfg = config.load_config(cli.config, cli.overrides)
    if cli.dry_run:
        import planner  # imports this file: only needed here

        if cli.world_size is None or cli.world_size < 1:
            raise ValueError("--dry-run needs --world-size N (N >= 1), the number of ranks of the layout to plan")
        print(planner.format_report(planner.plan_rank(cfg, cli.world_size, cli.rank)), flush=True)
        return []
    if cli.world_size is not None:
        raise ValueError("--world-size is for --dry-run; a training run takes its world size from torchrun")
    world_guess = int(os.environ.get("WORLD_SIZE", 1))
    plan = config.validate(cfg, world_guess)
    t = cfg.training
    dtype = config.DTYPES[t.dtype]

    # 2. Distributed init (a size-1 group without torchrun). Whatever happens next, the
    # groups made here are destroyed and the signal handlers restored on the way out (a
    # default group set up by the caller, e.g. a test harness, is left to the caller).
    rank, world, device, owns_default_group = init_distributed()
    stop = StopSignal()
    metrics_file = None
    groups = {}
    try:
        # 3. Process groups.
        groups = build_groups(plan.degrees, rank)
        coords = rank_coords(plan.degrees, rank)
        dp_rank = coords["dp_replicate"] * plan.degrees["dp_shard"] + coords["dp_shard"]
        torch.manual_seed(t.seed)
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        if rank == 0:
            os.makedirs(cfg.run.dir, exist_ok=True)
            with open(os.path.join(cfg.run.dir, "config.yaml"), "w") as f:
                yaml.safe_dump(config.config_to_dict(cfg), f, sort_keys=False)
            log(f"nanotitan | python {platform.python_version()} torch {torch.__version__} | {device} | "
                f"world {world}: {plan.layout}")
            log(yaml.safe_dump(config.config_to_dict(cfg), sort_keys=False).rstrip())

        # 4. Data: each data-parallel rank reads a disjoint part of every global batch.
        tokenizer = data.load_tokenizer(cfg.data.tokenizer)
        data.check_vocab(tokenizer, plan.model_args.vocab_size)
        datasets = {
            split: data.load_dataset(cfg.data.dataset, tokenizer, split, cfg.data.seq_len, cfg.data.cache_dir)
            for split in ("train", "val")
        }
        for ds in datasets.values():  # .bin shards may hold ids the tokenizer would not make
            data.check_vocab(ds, plan.model_args.vocab_size)
        loader = data.DataLoader(datasets["train"], cfg.data.seq_len, t.batch_size, t.micro_batch_size,
                                 dp_rank, plan.dp_size, t.seed)
        # Validation reads the same global batches at every evaluation (rewound to this
        # state) and for every layout (the global batch is the training one).
        val_loader = data.DataLoader(datasets["val"], cfg.data.seq_len, t.batch_size, t.micro_batch_size,
                                     dp_rank, plan.dp_size, t.seed)
        val_start = val_loader.state_dict()

        # 5-6. The model on the meta device (shapes only, no memory), parallelized.
        args = plan.model_args
        par = parallelize(cfg, plan, groups, coords)
        if rank == 0:
            for name, reason in par.float8_skipped:
                log(f"float8: {name} stays in {t.dtype}: {reason}")
        model, stages, fsdp_states = par.model, par.stages, par.fsdp_states
        fsdp_state = next(iter(fsdp_states.values()), None)
        tp_group = groups["tp"] if plan.degrees["tp"] > 1 else None
        vocab_group = tp_group if tp_group is not None and cfg.parallel.loss_parallel else None
        pp, v = plan.degrees["pp"], cfg.parallel.pp_stages_per_rank

        # 7. Materialize and initialize: the same global weights for every layout
        #    (each rank fills its shards from the global random streams). Master weights
        #    are float32 (float64 for exactness runs). bfloat16 compute: FSDP gathers in
        #    bf16; without FSDP, autocast runs the matmuls in bf16.
        llama.materialize(model, device)
        llama.init_weights(model, args, t.seed)
        if dtype == torch.float64:
            model.to(torch.float64)
        autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16,
                                     enabled=dtype == torch.bfloat16 and fsdp_state is None)

        # 8. Optimizer, over the shards.
        optimizer = build_optimizer(model, t)
        params = list(model.parameters())
        if fsdp_state is not None:
            fsdp.check_optimizer(optimizer)
        runner = eval_runner = None
        if pp > 1:
            m = cfg.parallel.pp_microbatches or pp
            seq = cfg.data.seq_len // plan.degrees["cp"] // (
                plan.degrees["tp"] if tp_group is not None and cfg.parallel.sequence_parallel else 1)
            act_dtype = torch.bfloat16 if dtype == torch.bfloat16 and fsdp_state is not None else (
                torch.float64 if dtype == torch.float64 else torch.float32)

            def grad_sync(stage: int, last: bool) -> None:  # FSDP: reduce-scatter once per step
                if stage in fsdp_states:
                    fsdp.set_gradient_sync(fsdp_states[stage], last and micro_state["last"])

            def stage_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
                return loss_fn(logits, labels, plan.global_tokens, vocab_group)

            micro_state = {"last": True}
            shape = (t.micro_batch_size // m, seq, args.dim)
            runner = pipeline.PipelineRunner(pipeline.build_schedule(cfg.parallel.pp_schedule, pp, m, v)[coords["pp"]],
                                             stages, pp * v, groups["pp"], stage_loss, shape, act_dtype, device,
                                             grad_sync)
            eval_runner = pipeline.PipelineRunner(
                pipeline.add_communication(pipeline.forward_only(pp, m, v), pp, pp * v)[coords["pp"]], stages,
                pp * v, groups["pp"], lambda logits, labels: loss_fn(logits, labels, 1, vocab_group), shape,
                act_dtype, device)
            if rank == 0:
                log(f"pipeline: {pp} ranks x {v} stages, schedule {cfg.parallel.pp_schedule}, {m} micro-batches "
                    f"of {t.micro_batch_size // m}; layers per stage "
                    f"{[len(x) for x in pipeline.split_layers(args.n_layers, pp * v, cfg.parallel.pp_split_points)]}")

        # 9. Start from weights (fine-tuning) or resume a run: every rank reads the slices
        #    of its shards, whatever layout saved them.
        if cfg.checkpoint.initial is not None:
            checkpoint.load_consolidated(cfg.checkpoint.initial, model)
            if rank == 0:
                log(f"initial weights from {cfg.checkpoint.initial}")
        ckpt = None
        if cfg.checkpoint.interval > 0 or cfg.checkpoint.load is not None:
            ckpt = checkpoint.Checkpointer(os.path.join(cfg.run.dir, "checkpoints"), cfg.checkpoint.keep,
                                           cfg.checkpoint.async_save)
        first_step = 1
        if cfg.checkpoint.load is not None:
            resumed = ckpt.load(cfg.checkpoint.load, model, optimizer, plan.layout)
            if resumed is None:
                if rank == 0:
                    log(f"checkpoint.load=latest: no checkpoint under {ckpt.root} yet, starting from step 1")
            else:
                loader.load_state_dict(resumed["extra"]["dataloader"])
                first_step = resumed["step"] + 1
                if rank == 0:
                    rng = "restored" if resumed["rng_restored"] else "not restored (another layout)"
                    log(f"resumed from {resumed['path']} (saved by {resumed['world_size']} ranks, "
                        f"{resumed['layout']}): continuing at step {first_step}; RNG {rng}")

        def save(step: int) -> None:
            started = time.perf_counter()
            ckpt.save(step, model, optimizer, {"dataloader": loader.state_dict(), "config": config.config_to_dict(cfg)},
                      plan.layout)
            if rank == 0:
                mode = "snapshot taken, writing in the background" if cfg.checkpoint.async_save else "saved"
                log(f"checkpoint step-{step}: {mode} in {time.perf_counter() - started:.2f}s")

        # Context parallel: this rank's tokens of each sequence and their global positions.
        cp, cp_rank = plan.degrees["cp"], coords["cp"]
        positions = context_parallel.positions(cfg.data.seq_len, cp_rank, cp, device)

        def local_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            inputs, labels = (x.to(device) for x in batch)
            if cp > 1:  # labels were shifted in the global order; permute both the same way
                inputs, labels = (context_parallel.shard_sequence(x, cp_rank, cp) for x in (inputs, labels))
            return inputs, labels

        # 10. Loop.
        fpt = llama.flops_per_token(args, cfg.data.seq_len)
        peak, peak_source = peak_flops(cfg, device, dtype)
        non_dp = plan.degrees["tp"] * plan.degrees["pp"] * plan.degrees["cp"]  # ranks per data replica
        if rank == 0:
            log(f"model {cfg.model.name}: {llama.num_params(args):,} parameters, {fpt / 1e6:.1f} MFLOP/token | "
                f"peak {peak / 1e12:.3f} TFLOP/s ({peak_source}) | batch {t.batch_size} x {cfg.data.seq_len} "
                f"= {plan.global_tokens:,} tokens/step, {plan.grad_accum} micro-steps of {t.micro_batch_size}/rank")
        # A resumed run appends to the metrics of the steps before its checkpoint.
        metrics_file = (open(os.path.join(cfg.run.dir, "metrics.jsonl"), "a" if first_step > 1 else "w")
                        if rank == 0 else None)
        history: list[dict] = []
        start = last_log = time.perf_counter()
        tokens_since_log = 0
        for step in range(first_step, t.steps + 1):
            lr = lr_at(step, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            for micro in range(plan.grad_accum):
                if fsdp_state is not None and cfg.parallel.fsdp_reduce_per_step:
                    fsdp.set_gradient_sync(fsdp_state, micro == plan.grad_accum - 1)
                inputs, labels = local_batch(next(loader))
                if runner is not None:  # the pipeline runs forward and backward of its micro-batches
                    micro_state["last"] = micro == plan.grad_accum - 1
                    with autocast():
                        loss_sum += runner.step(list(inputs.chunk(m)), list(labels.chunk(m)), positions)
                    continue
                with autocast():
                    logits = model(inputs, positions)
                loss = loss_fn(logits, labels, plan.global_tokens, vocab_group)
                loss.backward()
                loss_sum += loss.detach().double()
            if pp > 1:  # the loss lives on the last stage: every rank logs the same value
                loss_sum = all_reduce_sum(loss_sum, groups["pp"])
            if tp_group is not None:
                tensor_parallel.reduce_sequence_parallel_grads(params, tp_group)
            grad_norm = clip_grad_norm(params, t.max_norm, groups["dp_shard_cp"], tp_group,
                                       groups["pp"] if pp > 1 else None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_since_log += plan.global_tokens

            stopping = stop.agreed(device)
            if step % cfg.run.log_every == 0 or step == t.steps or stopping:
                loss_value = all_reduce_sum(loss_sum, groups["loss"]).item()
                now = time.perf_counter()
                tps = tokens_since_log / (now - last_log) / non_dp / plan.dp_size  # per device
                last_log, tokens_since_log = now, 0
                record = {
                    "step": step, "loss": loss_value, "grad_norm": grad_norm.item(), "lr": lr,
                    "tokens_per_sec": tps, "mfu": 100 * fpt * tps / peak if peak > 0 else None,
                    "memory_gb": memory_gb(device), "elapsed_s": now - start,
                    "eta_s": (now - start) / (step - first_step + 1) * (t.steps - step),
                }
                if cfg.run.eval_every and (step % cfg.run.eval_every == 0 or step == t.steps):
                    val_loader.load_state_dict(val_start)
                    record["val_loss"] = evaluate(model, val_loader, cfg.run.eval_steps * plan.grad_accum,
                                                  groups["loss"], autocast, local_batch, positions, vocab_group,
                                                  eval_runner, groups["pp"])
                history.append(record)
                if rank == 0:
                    mfu = f"{record['mfu']:.2f}%" if record["mfu"] is not None else "n/a"
                    val = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
                    log(f"step {step:5d} | loss {loss_value:.4f}{val} | grad norm {record['grad_norm']:.3f} | "
                        f"lr {lr:.2e} | {tps:,.0f} tok/s | mfu {mfu} | mem {record['memory_gb']:.2f} GiB | "
                        f"eta {record['eta_s']:.0f}s")
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
            if ckpt is not None and cfg.checkpoint.interval > 0 and (
                    step % cfg.checkpoint.interval == 0 or step == t.steps or stopping):
                save(step)  # also on a stop signal (preemption): resume continues from here
            if stopping:
                if rank == 0:
                    log(f"stopping after step {step}: received {stop.received or 'a signal on another rank'}")
                break
        if ckpt is not None:
            ckpt.close()  # waits for an asynchronous save

    finally:
        if metrics_file is not None:
            metrics_file.close()
        stop.restore()
        for group in set(groups.values()):
            dist.destroy_process_group(group)
        if owns_default_group:
            dist.destroy_process_group()
    return history


if __name__ == "__main__":
    try:
        main()
    except (ValueError, NotImplementedError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
