"""Checkpoint: ours (checkpoint.py) against torch.distributed.checkpoint (DCP).

    python bench/checkpoint.py [--quick] [--ranks 2 1] [--reps 3] [--dim 1024] [--tmp /tmp] ...

The same state on every side: parameters + AdamW state (one step taken), float32,
sharded by fsdp.py (ours) and by FSDP2 (DCP, as TorchTitan uses it: get_state_dict, then
dcp.save / dcp.async_save with the default FileSystemWriter: one file per rank, fsync)
over gloo ranks; 1 rank = one plain model for both. Checked first: save, zero every
local tensor, load: every tensor must come back bitwise, for ours and for DCP, else it
raises. Then interleaved reps (a fresh directory per save; the order alternates): save
until durable (blocking), the training stall of an async save (until save() returns),
and cold (evicted from the page cache) and warm loads; a time is the slowest rank's.
Then training steps run right after an async save, the write in flight, against the
same steps without a save: the time a save costs the training loop.
"""

import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time

import torch
import torch.distributed as dist

import checkpoint
import llama
from bench import common
from bench.fsdp import setup as fsdp_setup, shared_weights, step as fsdp_step

MODES = ("ours blocking", "ours async", "DCP blocking", "DCP async")
QUICK = dict(ranks=[2, 1], reps=2, dim=64, layers=1, vocab=256, steps=1, step_reps=2)


class Ours:
    """checkpoint.Checkpointer, one save per fresh directory (its root)."""

    def __init__(self, model, optimizer, async_save: bool):
        self.model, self.optimizer = model, optimizer
        self.ck = checkpoint.Checkpointer("", keep=0, async_save=async_save)

    def save(self, path: str) -> None:
        self.ck.root = path
        self.ck.save(1, self.model, self.optimizer)

    def in_flight(self) -> bool:
        return self.ck.thread is not None and self.ck.thread.is_alive()

    def wait(self) -> None:
        self.ck.wait()

    def load(self, path: str) -> None:
        self.ck.load(os.path.join(path, "step-1"), self.model, self.optimizer)

    def close(self) -> None:
        self.ck.close()


