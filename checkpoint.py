"""Sharded checkpoints: every rank writes only its own shards; a checkpoint saved under
one parallel layout loads under any other; async save; atomic commit; exact resume.

    ckpt = Checkpointer(root, keep=3, async_save=False)       # on every rank
    ckpt.save(step, model, optimizer, extra={"dataloader": ..., "config": ...})
    extra = ckpt.load("latest" | path, model, optimizer)       # None: nothing to load
    ckpt.close()                                               # waits for an async save
    python checkpoint.py export CKPT OUT.pt     # one consolidated state dict, Meta names
    python checkpoint.py verify CKPT            # check every file's checksum
    load_consolidated(path, model)              # start from such a file (or Meta's weights)
    python checkpoint.py from-hf HF_DIR OUT.pt  # a Hugging Face Llama -> such a file (hf.py)
    python checkpoint.py to-hf CKPT OUT_DIR     # a step-N directory (or a .pt) -> a HF folder

On-disk format (plain bytes and JSON: another tool can read it without this file)
    ROOT/step-N/metadata.json
        {"format": "nanotitan-checkpoint-1", "step": N, "world_size": W, "layout": "...",
         "optimizer": "AdamW", "extra": {...JSON from the trainer...},
         "tensors": {NAME: {"shape": [global shape], "dtype": "float32",
                            "chunks": [{"file": "rank-00003.bin", "offset": [global index of
                                        the chunk's first element], "shape": [chunk shape],
                                        "byte_offset": B, "nbytes": L, "crc32": C}, ...]}},
         "files": {"rank-00003.bin": {"nbytes": ..., "crc32": ...}}}
    ROOT/step-N/rank-RRRRR.bin
        the raw little-endian bytes of rank R's chunks, one after the other, each chunk
        C-contiguous in its dtype. Every byte of a file belongs to exactly one chunk, so the
        chunks' CRC-32s cover the whole file (also given per file).
    NAME is "model.<parameter name>" (Meta's Llama names), "optim.<parameter name>.<state>"
    (exp_avg, exp_avg_sq, step, momentum_buffer) or "rng.rank<R>.<device>" (per rank).
    A chunk is one rank's piece of a tensor: its FSDP / TP shard with FSDP padding rows
    removed (global_shape / global_offset attributes tell where it sits). A chunk held by
    several ranks (TP-replicated norms, HSDP replicas, the scalar Adam step) is written
    once, by the lowest rank holding it.

Save
    1. Snapshot (synchronous, on every rank): each rank lists its chunks; the lists are
       gathered so every rank knows which chunks it writes (dedup), and copies its chunks
       to CPU memory (the clone the async writer reads, so training may go on).
    2. Write (in a background thread with async_save, else inline): each rank writes its
       file into ROOT/step-N.tmp/ computing the CRC-32s, flushes and fsyncs it; the chunk
       tables are gathered (which is also the barrier: every file is durable); rank 0
       writes metadata.json (to a temp file, fsync, rename), renames step-N.tmp ->
       step-N, fsyncs ROOT, then prunes the oldest step-* beyond `keep`.
    The writer's barrier and gathers run on a process group of their own (gloo), so the
    writer thread never issues a collective on the training group. At most one save is
    in flight: the next save (and close) waits for it.

Atomicity argument. A checkpoint is visible only as ROOT/step-N/ containing
metadata.json, and that directory appears by a single rename of a directory whose data
files and metadata are already durable (fsynced before the rename; the parent directory
fsynced after). A crash before the rename leaves step-N.tmp/ (ignored by the loader,
removed by the next save of step N); after it, a complete checkpoint. Older checkpoints
are removed only after the new one is committed, so a kill at any point leaves the
previous checkpoint loadable.

Load (with resharding). For every tensor it holds, a rank knows the box it needs
(global_offset, its valid shape) and reads from each saved chunk only if the boxes
intersect, copying the intersection (the chunk's bytes are mapped with mmap and its CRC
verified first). Every element must be covered exactly once, else the error names the
tensor. Optimizer states are created (zeros) for the parameters and filled the same way.
The data-loader state is global (a position in the global sample order) at a step
boundary, so it maps to any data-parallel size; RNG states are restored only when the
world size and layout are the saved ones (they are per rank), otherwise left alone and
reported. Nothing is unpickled: tensors come from raw bytes, the rest from JSON
(consolidated .pt files are read with torch.load(weights_only=True)).

What is saved: parameters, optimizer state, step, RNG states (CPU, and CUDA where used),
and whatever JSON `extra` the trainer passes (data-loader state, resolved config). The
LR schedule is a function of the step. Not saved: gradients (a checkpoint is taken
between steps), activations, the validation loader (it rewinds at every evaluation).
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import pickle
import re
import shutil
import sys
import threading
import zlib
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

FORMAT = "nanotitan-checkpoint-1"
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8,
    torch.float8_e4m3fn, torch.float8_e5m2)}
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read as asked: missing, corrupt, or incompatible."""


