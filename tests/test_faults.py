"""Faults an operator can run into, each shown to end cleanly: one section per class
(safety.py, train.py, checkpoint.py, data.py). Every test fails on the code before the
fix; its docstring says what happened then.

1. A loss or gradient norm that goes NaN / inf stops the run naming the step; nothing
   non-finite is saved. User errors (YAML syntax, a corrupt checkpoint, a finished run)
   end with `error:` and exit 2.
2. Resuming into another model is refused naming the keys; other hyperparameters need
   checkpoint.allow_config_change; the layout may change.
3. One live run per run.dir (a lock, taken over from a dead run); a used run.dir needs
   checkpoint.load or run.overwrite; metrics cut back on resume; .tmp cleanup.
4. A hung rank ends the run after run.collective_timeout_s, naming group and step.
5. Restarts with torchrun (one node, two nodes) and torchrun's exit code on SIGTERM.
6. Corrupt data: a token id outside the vocabulary names the shard and the offset.
7. A full disk, and checkpoint.initial that is not a state dict: `error:` and exit 2.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

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


# ---------------------------------------------------------------------------------------
# 1. A loss that goes NaN or inf; user errors


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


# ---------------------------------------------------------------------------------------
# 2. Resuming into another model, or with other hyperparameters


def test_resuming_into_another_model_is_refused_naming_the_keys(tmp_path):
    """A 2-layer checkpoint resumed as 1 or 3 layers: refused by the config comparison
    (model.n_layers named), and, with checkpoint.allow_config_change=true, by the tensor
    comparison in either direction (the extra or missing layer's tensors named). Before:
    n_layers=1 resumed with exit 0 and silently dropped a layer and its optimizer state."""
    run = str(tmp_path / "run")
    train.main(train_argv(run, "training.steps=2", "checkpoint.interval=2"))
    resume = ["training.steps=4", "checkpoint.load=latest"]
    with pytest.raises(ValueError, match=r"model.n_layers: 2 -> 1.*checkpoint.allow_config_change=true"):
        train.main(train_argv(run, *resume, "model.n_layers=1"))
    with pytest.raises(checkpoint.CheckpointError, match=r"model.layers.1.\S+ is in the checkpoint but not in this"):
        train.main(train_argv(run, *resume, "model.n_layers=1", "checkpoint.allow_config_change=true"))
    with pytest.raises(checkpoint.CheckpointError, match=r"model.layers.2.\S+ is not in the checkpoint"):
        train.main(train_argv(run, *resume, "model.n_layers=3", "checkpoint.allow_config_change=true"))
    with pytest.raises(checkpoint.CheckpointError, match=r"model.tok_embeddings.weight has shape \[\d+, 64\] there, "
                                                         r"\[\d+, 128\] here"):
        train.main(train_argv(run, *resume, "model.dim=128", "checkpoint.allow_config_change=true"))


def test_a_hyperparameter_change_needs_allow_config_change_and_the_layout_does_not(tmp_path, capsys):
    run = str(tmp_path / "run")
    train.main(train_argv(run, "training.steps=2", "checkpoint.interval=2"))
    resume = ["training.steps=3", "checkpoint.load=latest", "checkpoint.interval=0"]
    with pytest.raises(ValueError, match=r"training.lr: 0.003 -> 0.001\b"):
        train.main(train_argv(run, *resume, "training.lr=1e-3"))
    with pytest.raises(ValueError, match=r"training.optimizer: 'adamw' -> 'sgd'"):
        train.main(train_argv(run, *resume, "training.optimizer=sgd"))
    capsys.readouterr()
    history = train.main(train_argv(run, *resume, "training.lr=1e-3", "checkpoint.allow_config_change=true"))
    assert [r["step"] for r in history] == [3] and 0 < history[0]["lr"] <= 1e-3  # the new schedule (3e-3 before)
    assert "checkpoint.allow_config_change=true: changed training.lr: 0.003 -> 0.001" in capsys.readouterr().out
    # the layout (micro-batches) and the length are free: resharding, and training on
    history = train.main(train_argv(run, "training.steps=4", "checkpoint.load=latest", "training.micro_batch_size=4"))
    assert [r["step"] for r in history] == [3, 4]


# ---------------------------------------------------------------------------------------
# 3. Two runs, one run.dir


_HOLD = "import sys, time; sys.path.insert(0, {root!r}); import safety; lock = safety.RunDirLock({dir!r}); " \
        "print('held', flush=True); time.sleep(120)"


def test_a_live_run_holds_run_dir_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    """While another process holds run.dir's lock, a run there is refused and told its
    pid; once that process is killed (SIGKILL: no clean-up), the next run takes the
    lock over and says whose it was. Before: both ran and deleted each other's files."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD.format(root=ROOT, dir=str(run))], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(safety.RunDirBusy, match=rf"run.dir={re.escape(str(run))} is in use by pid {holder.pid} "):
            train.main(train_argv(str(run), "training.steps=2"))
        out = _cli(*train_argv(str(run), "training.steps=2"))
        assert _is_clean_error(out, rf"^error: .*in use by pid {holder.pid} on "), out.stderr[-2000:]
        assert not (run / "config.yaml").exists()  # the refused runs wrote nothing
    finally:
        holder.kill()
        holder.wait()
    capsys.readouterr()
    assert [r["step"] for r in train.main(train_argv(str(run), "training.steps=2"))] == [1, 2]
    assert f"taking over the lock of pid {holder.pid} on " in capsys.readouterr().out


def test_a_used_run_dir_is_refused_unless_resumed_or_overwritten(tmp_path):
    """A new experiment in a run.dir holding another run's checkpoints and metrics is
    refused; run.overwrite=true replaces them (the old checkpoints are gone, so a later
    checkpoint.load=latest cannot resume the wrong run); checkpoint.load resumes it."""
    run = tmp_path / "run"
    train.main(train_argv(str(run), "training.steps=4", "checkpoint.interval=2"))
    with pytest.raises(ValueError, match=r"holds another run \(checkpoints step-2..4, metrics.jsonl\).*"
                                         r"run.overwrite=true"):
        train.main(train_argv(str(run), "training.steps=2", "training.lr=1e-3", "run.overwrite=false"))
    assert checkpoint.list_checkpoints(str(run / "checkpoints")) == [2, 4]
    train.main(train_argv(str(run), "training.steps=2", "training.lr=1e-3", "run.overwrite=true",
                          "checkpoint.interval=1"))
    assert checkpoint.list_checkpoints(str(run / "checkpoints")) == [1, 2]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_after_a_resume_no_step_is_in_the_metrics_twice(tmp_path):
    """A run that went on past its last checkpoint before it died (steps 5, 6 logged,
    step-6 lost) and a half-written last line: the resumed run cuts metrics.jsonl back
    to the checkpoint's step, so every step appears once. Before: 5 and 6 twice."""
    run = tmp_path / "run"
    train.main(train_argv(str(run), "training.steps=6", "checkpoint.interval=4"))
    shutil.rmtree(run / "checkpoints" / "step-6")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    train.main(train_argv(str(run), "training.steps=6", "checkpoint.load=latest"))
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_tmp_cleanup_removes_only_what_no_live_run_writes(tmp_path, capsys):
    """A save removes only its own step's leftover step-N.tmp, never another's (a second
    live run's save in flight); a run holding run.dir's lock removes the leftovers of
    dead saves at start-up, and says so. Before: every save removed every step-*.tmp."""
    root = tmp_path / "alone"
    (root / "step-9.tmp").mkdir(parents=True)
    (root / "step-2.tmp").mkdir()
    checkpoint.Checkpointer(str(root)).save(2, torch.nn.Linear(4, 4), None)
    assert sorted(os.listdir(root)) == ["step-2", "step-9.tmp"]

    run = tmp_path / "run"
    train.main(train_argv(str(run), "training.steps=2", "checkpoint.interval=2"))
    (run / "checkpoints" / "step-9.tmp").mkdir()
    capsys.readouterr()
    train.main(train_argv(str(run), "training.steps=3", "checkpoint.load=latest", "checkpoint.interval=3"))
    assert "removed step-9.tmp, left by a save that did not finish" in capsys.readouterr().out
    assert sorted(os.listdir(run / "checkpoints")) == ["step-2", "step-3"]


# ---------------------------------------------------------------------------------------
# 4. A hung rank


def test_a_hung_rank_ends_the_run_naming_the_group_and_the_step(tmp_path):
    """Two ranks (FSDP 2, started as torchrun would) with run.collective_timeout_s=5;
    SIGSTOP on rank 1 once steps are logged: rank 0 ends with `error:` naming the step
    and the group it waited on, within the timeout, not torch's 30 minutes. Before: the
    subgroups had no timeout and rank 0 waited past 15 minutes."""
    run = tmp_path / "run"
    argv = train_argv(str(run), "training.steps=100000", "parallel.dp_shard=2", "training.micro_batch_size=4",
                      "run.collective_timeout_s=5")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(2)]
    try:
        deadline = time.time() + 120
        while time.time() < deadline and _logged_steps(run) < 2 and ranks[0].poll() is None:
            time.sleep(0.1)
        os.kill(ranks[1].pid, signal.SIGSTOP)
        _, err = ranks[0].communicate(timeout=90)  # torch's default timeout would be 30 minutes
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    assert _is_clean_error(subprocess.CompletedProcess([], ranks[0].returncode, "", err),
                           r"^error: step \d+: a collective on group '\w+' \(ranks \[0, 1\]\) failed: .*"
                           r"run.collective_timeout_s"), err[-3000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logged_steps(run) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


# ---------------------------------------------------------------------------------------
# 5. Restarts with plain torchrun
#
# torchrun keeps one TCP store for the whole job, and on torch 2.13 the workers share it
# unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (pytorch/pytorch#135712): a restarted worker
# then reads the killed workers' gloo addresses, left there, and init_process_group fails
# (connection refused) or hangs. The static rendezvous (--master-addr / --master-port, or
# --nnodes > 1 without --rdzv-backend) always shares its store and ignores the variable,
# so it cannot restart; the c10d rendezvous with the variable set can, on one node and
# across nodes.

RESTART = ["training.steps=12", "checkpoint.interval=2", "checkpoint.load=latest"]


def _torchrun(node: list[str], run, overrides: list[str], log_path) -> subprocess.Popen:
    """One torchrun agent as the README starts it, with `node`'s rendezvous flags; its
    output and its workers' go to `log_path`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    with open(log_path, "w") as log:  # the agent holds its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *node, "--max-restarts", "1",
                                 "train.py", *train_argv(str(run), *overrides)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _job_workers(run) -> dict[int, int]:
    """{global rank: pid} of the live torchrun workers training into `run`, from /proc (the
    agents have no RANK in their environment)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        rank = [e[5:] for e in environ if e.startswith(b"RANK=")]
        if rank and f"run.dir={run}".encode() in cmdline:
            found[int(rank[0])] = int(entry)
    return found


def _stop(agents: list[subprocess.Popen], run) -> None:
    """Nothing outlives a test: kill the agents still running, then their workers (each in
    its own session, so a killed agent leaves them behind)."""
    for agent in agents:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    for pid in _job_workers(run).values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_a_worker_and_finish(tmp_path, nodes: list[list[str]]) -> tuple[int | None, list[int], str]:
    """Start one agent per entry of `nodes` on RESTART (FSDP over the 2 workers); SIGKILL
    the rank-1 worker once a checkpoint exists; wait for every agent. Returns the killed
    pid, the agents' exit codes and their output."""
    run = tmp_path / "run"
    overrides = [*RESTART, "training.micro_batch_size=4"]
    paths = [tmp_path / f"agent{i}.log" for i in range(len(nodes))]
    agents = [_torchrun(node, run, overrides, path) for node, path in zip(nodes, paths)]
    killed = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and killed is None and all(a.poll() is None for a in agents):
            pid = _job_workers(run).get(1)
            if pid and checkpoint.list_checkpoints(str(run / "checkpoints")):
                os.kill(pid, signal.SIGKILL)
                killed = pid
            time.sleep(0.02)
        codes = [agent.wait(timeout=180) for agent in agents]
    finally:
        _stop(agents, run)
    return killed, codes, "".join(path.read_text() for path in paths)


def _assert_resumed_and_finished(run, killed: int | None, codes: list[int], out: str) -> None:
    assert killed is not None, "the job finished before a worker could be killed"
    assert codes == [0] * len(codes), out[-4000:]
    resumed = re.search(r"continuing at step (\d+)", out)  # only a resumed attempt says it
    assert resumed and int(resumed.group(1)) > 1, out[-4000:]
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 12  # RESTART's training.steps


def test_torchrun_on_one_node_restarts_a_killed_worker(tmp_path):
    """The one-node recipe of docs/operations.md (c10d rendezvous on localhost, --max-restarts, the
    variable): SIGKILL worker 1 once a checkpoint exists; torchrun restarts both workers,
    they resume from the newest checkpoint and finish, exit 0. Before, with the static
    rendezvous or without the variable: the restart failed or hung (see above)."""
    node = ["--nnodes", "1", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"localhost:{_free_port()}", "--rdzv-id", "one-node"]
    _assert_resumed_and_finished(tmp_path / "run", *_kill_a_worker_and_finish(tmp_path, [node]))


def test_torchrun_on_two_nodes_restarts_a_killed_worker(tmp_path):
    """The README's multi-node recipe as two agents on this machine (--nnodes 2
    --nproc_per_node 1, one c10d endpoint and --rdzv-id): SIGKILL the rank-1 worker (the
    other agent's); both agents restart their workers, which resume and finish, exit 0."""
    node = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "two-nodes"]
    _assert_resumed_and_finished(tmp_path / "run", *_kill_a_worker_and_finish(tmp_path, [node, node]))


