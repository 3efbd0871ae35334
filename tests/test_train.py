"""Single-process training (train.py): the loss falls, metrics and config are written,
gradient accumulation and activation checkpointing do not change the math, compile
works on CPU, signals stop the run cleanly."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import parallelize
import train
from distributed import PARITY_BOUNDS, run_on_ranks, train_argv, train_rank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny model on the builtin corpus: seconds per run.
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "data.seq_len=32", "training.batch_size=8", "training.micro_batch_size=8",
        "training.warmup_steps=2", "run.eval_every=0", "run.log_every=1",
        "training.dtype=float32",  # debug.yaml's auto would pick bf16 on a CPU with native bf16
        "run.overwrite=true"]  # tests reuse run dirs for fresh runs; tests/test_faults.py checks the refusal


def run(tmp_path, *overrides: str) -> list[dict]:
    return train.main(["--config", os.path.join(ROOT, "configs/debug.yaml"), *TINY,
                       f"run.dir={tmp_path}", f"data.cache_dir={os.path.join(ROOT, '.cache/data')}",
                       *overrides])


def losses(history: list[dict]) -> list[float]:
    return [r["loss"] for r in history]


def test_loss_falls_and_metrics_are_written(tmp_path):
    history = run(tmp_path, "training.steps=40", "training.lr=1e-2", "run.eval_every=20", "run.eval_steps=2")
    assert [r["step"] for r in history] == list(range(1, 41))
    last = sum(losses(history)[-5:]) / 5
    assert last < history[0]["loss"] - 1.5, losses(history)  # from ~8.3 = ln(4096)
    assert history[39]["val_loss"] < history[19]["val_loss"] < history[0]["loss"] - 1.0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == history
    for key in ("step", "loss", "grad_norm", "lr", "tokens_per_sec", "mfu", "memory_gb", "elapsed_s"):
        assert key in lines[0], key
    assert lines[0]["tokens_per_sec"] > 0 and lines[0]["mfu"] > 0
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["training"]["steps"] == 40 and written["model"]["dim"] == 64


def test_first_loss_matches_the_init(tmp_path):
    """At init the final norm gives unit-RMS features and the output weights have std
    dim^-0.5, so the logits are ~N(0, 1): the expected first loss is ln(vocab) + 1/2."""
    first = run(tmp_path, "training.steps=2", "training.dtype=float32")[0]["loss"]
    assert abs(first - (torch.log(torch.tensor(4096.0)).item() + 0.5)) < 0.15


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_gradient_accumulation_is_exact(tmp_path, optimizer):
    """8 sequences per step as 1 x 8, 2 x 4 or 4 x 2 micro-batches: the same step, to
    float64 rounding (the loss convention: sum / global tokens, then plain sums)."""
    ref = losses(run(tmp_path / "a", "training.steps=5", "training.dtype=float64",
                     f"training.optimizer={optimizer}", "training.lr=0.05"))
    for micro in (4, 2):
        got = losses(run(tmp_path / f"m{micro}", "training.steps=5", "training.dtype=float64",
                         f"training.optimizer={optimizer}", "training.lr=0.05",
                         f"training.micro_batch_size={micro}"))
        assert got == pytest.approx(ref, rel=1e-12, abs=0), (micro, got, ref)
    assert ref[-1] < ref[0]


@pytest.mark.parametrize("mode, option", [("full", "op"), ("selective", "op"), ("selective", "2")])
def test_activation_checkpointing_does_not_change_the_math(tmp_path, mode, option):
    ref = losses(run(tmp_path / "ref", "training.steps=4", "training.dtype=float32"))
    got = losses(run(tmp_path / "ac", "training.steps=4", "training.dtype=float32",
                     f"activation_checkpoint.mode={mode}", f"activation_checkpoint.selective_option={option}"))
    assert got == ref  # bitwise: CPU kernels are deterministic and recompute is exact


def test_activation_checkpointing_is_applied():
    import llama

    args = llama.model_args("debug", n_layers=4)
    for mode, option, expected in [("full", "op", [1, 1, 1, 1]), ("selective", 2, [0, 1, 0, 1]),
                                   ("selective", "op", [1, 1, 1, 1]), ("none", "op", [0, 0, 0, 0])]:
        model = llama.build_model(args)
        parallelize.apply_activation_checkpointing(model, mode, option)
        assert [int(b.checkpoint_fn is not None) for b in model.layers.values()] == expected, (mode, option)


def test_selective_op_policy_saves_matmuls_and_attention():
    """Count what the op policy saves on a block: every mm and the attention, nothing else."""
    import llama
    from torch.utils.checkpoint import CheckpointPolicy

    seen = []

    def spy(ctx, op, *a, **k):
        decision = parallelize._sac_policy(ctx, op, *a, **k)
        if not ctx.is_recompute:
            seen.append((str(op), decision))
        return decision

    args = llama.model_args("debug", dim=64, n_heads=4, n_kv_heads=2, n_layers=1)
    model = llama.build_model(args, "cpu")
    llama.init_weights(model, args, 0)
    import functools
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    model.layers["0"].checkpoint_fn = functools.partial(
        checkpoint, use_reentrant=False, context_fn=functools.partial(create_selective_checkpoint_contexts, spy))
    model(torch.randint(0, 4096, (2, 16))).sum().backward()
    saved = [op for op, d in seen if d == CheckpointPolicy.MUST_SAVE]
    assert saved.count("aten.mm.default") == 7  # wq wk wv wo w1 w2 w3
    assert saved.count("aten._scaled_dot_product_flash_attention_for_cpu.default") == 1
    assert len(saved) == 8


def test_compile_matches_eager(tmp_path):
    ref = losses(run(tmp_path / "eager", "training.steps=3", "training.dtype=float32"))
    got = losses(run(tmp_path / "compiled", "training.steps=3", "training.dtype=float32", "compile=true"))
    # Bitwise equal here; fused kernels may order a reduction otherwise on another CPU:
    # the float32 loss bound of the parity tests (~20 ulps).
    assert got == pytest.approx(ref, rel=PARITY_BOUNDS["loss"], abs=0)


def test_clip_grad_norm_matches_torch():
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p) * 10
        q.grad = p.grad.clone()
    ours = train.clip_grad_norm(a, 1.0)
    theirs = torch.nn.utils.clip_grad_norm_(b, 1.0)
    assert torch.allclose(ours.float(), theirs)
    for p, q in zip(a, b):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_vocab_too_small_for_tokenizer(tmp_path):
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(ValueError, match="model.vocab_size 1000"):
        run(tmp_path, "model.vocab_size=1000")
    # a failed run leaves no process group and no signal handler behind
    assert not torch.distributed.is_initialized()
    assert signal.getsignal(signal.SIGINT) is handler


def test_sigterm_stops_after_the_current_step(tmp_path):
    """SIGTERM mid-run: the step in flight finishes, its metrics are logged, exit 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--config", "configs/debug.yaml", *TINY, "training.steps=100000",
         f"run.dir={tmp_path}", f"data.cache_dir={os.path.join(ROOT, '.cache/data')}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopping after step" in out and "SIGTERM" in out, out
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert f"stopping after step {last['step']}" in out
    assert last["step"] < 100000


