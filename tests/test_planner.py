"""The dry-run planner (planner.py) against measurement.

  * communication and memory: small layouts of every technique run ONE real training
    step through train.main on gloo ranks, with every collective counted per process
    group (calls and bytes handed in, as planner.py counts them). The planner's
    prediction for each rank must EQUAL the measurement, call for call and byte for
    byte, and so must the parameter, gradient and optimizer bytes of each rank;
  * activations: one micro-batch forward (with the loss on a last stage) of a rank's
    parallelized model, with its live tensor bytes tallied by a dispatch mode. The
    planner's kept bytes and forward peak (plus FSDP's gathered parameters) must be
    within 15% of the measured growth (measured here: 0.94-1.06, most within 1%). This
    runs in this process under the fake process group: a rank's forward allocates the
    same tensors whatever the other ranks do, and the fake collectives return at once
    (the values are garbage; the sizes are not);
  * the CLI: the paper's layouts plan in seconds, the per-rank parameters add up to the
    model's, and bad input fails with a message.
"""

from __future__ import annotations

import collections
import os

import pytest
import torch
import torch.distributed as dist

import llama
import planner
import config
import train
from distributed import run_on_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model on which every degree of 2 (4 for FSDP) divides, float8-able (dims by 16).
MODEL = ["model.dim=64", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "data.seq_len=32",
         "training.batch_size=8", "training.steps=1", "training.dtype=float32", "training.warmup_steps=0",
         "run.eval_every=0", "run.log_every=1", "run.peak_flops=1e12"]


def _argv(run_dir: str, *overrides: str) -> list[str]:
    return ["--config", os.path.join(ROOT, "configs/debug.yaml"), *MODEL, f"run.dir={run_dir}",
            f"data.cache_dir={os.path.join(ROOT, '.cache/data')}", *overrides]


# ---------------------------------------------------------------------------------------
# 1. Communication and memory: prediction == measurement

# (name, world, overrides): together they issue every collective of every technique.
LAYOUTS = [
    ("fsdp2-accum2", 2, ["parallel.dp_shard=2", "training.micro_batch_size=2"]),
    ("hsdp2x2-noreshard-reduce-per-step", 4, ["parallel.dp_replicate=2", "parallel.dp_shard=2",
                                              "training.micro_batch_size=1", "parallel.fsdp_reshard_after_forward=false",
                                              "parallel.fsdp_reduce_per_step=true"]),
    ("replicate2-sgd", 2, ["parallel.dp_replicate=2", "parallel.dp_shard=1", "training.micro_batch_size=4",
                           "training.optimizer=sgd", "training.momentum=0.9"]),
    ("tp2-sp-fsdp2", 4, ["parallel.tp=2", "parallel.dp_shard=2", "training.micro_batch_size=4"]),
    ("tp2-nosp-nolossparallel", 2, ["parallel.tp=2", "parallel.sequence_parallel=false",
                                    "parallel.loss_parallel=false"]),
    ("tp2-async-ac-full", 2, ["parallel.tp=2", "parallel.async_tp=true", "activation_checkpoint.mode=full"]),
    ("cp2-ring-tp2-ac-op", 4, ["parallel.cp=2", "parallel.tp=2", "activation_checkpoint.mode=selective",
                               "activation_checkpoint.selective_option=op"]),
    ("cp2-allgather-fsdp", 2, ["parallel.cp=2", "parallel.cp_rotate=allgather"]),
    ("pp2-1f1b-tp2-ac-every2", 4, ["parallel.pp=2", "parallel.tp=2", "parallel.pp_microbatches=4",
                                   "activation_checkpoint.mode=selective", "activation_checkpoint.selective_option=2"]),
    ("pp2-interleaved-fsdp2-accum2", 4, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                                         "parallel.pp_stages_per_rank=2", "parallel.dp_shard=2",
                                         "training.micro_batch_size=2", "parallel.pp_microbatches=2"]),
    ("pp2-zero-bubble", 2, ["parallel.pp=2", "parallel.pp_schedule=zero_bubble", "parallel.pp_microbatches=4"]),
    ("float8-fsdp2-tp2-gather8", 4, ["float8.enabled=true", "float8.fsdp_float8_all_gather=true",
                                     "parallel.tp=2", "parallel.dp_shard=2", "training.micro_batch_size=4",
                                     "activation_checkpoint.mode=full"]),
]

