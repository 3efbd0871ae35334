"""Config parsing and validation, the rank layout, and the LR schedule (train.py)."""

import math

import pytest
import torch
import torch.distributed as dist
from distributed import run_on_ranks

import config
import parallelize
import train


def cfg_of(*overrides: str, path: str | None = "configs/debug.yaml") -> config.Config:
    return config.load_config(path, list(overrides))


# ---------------------------------------------------------------------------------------
# Parsing


def test_yaml_and_overrides_typed():
    cfg = cfg_of("training.steps=20", "training.lr=1e-3", "compile=true", "model.n_layers=2",
                 "checkpoint.load=null", "parallel.dp_shard=-1")
    assert cfg.training.steps == 20 and isinstance(cfg.training.steps, int)
    assert cfg.training.lr == 1e-3 and isinstance(cfg.training.lr, float)
    assert cfg.compile is True
    assert cfg.model.overrides == {"n_layers": 2}
    assert config.validate(cfg, 1).model_args.n_layers == 2
    # int accepted where a float is expected, and stored as float
    assert isinstance(cfg_of("training.lr=1").training.lr, float)


def test_every_shipped_config_validates_with_its_layout():
    for name, world, layout in [
        ("debug", 1, "pp1 dp1x1 cp1 tp1"),
        ("llama3_8b", 8, "pp1 dp1x8 cp1 tp1"),
        ("llama3_70b", 256, "pp1 dp1x32 cp1 tp8"),
        ("llama3_405b", 512, "pp8 dp1x8 cp1 tp8"),
    ]:
        plan = config.validate(cfg_of(path=f"configs/{name}.yaml"), world)
        assert plan.layout == layout, name


def test_resolved_config_round_trips(tmp_path):
    cfg = cfg_of("model.n_layers=3", "training.steps=7")
    path = tmp_path / "config.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config.config_to_dict(cfg)))
    again = config.load_config(str(path), [])
    assert config.config_to_dict(again) == config.config_to_dict(cfg)


@pytest.mark.parametrize(
    "override, words",
    [
        ("training.stepz=3", ["training.stepz", "training.steps"]),
        ("trainin.steps=3", ["trainin.steps", "training"]),
        ("model.n_layerz=2", ["model.n_layerz", "model.n_layers"]),
        ("training.steps=abc", ["training.steps", "'abc'", "int"]),
        ("training.steps=true", ["training.steps", "bool", "int"]),
        ("training.lr=fast", ["training.lr", "float"]),
        ("training.dtype=fp16", ["training.dtype", "fp16", "bfloat16"]),
        ("training.optimizer=lion", ["training.optimizer", "lion", "adamw"]),
        ("parallel.pp_schedule=magic", ["parallel.pp_schedule", "magic", "1f1b"]),
        ("float8.recipe=blockwise", ["float8.recipe", "blockwise", "rowwise"]),
        ("activation_checkpoint.mode=some", ["activation_checkpoint.mode", "some"]),
        ("training=3", ["training", "section"]),
        ("compile.x=1", ["compile", "not a section"]),
        ("training.steps", ["key=value"]),
        ("model.name=llama3_9b", ["llama3_9b", "llama3_8b"]),
    ],
)
def test_bad_keys_and_types_name_the_key(override, words):
    with pytest.raises(ValueError) as err:
        config.validate(cfg_of(override), 1)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


