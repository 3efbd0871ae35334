"""The run's configuration: typed dataclasses mirrored one to one by the YAML sections,
dotted command-line overrides, and `validate`, which stops an impossible run before
any work.

    cfg = load_config("configs/debug.yaml", ["training.steps=20", "parallel.tp=2"])
    plan = validate(cfg, world_size=4)    # the derived values (degrees, accumulation, ...)

An unknown key (with the closest known one), a wrong type, a value outside its choices
or an impossible layout raises a ValueError naming the key, the values and the fix.
Nothing is ever adjusted silently. The rules that belong to a technique (tp must divide
the heads, seq_len must split into 2 x cp chunks, ...) live in that technique's file as
a `check_*` function, which its `apply_*` calls too: each rule is written once.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field

import torch
import yaml

import context_parallel
import float8
import llama
import pipeline
import tensor_parallel

# ---------------------------------------------------------------------------------------
# 1. Config: typed dataclasses, mirrored one to one by the YAML sections


@dataclass
class ModelConfig:
    name: str = "debug"  # a preset in llama.PRESETS
    # Any llama.ModelArgs field may also be given here (e.g. model.n_layers: 2); they are
    # kept in `overrides`, type-checked against ModelArgs.
    overrides: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    dataset: str = "builtin"  # builtin, or a path / dir / glob of .txt, .jsonl, .parquet (column text), .bin
    tokenizer: str = "builtin"  # builtin, a tiktoken ranks file (Llama 3 tokenizer.model) or an HF tokenizer.json
    seq_len: int = 256
    cache_dir: str = ".cache/data"  # tokenized builtin / text datasets are cached here


@dataclass
class TrainingConfig:
    steps: int = 300
    batch_size: int = 16  # global sequences per optimizer step
    micro_batch_size: int = 8  # sequences per rank per forward
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 20
    decay: str = "cosine"  # cosine | linear | wsd (warmup-stable-decay); TorchTitan's formula (train.lr_at)
    wsd_decay_fraction: float = 0.2  # wsd: decay linearly over this fraction of all steps (TorchTitan decay_ratio)
    max_norm: float = 1.0  # gradient clipping by global norm; <= 0 disables clipping
    optimizer: str = "adamw"  # adamw | sgd
    # On matrices only, not on norm weights, as is common practice; TorchTitan decays
    # every parameter (a difference listed in the README).
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.0  # sgd
    seed: int = 0
    # Compute dtype: auto | bfloat16 | float32 | float64. auto: bf16 where matmuls run natively
    # in bf16 (a GPU; a CPU whose measured bf16 GEMM beats fp32), else fp32 (metrics.py).
    dtype: str = "bfloat16"
    deterministic: bool = False


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the other degrees leave of the world size
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = True
    loss_parallel: bool = True
    async_tp: bool = False
    cp_rotate: str = "ring"  # ring | allgather: how K/V reach the other context-parallel ranks
    pp_schedule: str = "1f1b"  # one of pipeline.SCHEDULES: gpipe | 1f1b | interleaved_1f1b | zero_bubble | zbv
    pp_microbatches: int = 0  # 0: one per pipeline stage
    pp_stages_per_rank: int = 1
    # First layer of each stage after the first, e.g. [10, 20, 30] for 4 stages of a
    # 40-layer model (null: even split, earlier stages one layer more when uneven).
    pp_split_points: list | None = None
    fsdp_reshard_after_forward: bool = True  # free gathered block params after forward
    # Under PP: keep each stage's FSDP units gathered from their first forward to their
    # last backward of a step (one all-gather per unit per step, not two per micro-batch;
    # costs the stage's full parameters in memory: planner.py shows both). TorchTitan's
    # default under PP too.
    fsdp_pp_gather_once: bool = True
    # true: accumulate unsharded gradients over micro-batches and reduce-scatter once
    # per optimizer step (more memory, 1/accum of the reduce-scatter traffic)
    fsdp_reduce_per_step: bool = False


@dataclass
class Float8Config:
    enabled: bool = False
    recipe: str = "tensorwise"  # tensorwise | rowwise
    # FSDP gathers the weights of float8 linears already cast to float8 (tensorwise):
    # half the all-gather bytes of bf16, bitwise the same result.
    fsdp_float8_all_gather: bool = False


@dataclass
class ActivationCheckpointConfig:
    mode: str = "none"  # none | full | selective
    # selective: "op" keeps matmul and attention outputs and recomputes the rest;
    # an integer k checkpoints every k-th block fully.
    selective_option: str | int = "op"


@dataclass
class CheckpointConfig:
    interval: int = 0  # save every N steps; 0 = never
    keep: int = 3
    async_save: bool = False
    load: str | None = None  # latest | a path | null
    # A consolidated state dict (checkpoint.py export, or Meta's consolidated.00.pth) to
    # start from instead of the random init (fine-tuning); null = random init.
    initial: str | None = None
    # Resuming with another optimizer or other hyperparameters (training.*, data.*,
    # float8.*) than the checkpoint was saved with is refused unless this is true; the
    # layout (parallel.*, micro_batch_size) and training.steps may always change.
    allow_config_change: bool = False


@dataclass
class RunConfig:
    dir: str = "runs/debug"
    log_every: int = 10
    eval_every: int = 100  # 0 = never
    eval_steps: int = 4  # validation batches per evaluation
    peak_flops: float = 0.0  # per device, for MFU; 0 = by device name or measured on CPU
    peak_cache: str = ".cache/peak_flops.json"  # measured CPU GEMM rates, per CPU model / torch / threads / dtype
    collective_timeout_s: float = 600.0  # every process group: a hung or dead rank ends the run after this long
    overwrite: bool = False  # start a new run in a run.dir that holds one (deletes its checkpoints and metrics)
    tensorboard: bool = False  # also write every metric to run.dir/tb (rank 0; needs `pip install tensorboard`)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    float8: Float8Config = field(default_factory=Float8Config)
    activation_checkpoint: ActivationCheckpointConfig = field(default_factory=ActivationCheckpointConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    compile: bool = False  # torch.compile each transformer block


CHOICES = {
    "training.decay": ("cosine", "linear", "wsd"),
    "training.optimizer": ("adamw", "sgd"),
    "training.dtype": ("auto", "bfloat16", "float32", "float64"),
    "parallel.pp_schedule": tuple(pipeline.SCHEDULES),
    "parallel.cp_rotate": context_parallel.ROTATE,
    "float8.recipe": float8.RECIPES,
    "activation_checkpoint.mode": ("none", "full", "selective"),
}


def _field_type(cls: type, name: str):
    return typing.get_type_hints(cls)[name]


def _check_type(key: str, value, annotation) -> object:
    """Return value if it fits the annotation (int accepted for float), else raise."""
    hint = typing.get_args(annotation) or (annotation,)  # `str | None` -> (str, NoneType)
    if value is None and type(None) in hint:
        return None
    for t in hint:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if t is not float and t is not type(None) and isinstance(value, t):
            if t is int and isinstance(value, bool):
                continue
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in hint)
    raise ValueError(f"config key {key}={value!r} has type {type(value).__name__}; expected {names}")


def _unknown_key(key: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return ValueError(f"unknown config key {key!r}{hint}")


def _set(cfg: Config, key: str, value) -> None:
    """Set a dotted key (e.g. training.steps) with type checking."""
    section_name, _, name = key.partition(".")
    top = {f.name: f for f in dataclasses.fields(Config)}
    if section_name not in top:
        raise _unknown_key(key, list(top))
    if not name:  # a top-level scalar such as `compile`
        if dataclasses.is_dataclass(getattr(cfg, section_name)):
            raise ValueError(f"config key {key!r} is a section; give keys under it, e.g. {key}.<name>=...")
        setattr(cfg, key, _check_type(key, value, _field_type(Config, key)))
        return
    section = getattr(cfg, section_name)
    if not dataclasses.is_dataclass(section):
        raise ValueError(f"config key {section_name!r} is a value, not a section; cannot set {key!r}")
    if section_name == "model" and name != "name":
        arg_fields = {f.name: f for f in dataclasses.fields(llama.ModelArgs)}
        if name not in arg_fields:
            raise _unknown_key(key, ["model.name"] + [f"model.{n}" for n in arg_fields])
        section.overrides[name] = _check_type(key, value, _field_type(llama.ModelArgs, name))
        return
    names = {f.name for f in dataclasses.fields(section)}
    if name not in names:
        raise _unknown_key(key, [f"{section_name}.{n}" for n in names])
    value = _check_type(key, value, _field_type(type(section), name))
    if key in CHOICES and value not in CHOICES[key]:
        raise ValueError(f"config key {key}={value!r} is not one of {list(CHOICES[key])}")
    setattr(section, name, value)




def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"training": {"steps": 20}} -> {"training.steps": 20}"""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def load_config(path: str | None, overrides: list[str]) -> Config:
    """YAML file, then `key=value` overrides (values parsed as YAML: 20, true, null, 1e-3)."""
    cfg = Config()
    if path is not None:
        with open(path) as f:
            try:
                tree = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:  # names the line and column
                raise ValueError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: expected a mapping of sections at the top level")
        for key, value in _flatten(tree).items():
            _set(cfg, key, value)
    return with_overrides(cfg, overrides)


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A copy of cfg with `key=value` overrides applied (values parsed as YAML)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"command-line override {item!r} must look like key=value, e.g. training.steps=20")
        _set(cfg, key.strip(), yaml.safe_load(raw))
    return cfg


