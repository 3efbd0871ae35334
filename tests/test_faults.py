"""Faults an operator can run into, each shown to end cleanly (safety.py, train.py).

So far: a loss or gradient norm that goes NaN / inf (learning rate 1e6) stops the run
with an error naming the step, on one process and on 2 FSDP ranks alike; nothing
non-finite is saved, so the newest checkpoint is the newest finite step, and
`python train.py` ends with an `error:` line and exit 2, not a traceback. Before
safety.py the same run exited 0 after writing all-NaN checkpoints, and with
checkpoint.keep=2 pruning removed the last finite one. A YAML syntax error, a corrupt
checkpoint, and resuming a run already at training.steps end with `error:` and exit 2
too (before: tracebacks, and a silent exit 0 with nothing done).
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from distributed import run_on_ranks, train_argv

import checkpoint
import safety
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIVERGE = ["training.lr=1e6", "training.steps=8", "checkpoint.interval=1", "checkpoint.keep=2"]


def _all_finite(path: str) -> bool:
    return all(torch.isfinite(t).all() for t in checkpoint.consolidate(path).values())


def _diverge(rank: int, world: int, argv: list[str]) -> str:
    with pytest.raises(safety.NonFiniteError) as e:
        train.main(argv)
    return str(e.value)


@pytest.mark.parametrize("world, layout", [(1, []), (2, ["parallel.dp_shard=2", "training.micro_batch_size=4"])])
def test_a_non_finite_step_stops_the_run_and_nothing_non_finite_is_saved(tmp_path, world, layout):
    run = tmp_path / "run"
    messages = run_on_ranks(_diverge, world, train_argv(str(run), *DIVERGE, *layout), timeout=180)
    step = int(re.match(r"step (\d+): the (loss|gradient norm) is not finite", messages[0]).group(1))
    assert messages == [messages[0]] * world  # every rank stops at the same step
    saved = checkpoint.list_checkpoints(str(run / "checkpoints"))
    assert saved == [s for s in (step - 2, step - 1) if s >= 1]  # keep=2: the two newest, all before it
    assert all(_all_finite(str(run / "checkpoints" / f"step-{s}")) for s in saved)


def test_the_command_line_says_error_and_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "train.py", *train_argv(str(tmp_path / "run"), *DIVERGE)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert re.search(r"^error: step \d+: the (loss|gradient norm) is not finite", out.stderr, re.M), out.stderr[-2000:]
    assert "Traceback" not in out.stderr



def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _is_clean_error(out: subprocess.CompletedProcess, pattern: str) -> bool:
    return out.returncode == 2 and re.search(pattern, out.stderr, re.M) is not None and "Traceback" not in out.stderr


def test_user_errors_end_with_an_error_line_not_a_traceback(tmp_path):
    """A YAML syntax error (file and line named), a corrupt checkpoint, and resuming a
    run that is already at training.steps ("nothing to do"): `error:` and exit 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  steps: [1, 2\n")
    out = _cli("--config", str(bad))
    assert _is_clean_error(out, rf"^error: {re.escape(str(bad))} is not valid YAML") and "line 2" in out.stderr, \
        out.stderr[-2000:]

    run = tmp_path / "run"
    train.main(train_argv(str(run), "training.steps=2", "checkpoint.interval=2"))
    out = _cli(*train_argv(str(run), "training.steps=2", "checkpoint.load=latest"))
    assert _is_clean_error(out, r"^error: .*step-2 is step 2, and training.steps=2: nothing to do"), out.stderr[-2000:]

    (run / "checkpoints" / "step-2" / "metadata.json").write_text("{ not json")
    out = _cli(*train_argv(str(run), "training.steps=4", "checkpoint.load=latest"))
    assert _is_clean_error(out, r"^error: .*metadata"), out.stderr[-2000:]