def test_sigterm_to_torchrun_saves_the_step_and_torchrun_exits_1(tmp_path):
    """SIGTERM to torchrun (a scheduler's preemption): torchrun forwards it, the workers
    finish the step, save it and stop by themselves (torchrun did not have to SIGKILL
    them), and torchrun then exits 1 regardless (it re-raises the signal as an error).
    The checkpoint of that step is there, is the last step logged, and resumes."""
    run = tmp_path / "run"
    node = ["--nnodes", "1", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"localhost:{_free_port()}", "--rdzv-id", "sigterm"]
    overrides = ["training.steps=1000", *RESTART[1:], "training.micro_batch_size=4"]  # runs until the signal
    agent = _torchrun(node, run, overrides, tmp_path / "agent.log")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and agent.poll() is None and not checkpoint.list_checkpoints(
                str(run / "checkpoints")):
            time.sleep(0.02)
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=120)
    finally:
        _stop([agent], run)
    out = (tmp_path / "agent.log").read_text()
    assert code == 1, out[-4000:]
    stopped = re.search(r"stopping after step (\d+): received SIGTERM", out)
    assert stopped and "Unable to shutdown process" not in out, out[-4000:]
    step = int(stopped.group(1))
    assert checkpoint.list_checkpoints(str(run / "checkpoints"))[-1] == step
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step
    resumed = train.main(train_argv(str(run), f"training.steps={step + 1}", "checkpoint.load=latest"))
    assert [r["step"] for r in resumed] == [step + 1]