# ---------------------------------------------------------------------------------------
# 1. What a rank holds: its chunks with their global place

def _valid(t: torch.Tensor, global_shape: tuple[int, ...], offset: tuple[int, ...]) -> torch.Tensor:
    """The part of a local shard inside the global tensor (FSDP pads dim 0 at the tail)."""
    rows = max(0, min(t.shape[0], global_shape[0] - offset[0])) if t.dim() else None
    return t if rows is None or rows == t.shape[0] else t[:rows]


def local_chunks(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, tuple]:
    """name -> (local tensor without padding, global shape, global offset) for the
    model's parameters and the optimizer's state."""
    out = {}
    names = {}
    for name, p in model.named_parameters():
        shape = tuple(getattr(p, "global_shape", p.shape))
        offset = tuple(getattr(p, "global_offset", (0,) * p.dim()))
        out[f"model.{name}"] = (_valid(p.detach(), shape, offset), shape, offset)
        names[p] = (name, shape, offset)
    if optimizer is not None:
        for p, state in optimizer.state.items():
            name, shape, offset = names[p]
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if value.shape == p.shape:
                    out[f"optim.{name}.{key}"] = (_valid(value, shape, offset), shape, offset)
                elif value.dim() == 0:  # e.g. Adam's step: the same on every rank
                    out[f"optim.{name}.{key}"] = (value, (), ())
                else:
                    raise CheckpointError(f"optimizer state {name}.{key} of shape {tuple(value.shape)} is "
                                          f"neither a scalar nor shaped like its parameter {tuple(p.shape)}")
    return out


def _rng_chunks(rank: int) -> dict[str, tuple]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return {f"rng.rank{rank}.{dev}": (s, tuple(s.shape), (0,)) for dev, s in states.items()}


# ---------------------------------------------------------------------------------------
# 2. Save

def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _attempt(path: str, fn, *args) -> tuple[Any, str | None]:
    """(fn(*args), None), or (None, what went wrong) if it raised an OSError; a write
    error names no file, so `path` says where."""
    try:
        return fn(*args), None
    except OSError as e:
        return None, f"{e.filename or path}: {e.strerror or e}"


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