_KINDS = {"all_reduce": "all_reduce", "all_gather_single": "all_gather", "reduce_scatter_single": "reduce_scatter"}


class _Counter:
    """Wraps the collectives the technique files call (module attributes of
    torch.distributed) and tallies calls and bytes handed in per (group name, kind)."""

    def __init__(self):
        self.calls, self.bytes = collections.Counter(), collections.Counter()
        self.names: dict[int, str] = {}
        self.saved = {}

    def _name(self, group) -> str:
        if group is None or group is dist.group.WORLD:
            return "world"
        return self.names[id(group)]

    def install(self) -> None:
        for fn_name, kind in _KINDS.items():
            original = self.saved[fn_name] = getattr(dist, fn_name)

            def counted(*args, _original=original, _kind=kind, **kwargs):
                t = args[1] if _kind != "all_reduce" else args[0]
                key = (self._name(kwargs.get("group")), _kind)
                self.calls[key] += 1
                self.bytes[key] += t.numel() * t.element_size()
                return _original(*args, **kwargs)
            setattr(dist, fn_name, counted)
        original = self.saved["batch_isend_irecv"] = dist.batch_isend_irecv

        def batched(ops):
            for op in ops:
                if op.op is dist.isend:
                    key = (self._name(op.group), "send")
                    self.calls[key] += 1
                    self.bytes[key] += op.tensor.numel() * op.tensor.element_size()
            return original(ops)
        dist.batch_isend_irecv = batched

    def uninstall(self) -> None:
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _measure(rank: int, world: int, runs: list[list[str]]) -> list[dict]:
    """One training step per argv, with every collective counted; and the bytes of the
    parameters, of the gradients (at clipping) and of the optimizer state (after the step)."""
    results = []
    for argv in runs:
        counter, seen = _Counter(), {}
        build_groups, build_optimizer, clip = train.build_groups, train.build_optimizer, train.clip_grad_norm

        def groups_named(degrees, r):
            groups = build_groups(degrees, r)
            counter.names.update({id(g): name for name, g in groups.items()})
            return groups

        def optimizer_kept(model, t):
            seen["optimizer"] = build_optimizer(model, t)
            return seen["optimizer"]

        def clip_measured(params, *args):
            seen["grads"] = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
            return clip(params, *args)
        train.build_groups, train.build_optimizer, train.clip_grad_norm = groups_named, optimizer_kept, clip_measured
        counter.install()
        try:
            train.main(argv)
        finally:
            counter.uninstall()
            train.build_groups, train.build_optimizer, train.clip_grad_norm = build_groups, build_optimizer, clip
        opt = seen["optimizer"]
        params = [p for g in opt.param_groups for p in g["params"]]
        state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        results.append({
            "calls": dict(counter.calls), "bytes": dict(counter.bytes),
            "params": sum(p.numel() * p.element_size() for p in params), "grads": seen["grads"],
            "optimizer": sum(t.numel() * t.element_size() for t in state)})
    return results


def _predicted(argv: list[str], world: int, rank: int) -> dict:
    cfg = config.load_config(argv[1], argv[2:])
    report = planner.plan_rank(cfg, world, rank)
    calls = report.comm.calls + report.logged.calls
    nbytes = report.comm.bytes + report.logged.bytes
    return {"calls": dict(calls), "bytes": dict(nbytes), "params": report.memory["params"],
            "grads": report.memory["grads"], "optimizer": report.memory["optimizer"]}


@pytest.mark.parametrize("world", sorted({w for _, w, _ in LAYOUTS}))
def test_bytes_and_memory_equal_the_measurement(tmp_path, world):
    layouts = [(name, overrides) for name, w, overrides in LAYOUTS if w == world]
    runs = [_argv(str(tmp_path / name), *overrides) for name, overrides in layouts]
    measured = run_on_ranks(_measure, world, runs, timeout=600)
    for i, (name, _) in enumerate(layouts):
        for rank in range(world):
            got, want = measured[rank][i], _predicted(runs[i], world, rank)
            assert got["calls"] == want["calls"], (name, rank, got["calls"], want["calls"])
            assert got["bytes"] == want["bytes"], (name, rank, got["bytes"], want["bytes"])
            for key in ("params", "grads", "optimizer"):
                assert got[key] == want[key], (name, rank, key, got[key], want[key])