def test_bad_config_exits_with_a_message(tmp_path):
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/debug.yaml", "training.stepz=1"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert "training.stepz" in out.stderr and "training.steps" in out.stderr


def test_runs_are_determined_by_the_seed(tmp_path):
    a = losses(run(tmp_path / "a", "training.steps=3", "training.deterministic=true"))
    b = losses(run(tmp_path / "b", "training.steps=3", "training.deterministic=true"))
    c = losses(run(tmp_path / "c", "training.steps=3", "training.deterministic=true", "training.seed=1"))
    torch.use_deterministic_algorithms(False)
    assert a == b  # bitwise: same init, same batches, deterministic kernels
    assert a != c and a[0] != c[0]  # another seed: other weights and other batches


def test_no_weight_decay_on_norm_weights():
    """build_optimizer decays the matrices only. By name: the weight_decay=0 group holds
    exactly the RMSNorm weights. By behaviour: one step with zero gradients leaves every
    norm weight unchanged and shrinks every matrix by (1 - lr x weight_decay)."""
    import config
    import llama

    args = llama.model_args("debug", dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
    lr, wd = 0.1, 0.5
    for optimizer in ("adamw", "sgd"):
        model = llama.build_model(args, "cpu")
        llama.init_weights(model, args, 0)
        opt = train.build_optimizer(model, config.TrainingConfig(optimizer=optimizer, lr=lr, weight_decay=wd))
        name_of = {p: n for n, p in model.named_parameters()}
        norms = sorted(n for n in name_of.values() if n.endswith("norm.weight"))
        assert len(norms) == 2 * args.n_layers + 1  # attention_norm, ffn_norm per block, the final norm
        groups = {g["weight_decay"]: sorted(name_of[p] for p in g["params"]) for g in opt.param_groups}
        assert groups == {0.0: norms, wd: sorted(set(name_of.values()) - set(norms))}, (optimizer, groups)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for n, p in model.named_parameters():
            if n in norms:
                assert torch.equal(p.detach(), before[n]), (optimizer, n)
            else:  # AdamW: p x (1 - lr wd); SGD: p - lr (wd p); equal to float32 rounding
                torch.testing.assert_close(p.detach(), before[n] * (1 - lr * wd), rtol=1e-6, atol=0)


def test_tokens_per_sec_and_mfu_by_hand(tmp_path):
    """The logged tokens_per_sec and mfu on 2 ranks (dp_shard 2), logging every 2nd of 5
    steps (lines after steps 2, 4 and 5), against a hand computation from each line's
    elapsed_s: tokens/s per device = steps since the last line x 8 sequences x 32
    tokens / seconds since the last line / 2 devices; mfu (percent) = 100 x
    llama.flops_per_token x tokens/s / run.peak_flops."""
    import llama

    argv = train_argv(str(tmp_path), "training.steps=5", "run.log_every=2", "parallel.dp_shard=2",
                      "training.micro_batch_size=4", "run.peak_flops=2e11")
    flops_per_token = llama.flops_per_token(llama.model_args("debug", dim=64, n_layers=2, n_heads=4, n_kv_heads=2), 32)
    for rank, history in enumerate(run_on_ranks(train_rank, 2, argv, timeout=120)):
        assert [r["step"] for r in history] == [2, 4, 5], rank
        last_step, last_elapsed = 0, 0.0
        for r in history:
            tokens_per_sec = (r["step"] - last_step) * 8 * 32 / (r["elapsed_s"] - last_elapsed) / 2
            assert r["tokens_per_sec"] == pytest.approx(tokens_per_sec, rel=1e-6), (rank, r)
            assert r["mfu"] == pytest.approx(100 * flops_per_token * tokens_per_sec / 2e11, rel=1e-6), (rank, r)
            last_step, last_elapsed = r["step"], r["elapsed_s"]


def test_tensorboard_carries_the_values_of_metrics_jsonl(tmp_path):
    """run.tensorboard=true: every numeric field of every metrics.jsonl record is a
    TensorBoard scalar at its step, equal to float32 rounding (TensorBoard stores
    float32: relative 2^-24 ~ 6e-8, bound 1e-6). A resumed run purges the events of the
    steps after its checkpoint, as metrics.jsonl is cut back: each step once."""
    pytest.importorskip("tensorboard", reason="run.tensorboard needs `pip install tensorboard`")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = train_argv(str(tmp_path), "training.steps=6", "run.tensorboard=true", "checkpoint.interval=4",
                      "run.eval_every=3", "run.eval_steps=1")
    train.main(argv)
    shutil.rmtree(tmp_path / "checkpoints" / "step-6")  # steps 5 and 6 are redone after the resume
    train.main([*argv, "checkpoint.load=latest"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    keys = {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k != "step"}
    assert {"loss", "val_loss", "grad_norm", "lr", "tokens_per_sec", "mfu", "memory_gb"} <= keys
    assert keys == set(events.Tags()["scalars"])
    for key in keys:
        want = {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float))}
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == sorted(want), key  # every step once, in order
        for step, value in got:
            assert value == pytest.approx(want[step], rel=1e-6, abs=1e-30), (key, step)


def test_a_warmup_longer_than_the_run_is_cut_to_it(tmp_path, capsys):
    """debug.yaml warms up over 20 steps; a 10-step run warms up over all 10 (lr / 10 per
    step, the full lr at the last) and says so, instead of being refused."""
    history = train.main(train_argv(str(tmp_path), "training.warmup_steps=20", "training.lr=1e-3"))
    assert "training.warmup_steps=20 is longer than training.steps=10: warming up over all 10 steps" \
        in capsys.readouterr().out
    assert [r["lr"] for r in history] == pytest.approx([1e-3 * s / 10 for s in range(1, 11)], rel=1e-12)