@pytest.mark.parametrize(
    "overrides, world, words",
    [
        # degrees that do not multiply to the world size
        (["parallel.tp=2", "parallel.dp_shard=2"], 2, ["multiply to 4", "world size is 2"]),
        (["parallel.tp=3"], 4, ["not divisible", "3"]),
        (["parallel.tp=0"], 1, ["parallel.tp=0"]),
        # heads not divisible by tp (debug: 8 heads, 4 KV heads)
        (["parallel.tp=8", "training.batch_size=8"], 8, ["parallel.tp=8", "n_kv_heads=4"]),
        (["parallel.tp=3", "model.n_heads=4", "model.dim=256"], 3, ["parallel.tp=3", "n_heads=4"]),
        # seq_len not divisible by 2*cp
        (["parallel.cp=2", "data.seq_len=250"], 2, ["data.seq_len=250", "2 x parallel.cp = 4"]),
        # layers fewer than stages
        (["parallel.pp=4", "parallel.pp_stages_per_rank=2", "parallel.pp_schedule=interleaved_1f1b"], 4,
         ["n_layers=4", "8"]),
        # batch arithmetic
        (["training.batch_size=12", "training.micro_batch_size=8"], 1, ["batch_size=12", "micro_batch_size=8"]),
        (["training.batch_size=16", "training.micro_batch_size=4"], 3, ["batch_size=16", "12"]),
        (["parallel.pp=2", "training.micro_batch_size=6", "training.batch_size=12",
          "parallel.pp_microbatches=4"], 2, ["micro_batch_size=6", "pp_microbatches=4"]),
        (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], 2, ["pp_stages_per_rank >= 2"]),
        (["model.dim=100", "model.n_heads=8"], 1, ["model.dim=100", "n_heads=8"]),
        (["model.n_kv_heads=3"], 1, ["n_heads=8", "n_kv_heads=3"]),
        (["data.seq_len=5000"], 1, ["data.seq_len=5000", "max_seq_len=4096"]),
        (["training.warmup_steps=-1"], 1, ["warmup_steps=-1"]),
        (["activation_checkpoint.mode=selective", "activation_checkpoint.selective_option=x"], 1,
         ["selective_option='x'"]),
    ],
)
def test_impossible_layouts_are_refused(overrides, world, words):
    with pytest.raises(ValueError) as err:
        config.validate(cfg_of(*overrides), world)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_derived_values():
    plan = config.validate(cfg_of("training.batch_size=32", "training.micro_batch_size=4",
                                 "parallel.dp_replicate=2", "parallel.tp=2"), 8)
    assert plan.degrees == {"pp": 1, "dp_replicate": 2, "dp_shard": 2, "cp": 1, "tp": 2}
    assert plan.dp_size == 4 and plan.grad_accum == 2 and plan.global_tokens == 32 * 256


# ---------------------------------------------------------------------------------------
# Rank layout [pp, dp_replicate, dp_shard, cp, tp], tp innermost (pure arithmetic)


def _reference_groups(degrees: dict, dims: tuple) -> list[list[int]]:
    """Brute force: ranks sharing every coordinate outside `dims` form one group."""
    world = math.prod(degrees.values())
    by_key: dict = {}
    for r in range(world):
        c = train.rank_coords(degrees, r)
        key = tuple(c[d] for d in config.DIMS if d not in dims)
        by_key.setdefault(key, []).append(r)
    return sorted(sorted(g) for g in by_key.values())


LAYOUTS = [
    dict(pp=1, dp_replicate=1, dp_shard=1, cp=1, tp=1),
    dict(pp=1, dp_replicate=1, dp_shard=2, cp=1, tp=2),
    dict(pp=2, dp_replicate=1, dp_shard=2, cp=1, tp=2),
    dict(pp=2, dp_replicate=2, dp_shard=2, cp=1, tp=2),
    dict(pp=2, dp_replicate=1, dp_shard=2, cp=2, tp=2),
    dict(pp=1, dp_replicate=2, dp_shard=1, cp=2, tp=4),
    dict(pp=4, dp_replicate=1, dp_shard=1, cp=1, tp=4),
]


@pytest.mark.parametrize("degrees", LAYOUTS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_group_membership(degrees):
    world = math.prod(degrees.values())
    # coordinates: tp innermost, pp outermost
    for r in range(world):
        c = train.rank_coords(degrees, r)
        rebuilt = 0
        for d in config.DIMS:
            rebuilt = rebuilt * degrees[d] + c[d]
        assert rebuilt == r
    assert train.rank_coords(degrees, 1)["tp"] == (1 if degrees["tp"] > 1 else 0)
    for name, dims in parallelize.GROUPS.items():
        groups = parallelize.group_ranks(degrees, dims)
        assert sorted(sorted(g) for g in groups) == _reference_groups(degrees, dims), name
        # a partition of the world into groups of the product of the dims' degrees
        assert sorted(r for g in groups for r in g) == list(range(world))
        assert all(len(g) == math.prod(degrees[d] for d in dims) for g in groups)


def test_known_layout_by_hand():
    d = dict(pp=2, dp_replicate=1, dp_shard=2, cp=2, tp=2)  # 16 ranks
    assert parallelize.group_ranks(d, ("tp",))[:2] == [[0, 1], [2, 3]]
    assert parallelize.group_ranks(d, ("cp",))[0] == [0, 2]
    assert parallelize.group_ranks(d, ("dp_shard",))[0] == [0, 4]
    assert parallelize.group_ranks(d, ("pp",))[0] == [0, 8]
    assert parallelize.group_ranks(d, ("dp_shard", "cp"))[0] == [0, 2, 4, 6]
    assert parallelize.group_ranks(d, ("dp_replicate", "dp_shard", "cp"))[1] == [1, 3, 5, 7]


def _real_groups(rank, world, degrees):
    groups = train.build_groups(degrees, rank)
    out = {}
    for name, group in groups.items():
        # which world ranks are in my group: gather ranks over it
        t = torch.tensor([rank])
        gathered = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, t, group=group)
        out[name] = sorted(int(x) for x in gathered)
    return out