# ---------------------------------------------------------------------------------------
# 6. Corrupt data
# Token ids are checked against model.vocab_size where they are read (a sidecar's max_id
# cannot see bytes corrupted after it was written). Before: a .bin with overwritten bytes
# trained with exit 0 or died with a bare IndexError in the embedding, and a broken
# sidecar raised a bare JSONDecodeError or KeyError.

import data


def _bin_shards(folder, streams: list[torch.Tensor]) -> list[str]:
    """folder/shard-0000k.bin and their sidecars, for the builtin tokenizer (4096 ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"shard-{k:05d}.bin") for k in range(len(streams))]
    for path, stream in zip(paths, streams):
        data.write_bin(path, stream.numpy(), data.load_tokenizer("builtin"))
    return paths


def _random_shards(folder, seed: int) -> list[str]:
    """Two shards of 3000 random ids: 5700 train tokens (172 windows of 33), 300 val."""
    g = torch.Generator().manual_seed(seed)
    return _bin_shards(folder, [torch.randint(0, 4096, (3000,), generator=g) for _ in range(2)])


def _overwrite_tokens(path: str, offset: int, n: int) -> None:
    """Tokens [offset, offset + n) of a .bin become 0xFF bytes: id 2**32 - 1."""
    with open(path, "r+b") as f:
        f.seek(4 * offset)
        f.write(b"\xff" * 4 * n)


def _bad_id(path: str, offset: int) -> str:
    return re.escape(f"{path}: token id {2**32 - 1} at token offset {offset} is outside model.vocab_size 4096")


def test_a_corrupt_token_id_stops_the_run_naming_the_shard_and_offset(tmp_path):
    folder = tmp_path / "bin"
    paths = _random_shards(folder, seed=0)
    # The run's third batch (seq_len 32, batch 8, seed 0): the first window of it inside shard 1.
    ds = data.load_dataset(str(folder), data.load_tokenizer("builtin"), "train", 32, str(tmp_path))
    loader = data.DataLoader(ds, 32, 8, 8, 0, 1, seed=0)
    third = [next(loader)[0] for _ in range(3)][-1].numpy()
    start = next(33 * i for i in range(len(ds)) if 33 * i >= 3000 and (third == ds[i][:-1]).all(1).any())
    offset = start - 3000 + 10  # 3 tokens from the window's 11th on
    _overwrite_tokens(paths[1], offset, 3)
    with pytest.raises(ValueError, match=_bad_id(paths[1], offset)):
        train.main(train_argv(str(tmp_path / "run"), f"data.dataset={folder}", "training.steps=6"))
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2]  # the batches before it trained
    out = _cli(*train_argv(str(tmp_path / "cli"), f"data.dataset={folder}", "training.steps=6"))
    assert _is_clean_error(out, "^error: " + _bad_id(paths[1], offset)), out.stderr[-2000:]


def test_the_loader_raises_on_the_batch_with_the_bad_id_not_before(tmp_path):
    """Token i of the stream is id i, so a batch shows its windows; the shards meet at 500,
    inside window 62 (tokens 496..503), and the bad token is 502, offset 2 of shard 1."""
    folder, tok, seq_len = tmp_path / "bin", data.load_tokenizer("builtin"), 7
    paths = _bin_shards(folder, [torch.arange(500), torch.arange(500, 1200)])

    def loader() -> data.DataLoader:
        ds = data.load_dataset(str(folder), tok, "train", seq_len, str(tmp_path), vocab_size=tok.n_words)
        return data.DataLoader(ds, seq_len, 8, 2, 0, 1, seed=0)

    clean, before = loader(), []
    while 496 not in (inputs := next(clean)[0])[:, 0]:
        before.append(inputs)
    assert len(before) >= 2
    _overwrite_tokens(paths[1], 2, 1)
    corrupt = loader()
    for inputs in before:
        assert torch.equal(next(corrupt)[0], inputs)
    with pytest.raises(ValueError, match=_bad_id(paths[1], 2)):
        next(corrupt)
    signed = data.TokenDataset("signed", [torch.tensor([1, 2, 3, 4, 5, -5, 6, 7], dtype=torch.int32).numpy()], 3)
    data.check_vocab(signed, 100)  # a signed dtype: a negative id is caught too
    assert signed[0].tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"^signed shard 0: token id -5 at token offset 5 is outside"):
        signed[1]


def test_a_broken_sidecar_is_named(tmp_path):
    """Invalid JSON (in train.main) and a missing key: errors name the sidecar."""
    folder = tmp_path / "bin"
    side = _random_shards(folder, seed=1)[1] + ".json"
    with open(side) as f:
        meta = json.load(f)
    with open(side, "w") as f:
        f.write("{ not json")
    with pytest.raises(ValueError, match=re.escape(f"{side}: invalid JSON")):
        train.main(train_argv(str(tmp_path / "run"), f"data.dataset={folder}"))
    del meta["max_id"]
    with open(side, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=re.escape(f"{side}: the sidecar has no 'max_id'")):
        data.load_dataset(str(folder), data.load_tokenizer("builtin"), "train", 32, str(tmp_path))


# ---------------------------------------------------------------------------------------
# 7. Disk full, and checkpoint.initial that is not a state dict


def test_a_full_disk_ends_with_an_error_naming_the_file(tmp_path):
    """Checkpoint files may not grow past 64 KiB (RLIMIT_FSIZE: the write fails with
    EFBIG, as it would with ENOSPC on a full disk): `error:` naming the rank file,
    exit 2, the earlier step's checkpoint intact. Before: a traceback."""
    run = tmp_path / "run"
    warm = train_argv(str(tmp_path / "warm"), "training.steps=2")  # tokenized data cached before the limit
    train.main(warm)
    argv = train_argv(str(run), "training.steps=2", "checkpoint.interval=1")
    out = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         preexec_fn=_limit_file_size)
    assert _is_clean_error(out, r"^error: step-1 was not saved under .*checkpoints: rank 0: .*rank-00000.bin: "
                                r"File too large"), out.stderr[-2000:]
    assert checkpoint.list_checkpoints(str(run / "checkpoints")) == []


def _limit_file_size() -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


@pytest.mark.parametrize("content, message", [
    ("text", r"is not a state dict saved with torch.save"),
    ("list", r"holds a list, not a state dict of tensors"),
    ("dir", r"is not a state dict saved with torch.save \(a step-N directory resumes with checkpoint.load"),
])
def test_checkpoint_initial_that_is_not_a_state_dict(tmp_path, content, message):
    path = tmp_path / "weights.pt"
    if content == "text":
        path.write_text("not a checkpoint")
    elif content == "list":
        torch.save([torch.zeros(2)], path)
    else:
        path.mkdir()
    out = _cli(*train_argv(str(tmp_path / "run"), "training.steps=2", f"checkpoint.initial={path}"))
    assert _is_clean_error(out, rf"^error: {re.escape(str(path))} {message}"), out.stderr[-2000:]