class Checkpointer:
    """Saves and loads checkpoints under `root` (the same on every rank; a shared file
    system when ranks are on several machines). Construct it on every rank."""

    def __init__(self, root: str, keep: int = 3, async_save: bool = False, timeout: timedelta | None = None):
        self.root, self.keep, self.async_save = root, keep, async_save
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        # The writer's own group: its barriers and gathers never touch the training group.
        # `timeout` bounds them (None: torch's default, 30 minutes).
        self.group = None
        if self.world > 1:
            self.group = dist.new_group(backend="gloo", timeout=timeout, group_desc="checkpoint")
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.fault_hook = None  # tests: called with a stage name, may raise (crash injection)

    # -- save -------------------------------------------------------------------------

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             extra: dict[str, Any] | None = None, layout: str = "") -> None:
        """Checkpoint as ROOT/step-<step>. Blocks until the snapshot is in CPU memory;
        with async_save the files are written in the background."""
        self.wait()
        chunks = {**local_chunks(model, optimizer), **_rng_chunks(self.rank)}
        keys = [(name, offset, tuple(t.shape)) for name, (t, _, offset) in chunks.items() if t.numel()]
        holders = self._all_gather(keys)
        writer = {}
        for r, rank_keys in enumerate(holders):
            for key in rank_keys:
                writer.setdefault(tuple(key), r)
        # Snapshot: CPU copies of the chunks this rank writes (all the training thread
        # waits for with async_save; checksums and metadata are the writer's job).
        snapshot = [(name, shape, offset, t.detach().to("cpu", copy=True).contiguous())
                    for name, (t, shape, offset) in chunks.items()
                    if t.numel() and writer[(name, offset, tuple(t.shape))] == self.rank]
        header = dict(format=FORMAT, step=step, world_size=self.world, layout=layout,
                      optimizer=type(optimizer).__name__ if optimizer is not None else None, extra=extra or {})
        if self.async_save:
            self.thread = threading.Thread(target=self._write_guarded, args=(step, snapshot, header), daemon=True)
            self.thread.start()
        else:
            self._write(step, snapshot, header)

    def _write_guarded(self, step: int, snapshot: list, header: dict) -> None:
        try:
            self._write(step, snapshot, header)
        except BaseException as e:  # re-raised by wait() in the training thread
            self.error = e

    def _write(self, step: int, snapshot: list[tuple], header: dict) -> None:
        """Three phases, each ended by a barrier that also tells every rank whether any
        rank failed with an OSError (disk full, no permission), so that all raise the
        same CheckpointError and none waits for a rank that gave up: rank 0 makes
        step-N.tmp; every rank writes its file; rank 0 writes metadata.json, commits and
        prunes."""
        final = os.path.join(self.root, f"step-{step}")
        tmp = final + ".tmp"
        none = (None, None)
        _, failure = _attempt(tmp, self._make_tmp, tmp) if self.rank == 0 else none
        self._barrier(step, failure)
        file = f"rank-{self.rank:05d}.bin"
        written, failure = _attempt(os.path.join(tmp, file), self._write_file, tmp, file, snapshot)
        gathered = self._all_gather((written, failure))  # also: every rank's data is durable
        self._raise_failures(step, [f for _, f in gathered])
        _, failure = _attempt(final, self._commit, step, tmp, final, header, gathered) if self.rank == 0 else none
        self._barrier(step, failure)

    def _make_tmp(self, tmp: str) -> None:
        os.makedirs(self.root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # this step's own leftover (a crashed save); no other
        os.makedirs(tmp)

    def _write_file(self, tmp: str, file: str, snapshot: list[tuple]) -> tuple[dict, tuple]:
        """This rank's chunks, back to back, fsynced: (chunk entries, (file, bytes, CRC-32))."""
        entries, pos, crc = {}, 0, 0
        with open(os.path.join(tmp, file), "wb") as f:
            for name, shape, offset, blob in snapshot:
                data = _bytes(blob)
                f.write(data)
                entries[name] = dict(shape=list(shape), dtype=str(blob.dtype).removeprefix("torch."), chunk=dict(
                    file=file, offset=list(offset), shape=list(blob.shape), byte_offset=pos, nbytes=len(data),
                    crc32=zlib.crc32(data)))
                crc, pos = zlib.crc32(data, crc), pos + len(data)
                self._fault("after_chunk")
            f.flush()
            os.fsync(f.fileno())
        self._fault("after_file")
        return entries, (file, pos, crc)

    def _commit(self, step: int, tmp: str, final: str, header: dict, gathered: list) -> None:
        """Rank 0: metadata.json from every rank's entries, the rename, then pruning."""
        metadata = dict(header, tensors={}, files={})
        for (rank_entries, (name, nbytes, file_crc)), _ in gathered:
            metadata["files"][name] = dict(nbytes=nbytes, crc32=file_crc)
            for tensor, e in rank_entries.items():
                t = metadata["tensors"].setdefault(tensor, dict(shape=e["shape"], dtype=e["dtype"], chunks=[]))
                t["chunks"].append(e["chunk"])
        meta_tmp = os.path.join(tmp, "metadata.json.tmp")
        with open(meta_tmp, "w") as f:
            json.dump(metadata, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(meta_tmp, os.path.join(tmp, "metadata.json"))
        self._fault("before_commit")
        if os.path.exists(final):  # the same step saved again (a rerun in the same run.dir):
            shutil.rmtree(final)  # the one case where the old copy goes before the new commits
        os.replace(tmp, final)  # the commit point
        _fsync_dir(self.root)
        # Prune the oldest of the EARLIER checkpoints; never this one, never later-
        # numbered ones (a run resumed from an older checkpoint leaves those alone).
        earlier = [s for s in list_checkpoints(self.root) if s < step]
        for old in earlier[:max(0, len(earlier) - (self.keep - 1))] if self.keep > 0 else []:
            shutil.rmtree(os.path.join(self.root, f"step-{old}"), ignore_errors=True)

    def remove_leftovers(self) -> list[str]:
        """Delete the step-N.tmp directories of crashed saves (rank 0; call it only while
        no other run can be saving here, e.g. holding the run directory's lock)."""
        if self.rank != 0 or not os.path.isdir(self.root):
            return []
        gone = sorted(e for e in os.listdir(self.root) if e.startswith("step-") and e.endswith(".tmp"))
        for entry in gone:
            shutil.rmtree(os.path.join(self.root, entry), ignore_errors=True)
        return gone

    def _fault(self, stage: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(stage)

    def wait(self) -> None:
        """Wait for the save in flight, if any (re-raising its error)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise CheckpointError(f"asynchronous checkpoint save failed: {error}") from error

    def close(self) -> None:
        self.wait()
        if self.group is not None:
            dist.barrier(group=self.group)  # no rank tears the group down under another
            dist.destroy_process_group(self.group)
            self.group = None

    def _all_gather(self, obj) -> list:
        if self.group is None:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)  # comm: checkpoint group, the chunk lists
        return out

    def _barrier(self, step: int, failure: str | None) -> None:
        """A barrier that also shares this rank's failure (or None) with every rank."""
        self._raise_failures(step, self._all_gather(failure))

    def _raise_failures(self, step: int, failures: list[str | None]) -> None:
        failed = [f"rank {r}: {f}" for r, f in enumerate(failures) if f is not None]
        if failed:
            raise CheckpointError(f"step-{step} was not saved under {self.root}: {'; '.join(failed)} "
                                  f"(disk full or not writable?); the earlier checkpoints are intact")

    # -- load -------------------------------------------------------------------------

    def find(self, which: str) -> str | None:
        """The directory `which` names: "latest" (None if there is no checkpoint under
        root yet) or a step-N directory."""
        if which != "latest":
            return which
        steps = list_checkpoints(self.root)
        return os.path.join(self.root, f"step-{steps[-1]}") if steps else None

    def load(self, which: str, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             layout: str = "") -> dict | None:
        """Fill model (and optimizer) from `which`: "latest" (None if there is no
        checkpoint under root) or a step-N directory. Returns the metadata (step, extra,
        and "rng_restored")."""
        path = self.find(which)
        if path is None:
            return None
        metadata = read_metadata(path)
        if optimizer is not None and metadata["optimizer"] not in (None, type(optimizer).__name__):
            raise CheckpointError(f"{path} holds {metadata['optimizer']} state but the optimizer is "
                                  f"{type(optimizer).__name__}; set training.optimizer to match")
        targets = {name: (t, shape, offset) for name, (t, shape, offset) in local_chunks(model, None).items()}
        if optimizer is not None:
            targets.update(_optimizer_targets(model, optimizer, metadata))
        _check_same_model(path, model, metadata)
        files = _Files(path)
        try:
            for name, (t, shape, offset) in targets.items():
                _fill(t, shape, offset, name, metadata["tensors"][name], files)
            same_layout = metadata["world_size"] == self.world and metadata["layout"] == layout
            rng = {k.split(".")[-1]: k for k in metadata["tensors"] if k.startswith(f"rng.rank{self.rank}.")}
            if same_layout and rng:
                for dev, name in rng.items():
                    info = metadata["tensors"][name]
                    state = torch.empty(info["shape"], dtype=torch.uint8)
                    _fill(state, tuple(info["shape"]), (0,), name, info, files)
                    torch.set_rng_state(state) if dev == "cpu" else torch.cuda.set_rng_state(state)
        finally:
            files.close()
        metadata["rng_restored"] = bool(same_layout and rng)
        metadata["path"] = path
        return metadata


def _check_same_model(path: str, model: nn.Module, metadata: dict) -> None:
    """The model's parameters and the checkpoint's must be the same set with the same
    global shapes: a tensor missing on either side, or reshaped, is refused by name
    (loading would drop saved weights and their optimizer state, or invent new ones)."""
    here = {f"model.{n}": list(getattr(p, "global_shape", p.shape)) for n, p in model.named_parameters()}
    saved = {n: info["shape"] for n, info in metadata["tensors"].items() if n.startswith("model.")}
    differences = [f"{n} is not in the checkpoint" for n in here if n not in saved]
    differences += [f"{n} is in the checkpoint but not in this model" for n in saved if n not in here]
    differences += [f"{n} has shape {saved[n]} there, {here[n]} here"
                    for n in here if n in saved and saved[n] != here[n]]
    if differences:
        shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
        raise CheckpointError(f"{path} holds another model: {shown}. Resume with the model settings it was "
                              f"saved with (its config is in its metadata.json)")


def _optimizer_targets(model: nn.Module, optimizer: torch.optim.Optimizer, metadata: dict) -> dict:
    """Create (zeros) the optimizer state the checkpoint has for each parameter, and
    return it as load targets."""
    params = dict(model.named_parameters())
    owned = {p for group in optimizer.param_groups for p in group["params"]}
    targets = {}
    for full_name, info in metadata["tensors"].items():
        if not full_name.startswith("optim."):
            continue
        name, key = full_name[len("optim."):].rsplit(".", 1)
        p = params.get(name)
        if p is None or p not in owned:
            continue
        state = optimizer.state[p]
        dtype = DTYPES[info["dtype"]]
        if key not in state:  # a fresh optimizer: create the state the checkpoint has
            state[key] = torch.zeros((), dtype=dtype) if not info["shape"] else torch.zeros_like(p, dtype=dtype)
        value = state[key]
        shape = tuple(getattr(p, "global_shape", p.shape))
        offset = tuple(getattr(p, "global_offset", (0,) * p.dim()))
        targets[full_name] = (value, (), ()) if value.dim() == 0 else (_valid(value, shape, offset), shape, offset)
    return targets


class _Files:
    """The checkpoint's data files, memory-mapped on first use."""

    def __init__(self, path: str):
        self.path, self.maps = path, {}

    def chunk(self, info: dict, dtype: torch.dtype) -> torch.Tensor:
        name = info["file"]
        if name not in self.maps:
            try:
                f = open(os.path.join(self.path, name), "rb")
            except OSError as e:
                raise CheckpointError(f"{os.path.join(self.path, name)}: cannot read it ({e.strerror}); the "
                                      f"checkpoint is incomplete") from None
            size = os.fstat(f.fileno()).st_size
            self.maps[name] = (f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b"")
        _, mm = self.maps[name]
        start, n = info["byte_offset"], info["nbytes"]
        data = memoryview(mm)[start: start + n]
        if len(data) != n or zlib.crc32(data) != info["crc32"]:
            data.release()
            raise CheckpointError(f"{os.path.join(self.path, name)}: checksum mismatch in bytes [{start}, {start + n}) "
                                  f"(the file is corrupt or truncated); load an earlier checkpoint")
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a copy: the map may close
        data.release()
        return t.view(dtype).view(info["shape"])

    def close(self) -> None:
        for f, mm in self.maps.values():
            if isinstance(mm, mmap.mmap):
                mm.close()
            f.close()
        self.maps = {}


@torch.no_grad()
def _fill(target: torch.Tensor, shape: tuple, offset: tuple, name: str, info: dict, files: _Files) -> None:
    """Copy into `target` (the box [offset, offset + target.shape) of tensor `name`) the
    overlapping part of every saved chunk; every element must be covered once."""
    if list(shape) != list(info["shape"]):
        raise CheckpointError(f"{name}: shape {list(shape)} here but {info['shape']} in the checkpoint "
                              f"(a different model configuration?)")
    dtype = DTYPES[info["dtype"]]
    covered = 0
    for chunk in info["chunks"]:
        lo = [max(a, b) for a, b in zip(offset, chunk["offset"])]
        hi = [min(a + n, b + m) for a, n, b, m in zip(offset, target.shape, chunk["offset"], chunk["shape"])]
        if any(h <= l for l, h in zip(lo, hi)):
            continue
        src = files.chunk(chunk, dtype)
        box_src = tuple(slice(l - c, h - c) for l, h, c in zip(lo, hi, chunk["offset"]))
        box_dst = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offset))
        target[box_dst] = src[box_src].to(target.dtype)
        covered += math.prod(h - l for l, h in zip(lo, hi))
    if covered != target.numel():
        raise CheckpointError(f"{name}: the saved chunks cover {covered} of the {target.numel()} elements this "
                              f"rank needs (offset {list(offset)}, shape {list(target.shape)})")


# ---------------------------------------------------------------------------------------
# 3. Finding checkpoints

def list_checkpoints(root: str) -> list[int]:
    """Committed checkpoint steps under root, ascending (step-N with metadata.json)."""
    if not os.path.isdir(root):
        return []
    steps = []
    for entry in os.listdir(root):
        m = STEP_DIR.match(entry)
        if m and os.path.isfile(os.path.join(root, entry, "metadata.json")):
            steps.append(int(m.group(1)))
    return sorted(steps)


def read_metadata(path: str) -> dict:
    meta_path = os.path.join(path, "metadata.json")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path} is not a committed checkpoint (no metadata.json); "
                              f"checkpoint.load takes 'latest' or a step-N directory")
    with open(meta_path, "rb") as f:
        try:
            metadata = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{meta_path} is not valid JSON ({e}): the checkpoint is corrupt") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise CheckpointError(f"{meta_path}: format {found!r}, expected {FORMAT!r}")
    return metadata


