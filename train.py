"""Pretrain Llama 3 with composable parallelism: the recipe, read top to bottom.

    python train.py --config configs/debug.yaml                          # one process
    torchrun --nproc_per_node 4 train.py --config configs/debug.yaml \
        training.micro_batch_size=2 parallel.dp_replicate=2          # HSDP 2 x 2

`main()` comes first and is a numbered recipe: config -> distributed init -> process
groups -> data -> model on the meta device -> parallelize (fixed order) -> materialize
and init -> optimizer -> resume -> loop. The functions it calls follow in that order,
so one training step reads from the YAML to the optimizer without jumping backwards.
The parallel techniques live one per file and take their process groups as arguments;
this is the only file that reads the environment. `planner.py` runs the same
`parallelize` for one rank of any world size without training (the dry run).

Config (config.py): YAML sections mirror typed dataclasses one to one; `key.sub=value`
on the command line overrides. An unknown key, a wrong type or an impossible layout
stops the run before any work, with a message naming the key, the value and the fix.

Loss and gradients (DESIGN.md): every micro-batch loss is the SUM of its token losses
divided by the number of tokens in the GLOBAL batch, so summing gradients over
micro-batches and ranks (plain SUM reductions everywhere) gives exactly the gradient of
the mean loss over the global batch, the same as one process computes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

import checkpoint
import config
import context_parallel
import data
import float8
import fsdp
import llama
import metrics
import pipeline
import safety
import tensor_parallel
from parallelize import Parallelized, build_groups, destroy_groups, parallelize, rank_coords


@dataclass
class Run:
    """What the steps of the loop read, built once by main. Plain data: every function
    below takes it (or the parts it needs) as an argument; nothing else holds state."""
    cfg: config.Config
    plan: config.Plan
    groups: dict[str, dist.ProcessGroup]
    device: torch.device
    model: torch.nn.Module  # the Transformer, or pipeline.Stages holding this rank's stages
    fsdp_states: dict[int, object]  # stage index -> FSDP state (empty without FSDP)
    optimizer: torch.optim.Optimizer
    loader: data.DataLoader
    val_loader: data.DataLoader
    val_start: dict  # the validation loader's state at the start: every evaluation rewinds to it
    batch: Callable  # loader batch -> this rank's (inputs, labels) on the device (CP shards them)
    positions: torch.Tensor  # global positions of this rank's tokens (RoPE; CP makes them non-contiguous)
    autocast: Callable  # a context manager factory: bf16 matmuls where FSDP does not cast already
    runner: pipeline.PipelineRunner | None = None  # the training schedule (PP)
    eval_runner: pipeline.PipelineRunner | None = None  # the forward-only schedule (PP)

    @property
    def tp_group(self) -> dist.ProcessGroup | None:
        return self.groups["tp"] if self.plan.degrees["tp"] > 1 else None

    @property
    def vocab_group(self) -> dist.ProcessGroup | None:  # loss parallel: logits stay vocabulary-sharded
        return self.tp_group if self.cfg.parallel.loss_parallel else None


def main(argv: list[str] | None = None) -> list[dict]:
    """The recipe. Returns the logged metric records (what metrics.jsonl holds)."""
    cli = parse_args(argv)
    # 1. Config, validated before any work (the world size comes from torchrun's env).
    cfg = config.load_config(cli.config, cli.overrides)
    plan = config.validate(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    # Whatever happens next, the clean-ups registered on the stack run on the way out:
    # groups destroyed, signal handlers restored, the metrics file closed.
    with contextlib.ExitStack() as cleanup:
        # 2. Distributed init (a size-1 group without torchrun, so every path is the same).
        timeout = timedelta(seconds=cfg.run.collective_timeout_s)  # every group: a hung rank ends the run
        rank, device = init_distributed(cleanup, timeout)
        stop = cleanup.enter_context(safety.StopSignal())  # SIGINT / SIGTERM: stop after this step
        cfg = resolve_dtype(cfg, device)  # training.dtype auto: measured on rank 0, the same everywhere
        t = cfg.training
        # 3. Process groups for the [pp, dp_replicate, dp_shard, cp, tp] layout.
        groups = build_groups(plan.degrees, rank, timeout)
        cleanup.callback(destroy_groups, groups)
        coords = rank_coords(plan.degrees, rank)
        torch.manual_seed(t.seed)
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        start_run_dir(cfg, plan, device, cleanup)  # one live run per run.dir (a lock); a used one refused
        # 4. Data: each data-parallel rank reads a disjoint part of every global batch.
        loader, val_loader = build_data(cfg, plan, coords)
        # 5-6. The model on the meta device (shapes only, no memory), parallelized in the
        #      fixed order explained in parallelize.py.
        par = parallelize(cfg, plan, groups, coords)
        for name, reason in par.float8_skipped:
            log(f"float8: {name} stays in {t.dtype}: {reason}")
        log_kernels(cfg, plan, device)
        # 7. Materialize and initialize: the same global weights for every layout.
        autocast = initialize(par, cfg, plan, device)
        # 8. Optimizer over the shards; under PP, the runners of this rank's schedules.
        optimizer = build_optimizer(par.model, t)
        if par.fsdp_states:
            fsdp.check_optimizer(optimizer)
        runner, eval_runner = build_pipeline(cfg, plan, par, groups, coords, device)
        run = Run(cfg, plan, groups, device, par.model, par.fsdp_states, optimizer, loader, val_loader,
                  val_loader.state_dict(),
                  functools.partial(local_batch, device=device, cp_rank=coords["cp"], cp=plan.degrees["cp"]),
                  context_parallel.positions(cfg.data.seq_len, coords["cp"], plan.degrees["cp"], device),
                  autocast, runner, eval_runner)
        # 9. Start from weights (fine-tuning) or resume a run: every rank reads the
        #    slices of its shards, whatever layout saved them.
        with safety.collective_errors("resuming"):
            ckpt, first_step = resume(run, timeout)
        # 10. Loop: step, log (rank 0 writes metrics.jsonl), save; a stop signal on any
        #     rank ends the loop after the same step on every rank, with a checkpoint. A
        #     collective that times out names its group and the step (CollectiveError).
        meter = Meter(cfg, plan, device, first_step, cleanup)
        for step in range(first_step, t.steps + 1):
            with safety.collective_errors(f"step {step}"):
                loss, grad_norm, stopping = checked_step(run, step, stop, ckpt)  # NaN / inf: NonFiniteError
                if step % cfg.run.log_every == 0 or step == t.steps or stopping:
                    log_step(run, meter, step, loss, grad_norm)
                if ckpt is not None and cfg.checkpoint.interval > 0 and (
                        step % cfg.checkpoint.interval == 0 or step == t.steps or stopping):
                    save(run, ckpt, step)
            if stopping:
                log(f"stopping after step {step}: received {stop.received or 'a signal on another rank'}")
                break
        if ckpt is not None:
            with safety.collective_errors("the last checkpoint"):
                ckpt.close()  # waits for an asynchronous save
    return meter.history


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="The dry run (no training): python planner.py --config ... --world-size N")
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.steps=20")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------
# 2. Distributed init


def init_distributed(cleanup: contextlib.ExitStack, timeout: timedelta) -> tuple[int, torch.device]:
    """Initialize the default process group from torchrun's environment, or a size-1
    group for a plain `python train.py`, so every code path is the same. A group this
    call creates is destroyed on the way out; one set up by the caller (a test harness)
    is left to the caller. `timeout` bounds every collective on it."""
    rank = int(os.environ.get("RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if dist.is_initialized():
        return rank, device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    cleanup.callback(dist.destroy_process_group)
    return rank, device


def resolve_dtype(cfg: config.Config, device: torch.device) -> config.Config:
    """training.dtype auto: the dtype rank 0 measures to run matmuls fastest
    (metrics.pick_dtype), the same on every rank, logged with the reason."""
    if cfg.training.dtype != "auto":
        return cfg
    names = list(config.DTYPES)
    choice = torch.zeros(1, dtype=torch.int64, device=device)
    if dist.get_rank() == 0:
        name, why = metrics.pick_dtype(device, cfg.run.peak_cache)
        choice[0] = names.index(name)
        log(f"training.dtype auto: {name}, because {why}")
    if dist.get_world_size() > 1:
        dist.broadcast(choice, src=0)  # comm: world, one int64 at start-up (every rank computes alike)
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, dtype=names[int(choice)]))


# ---------------------------------------------------------------------------------------
# 3. The run directory


def start_run_dir(cfg: config.Config, plan: config.Plan, device: torch.device, cleanup: contextlib.ExitStack
                  ) -> None:
    """Rank 0 claims run.dir for this run (safety.RunDirLock, held to the end), refuses
    a directory that holds another run unless this one resumes it or run.overwrite is
    set, writes the resolved config and logs versions, layout and config. A refusal
    reaches every rank (one broadcast at start-up), so all stop, none waits."""
    error = None
    if dist.get_rank() == 0:
        try:
            os.makedirs(cfg.run.dir, exist_ok=True)
            lock = cleanup.enter_context(safety.RunDirLock(cfg.run.dir))
            if lock.taken_over:
                log(f"run.dir={cfg.run.dir}: taking over the lock of {lock.taken_over}, which is no longer running")
            check_run_dir_unused(cfg)
        except (ValueError, OSError) as e:
            error = e
    refused = torch.tensor([error is not None], dtype=torch.int64, device=device)
    if dist.get_world_size() > 1:
        dist.broadcast(refused, src=0)  # comm: world, one int64 at start-up
    if error is not None:
        raise error
    if refused.item():
        raise ValueError(f"rank 0 refused run.dir={cfg.run.dir} (its error says why)")
    if dist.get_rank() != 0:
        return
    resolved = yaml.safe_dump(config.config_to_dict(cfg), sort_keys=False)
    with open(os.path.join(cfg.run.dir, "config.yaml"), "w") as f:
        f.write(resolved)
    log(f"nanotitan | python {platform.python_version()} torch {torch.__version__} | {device} | "
        f"world {dist.get_world_size()}: {plan.layout}")
    log(resolved.rstrip())


def check_run_dir_unused(cfg: config.Config) -> None:
    """A run.dir that holds another run's checkpoints or metrics is only reused to resume
    it (checkpoint.load), or to replace it (run.overwrite=true deletes them first)."""
    ckpt_dir, metrics_path = os.path.join(cfg.run.dir, "checkpoints"), os.path.join(cfg.run.dir, "metrics.jsonl")
    steps = checkpoint.list_checkpoints(ckpt_dir)
    held = [f"checkpoints step-{steps[0]}..{steps[-1]}"] if steps else []
    held += ["metrics.jsonl"] if os.path.isfile(metrics_path) and os.path.getsize(metrics_path) else []
    held += ["tb"] if os.path.isdir(os.path.join(cfg.run.dir, "tb")) else []
    if not held or cfg.checkpoint.load is not None:
        return
    if not cfg.run.overwrite:
        raise ValueError(f"run.dir={cfg.run.dir} holds another run ({', '.join(held)}): resume it with "
                         f"checkpoint.load=latest, replace it with run.overwrite=true (deletes them), or choose "
                         f"another run.dir")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    shutil.rmtree(os.path.join(cfg.run.dir, "tb"), ignore_errors=True)
    if os.path.isfile(metrics_path):
        os.remove(metrics_path)
    log(f"run.overwrite=true: deleted the previous run's {', '.join(held)} in {cfg.run.dir}")


# ---------------------------------------------------------------------------------------
# 4. Data


def build_data(cfg: config.Config, plan: config.Plan, coords: dict[str, int]
               ) -> tuple[data.DataLoader, data.DataLoader]:
    """The train and validation loaders of this rank's data-parallel index. Validation
    reads the same global batches at every evaluation (rewound) and for every layout."""
    tokenizer = data.load_tokenizer(cfg.data.tokenizer)
    data.check_vocab(tokenizer, plan.model_args.vocab_size)
    dp_rank = coords["dp_replicate"] * plan.degrees["dp_shard"] + coords["dp_shard"]
    loaders = []
    for split in ("train", "val"):
        ds = data.load_dataset(cfg.data.dataset, tokenizer, split, cfg.data.seq_len, cfg.data.cache_dir)
        data.check_vocab(ds, plan.model_args.vocab_size)  # .bin shards may hold ids the tokenizer would not make
        loaders.append(data.DataLoader(ds, cfg.data.seq_len, cfg.training.batch_size, cfg.training.micro_batch_size,
                                       dp_rank, plan.dp_size, cfg.training.seed))
    return loaders[0], loaders[1]


def local_batch(batch: tuple[torch.Tensor, torch.Tensor], device: torch.device, cp_rank: int, cp: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of a loader batch, on the device: context parallel keeps 2 of the
    2 x cp chunks of every sequence (labels were shifted in the global order, so both
    are permuted the same way)."""
    inputs, labels = (x.to(device) for x in batch)
    if cp > 1:
        inputs, labels = (context_parallel.shard_sequence(x, cp_rank, cp) for x in (inputs, labels))
    return inputs, labels