def test_the_counter_sees_a_wrong_prediction():
    """The comparison above can fail: a layout's prediction differs from another's."""
    a = _predicted(_argv("/tmp/x", "parallel.tp=2"), 2, 0)
    b = _predicted(_argv("/tmp/x", "parallel.tp=2", "parallel.sequence_parallel=false"), 2, 0)
    assert a["bytes"] != b["bytes"] and a["calls"] != b["calls"]


# ---------------------------------------------------------------------------------------
# 2. Activations: estimate vs measured growth of live tensor bytes

ACT_MODEL = ["model.dim=128", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "model.vocab_size=512",
             "data.seq_len=128", "training.batch_size=2", "training.micro_batch_size=2", "training.dtype=float32"]

# (name, world, rank, overrides).
ACT_LAYOUTS = [
    ("single", 1, 0, []),
    ("single-full-ac", 1, 0, ["activation_checkpoint.mode=full"]),
    ("single-op-ac", 1, 0, ["activation_checkpoint.mode=selective", "activation_checkpoint.selective_option=op"]),
    ("single-every2-ac", 1, 0, ["activation_checkpoint.mode=selective", "activation_checkpoint.selective_option=2"]),
    ("tp2-sp", 2, 1, ["parallel.tp=2"]),
    ("tp2-nosp", 2, 0, ["parallel.tp=2", "parallel.sequence_parallel=false", "parallel.loss_parallel=false"]),
    ("tp2-sp-full-ac", 2, 0, ["parallel.tp=2", "activation_checkpoint.mode=full"]),
    ("cp2-ring", 2, 1, ["parallel.cp=2"]),
    ("cp2-tp2-full-ac", 4, 3, ["parallel.cp=2", "parallel.tp=2", "activation_checkpoint.mode=full"]),
    ("cp2-tp2-op-ac", 4, 3, ["parallel.cp=2", "parallel.tp=2", "activation_checkpoint.mode=selective",
                             "activation_checkpoint.selective_option=op"]),
    ("fsdp2-noreshard", 2, 0, ["parallel.dp_shard=2", "training.micro_batch_size=1",
                               "parallel.fsdp_reshard_after_forward=false"]),
    ("fsdp2-full-ac", 2, 1, ["parallel.dp_shard=2", "training.micro_batch_size=1",
                             "activation_checkpoint.mode=full"]),
    ("cp2-allgather", 2, 0, ["parallel.cp=2", "parallel.cp_rotate=allgather"]),
    ("pp2-first-stage", 2, 0, ["parallel.pp=2"]),
    ("pp2-last-stage-tp2", 4, 3, ["parallel.pp=2", "parallel.tp=2"]),
    ("float8-tensorwise", 1, 0, ["float8.enabled=true"]),
    ("float8-rowwise-tp2-full-ac", 2, 0, ["float8.enabled=true", "float8.recipe=rowwise", "parallel.tp=2",
                                          "activation_checkpoint.mode=full"]),
]