def test_real_gloo_groups_match_arithmetic():
    degrees = dict(pp=2, dp_replicate=1, dp_shard=1, cp=1, tp=2)
    results = run_on_ranks(_real_groups, 4, degrees, timeout=120)
    for rank, groups in enumerate(results):
        for name, dims in parallelize.GROUPS.items():
            expected = next(g for g in parallelize.group_ranks(degrees, dims) if rank in g)
            assert groups[name] == expected, (rank, name)


# ---------------------------------------------------------------------------------------
# LR schedule


def _torchtitan_factor(current_step: int, warmup_steps: int, stable_steps: int, decay_steps: int,
                       decay_type: str, min_lr_factor: float) -> float:
    """TorchTitan v0.2's linear_warmup_stable_decay (components/lr_scheduler.py), its
    LambdaLR factor at the 0-based step, restated here as the reference."""
    if current_step < warmup_steps:
        return (current_step + 1) / warmup_steps
    if current_step < warmup_steps + stable_steps:
        return 1.0
    progress = (current_step + 1 - warmup_steps - stable_steps) / decay_steps
    factor = 1 - progress if decay_type == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_factor + (1 - min_lr_factor) * factor


@pytest.mark.parametrize("steps, warmup, decay, fraction, min_ratio", [
    (15, 2, "wsd", 0.8, 0.0), (100, 10, "wsd", 0.2, 0.1), (37, 5, "wsd", 0.5, 0.0), (20, 0, "wsd", 0.3, 0.25),
    (100, 10, "cosine", None, 0.1), (30, 3, "linear", None, 0.0)])
def test_lr_schedule_is_torchtitans(steps, warmup, decay, fraction, min_ratio):
    """Per-step learning rates equal TorchTitan's (decay_ratio = wsd_decay_fraction for
    wsd, none for cosine / linear, so they decay over every step after warmup)."""
    t = config.TrainingConfig(steps=steps, lr=2.0, warmup_steps=warmup, decay=decay, min_lr_ratio=min_ratio,
                              wsd_decay_fraction=fraction or 0.2)
    decay_steps = steps - warmup if fraction is None else min(round(steps * fraction), steps - warmup)
    stable = steps + 1 - warmup - decay_steps
    kind = "cosine" if decay == "cosine" else "linear"
    expected = [2.0 * _torchtitan_factor(k, warmup, stable, decay_steps, kind, min_ratio) for k in range(steps)]
    assert [train.lr_at(s, t) for s in range(1, steps + 1)] == pytest.approx(expected, rel=1e-12)


def test_wsd_ends_one_decay_step_above_the_minimum():
    """The issue's case: 15 steps, warmup 2, fraction 0.8 -> 12 decay steps, the last at 1/12."""
    t = config.TrainingConfig(steps=15, lr=1.0, warmup_steps=2, decay="wsd", wsd_decay_fraction=0.8, min_lr_ratio=0.0)
    lrs = [train.lr_at(s, t) for s in range(1, 16)]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 1.0] + [(12 - i) / 12 for i in range(1, 12)])


def test_defaults_that_differ_from_torchtitan():
    """The README's list of deliberate differences from TorchTitan (v0.2.2 defaults in the
    comments), pinned so that changing one means changing the list."""
    t, ac = config.TrainingConfig(), config.ActivationCheckpointConfig()
    assert (t.decay, t.min_lr_ratio) == ("cosine", 0.1)  # TorchTitan: linear decay to lr_min 0
    assert ac.mode == "none"  # TorchTitan: selective, every 2nd block
    assert cfg_of().training.dtype == "auto"  # configs/debug.yaml; TorchTitan: bf16 parameters always