# ---------------------------------------------------------------------------------------
# 4. Consolidated state dicts (Meta names): export, and starting from one

def consolidate(path: str) -> dict[str, torch.Tensor]:
    """The model's full tensors from a checkpoint directory, named as Meta's Llama."""
    metadata = read_metadata(path)
    files = _Files(path)
    try:
        out = {}
        for name, info in metadata["tensors"].items():
            if name.startswith("model."):
                t = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
                _fill(t, tuple(info["shape"]), (0,) * t.dim(), name, info, files)
                out[name[len("model."):]] = t
        return out
    finally:
        files.close()


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A consolidated state dict (torch.save of {name: tensor}), read with weights_only=True
    and mmap: nothing is unpickled and nothing is read until a tensor is used."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, IsADirectoryError) as e:
        hint = " (a step-N directory resumes with checkpoint.load, or export it first)" if os.path.isdir(path) else ""
        raise CheckpointError(f"{path} is not a state dict saved with torch.save{hint}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors "
                              f"(python checkpoint.py export writes one)")
    return state


@torch.no_grad()
def load_consolidated(path: str, model: nn.Module) -> None:
    """Fill each rank's shards of `model` from a consolidated state dict (e.g. `export`'s
    or `from-hf`'s output, or Meta's consolidated.00.pth): only the slices are copied."""
    state = read_state_dict(path)
    for name, p in model.named_parameters():
        if name not in state:
            raise CheckpointError(f"{path} has no tensor {name!r} (it has {len(state)} tensors, e.g. "
                                  f"{list(state)[:3]}): not a Llama state dict with Meta's names?")
        src = state[name]
        shape = tuple(getattr(p, "global_shape", p.shape))
        if tuple(src.shape) != shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(src.shape)}, the model wants {shape} "
                                  f"(model.* settings differ from the checkpoint's)")
        offset = tuple(getattr(p, "global_offset", (0,) * p.dim()))
        dst = _valid(p.data, shape, offset)
        dst.copy_(src[tuple(slice(o, o + n) for o, n in zip(offset, dst.shape))].to(p.dtype))