# ---------------------------------------------------------------------------------------
# 7. Materialize and initialize


def initialize(par: Parallelized, cfg: config.Config, plan: config.Plan, device: torch.device) -> Callable:
    """Allocate the parameters on the device and fill them from the global random
    streams, so every layout holds the same global weights (each rank its slices).
    Master weights are float32 (float64 for exactness runs). Returns the autocast
    factory: bf16 compute comes from FSDP's bf16 gather where there is FSDP, from
    autocast otherwise."""
    llama.materialize(par.model, device)
    llama.init_weights(par.model, plan.model_args, cfg.training.seed)
    dtype = config.DTYPES[cfg.training.dtype]
    if dtype == torch.float64:
        par.model.to(torch.float64)
    return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16,
                             enabled=dtype == torch.bfloat16 and not par.fsdp_states)


# ---------------------------------------------------------------------------------------
# 8. Optimizer and pipeline runners


def build_optimizer(model: torch.nn.Module, t: config.TrainingConfig) -> torch.optim.Optimizer:
    """Weight decay on matrices (embeddings, projections), none on norm weights."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": t.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, foreach=True)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, foreach=True)


def build_pipeline(cfg: config.Config, plan: config.Plan, par: Parallelized, groups: dict[str, dist.ProcessGroup],
                   coords: dict[str, int], device: torch.device
                   ) -> tuple[pipeline.PipelineRunner | None, pipeline.PipelineRunner | None]:
    """Under PP: the runner of this rank's training schedule (with its send / recv
    actions) and of the forward-only schedule for evaluation. (None, None) without PP."""
    pp, v, d = plan.degrees["pp"], cfg.parallel.pp_stages_per_rank, plan.degrees
    if pp == 1:
        return None, None
    m = plan.pp_microbatches
    sp = d["tp"] > 1 and cfg.parallel.sequence_parallel
    shape = (cfg.training.micro_batch_size // m, cfg.data.seq_len // d["cp"] // (d["tp"] if sp else 1),
             plan.model_args.dim)  # the activation sent between stages: (B_mb, S / cp [/ tp], dim)
    dtype = config.DTYPES[cfg.training.dtype]
    act_dtype = torch.bfloat16 if dtype == torch.bfloat16 and par.fsdp_states else torch.promote_types(
        dtype, torch.float32)
    vocab_group = groups["tp"] if d["tp"] > 1 and cfg.parallel.loss_parallel else None
    common = dict(stages=par.stages, n_stages=pp * v, group=groups["pp"], act_shape=shape, act_dtype=act_dtype,
                  device=device)
    schedule = pipeline.build_schedule(cfg.parallel.pp_schedule, pp, m, v)[coords["pp"]]
    runner = pipeline.PipelineRunner(
        schedule, loss_fn=functools.partial(loss_fn, global_tokens=plan.global_tokens, vocab_group=vocab_group),
        grad_sync=functools.partial(sync_stage_grads, par.fsdp_states), log=log, **common)
    name = cfg.parallel.pp_schedule  # its stage placement (zbv: a V) holds for evaluation too
    forward_only = pipeline.add_communication(pipeline.forward_only(pp, m, v, name), pp, pp * v, name)[coords["pp"]]
    eval_runner = pipeline.PipelineRunner(
        forward_only, loss_fn=functools.partial(loss_fn, global_tokens=1, vocab_group=vocab_group), **common)
    layers = [len(x) for x in pipeline.split_layers(plan.model_args.n_layers, pp * v, cfg.parallel.pp_split_points)]
    log(f"pipeline: {pp} ranks x {v} stages, schedule {cfg.parallel.pp_schedule}, {m} micro-batches of "
        f"{cfg.training.micro_batch_size // m}; layers per stage {layers}")
    return runner, eval_runner


def sync_stage_grads(fsdp_states: dict[int, object], stage: int, sync: bool) -> None:
    """The pipeline calls this before each backward action of a stage: FSDP reduce-
    scatters a stage's gradients, and reshards its units, only on the action that
    completes them for the optimizer step (its last B, or with zero-bubble's split
    backward its last W; with parallel.fsdp_pp_gather_once the units were not resharded
    after forward either: gathered once per step)."""
    if stage in fsdp_states:
        fsdp.set_gradient_sync(fsdp_states[stage], sync)
        fsdp.set_reshard_after_backward(fsdp_states[stage], sync)


# ---------------------------------------------------------------------------------------
# 9. Initial weights and resume


def resume(run: Run, timeout: timedelta) -> tuple[checkpoint.Checkpointer | None, int]:
    """Load checkpoint.initial (weights only) and / or resume checkpoint.load (weights,
    optimizer, data loader position) after comparing its config with this one. Returns
    the checkpointer (None when the run neither saves nor loads) and the first step."""
    c = run.cfg.checkpoint
    if c.initial is not None:
        checkpoint.load_consolidated(c.initial, run.model)
        log(f"initial weights from {c.initial}")
    if c.interval == 0 and c.load is None:
        return None, 1
    ckpt = checkpoint.Checkpointer(os.path.join(run.cfg.run.dir, "checkpoints"), c.keep, c.async_save, timeout)
    for leftover in ckpt.remove_leftovers():  # run.dir is locked: no live run is saving there
        log(f"removed {leftover}, left by a save that did not finish")
    path = ckpt.find(c.load) if c.load is not None else None
    if path is None:
        if c.load is not None:
            log(f"checkpoint.load=latest: no checkpoint under {ckpt.root} yet, starting from step 1")
        return ckpt, 1
    check_config_change(path, checkpoint.read_metadata(path)["extra"].get("config"), run.cfg)
    resumed = ckpt.load(path, run.model, run.optimizer, run.plan.layout)
    if resumed["step"] >= run.cfg.training.steps:
        raise ValueError(f"{resumed['path']} is step {resumed['step']}, and training.steps={run.cfg.training.steps}: "
                         f"nothing to do; raise training.steps to train further")
    run.loader.load_state_dict(resumed["extra"]["dataloader"])
    rng = "restored" if resumed["rng_restored"] else "not restored (another layout)"
    log(f"resumed from {resumed['path']} (saved by {resumed['world_size']} ranks, {resumed['layout']}): "
        f"continuing at step {resumed['step'] + 1}; RNG {rng}")
    return ckpt, resumed["step"] + 1


def check_config_change(path: str, saved: dict | None, cfg: config.Config) -> None:
    """Resuming continues the saved run: the layout may change (resharding, logged), and
    training.steps; anything else (the model, the optimizer, hyperparameters, the data)
    only with checkpoint.allow_config_change=true, logged. A model whose parameters
    differ from the checkpoint's is refused by checkpoint.load in any case."""
    if saved is None:
        log(f"{path} holds no config (saved by another program): not compared")
        return
    changes = config.config_changes(saved, cfg)
    changed = [f"{k}: {old!r} -> {new!r}" for k, old, new in changes if not k.startswith(config.FREE_ON_RESUME)]
    layout = [f"{k}: {old!r} -> {new!r}" for k, old, new in changes
              if k.startswith(config.FREE_ON_RESUME) and not k.startswith(("run.", "checkpoint."))]
    if changed and not cfg.checkpoint.allow_config_change:
        raise ValueError(f"{path} was saved with another config: {'; '.join(changed)}. Resume with the saved "
                         f"values (its config is in {os.path.join(path, 'metadata.json')}), or set "
                         f"checkpoint.allow_config_change=true to continue it with these")
    for what, lines in (("checkpoint.allow_config_change=true: changed", changed), ("resuming with", layout)):
        if lines:
            log(f"{what} {'; '.join(lines)}")