def config_to_dict(cfg: Config) -> dict:
    tree = dataclasses.asdict(cfg)
    tree["model"] = {"name": cfg.model.name, **cfg.model.overrides}
    return tree


# What may differ between a checkpoint's config and the run resuming it, without
# checkpoint.allow_config_change: how the work is laid out and run (resharding), and
# how long it goes on. Anything else changes what is computed.
FREE_ON_RESUME = ("parallel.", "run.", "checkpoint.", "activation_checkpoint.", "compile", "data.cache_dir",
                  "training.micro_batch_size", "training.steps")


def config_changes(saved: dict, cfg: Config) -> list[tuple[str, object, object]]:
    """(key, saved value, value now) for every dotted key that differs ("(unset)" where a
    key is on one side only, e.g. a model override)."""
    old, new = _flatten(saved), _flatten(config_to_dict(cfg))
    keys = list(new) + [k for k in old if k not in new]
    pairs = [(k, old.get(k, "(unset)"), new.get(k, "(unset)")) for k in keys]
    return [(k, was, now) for k, was, now in pairs if was != now]


# ---------------------------------------------------------------------------------------
# 2. Validation: everything that can be known before any work


DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # world rank layout, tp innermost


def resolve_degrees(p: ParallelConfig, world_size: int) -> dict[str, int]:
    """The five degrees, with dp_shard = -1 resolved. Raises unless they multiply to the world."""
    degrees = {d: getattr(p, d) for d in DIMS}
    for d, n in degrees.items():
        if n < 1 and not (d == "dp_shard" and n == -1):
            raise ValueError(f"parallel.{d}={n} must be >= 1" + (" (or -1 for the rest)" if d == "dp_shard" else ""))
    others = math.prod(n for d, n in degrees.items() if d != "dp_shard")
    if degrees["dp_shard"] == -1:
        if world_size % others:
            raise ValueError(
                f"world size {world_size} is not divisible by pp*dp_replicate*cp*tp = {others}; "
                f"change the degrees or the number of processes"
            )
        degrees["dp_shard"] = world_size // others
    if math.prod(degrees.values()) != world_size:
        layout = " x ".join(f"{d}={n}" for d, n in degrees.items())
        raise ValueError(
            f"parallel degrees {layout} multiply to {math.prod(degrees.values())}, but the world size is "
            f"{world_size}; set parallel.dp_shard=-1 or make the product equal the number of processes"
        )
    return degrees