def verify(path: str) -> None:
    """Check every file's size and CRC-32 against the metadata."""
    metadata = read_metadata(path)
    for name, info in metadata["files"].items():
        file = os.path.join(path, name)
        crc, size = 0, 0
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing; the checkpoint is incomplete")
        with open(file, "rb") as f:
            while block := f.read(1 << 24):
                crc, size = zlib.crc32(block, crc), size + len(block)
        if size != info["nbytes"] or crc != info["crc32"]:
            raise CheckpointError(f"{file}: {size} bytes with CRC-32 {crc:#010x}, the metadata says {info['nbytes']} "
                                  f"bytes with {info['crc32']:#010x}: the file is corrupt")


def _write_state(state: dict[str, torch.Tensor], out: str) -> None:
    tmp = out + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, out)  # never a half-written OUT.pt


def _from_hf(args: argparse.Namespace) -> None:
    import hf  # here, not at the top: only these commands need safetensors

    state, name, overrides, notes = hf.from_hf(args.hf_dir)
    _write_state(state, args.out)
    for note in notes:
        print(note)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    print(f"wrote {args.out}: {len(state)} tensors, {sum(t.numel() for t in state.values()):,} parameters, "
          f"{'/'.join(dtypes)} (Meta names and q/k row order)")
    yaml, overrides_line = hf.settings_text(name, overrides)
    print(f"train.py builds this model with (YAML):\n{yaml}or as overrides: {overrides_line}")
    print(f"start from these weights with: checkpoint.initial={args.out}")