@pytest.mark.parametrize("name, world, rank, overrides", ACT_LAYOUTS, ids=[x[0] for x in ACT_LAYOUTS])
def test_activation_estimate_within_15_percent(name, world, rank, overrides):
    import bench  # its allocator-independent live-bytes tally

    cfg = config.load_config(os.path.join(ROOT, "configs/debug.yaml"), ACT_MODEL + overrides)
    plan = config.validate(cfg, world)
    d = plan.degrees
    with planner.fake_world(world, rank):
        groups = train.build_groups(d, rank)
        coords = train.rank_coords(d, rank)
        par = train.parallelize(cfg, plan, groups, coords, "meta")
        (s, stage), = par.stages.items()
        llama.materialize(stage, torch.device("cpu"))
        llama.init_weights(stage, plan.model_args, 0)
        est = planner.activations(cfg, plan, stage)
        m = (cfg.parallel.pp_microbatches or d["pp"]) if d["pp"] > 1 else 1
        B, S = cfg.training.micro_batch_size // m, cfg.data.seq_len // d["cp"]
        positions = None
        if d["cp"] > 1:
            from context_parallel import positions as cp_positions
            positions = cp_positions(cfg.data.seq_len, coords["cp"], d["cp"], torch.device("cpu"))
        if stage.tok_embeddings is not None:
            x = torch.randint(0, plan.model_args.vocab_size, (B, S))
        else:  # a later pipeline stage receives the (sequence-parallel) hidden state
            sp = d["tp"] > 1 and cfg.parallel.sequence_parallel
            x = torch.randn(B, S // d["tp"] if sp else S, plan.model_args.dim, requires_grad=True)
            positions = torch.arange(S)
        labels = torch.randint(0, plan.model_args.vocab_size, (B, S))
        live = bench._LiveBytes([*stage.parameters(), x])
        with live:
            start = live.live
            out = stage(x, positions)  # kept alive, as train.main's `logits`
            if stage.output is not None:
                vocab_group = groups["tp"] if d["tp"] > 1 and cfg.parallel.loss_parallel else None
                loss = train.loss_fn(out, labels, plan.global_tokens, vocab_group)
            kept, peak = live.live - start, live.peak - start
        del out
    # FSDP (here also over the cp ranks) keeps gathered parameters alive too: the root
    # unit's (every unit's without resharding), and while a block runs its own and the next.
    held = planner.fsdp_gathered(cfg, par.fsdp_states.get(s))
    est_peak = max(est["peak"] + held["kept"], est["blocks_peak"] + held["kept"] + held["running"])
    for what, got, want in (("kept", est["kept"] + held["kept"], kept), ("peak", est_peak, peak)):
        assert abs(got - want) <= 0.15 * want, (name, what, got, want, got / want)


# ---------------------------------------------------------------------------------------
# 3. The CLI, invariants, bad input


def test_dry_run_405b_on_512_ranks(capsys):
    train.main(["--config", os.path.join(ROOT, "configs/llama3_405b.yaml"), "--dry-run", "--world-size", "512"])
    out = capsys.readouterr().out
    for line in ("on 512 ranks, layout pp8 dp1x8 cp1 tp8", "memory per rank", "activations per micro-batch",
                 "FLOPs per step per rank", "FSDP (dp_shard x cp), 8 ranks", "tensor parallel (tp), 8 ranks",
                 "pipeline (pp), 8 ranks", "pipeline bubble: interleaved_1f1b, p = 8, m = 8, v = 2"):
        assert line in out, line
    # 126 layers over 16 stages: rank 0 holds stages 0 and 8 (8 + 8 layers and the
    # embedding); every weight divides by tp 8 and FSDP 8 (no padding); the two norms of
    # a layer are replicated over tp, so only FSDP splits them.
    args = llama.model_args("llama3_405b")
    norms = 2 * args.dim
    layer = llama.num_params(args.__class__(**{**args.__dict__, "n_layers": 1})) - 2 * args.vocab_size * args.dim \
        - args.dim - norms
    expected = (16 * layer + args.vocab_size * args.dim) // 64 + 16 * norms // 8
    assert f"= {expected:,}" in out


def test_parameters_add_up_over_the_ranks():
    """Every rank's parameters (no padding: everything divides) add up to the model,
    counting each (pp, tp, FSDP) shard once (dp_replicate ranks hold copies) and the
    norms tp times (tensor parallel replicates them)."""
    overrides = ["model.dim=64", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "model.vocab_size=512",
                 "parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=2", "parallel.dp_replicate=2",
                 "training.micro_batch_size=2", "parallel.pp_microbatches=2"]
    cfg = config.load_config(os.path.join(ROOT, "configs/debug.yaml"), overrides)
    total = 0
    for rank in range(16):
        report = planner.plan_rank(cfg, 16, rank)
        if report.coords["dp_replicate"] == 0:
            total += report.memory["elements"]
    args = config.validate(cfg, 16).model_args
    norms = (2 * args.n_layers + 1) * args.dim
    assert total == llama.num_params(args) + (2 - 1) * norms


def test_bad_input():
    debug = os.path.join(ROOT, "configs/debug.yaml")
    with pytest.raises(ValueError, match="--dry-run needs --world-size"):
        train.main(["--config", debug, "--dry-run"])
    with pytest.raises(ValueError, match="--world-size is for --dry-run"):
        train.main(["--config", debug, "--world-size", "4"])
    with pytest.raises(ValueError, match="multiply to 8, but the world size is 4"):
        train.main(["--config", debug, "--dry-run", "--world-size", "4", "parallel.tp=2", "parallel.dp_shard=4"])
    with pytest.raises(ValueError, match=r"--rank 4 is not in \[0, 4\)"):
        train.main(["--config", debug, "--dry-run", "--world-size", "4", "--rank", "4", "training.micro_batch_size=2"])