@dataclass
class Plan:
    """Values derived from the config, computed once here and logged."""
    degrees: dict[str, int]
    dp_size: int  # data-parallel degree = dp_replicate * dp_shard (ranks seeing different data)
    grad_accum: int  # micro-steps per optimizer step
    global_tokens: int  # tokens per optimizer step: the loss denominator
    pp_microbatches: int  # pipeline micro-batches per micro-step (1 without PP)
    model_args: llama.ModelArgs

    @property
    def layout(self) -> str:
        d = self.degrees
        return f"pp{d['pp']} dp{d['dp_replicate']}x{d['dp_shard']} cp{d['cp']} tp{d['tp']}"


# Ranges of single values: (key, test, what the test requires).
RANGES = [
    ("training.steps", lambda v: v >= 1, ">= 1"),
    ("training.batch_size", lambda v: v >= 1, ">= 1"),
    ("training.micro_batch_size", lambda v: v >= 1, ">= 1"),
    ("training.lr", lambda v: v > 0, "> 0"),
    ("training.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("training.wsd_decay_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("parallel.pp_microbatches", lambda v: v >= 0, ">= 0 (0: one per pipeline rank)"),
    ("checkpoint.interval", lambda v: v >= 0, ">= 0 (0: never save)"),
    ("checkpoint.keep", lambda v: v >= 0, ">= 0 (0: keep every checkpoint)"),
    ("run.log_every", lambda v: v >= 1, ">= 1"),
    ("run.eval_every", lambda v: v >= 0, ">= 0 (0: never)"),
    ("run.eval_steps", lambda v: v >= 1, ">= 1"),
    ("run.collective_timeout_s", lambda v: v > 0, "> 0 (seconds)"),
]


def validate(cfg: Config, world_size: int) -> Plan:
    """Everything that can be known before any work: single values, the degrees, the
    model, each technique's own rules (its check_* function, the same one its apply_*
    calls), then the batch arithmetic. Returns the derived values."""
    t, p = cfg.training, cfg.parallel
    for key, ok, requirement in RANGES:
        section, name = key.split(".")
        if not ok(getattr(getattr(cfg, section), name)):
            raise ValueError(f"{key}={getattr(getattr(cfg, section), name)} must be {requirement}")
    if t.warmup_steps < 0:  # more than training.steps is cut to the run's length (train.lr_at)
        raise ValueError(f"training.warmup_steps={t.warmup_steps} must be >= 0")
    degrees = resolve_degrees(p, world_size)
    args = llama.model_args(cfg.model.name, **cfg.model.overrides)  # checks heads and head dim
    if not 1 <= cfg.data.seq_len <= args.max_seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} must be in [1, model.max_seq_len={args.max_seq_len}]")
    tp, cp, pp, v = degrees["tp"], degrees["cp"], degrees["pp"], p.pp_stages_per_rank
    microbatches = (p.pp_microbatches or pp) if pp > 1 else 1  # 0: one per pipeline rank

    context_parallel.check_cp_args(cp, cfg.data.seq_len, p.cp_rotate)
    tensor_parallel.check_tp_args(tp, args.n_heads, args.kv_heads, {
        "model.vocab_size": args.vocab_size, "the FFN hidden dim (model.dim, ffn_dim_multiplier, multiple_of)":
        args.ffn_dim}, cfg.data.seq_len // cp, p.sequence_parallel, p.async_tp)
    float8.check_float8_args(cfg.float8.recipe, cfg.float8.fsdp_float8_all_gather)
    pipeline.check_stage_args(args.n_layers, pp, v, p.pp_split_points)
    if pp > 1:
        pipeline.check_schedule_args(p.pp_schedule, pp, microbatches, v)
    option = cfg.activation_checkpoint.selective_option
    if cfg.activation_checkpoint.mode == "selective" and option != "op" and not (isinstance(option, int)
                                                                                   and option >= 1):
        raise ValueError(f"activation_checkpoint.selective_option={option!r} must be 'op' or a positive "
                         f"integer k (checkpoint every k-th block)")

    dp_size = degrees["dp_replicate"] * degrees["dp_shard"]
    per_step = t.micro_batch_size * dp_size
    if t.batch_size % per_step:
        raise ValueError(f"training.batch_size={t.batch_size} is not divisible by training.micro_batch_size="
                         f"{t.micro_batch_size} x data-parallel degree {dp_size} (dp_replicate x dp_shard) = "
                         f"{per_step}; make batch_size a multiple of {per_step}")
    if t.micro_batch_size % microbatches:
        raise ValueError(f"training.micro_batch_size={t.micro_batch_size} is not divisible by "
                         f"parallel.pp_microbatches={microbatches}")
    return Plan(degrees, dp_size, t.batch_size // per_step, t.batch_size * cfg.data.seq_len, microbatches, args)


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