def _to_hf(args: argparse.Namespace) -> None:
    """The model settings come from the run's config (a step-N directory) or from the
    command line (a consolidated .pt holds tensors only)."""
    import hf

    if not os.path.exists(args.checkpoint):
        raise CheckpointError(f"{args.checkpoint} not found; give a step-N checkpoint directory or a .pt state dict")
    if os.path.isdir(args.checkpoint):
        if args.settings:
            raise ValueError(f"{args.checkpoint} is a checkpoint directory, whose model settings are its run's "
                             f"config: drop {' '.join(args.settings)}")
        model = dict((read_metadata(args.checkpoint)["extra"].get("config") or {}).get("model") or {})
        if "name" not in model:
            raise CheckpointError(f"{os.path.join(args.checkpoint, 'metadata.json')} holds no model config "
                                  f"(extra.config.model): export it to a .pt and pass model.name=... model.dim=...")
        name = model.pop("name")
        state, overrides = consolidate(args.checkpoint), model
    else:
        state = read_state_dict(args.checkpoint)
        name, overrides = hf.parse_settings(args.settings, args.checkpoint)
    files = hf.to_hf(state, name, overrides, args.out_dir, args.checkpoint, int(args.max_shard_gb * 10**9),
                     getattr(torch, args.dtype) if args.dtype else None)
    print(f"wrote {args.out_dir}: {', '.join(files)} (LlamaForCausalLM.from_pretrained loads it)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="nanotitan checkpoint tools")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write one consolidated state dict (Meta Llama names)")
    export.add_argument("checkpoint", help="a step-N directory")
    export.add_argument("out", help="output .pt file (torch.load(..., weights_only=True) reads it)")
    check = sub.add_parser("verify", help="check every file's checksum")
    check.add_argument("checkpoint")
    from_hf = sub.add_parser("from-hf", help="a Hugging Face Llama folder -> a state dict with Meta names (hf.py)")
    from_hf.add_argument("hf_dir", help="folder with config.json and *.safetensors (sharded or not)")
    from_hf.add_argument("out", help="output .pt: checkpoint.initial=OUT.pt starts training from it")
    to_hf = sub.add_parser("to-hf", help="a checkpoint -> a Hugging Face LlamaForCausalLM folder (hf.py)")
    to_hf.add_argument("checkpoint", help="a step-N directory, or a consolidated .pt (then give its model settings)")
    to_hf.add_argument("out_dir", help="a new folder: config.json, model-*.safetensors and their index")
    to_hf.add_argument("settings", nargs="*", help="for a .pt: model.name=PRESET model.FIELD=VALUE ... "
                                                   "(the line from-hf printed)")
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (default 5)")
    to_hf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast (default: keep the dtype)")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            state = consolidate(args.checkpoint)
            _write_state(state, args.out)
            n = sum(t.numel() for t in state.values())
            print(f"wrote {args.out}: {len(state)} tensors, {n:,} parameters")
        elif args.command == "from-hf":
            _from_hf(args)
        elif args.command == "to-hf":
            _to_hf(args)
        else:
            verify(args.checkpoint)
            print(f"{args.checkpoint}: every file matches its checksum")
    except (CheckpointError, ValueError, ImportError) as e:  # ValueError, ImportError: from hf.py
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