class DCP:
    """get_state_dict (DTensors under FSDP2), then dcp.save / dcp.async_save (the async
    writer on a gloo group of its own); load = get_state_dict + dcp.load (in place) +
    set_state_dict."""

    def __init__(self, model, optimizer, async_save: bool):
        self.model, self.optimizer, self.async_save = model, optimizer, async_save
        self.group = dist.new_group(backend="gloo") if async_save else None
        self.future = None

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optim": osd}

    def save(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        if self.async_save:
            self.future = dcp.async_save(self._state(), checkpoint_id=path, process_group=self.group)
        else:
            dcp.save(self._state(), checkpoint_id=path)

    def in_flight(self) -> bool:
        return self.future is not None and not self.future.done()

    def wait(self) -> None:
        if self.future is not None:
            self.future.result()
            self.future = None

    def load(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        state = self._state()
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def close(self) -> None:
        self.wait()
        if self.group is not None:
            dist.destroy_process_group(self.group)


def local_tensors(model, optimizer) -> list[torch.Tensor]:
    """This rank's tensors of the state (a DTensor's local shard)."""
    return [getattr(t, "_local_tensor", t).detach() for t in common.state_tensors(model, optimizer)]


def dir_bytes(path: str) -> tuple[int, int]:
    sizes = [os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(path) for n in names]
    return sum(sizes), len(sizes)


def evict(path: str) -> None:
    """Drop the (fsynced, so clean) files under path from the page cache: the next read
    goes to the disk, or to the VM host's cache."""
    for root, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def build(rank: int, world: int, cfg: dict):
    """{"ours": (model, optimizer), "DCP": ...} with AdamW state (one step taken), micro-batches, tokens."""
    args = llama.model_args("debug", dim=cfg["dim"], n_layers=cfg["layers"], vocab_size=cfg["vocab"])
    gen = torch.Generator().manual_seed(1000 + rank)
    micro = [torch.randint(0, args.vocab_size, (cfg["batch"], cfg["seq"] + 1), generator=gen)]
    tokens = world * cfg["batch"] * cfg["seq"]
    if world == 1:
        plain = common.build(args)
        models = {"ours": plain, "DCP": plain}
    else:
        state = shared_weights(args)
        models = {"ours": fsdp_setup("ours", args, state, world), "DCP": fsdp_setup("FSDP2", args, state, world)}
    for model, opt in {id(m): m for m in models.values()}.values():
        fsdp_step(model, opt, micro, tokens)
    return models, micro, tokens


def rank_main(rank: int, world: int, cfg: dict) -> dict:
    models, micro, tokens = build(rank, world, cfg)
    savers = {m: (Ours if m.startswith("ours") else DCP)(*models[m.split()[0]], async_save=m.endswith("async"))
              for m in MODES}
    out = {"bytes": sum(t.nbytes for t in local_tensors(*models["ours"])), "verify": {},
           "stall": {m: [] for m in MODES}, "durable": {m: [] for m in MODES}, "cold": {"ours": [], "DCP": []},
           "warm": {"ours": [], "DCP": []}, "disk": {}}

    def clear(*paths):
        dist.barrier()
        if rank == 0:
            for p in paths:
                shutil.rmtree(p, ignore_errors=True)
        dist.barrier()

    for impl in ("ours", "DCP"):  # the round trip: save, zero every local tensor, load, compare bitwise
        path, saver = os.path.join(cfg["dir"], f"verify-{impl}"), savers[f"{impl} blocking"]
        before = [t.clone() for t in local_tensors(*models[impl])]
        saver.save(path)
        with torch.no_grad():
            for t in local_tensors(*models[impl]):
                t.zero_()
        saver.load(path)
        out["verify"][impl] = (len(before), sum(map(torch.equal, before, local_tensors(*models[impl]))))
        clear(path)
    for rep in range(cfg["reps"]):  # interleaved, alternating the order
        paths = {m: os.path.join(cfg["dir"], f"{m.replace(' ', '-')}-{rep}") for m in MODES}
        for mode in (MODES if rep % 2 == 0 else MODES[::-1]):
            dist.barrier()
            start = time.perf_counter()
            savers[mode].save(paths[mode])
            out["stall"][mode].append(time.perf_counter() - start)
            savers[mode].wait()
            out["durable"][mode].append(time.perf_counter() - start)
        if rep == 0 and rank == 0:
            out["disk"] = {m: dir_bytes(p) for m, p in paths.items()}
        for impl in (("ours", "DCP") if rep % 2 == 0 else ("DCP", "ours")):
            dist.barrier()
            if rank == 0:
                evict(paths[f"{impl} blocking"])
            for kind in ("cold", "warm"):
                dist.barrier()
                start = time.perf_counter()
                savers[f"{impl} blocking"].load(paths[f"{impl} blocking"])
                out[kind][impl].append(time.perf_counter() - start)
        clear(*paths.values())
    out["steps"] = steps_during_save(rank, world, cfg, models, savers, micro, tokens, clear)
    for s in savers.values():
        s.close()
    return out


def steps_during_save(rank, world, cfg, models, savers, micro, tokens, clear) -> dict:
    """Per (model, save mode or None): the wall time of save + `steps` training steps +
    waiting until durable, interleaved with the same steps and no save."""
    variants = [("ours", None), ("ours", "ours async"), ("DCP", "DCP async")] + ([("DCP", None)] if world > 1 else [])
    out = {v: [] for v in variants}
    for rep in range(cfg["step_reps"]):
        for impl, mode in (variants if rep % 2 == 0 else variants[::-1]):
            path = os.path.join(cfg["dir"], f"steps-{rep}")
            dist.barrier()
            start = time.perf_counter()
            if mode is not None:
                savers[mode].save(path)
            for _ in range(cfg["steps"]):
                fsdp_step(*models[impl], micro, tokens)
            if mode is not None:
                savers[mode].wait()
            out[impl, mode].append(time.perf_counter() - start)
            clear(path)
    return out


def disk(path: str) -> str:
    """The file system holding `path`, from `df -T`."""
    try:
        line = subprocess.run(["df", "-T", path], capture_output=True, text=True, check=True).stdout.splitlines()[-1]
        dev, fstype, *_, mount = line.split()
        return f"{path} on {fstype} ({dev}, mounted at {mount})"
    except (OSError, subprocess.CalledProcessError, ValueError):
        return f"{path} (df -T failed)"


def compare(W: int, cli: argparse.Namespace) -> tuple[list[str], list[dict]]:
    base = tempfile.mkdtemp(prefix="nanotitan-bench-ckpt-", dir=cli.tmp)
    try:
        cfg = dict(dim=cli.dim, layers=cli.layers, vocab=cli.vocab, reps=cli.reps, steps=cli.steps,
                   step_reps=cli.step_reps, batch=1, seq=32, dir=base)
        res = common.run_on_ranks(rank_main, W, cfg, timeout=3600, pg_timeout_s=600)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    verified = {}
    for impl in ("ours", "DCP"):
        total, equal = (sum(x) for x in zip(*(r["verify"][impl] for r in res)))
        if equal != total:
            raise RuntimeError(f"checkpoint {W} rank(s): {impl} loaded back {equal} of {total} tensors bitwise")
        verified[impl] = f"{equal}/{total}"

    def slowest(key, sub):
        return common.slowest([r[key][sub] for r in res])
    save = {i: slowest("durable", f"{i} blocking") for i in ("ours", "DCP")}
    cold, warm = ({i: slowest(k, i) for i in ("ours", "DCP")} for k in ("cold", "warm"))
    stall = {m: slowest("stall", m) for m in MODES}
    disk_bytes = res[0]["disk"]
    where = f"{W} rank(s) ({'fsdp.py / FSDP2 shards' if W > 1 else 'one unsharded model'})"
    size = common.mib(sum(r["bytes"] for r in res))
    lines = [f"### {where}, state {size}", "",
             f"Round trip (save, zero, load), tensors back bitwise: ours {verified['ours']}, DCP {verified['DCP']} "
             "(asserted).",
             *common.table(["impl", "save (blocking, durable)", "load cold", "load warm", "bytes on disk (files)"],
                           [[i, common.ms(save[i]), common.ms(cold[i]), common.ms(warm[i]),
                             f"{disk_bytes[f'{i} blocking'][0]:,} ({disk_bytes[f'{i} blocking'][1]})"]
                            for i in ("ours", "DCP")]),
             *common.table(["ours / DCP", "ratio"], [["save", common.ratio(save["ours"], save["DCP"])],
                                                    ["load cold", common.ratio(cold["ours"], cold["DCP"])],
                                                    ["load warm", common.ratio(warm["ours"], warm["DCP"])],
                                                    ["async stall", common.ratio(stall["ours async"],
                                                                                 stall["DCP async"])]]),
             *common.table(["save mode", "stall (save() returns)", "until durable", "stall / its blocking save"],
                           [[m, common.ms(stall[m]), common.ms(slowest("durable", m)),
                             common.ratio(stall[m], save[m.split()[0]]) if m.endswith("async") else "-"]
                            for m in MODES])]
    if cli.steps:
        steps = {v: common.slowest([r["steps"][v] for r in res]) for v in res[0]["steps"]}
        cells = []
        for (impl, mode), ts in steps.items():
            if mode is not None:
                plain = steps[impl if W > 1 else "ours", None]
                lost = [a - b for a, b in zip(ts, plain)]
                cells.append([impl, mode, common.ms(ts), common.ms(plain),
                              f"{statistics.median(lost) * 1e3:.0f} ms (min {min(lost) * 1e3:.0f})",
                              common.ms(save[impl])])
        lines += [f"An async save, then {cli.steps} training step(s), then waiting until durable, against the same "
                  f"steps without a save ({cli.step_reps} interleaved reps): the time a save costs the loop.",
                  *common.table(["model", "save mode", "save + steps + wait", "steps alone", "lost per save",
                                 "a blocking save"], cells)]
    rows = [common.row("checkpoint", f"ours vs DCP, {where}, {size}: blocking save until durable",
                       common.ms(save["ours"]), common.ms(save["DCP"]), common.ratio(save["ours"], save["DCP"]),
                       f"asserted: round trip bitwise, ours {verified['ours']}, DCP {verified['DCP']}; bytes on disk "
                       f"{disk_bytes['ours blocking'][0] / disk_bytes['DCP blocking'][0]:.3f}x DCP's"),
            common.row("checkpoint", f"{where}: load, cold / warm", f"{common.ms(cold['ours'])} / "
                       f"{common.ms(warm['ours'])}", f"{common.ms(cold['DCP'])} / {common.ms(warm['DCP'])}",
                       f"cold {common.ratio(cold['ours'], cold['DCP'])}; warm {common.ratio(warm['ours'], warm['DCP'])}"),
            common.row("checkpoint", f"{where}: async save, training stall (until save() returns)",
                       common.ms(stall["ours async"]), common.ms(stall["DCP async"]),
                       common.ratio(stall["ours async"], stall["DCP async"]))]
    return lines, rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 1], help="1 = one process, unsharded model")
    parser.add_argument("--reps", type=int, default=3, help="interleaved reps of every save mode and load")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3, help="training steps after an async save (0: skip)")
    parser.add_argument("--step-reps", type=int, default=3, help="interleaved reps of save + steps")
    parser.add_argument("--tmp", default="/tmp", help="where the checkpoints are written (a fresh folder in it)")
    cli = common.parse(parser, argv, QUICK)
    n = llama.num_params(llama.model_args("debug", dim=cli.dim, n_layers=cli.layers, vocab_size=cli.vocab))
    intro = (f"State: Llama debug dim {cli.dim}, {cli.layers} layers, vocab {cli.vocab}: {n / 1e6:.1f}M parameters + "
             f"AdamW exp_avg, exp_avg_sq, float32 = {common.mib(12 * n)}; disk: {disk(cli.tmp)}; gloo, 1 compute "
             f"thread per rank; {cli.reps} interleaved reps; time = slowest rank.")
    return common.report("checkpoint", "Checkpoint: ours (checkpoint.py) vs torch.distributed.checkpoint", intro,
                         (compare(W, cli) for W in cli.ranks), cli)


if __name__ == "__main__":
    main()