# ---------------------------------------------------------------------------------------
# 10. The loop: one training step


def checked_step(run: Run, step: int, stop: safety.StopSignal, ckpt: checkpoint.Checkpointer | None
                 ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """train_step, then every rank agrees on a stop signal and a finite loss (safety.py).
    A non-finite step stops the run once a background save of an earlier step is written."""
    try:
        loss, grad_norm = train_step(run, step)
        stopping, loss_not_finite = stop.agreed(run.device, loss)
        if loss_not_finite:
            raise safety.NonFiniteError(step, "loss")
    except safety.NonFiniteError:
        if ckpt is not None:
            ckpt.wait()
        raise
    return loss, grad_norm, stopping


def train_step(run: Run, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: grad_accum micro-steps of forward + backward, the sequence-
    parallel norm gradients summed over tp, clipping, the update. Returns (this rank's
    part of the step loss, the global grad norm)."""
    cfg, plan, pp = run.cfg, run.plan, run.plan.degrees["pp"]
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, cfg.training)
    loss = torch.zeros((), device=run.device, dtype=torch.float64)
    for micro in range(plan.grad_accum):
        inputs, labels = run.batch(next(run.loader))
        loss += forward_backward(run, inputs, labels, last=micro == plan.grad_accum - 1)
    if pp > 1:  # the loss lives on the last stage: every rank logs the same value
        loss = all_reduce_sum(loss, run.groups["pp"])
    params = list(run.model.parameters())
    if run.tp_group is not None:
        tensor_parallel.reduce_sequence_parallel_grads(params, run.tp_group)
    grad_norm = clip_grad_norm(params, cfg.training.max_norm, run.groups["dp_shard_cp"], run.tp_group,
                               run.groups["pp"] if pp > 1 else None)
    if not torch.isfinite(grad_norm):  # reduced over every rank: all stop here, before the update
        raise safety.NonFiniteError(step, "gradient norm")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def forward_backward(run: Run, inputs: torch.Tensor, labels: torch.Tensor, last: bool) -> torch.Tensor:
    """One micro-step's forward and backward; returns its loss (float64, detached).
    last: the last micro-step of the optimizer step, where FSDP reduce-scatters the
    accumulated gradients (always under PP; with parallel.fsdp_reduce_per_step without)."""
    if run.runner is not None:  # the schedule runs forward and backward of its micro-batches
        m = run.plan.pp_microbatches
        with run.autocast():
            return run.runner.step(list(inputs.chunk(m)), list(labels.chunk(m)), run.positions, sync_grads=last)
    if run.fsdp_states and run.cfg.parallel.fsdp_reduce_per_step:
        fsdp.set_gradient_sync(run.fsdp_states[0], last)
    with run.autocast():
        logits = run.model(inputs, run.positions)
    loss = loss_fn(logits, labels, run.plan.global_tokens, run.vocab_group)
    loss.backward()
    return loss.detach().double()


def lr_at(step: int, t: config.TrainingConfig) -> float:
    """LR of optimizer step `step` (1-based): TorchTitan's linear_warmup_stable_decay
    (v0.2), which LambdaLR evaluates at k = step - 1:
        warmup  k < W:       lr (k + 1) / W
        stable  k < W + S:   lr
        decay   otherwise:   lr (m + (1 - m) f(p)),  p = (k + 1 - W - S) / D
    W = warmup_steps, m = min_lr_ratio, f(p) = 1 - p (linear, wsd) or (1 + cos(pi p)) / 2
    (cosine); D decay steps = steps - W (cosine, linear) or round(wsd_decay_fraction x
    steps), at most steps - W (wsd); S = steps + 1 - W - D stable steps. The one extra
    stable step puts the last step at p = (D - 1) / D, one decay step above the minimum
    (15 steps, warmup 2, wsd 0.8: D = 12 and the last step runs at lr / 12), so the last
    update still moves the weights."""
    W = min(t.warmup_steps, t.steps)  # a warmup longer than the run is cut to it (logged by Meter)
    D = t.steps - W if t.decay != "wsd" else min(round(t.wsd_decay_fraction * t.steps), t.steps - W)
    k = step - 1
    if k < W:
        return t.lr * (k + 1) / W
    if k < t.steps + 1 - D or D == 0:
        return t.lr
    p = (k + 1 - (t.steps + 1 - D)) / D
    f = (1 + math.cos(math.pi * p)) / 2 if t.decay == "cosine" else 1 - p
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * f)


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


def all_reduce_sum(value: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    if dist.get_world_size(group) > 1:
        dist.all_reduce(value, group=group)  # comm: loss group, one scalar
    return value


# ---------------------------------------------------------------------------------------
# 10. The loop: logging and evaluation


class Meter:
    """The logged records and what tokens/s and MFU need between two log lines."""

    def __init__(self, cfg: config.Config, plan: config.Plan, device: torch.device, first_step: int,
                 cleanup: contextlib.ExitStack):
        self.flops_per_token = llama.flops_per_token(plan.model_args, cfg.data.seq_len)
        # The peak: given, a GPU's spec, or this CPU's measured (cached) GEMM rate, which
        # rank 0 measures alone (ranks measuring at once would slow each other down).
        self.peak = metrics.Peak(cfg.run.peak_flops, device, cfg.training.dtype, cfg.run.peak_cache,
                                 measure=dist.get_rank() == 0 or cfg.run.peak_flops > 0)
        self.devices = dist.get_world_size()  # tokens/s and MFU are per device
        self.first_step, self.history = first_step, []
        self.start = self.last_time = time.perf_counter()
        self.last_step = first_step - 1
        self.file, self.tb = None, None
        if dist.get_rank() == 0:
            self.file = cleanup.enter_context(open_metrics(os.path.join(cfg.run.dir, "metrics.jsonl"), first_step))
            if cfg.run.tensorboard:
                self.tb = open_tensorboard(os.path.join(cfg.run.dir, "tb"), first_step)
                cleanup.callback(self.tb.close)
        if cfg.training.warmup_steps > cfg.training.steps:
            log(f"training.warmup_steps={cfg.training.warmup_steps} is longer than training.steps={cfg.training.steps}: "
                f"warming up over all {cfg.training.steps} steps")
        log(f"model {cfg.model.name}: {llama.num_params(plan.model_args):,} parameters, "
            f"{self.flops_per_token / 1e6:.1f} MFLOP/token | peak {self.peak.flops / 1e12:.3f} TFLOP/s "
            f"({self.peak.source}) | batch {cfg.training.batch_size} x {cfg.data.seq_len} = "
            f"{plan.global_tokens:,} tokens/step, {plan.grad_accum} micro-steps of {cfg.training.micro_batch_size}/rank")


def open_metrics(path: str, first_step: int):
    """metrics.jsonl for appending. A new run starts it empty. A resumed run keeps the
    records of the steps before the checkpoint's and drops the rest (steps a run took
    after its last checkpoint, and a line cut short by a crash), so no step appears twice."""
    kept = []
    if first_step > 1 and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line)["step"] < first_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return open(path, "a")


def open_tensorboard(path: str, first_step: int):
    """A TensorBoard writer for run.dir/tb (run.tensorboard). A resumed run purges the
    events of the steps from its first one on, as open_metrics cuts metrics.jsonl."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
    except ImportError:
        raise ValueError("run.tensorboard=true needs TensorBoard: pip install tensorboard") from None
    return SummaryWriter(path, purge_step=first_step if first_step > 1 else None)


def log_step(run: Run, meter: Meter, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """Reduce the loss over the data ranks, time the steps since the last line, evaluate
    when due, and (rank 0) print the line and append it to metrics.jsonl."""
    cfg, plan = run.cfg, run.plan
    loss_value = all_reduce_sum(loss, run.groups["loss"]).item()
    now = time.perf_counter()
    tps = (step - meter.last_step) * plan.global_tokens / (now - meter.last_time) / meter.devices
    meter.last_step, meter.last_time = step, now
    record = {
        "step": step, "loss": loss_value, "grad_norm": grad_norm.item(), "lr": lr_at(step, cfg.training),
        "tokens_per_sec": tps, "mfu": None,
        "memory_gb": metrics.memory_gb(run.device), "elapsed_s": now - meter.start,
        "eta_s": (now - meter.start) / (step - meter.first_step + 1) * (cfg.training.steps - step),
    }
    record["mfu"], note = meter.peak.mfu(meter.flops_per_token * tps, log)
    if note is not None:
        record["mfu_note"] = note
    if cfg.run.eval_every and (step % cfg.run.eval_every == 0 or step == cfg.training.steps):
        record["val_loss"] = evaluate(run)
    meter.history.append(record)
    if meter.file is not None:
        mfu = f"{record['mfu']:.2f}%" if record["mfu"] is not None else "n/a"
        mfu += f" ({note})" if note is not None else ""
        val = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
        log(f"step {step:5d} | loss {loss_value:.4f}{val} | grad norm {record['grad_norm']:.3f} | "
            f"lr {record['lr']:.2e} | {tps:,.0f} tok/s | mfu {mfu} | mem {record['memory_gb']:.2f} GiB | "
            f"eta {record['eta_s']:.0f}s")
        try:
            meter.file.write(json.dumps(record) + "\n")
            meter.file.flush()
        except OSError as e:  # e.g. the disk is full: a write error does not name its file
            raise OSError(e.errno, e.strerror, meter.file.name) from e
    if meter.tb is not None:  # the same numbers as metrics.jsonl, which stays the source of truth
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                meter.tb.add_scalar(key, value, step)
        meter.tb.flush()


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean token loss over run.eval_steps validation steps of every rank, from the same
    position each time (through the forward-only schedule under PP)."""
    run.val_loader.load_state_dict(run.val_start)
    run.model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=run.device)  # (loss sum, tokens)
    for _ in range(run.cfg.run.eval_steps * run.plan.grad_accum):
        inputs, labels = run.batch(next(run.val_loader))
        with run.autocast():
            if run.eval_runner is not None:
                m = run.plan.pp_microbatches
                totals[0] += run.eval_runner.step(list(inputs.chunk(m)), list(labels.chunk(m)), run.positions)
            else:
                totals[0] += loss_fn(run.model(inputs, run.positions), labels, 1, run.vocab_group).double()
        totals[1] += labels.numel()
    run.model.train()
    if run.eval_runner is not None:  # the loss is on the last stage
        totals[0] = all_reduce_sum(totals[0].clone(), run.groups["pp"])
    totals = all_reduce_sum(totals, run.groups["loss"])
    return (totals[0] / totals[1]).item()


def log_kernels(cfg: config.Config, plan: config.Plan, device: torch.device) -> None:
    """Say once which kernel runs where the device gives a choice: nothing falls back to a
    slow path without a line in the log."""
    dtype = config.DTYPES[cfg.training.dtype]
    if plan.degrees["cp"] > 1 and cfg.parallel.cp_rotate == "ring":
        kernel, why = context_parallel.block_kernel(device, dtype, plan.model_args.head_dim)
        log(f"context parallel: ring attention blocks run {context_parallel.KERNELS[kernel]} ({why})")
    if cfg.float8.enabled and float8.mm_out_dtype(cfg.float8.recipe, dtype) != dtype:
        out = float8.mm_out_dtype(cfg.float8.recipe, dtype)
        log(f"float8 {cfg.float8.recipe}: _scaled_mm computes in {out}, cast to {dtype} (CUDA's _scaled_mm "
            f"writes no {dtype} with {cfg.float8.recipe} scales)")


def log(msg: str) -> None:
    """Print on rank 0 only (every rank holds the same reduced figures)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


# ---------------------------------------------------------------------------------------
# 10. The loop: checkpoints


def save(run: Run, ckpt: checkpoint.Checkpointer, step: int) -> None:
    """Save model, optimizer and the loader's position (and the config, for the record)."""
    started = time.perf_counter()
    extra = {"dataloader": run.loader.state_dict(), "config": config.config_to_dict(run.cfg)}
    ckpt.save(step, run.model, run.optimizer, extra, run.plan.layout)
    mode = "snapshot taken, writing in the background" if run.cfg.checkpoint.async_save else "saved"
    log(f"checkpoint step-{step}: {mode} in {time.perf_counter() - started:.2f}s")


if __name__ == "__main__":
    try:
        main()
    # What a user or the machine can cause (a bad value, a full disk, a hung rank) ends
    # with `error:` and exit 2; a programming error keeps its traceback.
    except (ValueError, NotImplementedError, OSError, checkpoint.CheckpointError, safety.NonFiniteError,
            safety.CollectiveError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
