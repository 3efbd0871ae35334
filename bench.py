"""Benchmarks, each printed as a Markdown table with the machine it ran on.

    python bench.py mfu        # single-process training: MFU and where the step time goes
    python bench.py fsdp       # ours vs PyTorch FSDP2 on 2 and 4 gloo ranks: time, memory, bytes
    python bench.py tp         # ours vs PyTorch DTensor TP on gloo ranks: time, bytes; async vs sync TP
    python bench.py float8     # float8 linear (torch._scaled_mm) vs bf16/fp32 on Llama 3 8B shapes
    python bench.py checkpoint # ours vs torch.distributed.checkpoint: save/load time, bytes; async save stall
    python bench.py cp         # context parallel: longest sequence in a per-rank memory budget at cp = 1, 2, 4;
                               # step time ring vs all-gather vs no CP; PyTorch's context_parallel
    python bench.py pp         # ours vs torch.distributed.pipelining schedules: step time, measured bubble
    python bench.py all        # all of the above, one after another: one summary table -> bench_all.md
                               # (--only NAME ... a subset; --quick smoke-test sizes, never figures)

Protocol (DESIGN.md): compare like with like on the same machine in the same run,
interleave repetitions, report the median and the min; on CPU, MFU is against this
machine's measured GEMM peak, never a vendor figure. Later techniques add their
comparisons against PyTorch's own implementations here.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import math
import os
import platform
import socket
import statistics
import sys
import time
import traceback
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist

import float8
import fsdp
import llama
import tensor_parallel
import config
import train

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                 "aten::_scaled_dot_product_flash_attention",
                 "aten::_scaled_dot_product_flash_attention_backward")


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{name} ({isa}), {torch.get_num_threads()} thread(s)"


# The summary table of `bench.py all`: every bench_* prints its detailed tables and
# returns its headline figures as rows of these columns (text, computed from what it
# measured). ours / peer: the two measured sides; result: their ratio or the figure.
SUMMARY_COLUMNS = ("technique", "comparison", "ours", "peer", "result", "check")


def _row(technique: str, comparison: str, ours: str, peer: str, result: str, check: str = "") -> dict[str, str]:
    return dict(zip(SUMMARY_COLUMNS, (technique, comparison, ours, peer, result, check)))


def _ratio(a: list[float], b: list[float]) -> str:
    """'0.94x (0.87x)': a / b of the medians (of the mins)."""
    return f"{statistics.median(a) / statistics.median(b):.2f}x ({min(a) / min(b):.2f}x)"


def _ms(ts: list[float]) -> str:
    return f"{statistics.median(ts) * 1e3:.0f} ms ({min(ts) * 1e3:.0f})"


def _train_setup(args: llama.ModelArgs, dtype: torch.dtype, seed: int = 0):
    model = llama.build_model(args, "cpu")
    llama.init_weights(model, args, seed)
    if dtype == torch.float64:
        model.to(torch.float64)
    cfg = config.TrainingConfig(lr=1e-3)
    optimizer = train.build_optimizer(model, cfg)
    return model, optimizer


def _step(model, optimizer, tokens, autocast) -> None:
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    with autocast():
        logits = model(inputs)
    loss = train.loss_fn(logits, labels, labels.numel())
    loss.backward()
    train.clip_grad_norm(list(model.parameters()), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_mfu(steps: int, warmup: int, dtypes: list[str], models: list[str] = ("debug", "wide")) -> list[dict]:
    """Train the debug model and a wider one on random tokens as train.py does (fp32
    master weights, AdamW; bfloat16 = autocast); report tokens/s, MFU against the
    measured GEMM peak of the same dtype, and the share of step time in matmuls, in
    attention and outside both (profiler self time)."""
    torch.manual_seed(0)
    shapes = {
        "debug (dim 256, 4 layers)": (llama.model_args("debug"), 8, 256),
        "wide (dim 1024, 4 layers)": (llama.model_args("debug", dim=1024, n_heads=16, n_kv_heads=4,
                                                          multiple_of=256), 4, 256),
    }
    shapes = {label: shape for label, shape in shapes.items() if label.split()[0] in models}
    rows = []
    peaks = {name: train.measure_gemm_peak(config.DTYPES[name], reps=10) for name in dtypes}
    print(f"\nMFU, single process, {machine()}, torch {torch.__version__}")
    print("peak = measured 1024^3 GEMM: " + ", ".join(f"{n} {p / 1e9:.0f} GFLOP/s" for n, p in peaks.items()))
    print("\n| model | dtype | params | batch x seq | step median (min) | tokens/s | MFU | matmul | attention | other |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (label, (args, batch, seq)), name in itertools.product(shapes.items(), dtypes):
        peak = peaks[name]
        autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=name == "bfloat16")
        model, optimizer = _train_setup(args, config.DTYPES[name])
        tokens = torch.randint(0, args.vocab_size, (batch, seq + 1))
        for _ in range(warmup):
            _step(model, optimizer, tokens, autocast)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            _step(model, optimizer, tokens, autocast)
            times.append(time.perf_counter() - start)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                _step(model, optimizer, tokens, autocast)
        self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
        total = sum(self_us.values())
        mm = sum(self_us.get(k, 0) for k in MATMUL_OPS) / total
        attn = sum(self_us.get(k, 0) for k in ATTENTION_OPS) / total
        median = statistics.median(times)
        tps = batch * seq / median
        mfu = llama.flops_per_token(args, seq) * tps / peak
        n = sum(p.numel() for p in model.parameters())
        print(f"| {label} | {name} | {n / 1e6:.1f}M | {batch} x {seq} | {median * 1e3:.0f} ms ({min(times) * 1e3:.0f}) "
              f"| {tps:,.0f} | {100 * mfu:.1f}% | {100 * mm:.0f}% | {100 * attn:.0f}% | {100 * (1 - mm - attn):.0f}% |")
        rows.append(_row("MFU", f"{label}, {name}, {batch} x {seq} tokens, 1 process: model FLOP/s vs the "
                                f"measured {name} GEMM peak", f"{median * 1e3:.0f} ms ({min(times) * 1e3:.0f}) "
                                f"per step, {tps:,.0f} tokens/s", f"{peak / 1e9:.0f} GFLOP/s (1024^3 GEMM)",
                         f"MFU {100 * mfu:.1f}%", f"step: matmul {100 * mm:.0f}%, attention {100 * attn:.0f}%, "
                                                  f"other {100 * (1 - mm - attn):.0f}%"))
    return rows


# ---------------------------------------------------------------------------------------
# fsdp: ours (fsdp.py) against PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard)

# The torch.distributed functions whose calls are counted (tensor bytes handed in).
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "reduce_scatter_single",
               "reduce_scatter_tensor", "reduce_scatter", "all_reduce", "broadcast", "all_to_all_single")


class _CommCounter:
    """Wraps the torch.distributed collectives (module attributes, so fsdp.py, FSDP2's
    _fsdp_collectives.py and train.clip_grad_norm, which all call `dist.<name>`, go
    through it) and tallies calls and the bytes of the tensors handed in: the input of an
    all-gather, the (W x larger) input of a reduce-scatter, the tensor of an all-reduce.
    A collective called from inside another counted one is not counted twice."""

    def __init__(self):
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._depth = 0

    def install(self, names: tuple[str, ...] = COLLECTIVES) -> None:
        for name in names:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def reset(self) -> None:
        self.bytes, self.calls = {}, {}

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self._depth == 0:
                self.calls[name] = self.calls.get(name, 0) + 1
                self.bytes[name] = self.bytes.get(name, 0) + self._input_bytes(name, args, kwargs)
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return functools.wraps(fn)(counted)

    @staticmethod
    def _input_bytes(name: str, args, kwargs) -> int:
        if name == "batch_isend_irecv":  # the tensors sent
            ops = args[0] if args else kwargs["p2p_op_list"]
            return sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        if name in ("all_reduce", "broadcast"):
            t = args[0] if args else kwargs["tensor"]
        elif name == "all_gather":
            t = args[1] if len(args) > 1 else kwargs["tensor"]
        elif name == "reduce_scatter":
            ts = args[1] if len(args) > 1 else kwargs["input_list"]
            return sum(x.numel() * x.element_size() for x in ts)
        else:  # (output, input, ...) signatures
            t = args[1] if len(args) > 1 else kwargs.get("input", kwargs.get("input_tensor"))
        return t.numel() * t.element_size()


def _storage(t: torch.Tensor):
    local = getattr(t, "_local_tensor", t)  # a DTensor holds its shard in _local_tensor
    return local.untyped_storage()


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Allocator-independent tally of live tensor bytes: every storage of `seed` (the
    tensors alive before the step) and every storage an op returns is counted once,
    until Python frees it (weakref on the storage); storage resizes (FSDP2 frees and
    re-allocates its unsharded parameters with UntypedStorage.resize_) are followed.
    `peak` is the maximum over the step. Buffers a kernel or gloo uses internally and
    never returns are not seen. Also counts the c10d ops that pass through the
    dispatcher (a cross-check of _CommCounter)."""

    def __init__(self, seed: list[torch.Tensor]):
        super().__init__()
        import torch.utils.weak
        self.seen = torch.utils.weak.WeakIdKeyDictionary()  # storage -> [its counted bytes]
        self.live = self.peak = 0
        self.c10d_ops: dict[str, int] = {}
        for t in seed:
            self._track(_storage(t))

    def _track(self, s) -> list[int]:
        if s not in self.seen:
            cell = [s.nbytes()]
            self.seen[s] = cell
            self._add(cell[0])
            weakref.finalize(s, self._free, cell)
        return self.seen[s]

    def _add(self, n: int) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)

    def _free(self, cell: list[int]) -> None:
        self.live -= cell[0]

    def __enter__(self):
        self._resize = resize = torch.UntypedStorage.resize_

        def tracked_resize(storage, nbytes):
            cell = self._track(storage)
            out = resize(storage, nbytes)
            self._add(storage.nbytes() - cell[0])
            cell[0] = storage.nbytes()
            return out
        torch.UntypedStorage.resize_ = tracked_resize
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "c10d":
            self.c10d_ops[func.__name__] = self.c10d_ops.get(func.__name__, 0) + 1
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t.untyped_storage())
        return out


def _fsdp_units_padded(args: llama.ModelArgs, W: int) -> tuple[int, int, int]:
    """(Psi, P, P_r): parameters, padded total (dim 0 rounded up to W rows), padded
    parameters of the resharded units (the blocks; the root keeps its gather)."""
    model = llama.build_model(args, "meta")
    psi = P = P_r = 0
    for name, p in model.named_parameters():
        padded = math.ceil(p.shape[0] / W) * W * math.prod(p.shape[1:])
        psi, P = psi + p.numel(), P + padded
        if name.startswith("layers."):
            P_r += padded
    return psi, P, P_r


def _fsdp_setup(impl: str, args: llama.ModelArgs, state: dict, world: int):
    """The same global weights, sharded by ours or by FSDP2 (per block, then the root;
    blocks reshard after forward, the root does not; float32, SUM reductions)."""
    model = llama.build_model(args, "cpu")
    model.load_state_dict(state)
    if impl == "ours":
        fsdp.apply_fsdp(model, list(model.layers.values()), dist.group.WORLD)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for block in model.layers.values():
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
        for m in model.modules():
            if isinstance(m, FSDPModule):  # SUM, as ours: no 1/W (gloo has no AVG / PREMUL_SUM)
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)
    optimizer = train.build_optimizer(model, config.TrainingConfig(lr=1e-3))
    if impl == "ours":
        fsdp.check_optimizer(optimizer)
    return model, optimizer


class _LocalGrad:
    """train.clip_grad_norm reads p.grad: hand it a DTensor gradient's local shard (a
    view, so the in-place scaling reaches the DTensor)."""

    def __init__(self, p):
        g = p.grad
        self.grad = None if g is None else getattr(g, "_local_tensor", g)


def _fsdp_step(model, optimizer, micro: list[torch.Tensor], global_tokens: int) -> tuple[float, float]:
    """One optimizer step over the micro-batches: (this rank's loss, global grad norm)."""
    loss_sum = 0.0
    for tokens in micro:
        logits = model(tokens[:, :-1])
        loss = train.loss_fn(logits, tokens[:, 1:], global_tokens)
        loss.backward()
        loss_sum += loss.item()
    params = [_LocalGrad(p) for p in model.parameters()]
    norm = train.clip_grad_norm(params, 1.0, dist.group.WORLD)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, norm.item()


def _fsdp_state_bytes(model, optimizer) -> int:
    """Parameters (shards) + gradients (the same size) + AdamW state, distinct storages."""
    params = {id(s): s.nbytes() for s in (_storage(p) for p in model.parameters())}
    state = {id(s): s.nbytes() for s in (_storage(v) for st in optimizer.state.values()
                                          for v in st.values() if isinstance(v, torch.Tensor))}
    return 2 * sum(params.values()) + sum(state.values())


def _fsdp_rank(rank: int, world: int, cfg: dict) -> dict:
    """One rank: build both, check equal losses, time interleaved rounds, then measure
    memory and communication of one step each; rank 0 optionally profiles."""
    counter = _CommCounter()
    counter.install()  # before the models are built
    args = llama.model_args("debug", dim=cfg["dim"], n_layers=cfg["layers"])
    full = llama.build_model(args, "cpu")
    llama.init_weights(full, args, seed=0)
    state = full.state_dict()
    del full
    impls = {name: _fsdp_setup(name, args, state, world) for name in ("ours", "fully_shard")}
    del state
    gen = torch.Generator().manual_seed(1000 + rank)  # this rank's data, the same for both
    micro = [torch.randint(0, args.vocab_size, (cfg["batch"], cfg["seq"] + 1), generator=gen)
             for _ in range(cfg["micro"])]
    global_tokens = world * cfg["micro"] * cfg["batch"] * cfg["seq"]
    result = {"losses": {}, "norms": {}, "times": {}, "mem": {}, "state": {}, "comm": {}, "c10d": {}}

    # Equal work: the first steps from the same weights on the same data.
    for name, (model, opt) in impls.items():
        steps = [_fsdp_step(model, opt, micro, global_tokens) for _ in range(max(3, cfg["warmup"]))]
        result["losses"][name] = [s[0] for s in steps[:3]]
        result["norms"][name] = [s[1] for s in steps[:3]]

    # Interleaved rounds: ours, theirs, ours, theirs, ...
    for name in impls:
        result["times"][name] = []
    for _ in range(cfg["rounds"]):
        for name, (model, opt) in impls.items():
            dist.barrier()
            for _ in range(cfg["steps"]):
                start = time.perf_counter()
                _fsdp_step(model, opt, micro, global_tokens)
                result["times"][name].append(time.perf_counter() - start)

    # Memory (live tensor bytes) and communication of one step each.
    for name, (model, opt) in impls.items():
        seed = [p for p in model.parameters()]
        seed += [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        dist.barrier()
        counter.reset()
        with _LiveBytes(seed) as tally:
            _fsdp_step(model, opt, micro, global_tokens)
        result["comm"][name] = (dict(counter.calls), dict(counter.bytes))
        result["mem"][name] = tally.peak
        result["c10d"][name] = dict(tally.c10d_ops)
        result["state"][name] = _fsdp_state_bytes(model, opt)

    if cfg["profile"]:
        result["profile"] = {}
        for name, (model, opt) in impls.items():
            dist.barrier()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                for _ in range(2):
                    _fsdp_step(model, opt, micro, global_tokens)
                wall = (time.perf_counter() - start) / 2
            events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            result["profile"][name] = (wall, [(e.key, e.self_cpu_time_total / 2e6, e.count // 2)
                                              for e in events[:cfg["profile"]]],
                                       sum(e.self_cpu_time_total for e in events) / 2e6)
    return result


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, body: Callable[[int, int, dict], dict], world: int, port: int, cfg: dict, queue,
                timeout_s: float | None) -> None:
    """A spawned rank: join the gloo group with 1 compute thread, put body(rank, world,
    cfg)'s result (or this rank's traceback) on the queue, leave the group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", rank=rank, world_size=world, **timeout)
    try:
        queue.put((rank, body(rank, world, cfg)))
    except BaseException:
        queue.put((rank, {"error": traceback.format_exc()}))
        raise
    finally:
        dist.destroy_process_group()


def _run_ranks(body: Callable[[int, int, dict], dict], world: int, cfg: dict,
               timeout_s: float | None = None) -> list[dict]:
    """Spawn `world` fresh processes, each a gloo rank (1 thread; collectives time out
    after timeout_s, None = gloo's default) running body(rank, world, cfg) -> dict, a
    module-level function; return their results, rank order."""
    import torch.multiprocessing as tmp
    ctx = tmp.get_context("spawn")
    queue = ctx.SimpleQueue()
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # read by the children at import
    results = {}
    try:
        procs = tmp.start_processes(_rank_entry, args=(body, world, _free_port(), cfg, queue, timeout_s),
                                    nprocs=world, join=False, start_method="spawn")
        done = False
        while not done:  # drain the queue while waiting, so no child blocks on a full pipe
            done = procs.join(timeout=0.5)  # raises if a rank failed (and ends the others)
            while not queue.empty():
                rank, value = queue.get()
                results[rank] = value
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for r in range(world):
        if "error" in results[r]:
            raise RuntimeError(f"rank {r} failed:\n{results[r]['error']}")
    return [results[r] for r in range(world)]


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def bench_fsdp(ranks: list[int], steps: int, warmup: int, rounds: int, dim: int, layers: int, batch: int,
               seq: int, micro: int, profile: int) -> list[dict]:
    """Ours (fsdp.py) against PyTorch's FSDP2 on the same Llama, the same weights and
    per-rank data, float32 weights and compute (this CPU has no native bf16), AdamW and
    gradient clipping, SUM gradient reductions for both, gloo, 1 thread per rank.
    Interleaved rounds; a step's time is the slowest rank's. Memory: peak live tensor
    bytes during one step (allocator-independent tally), and the steady state of shards
    + gradients + AdamW state. Communication: bytes handed to each collective in one step,
    against fsdp.py's formula."""
    args = llama.model_args("debug", dim=dim, n_layers=layers)
    b = 4  # float32 everywhere: b_p = b_r = 4
    print(f"\nFSDP: ours (fsdp.py) vs PyTorch FSDP2 (torch.distributed.fsdp.fully_shard), {machine()}, "
          f"torch {torch.__version__}")
    print(f"model debug dim {dim}, {layers} layers, {llama.num_params(args) / 1e6:.2f}M params; "
          f"{micro} micro-batch(es) of {batch} x {seq} tokens per rank; float32 weights, compute and "
          f"reductions (bf16 matmuls are emulated on this CPU); AdamW, clip 1.0; gloo, 1 thread per rank; "
          f"{rounds} interleaved rounds x {steps} steps after {max(3, warmup)} warmup steps; "
          f"step time = slowest rank")
    rows = []
    for W in ranks:
        cfg = dict(dim=dim, layers=layers, batch=batch, seq=seq, micro=micro, steps=steps,
                   warmup=warmup, rounds=rounds, profile=profile)
        load0 = os.getloadavg()[0]
        res = _run_ranks(_fsdp_rank, W, cfg)
        load1 = os.getloadavg()[0]
        names = ("ours", "fully_shard")
        rel = max(abs(a - c) / abs(c) for r in res for a, c in zip(r["losses"]["ours"], r["losses"]["fully_shard"]))
        rel_norm = max(abs(a - c) / abs(c) for r in res for a, c in zip(r["norms"]["ours"], r["norms"]["fully_shard"]))
        times = {n: [max(ts) for ts in zip(*(r["times"][n] for r in res))] for n in names}
        med = {n: statistics.median(times[n]) for n in names}
        mem = {n: max(r["mem"][n] for r in res) for n in names}
        state = {n: max(r["state"][n] for r in res) for n in names}
        psi, P, P_r = _fsdp_units_padded(args, W)
        ag_sent = (W - 1) / W * (P + P_r) * b * micro
        rs_sent = (W - 1) / W * P * b * micro
        print(f"\n{W} ranks ({'oversubscribed: ' if W > os.cpu_count() else ''}{os.cpu_count()} cores): "
              f"first 3 steps, max relative difference ours vs fully_shard: loss {rel:.1e}, grad norm "
              f"{rel_norm:.1e} (loss {res[0]['losses']['ours'][0]:.4f} on rank 0); 1-min load average "
              f"{load0:.1f} before, {load1:.1f} after (other processes on this machine skew the times)")
        print(f"formula (fsdp.py docstring), per rank and step: sent by a ring = AG (W-1)/W*(P+P_r)*b_p*m "
              f"{_mib(ag_sent)} + RS (W-1)/W*P*b_r*m {_mib(rs_sent)} = {_mib(ag_sent + rs_sent)}; handed in: "
              f"AG (P+P_r)/W*b_p*m = {_mib((P + P_r) / W * b * micro)}, RS P*b_r*m = {_mib(P * b * micro)} "
              f"(Psi {psi:,}, P {P:,}, P_r {P_r:,}); unsharded fp32 AdamW state 16*Psi = {_mib(16 * psi)}")
        print("\n| impl | step median (min) | ratio ours/theirs: median (min) | peak live tensors (ratio) "
              "| shards+grads+AdamW | comm handed in: AG / RS / AR (calls) | ring-sent (formula) |")
        print("|---|---|---|---|---|---|---|")
        sent_by, calls_by = {}, {}
        for n in names:
            calls, nbytes = res[0]["comm"][n]
            ag = sum(v for k, v in nbytes.items() if k.startswith("all_gather"))
            rs = sum(v for k, v in nbytes.items() if k.startswith("reduce_scatter"))
            ar = nbytes.get("all_reduce", 0)
            other = {k: v for k, v in nbytes.items() if not k.startswith(("all_gather", "reduce_scatter", "all_reduce"))}
            sent = ag * (W - 1) + rs * (W - 1) / W + ar * 2 * (W - 1) / W
            ncalls = "/".join(str(sum(v for k, v in calls.items() if k.startswith(p)))
                              for p in ("all_gather", "reduce_scatter", "all_reduce"))
            sent_by[n], calls_by[n] = sent, ncalls
            ratio = f"{med[n] / med['fully_shard']:.2f} ({min(times[n]) / min(times['fully_shard']):.2f})"
            print(f"| {n} | {med[n] * 1e3:.0f} ms ({min(times[n]) * 1e3:.0f}) | {ratio} "
                  f"| {_mib(mem[n])} ({mem[n] / mem['fully_shard']:.2f}) | {_mib(state[n])} "
                  f"| {_mib(ag)} / {_mib(rs)} / {ar} B ({ncalls}){' + ' + str(other) if other else ''} "
                  f"| {_mib(sent)} ({_mib(ag_sent + rs_sent)}) |")
        print("c10d ops seen by the dispatcher in that step (rank 0): "
              + "; ".join(f"{n}: {res[0]['c10d'][n]}" for n in names))
        formula = ag_sent + rs_sent
        where = f"{W} ranks{' (oversubscribed)' if W > os.cpu_count() else ''}"
        rows += [
            _row("FSDP", f"ours vs FSDP2 (fully_shard), {where}: step time", _ms(times["ours"]),
                 _ms(times["fully_shard"]), _ratio(times["ours"], times["fully_shard"]) + " of FSDP2's time",
                 f"first 3 steps: loss max rel. diff {rel:.1e}, grad norm {rel_norm:.1e}"),
            _row("FSDP", f"{where}: bytes a ring sends per rank and step vs the fsdp.py formula "
                         f"({_mib(formula)})", _mib(sent_by["ours"]), _mib(sent_by["fully_shard"]),
                 f"ours {sent_by['ours'] / formula:.3f}x, FSDP2 {sent_by['fully_shard'] / formula:.3f}x the formula",
                 f"AG/RS/AR calls: ours {calls_by['ours']}, FSDP2 {calls_by['fully_shard']}"),
            _row("FSDP", f"{where}: peak live tensor bytes per rank in a step", _mib(mem["ours"]),
                 _mib(mem["fully_shard"]), f"{mem['ours'] / mem['fully_shard']:.2f}x of FSDP2's",
                 f"shards+grads+AdamW {_mib(state['ours'])} = {state['ours'] / (16 * psi):.3f} x unsharded "
                 f"16 Psi {_mib(16 * psi)} (1/W = {1 / W:.3f})"),
        ]
        if profile:
            for n in names:
                wall, top, total = res[0]["profile"][n]
                print(f"\nprofile rank 0, {n}: step {wall * 1e3:.0f} ms, op self time {total * 1e3:.0f} ms; top ops "
                      f"(self ms per step, calls):")
                print("; ".join(f"{k} {t * 1e3:.1f} ({c})" for k, t, c in top))
    return rows


# ---------------------------------------------------------------------------------------
# tp: ours (tensor_parallel.py) against PyTorch's DTensor TP (parallelize_module), and
# async TP (the ring ops) against synchronous TP

TP_IMPLS = ("ours sync", "DTensor", "ours async")
TP_COLLECTIVES = COLLECTIVES + ("batch_isend_irecv",)  # dist.isend / irecv cannot be wrapped: P2POp checks identity

# The c10d and functional-collective ops at the dispatcher, and which argument holds the
# tensor(s) handed in (None: a receive, counted in calls only).
_C10D_INPUT_ARG = {"allreduce_": 0, "allreduce_coalesced_": 0, "_allgather_base_": 1, "allgather_": 1,
                   "allgather_into_tensor_coalesced_": 1, "_reduce_scatter_base_": 1, "reduce_scatter_": 1,
                   "reduce_scatter_tensor_coalesced_": 1, "alltoall_base_": 1, "broadcast_": 0, "send": 0,
                   "recv_": None, "recv_any_source_": None,
                   "all_reduce": 0, "all_reduce_": 0, "all_reduce_coalesced": 0, "all_reduce_coalesced_": 0,
                   "all_gather_into_tensor": 0, "all_gather_into_tensor_coalesced": 0,
                   "all_gather_into_tensor_out": 0, "reduce_scatter_tensor": 0, "reduce_scatter_tensor_coalesced": 0,
                   "all_to_all_single": 0, "broadcast": 0, "broadcast_": 0}
_C10D_SKIP = ("wait_tensor", "barrier", "monitored_barrier", "_wrap_tensor_autograd")


class _DispatchComm(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the communication ops that reach the dispatcher: torch.distributed's c10d ops
    (what dist.* calls) and the functional collectives (_c10d_functional, what DTensor's
    redistribute and loss_parallel call, which no dist.* wrapper sees). As PyTorch's
    CommDebugMode does, it steps aside (NotImplemented) for tensor subclasses, so DTensor
    desugars first and its collectives on plain local tensors come back through here.
    Bytes = the tensors handed in, as _CommCounter counts them."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is not torch.Tensor and t is not torch.nn.Parameter for t in types):
            return NotImplemented
        name = func.__name__.split(".")[0]
        if func.namespace in ("c10d", "_c10d_functional") and name not in _C10D_SKIP:
            key = f"{func.namespace}.{name}"
            self.calls[key] = self.calls.get(key, 0) + 1
            idx = _C10D_INPUT_ARG.get(name, 0)
            if idx is not None:
                ts = torch.utils._pytree.tree_leaves(args[idx])
                self.bytes[key] = self.bytes.get(key, 0) + sum(
                    t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))
        return func(*args, **(kwargs or {}))


def _ring_sent(nbytes: dict[str, int], W: int) -> float:
    """Bytes a rank sends for these collectives on a ring: all-gather (W-1) x its input,
    reduce-scatter (W-1)/W x its input, all-reduce 2 (W-1)/W x its tensor, p2p what it sends."""
    sent = 0.0
    for k, v in nbytes.items():
        op = k.split(".")[-1]
        if "gather" in op:
            sent += (W - 1) * v
        elif "reduce_scatter" in op:
            sent += (W - 1) / W * v
        elif "reduce" in op:
            sent += 2 * (W - 1) / W * v
        else:  # send, batch_isend_irecv
            sent += v
    return sent


def _comm_summary(calls: dict[str, int], nbytes: dict[str, int]) -> str:
    """'AG x MiB (n) / RS ... / AR ... / P2P ...' from either counter's names."""
    kinds = {"AG": ("gather",), "RS": ("reduce_scatter",), "AR": ("allreduce", "all_reduce"),
             "P2P": ("send", "batch_isend_irecv")}
    parts = []
    for label, keys in kinds.items():
        match = [k for k in calls if any(x in k.split(".")[-1] for x in keys)
                 and not (label == "AR" and "scatter" in k)]
        if match:
            b = sum(nbytes.get(k, 0) for k in match)
            parts.append(f"{label} {b / 2**20:.2f} MiB ({sum(calls[k] for k in match)})")
    return " / ".join(parts) or "none"


def _tp_args(cfg: dict) -> llama.ModelArgs:
    return llama.model_args("debug", dim=cfg["dim"], n_layers=cfg["layers"])


def _dtensor_tp(model: llama.Transformer, mesh, loss_parallel: bool = True) -> None:
    """TorchTitan's Llama TP plan (sequence parallel, loss parallel) with DTensor. Our
    Attention.forward takes (x, cos, sin), computed by the Transformer: two None layouts."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)
    parallelize_module(model, mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                  use_local_output=not loss_parallel),
    })
    for block in model.layers.values():
        parallelize_module(block, mesh, {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        })


def _tp_setup(impl: str, args: llama.ModelArgs, state: dict, world: int):
    """The same global weights, sharded by ours (sync or async TP) or by DTensor; both
    with sequence parallel and loss parallel; AdamW over the shards."""
    model = llama.build_model(args, "cpu")
    model.load_state_dict(state)
    if impl == "DTensor":
        from torch.distributed.device_mesh import init_device_mesh
        _dtensor_tp(model, init_device_mesh("cpu", (world,)))
    else:
        tensor_parallel.apply_tp(model, dist.group.WORLD, sequence_parallel=True, loss_parallel=True,
                                 async_tp=impl == "ours async")
    optimizer = train.build_optimizer(model, config.TrainingConfig(lr=1e-3))
    return model, optimizer, list(model.parameters())


def _tp_step(impl: str, model, optimizer, params, tokens: torch.Tensor) -> tuple[float, float, float, float]:
    """One optimizer step, each system its own way: (loss, grad norm, fwd+bwd s, step s).
    Ours: vocab-parallel loss, the SP norm-gradient all-reduce, train.clip_grad_norm.
    DTensor: F.cross_entropy under loss_parallel(), clipping as TorchTitan does
    (get_total_norm over the DTensor gradients, full_tensor, clip_grads_with_norm_)."""
    from torch.distributed.tensor import DTensor
    start = time.perf_counter()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    if impl == "DTensor":
        from torch.distributed.tensor.parallel import loss_parallel
        with loss_parallel():
            logits = model(inputs)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                     reduction="sum") / labels.numel()
            loss.backward()
        fwd_bwd = time.perf_counter()
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm, foreach=True)
    else:
        logits = model(inputs)
        loss = train.loss_fn(logits, labels, labels.numel(), dist.group.WORLD)
        loss.backward()
        fwd_bwd = time.perf_counter()
        tensor_parallel.reduce_sequence_parallel_grads(params, dist.group.WORLD)
        norm = train.clip_grad_norm(params, 1.0, tp_group=dist.group.WORLD)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    if isinstance(loss, DTensor):
        loss = loss.full_tensor()
    return loss.item(), norm.item(), fwd_bwd - start, end - start


def _ring_op_variants(kind: str, S: int, D: int, N: int, gen: torch.Generator) -> dict:
    """Forward + backward of one TP op in four ways, on plain float32 tensors (batch 1):
    column (x (1, S/t, D) sequence shard, W (N, D)): sync = GatherSeq then x W^T (backward:
    matmuls, then reduce-scatter of dX); async = AllGatherMatmul; comm = GatherSeq alone
    (all-gather + its reduce-scatter); compute = the matmuls on an already gathered x.
    row (x (1, S, N), W (D, N)): sync = x W^T then ReduceScatterSeq; async =
    MatmulReduceScatter; comm = ReduceScatterSeq alone; compute = the matmuls alone.
    Returns name -> (leaves, fn(): runs it, returns the output)."""
    tpm = tensor_parallel
    g, t = dist.group.WORLD, dist.get_world_size()
    s = S // t
    F_ = torch.nn.functional

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).requires_grad_()

    if kind == "column":
        x, w, xf, yd = leaf(1, s, D), leaf(N, D, scale=D**-0.5), leaf(1, S, D), leaf(1, s, D)
        go, go_d = torch.randn(1, S, N, generator=gen), torch.randn(1, S, D, generator=gen)

        def sync():
            y = F_.linear(tpm.GatherSeq.apply(x, g), w)
            y.backward(go)
            return y

        def async_():
            (y,) = tpm.AllGatherMatmul.apply(x, g, w)
            y.backward(go)
            return y
        variants = {"sync": ((x, w), sync), "async": ((x, w), async_),
                    "comm": ((yd,), lambda: tpm.GatherSeq.apply(yd, g).backward(go_d)),
                    "compute": ((xf, w), lambda: F_.linear(xf, w).backward(go))}
    else:
        x, w, yd = leaf(1, S, N), leaf(D, N, scale=N**-0.5), leaf(1, S, D)
        go, go_d = torch.randn(1, s, D, generator=gen), torch.randn(1, S, D, generator=gen)

        def sync():
            y = tpm.ReduceScatterSeq.apply(F_.linear(x, w), g)
            y.backward(go)
            return y

        def async_():
            y = tpm.MatmulReduceScatter.apply(x, w, g)
            y.backward(go)
            return y
        variants = {"sync": ((x, w), sync), "async": ((x, w), async_),
                    "comm": ((yd,), lambda: tpm.ReduceScatterSeq.apply(yd, g).backward(go)),
                    "compute": ((x, w), lambda: F_.linear(x, w).backward(go_d))}
    return variants


def _tp_ops(cfg: dict, result: dict) -> None:
    """Interleaved reps of sync / async / comm alone / compute alone per op and shape,
    a barrier before each; rank-local times (the caller takes the slowest rank)."""
    gen = torch.Generator().manual_seed(7 + dist.get_rank())
    result["ops"] = {}
    for label, S, D, N, reps in cfg["ops"]:
        for kind in ("column", "row"):
            variants = _ring_op_variants(kind, S, D, N, gen)
            outs = {}
            for name, (leaves, fn) in variants.items():  # warm-up; sync vs async numerics
                for _ in range(cfg["op_warmup"]):
                    for p in leaves:
                        p.grad = None
                    out = fn()
                if name in ("sync", "async"):
                    outs[name] = [out.detach()] + [p.grad.clone() for p in leaves]
            diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(outs["async"], outs["sync"]))
            del outs
            times = {name: [] for name in variants}
            for _ in range(reps):
                for name, (leaves, fn) in variants.items():
                    for p in leaves:
                        p.grad = None
                    dist.barrier()
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            result["ops"][(label, kind)] = (times, diff)
            del variants
    # §3.3's progress test: post one ring step of the comm-heavy block, sleep, time the wait.
    if cfg["ops"]:
        _, S, D, _, _ = max(cfg["ops"], key=lambda o: o[1] * o[2])
        blk = torch.randn(1, S // dist.get_world_size(), D)
        recv = torch.empty_like(blk)
        dist.barrier()
        start = time.perf_counter()
        works = tensor_parallel._start_ring(blk, recv, dist.group.WORLD, 1)
        tensor_parallel._wait(works)
        alone = time.perf_counter() - start
        dist.barrier()
        works = tensor_parallel._start_ring(blk, recv, dist.group.WORLD, 1)
        time.sleep(max(0.2, 3 * alone))
        start = time.perf_counter()
        tensor_parallel._wait(works)
        result["progress"] = (blk.numel() * 4, alone, time.perf_counter() - start)


def _tp_rank(rank: int, world: int, cfg: dict) -> dict:
    """One rank: the three models from the same weights; equal losses first; interleaved
    timed steps; the communication of one step each (two counters); then the ring ops."""
    result = {"losses": {}, "norms": {}, "times": {}, "fwd_bwd": {}, "comm": {}, "dispatch": {}}
    if cfg["model"]:
        counter = _CommCounter()
        counter.install(TP_COLLECTIVES)
        args = _tp_args(cfg)
        full = llama.build_model(args, "cpu")
        llama.init_weights(full, args, seed=0)
        state = full.state_dict()
        del full
        impls = {name: _tp_setup(name, args, state, world) for name in TP_IMPLS}
        del state
        # The same tokens on every TP rank (TP ranks share the batch).
        tokens = torch.randint(0, args.vocab_size, (cfg["batch"], cfg["seq"] + 1),
                               generator=torch.Generator().manual_seed(1000))
        for name, (model, opt, params) in impls.items():
            steps = [_tp_step(name, model, opt, params, tokens) for _ in range(max(3, cfg["warmup"]))]
            result["losses"][name] = [s[0] for s in steps[:3]]
            result["norms"][name] = [s[1] for s in steps[:3]]
        for name in impls:
            result["times"][name], result["fwd_bwd"][name] = [], []
        for _ in range(cfg["reps"]):  # interleaved: ours sync, DTensor, ours async, ...
            for name, (model, opt, params) in impls.items():
                dist.barrier()
                _, _, fb, step = _tp_step(name, model, opt, params, tokens)
                result["times"][name].append(step)
                result["fwd_bwd"][name].append(fb)
        for name, (model, opt, params) in impls.items():
            dist.barrier()
            counter.reset()
            with _DispatchComm() as seen:
                _tp_step(name, model, opt, params, tokens)
            result["comm"][name] = (dict(counter.calls), dict(counter.bytes))
            result["dispatch"][name] = (dict(seen.calls), dict(seen.bytes))
        del impls
    _tp_ops(cfg, result)
    return result


def _tp_formula(args: llama.ModelArgs, W: int, batch: int, seq: int) -> tuple[float, str]:
    """Ring-sent bytes per rank per step from tensor_parallel.py's docstring (SP + loss
    parallel, float32): 8 (t-1)/t A a per block, embedding and output one collective of
    A a each way; loss parallel all-reduces 3 floats per token; SP norm gradients one
    all-reduce; clipping one float64 all-reduce."""
    a, L, N = 4, args.n_layers, batch * seq
    A = batch * seq * args.dim
    f = (W - 1) / W
    acts = (8 * L + 4) * f * A * a
    loss = 2 * f * 3 * N * a
    norms = 2 * f * (2 * L + 1) * args.dim * a
    clip = 2 * f * 8
    text = (f"(8L+4)(t-1)/t A a = {_mib(acts)} + loss 2(t-1)/t 3N a = {_mib(loss)} + SP norm grads "
            f"2(t-1)/t (2L+1) D a = {_mib(norms)} + clip 16 (t-1)/t B = {_mib(acts + loss + norms + clip)} "
            f"(A = B S D = {A:,}, N = {N:,})")
    return acts + loss + norms + clip, text


def bench_tp(ranks: list[int], reps: int, warmup: int, dim: int, layers: int, batch: int, seq: int,
             op_reps: int, op_shapes: bool) -> list[dict]:
    """Ours (tensor_parallel.py, sync and async TP) against PyTorch's DTensor TP
    (parallelize_module with TorchTitan's Llama plan) on the same Llama, weights and
    tokens; sequence parallel and loss parallel for all; float32; AdamW and clipping at
    1.0; gloo, 1 thread per rank. Interleaved steps; a step's time is the slowest rank's.
    Communication of one step: dist.* wrappers (ours) and the dispatcher (both). Then the
    ring ops alone: sync vs async vs the collective alone vs the matmuls alone, and the
    hidden fraction (T_compute + T_comm - T_op) / T_comm (TECHNIQUES §3.3)."""
    args = _tp_args(dict(dim=dim, layers=layers))
    print(f"\nTP: ours (tensor_parallel.py, sync and async TP) vs PyTorch DTensor TP (parallelize_module, "
          f"TorchTitan's plan), {machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"model debug dim {dim}, {layers} layers, {args.n_heads} heads ({args.kv_heads} KV), FFN {args.ffn_dim}, "
          f"vocab {args.vocab_size}, {llama.num_params(args) / 1e6:.2f}M params; batch {batch} x seq {seq} "
          f"(the same tokens on every TP rank); sequence parallel + loss parallel for all; float32; AdamW, clip "
          f"1.0 (each its own way: ours train.clip_grad_norm, DTensor TorchTitan's get_total_norm + "
          f"full_tensor); gloo, 1 thread per rank; {reps} interleaved reps (ours sync, DTensor, ours async) "
          f"after {max(3, warmup)} warm-up steps, a barrier before each; time = slowest rank, median (min)")
    S_model = batch * seq
    # The model's shape is fast: 3x the reps. (label, S, D, N, reps)
    ops = [(f"model FFN (S = B*seq, D = dim, N = F/2)", S_model, dim, args.ffn_dim // 2, 3 * op_reps)]
    if op_shapes:
        ops += [("comm-heavy (§3.3)", 4096, 4096, 256, op_reps), ("compute-bound (§3.3)", 4096, 1024, 1024, op_reps)]
    start_all = time.perf_counter()
    op_res = None
    rows = []
    for W in ranks:
        cfg = dict(dim=dim, layers=layers, batch=batch, seq=seq, reps=reps, warmup=warmup, model=True,
                   ops=ops if W == 2 else [], op_reps=op_reps, op_warmup=1)
        load0 = os.getloadavg()[0]
        res = _run_ranks(_tp_rank, W, cfg)
        load1 = os.getloadavg()[0]
        if W == 2:
            op_res = res
        ref = "ours sync"
        rel = {n: max(abs(a - c) / abs(c) for r in res for a, c in zip(r["losses"][n], r["losses"][ref]))
               for n in TP_IMPLS}
        rel_norm = {n: max(abs(a - c) / abs(c) for r in res for a, c in zip(r["norms"][n], r["norms"][ref]))
                    for n in TP_IMPLS}
        if max(rel.values()) > 1e-4:
            raise RuntimeError(f"losses differ by more than 1e-4 relative: {rel}; "
                               f"{[r['losses'] for r in res]}")
        times = {n: [max(ts) for ts in zip(*(r["times"][n] for r in res))] for n in TP_IMPLS}
        fb = {n: [max(ts) for ts in zip(*(r["fwd_bwd"][n] for r in res))] for n in TP_IMPLS}
        med = {n: statistics.median(times[n]) for n in TP_IMPLS}
        low = {n: min(times[n]) for n in TP_IMPLS}
        sent_formula, formula = _tp_formula(args, W, batch, seq)
        print(f"\n{W} ranks ({'oversubscribed: ' if W > os.cpu_count() else ''}{os.cpu_count()} cores): first 3 "
              f"steps, max relative difference vs ours sync: loss DTensor {rel['DTensor']:.1e}, ours async "
              f"{rel['ours async']:.1e}; grad norm DTensor {rel_norm['DTensor']:.1e}, ours async "
              f"{rel_norm['ours async']:.1e} (ours sums the squares in float64, TorchTitan's get_total_norm in float32) "
              f"(loss {res[0]['losses'][ref][0]:.4f} at step 1, "
              f"{res[0]['losses'][ref][2]:.4f} at step 3); 1-min load average {load0:.1f} before, {load1:.1f} after")
        print(f"formula (tensor_parallel.py docstring), ring-sent per rank and step: {formula}")
        print("\n| impl | fwd+bwd median (min) | step median (min) | step ratio vs DTensor: median (min) "
              "| vs ours sync: median (min) | comm handed in, dist.* wrappers (calls) "
              "| comm handed in, dispatcher (calls) | ring-sent per rank (formula) |")
        print("|---|---|---|---|---|---|---|---|")
        for n in TP_IMPLS:
            calls, nbytes = res[0]["comm"][n]
            dcalls, dbytes = res[0]["dispatch"][n]
            wrapped = _comm_summary(calls, nbytes) if n != "DTensor" else "not seen (functional collectives)"
            print(f"| {n} | {_ms(fb[n])} | {_ms(times[n])} | {med[n] / med['DTensor']:.2f} "
                  f"({low[n] / low['DTensor']:.2f}) | {med[n] / med[ref]:.2f} ({low[n] / low[ref]:.2f}) "
                  f"| {wrapped} | {_comm_summary(dcalls, dbytes)} | {_mib(_ring_sent(dbytes, W))} "
                  f"({_mib(sent_formula)}) |")
        print("dispatcher ops (rank 0): " + "; ".join(
            f"{n}: " + ", ".join(f"{k} {v}" for k, v in sorted(res[0]["dispatch"][n][0].items())) for n in TP_IMPLS))
        where = f"{W} ranks{' (oversubscribed)' if W > os.cpu_count() else ''}"
        sent = {n: _ring_sent(res[0]["dispatch"][n][1], W) for n in TP_IMPLS}
        n_ar = {n: sum(v for k, v in res[0]["dispatch"][n][0].items() if "all_reduce" in k or "allreduce" in k)
                for n in TP_IMPLS}
        rows += [
            _row("TP", f"ours (sync) vs DTensor TP, {where}: step time", _ms(times[ref]), _ms(times["DTensor"]),
                 _ratio(times[ref], times["DTensor"]) + " of DTensor's time",
                 f"first 3 steps: loss max rel. diff {rel['DTensor']:.1e}, grad norm {rel_norm['DTensor']:.1e}"),
            _row("TP", f"{where}: bytes a ring sends per rank and step vs the tensor_parallel.py formula "
                       f"({_mib(sent_formula)})", _mib(sent[ref]), _mib(sent["DTensor"]),
                 f"ours {sent[ref] / sent_formula:.3f}x, DTensor {sent['DTensor'] / sent_formula:.3f}x the formula",
                 f"all-reduces per step: ours {n_ar[ref]}, DTensor {n_ar['DTensor']}"),
            _row("async TP", f"ours async vs ours sync TP, {where}: whole-model step time", _ms(times["ours async"]),
                 _ms(times[ref]), _ratio(times["ours async"], times[ref]) + " of sync's time",
                 f"first 3 steps: loss max rel. diff {rel['ours async']:.1e}, grad norm "
                 f"{rel_norm['ours async']:.1e}; bytes {sent['ours async'] / sent_formula:.3f}x the formula"),
        ]

    if op_res is not None and ops:
        print(f"\nAsync TP ring ops vs synchronous, 2 ranks, forward + backward of one op, float32, batch 1; "
              f"interleaved reps (sync, async, comm alone, compute alone) after 1 warm-up, a barrier "
              f"before each; time = slowest rank, median (min). column: x (S/2, D) shard, W (N, D): "
              f"sync = all-gather + matmuls (bwd: matmuls + reduce-scatter of dX), async = AllGatherMatmul; "
              f"row: x (S, N), W (D, N): sync = matmul + reduce-scatter (bwd: all-gather of dY + matmuls), "
              f"async = MatmulReduceScatter. hidden = (T_compute + T_comm - T_op) / T_comm, from the medians "
              f"(from the mins); 1 = all communication hidden, 0 = none, < 0 = slower than serial")
        print("\n| shape | S x D, N | op | reps | sync | async | comm alone | compute alone | hidden: sync "
              "| hidden: async | async / sync: median (min) | max rel diff async vs sync |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for label, S, D, N, reps in ops:
            cell = {"async": [], "sync": [], "ratio": [], "hidden": [], "diff": []}
            for kind in ("column", "row"):
                per_rank = [r["ops"][(label, kind)] for r in op_res]
                t = {n: [max(ts) for ts in zip(*(pr[0][n] for pr in per_rank))] for n in per_rank[0][0]}
                diff = max(pr[1] for pr in per_rank)
                md = {n: statistics.median(v) for n, v in t.items()}
                mn = {n: min(v) for n, v in t.items()}

                def hidden(x: str, d: dict) -> float:
                    return (d["compute"] + d["comm"] - d[x]) / d["comm"]
                print(f"| {label} | {S} x {D}, {N} | {kind} | {reps} | {_ms(t['sync'])} | {_ms(t['async'])} "
                      f"| {_ms(t['comm'])} | {_ms(t['compute'])} | {hidden('sync', md):.2f} ({hidden('sync', mn):.2f}) "
                      f"| {hidden('async', md):.2f} ({hidden('async', mn):.2f}) | {md['async'] / md['sync']:.2f} "
                      f"({mn['async'] / mn['sync']:.2f}) | {diff:.1e} |")
                cell["async"].append(f"{kind} {_ms(t['async'])}")
                cell["sync"].append(f"{kind} {_ms(t['sync'])}")
                cell["ratio"].append(f"{kind} {_ratio(t['async'], t['sync'])}")
                cell["hidden"].append(f"{kind} {hidden('async', md):.2f} (sync {hidden('sync', md):.2f})")
                cell["diff"].append(diff)
            rows.append(_row("async TP", f"ring op vs its synchronous form, 2 ranks, fwd+bwd of one op: {label}, "
                                         f"S x D, N = {S} x {D}, {N}", "; ".join(cell["async"]),
                             "; ".join(cell["sync"]), "; ".join(cell["ratio"]) + " of sync's time",
                             "communication hidden, median: " + "; ".join(cell["hidden"])
                             + f"; max rel. diff async vs sync {max(cell['diff']):.1e}"))
        nbytes, alone, waited = op_res[0]["progress"]
        print(f"\nprogress test (§3.3, rank 0): one ring step of {_mib(nbytes)} took {alone * 1e3:.1f} ms alone; "
              f"posted, then {max(0.2, 3 * alone) * 1e3:.0f} ms of sleep, its wait() took {waited * 1e3:.2f} ms "
              f"(~0: gloo progresses the transfer on its own threads, so a missing overlap means no spare CPU)")
    print(f"\n{time.perf_counter() - start_all:.0f} s in all")
    return rows


# ---------------------------------------------------------------------------------------
# float8: Float8Linear's matmul (float8.py, torch._scaled_mm) against a high-precision linear

# Llama 3 8B (dim 4096, 32 heads, 8 KV heads, FFN 14336): the distinct (K -> N) shapes of a block.
LLAMA3_8B_LINEARS = (("wq, wo", 4096, 4096), ("wk, wv", 4096, 1024), ("w1, w3", 4096, 14336),
                     ("w2", 14336, 4096))


def _linear_hp(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, w)


def _linear_f8_tensorwise(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return float8.Float8Matmul.apply(x, w, "tensorwise", None)


def _linear_f8_rowwise(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return float8.Float8Matmul.apply(x, w, "rowwise", None)


def _sqnr_db(ref: torch.Tensor, y: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - y|^2), in float64."""
    ref = ref.double()
    noise = (ref - y.double()).pow(2).sum()
    return float("inf") if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise.item())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_float8(M: int | None, reps: int | None, warmup: int | None, compile_: bool,
                 shape_div: int = 1) -> list[dict]:
    """Forward + backward of one linear (out = x W^T, grad_x, grad_W) on the Llama 3 8B
    block shapes: float8.Float8Matmul (tensorwise, rowwise) against F.linear in bf16
    (and float32 on CPU), the same bf16-representable inputs for all. Interleaved
    repetitions; speedup = baseline time / this time (> 1: faster). Numerics: SQNR of the
    output, grad_x and grad_W against float64 on the same inputs, from the last warmup
    run. On CUDA this is the speed comparison (target: float8 >= 1.3x bf16 on the FFN
    shapes with --compile, H100); on CPU, where _scaled_mm and bf16 matmul are both
    slow emulations, it only demonstrates the numerics."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    M = M or (8192 if cuda else 256)
    reps = reps or (20 if cuda else 3)
    warmup = warmup if warmup is not None else (3 if cuda else 1)
    warmup = max(1, warmup)  # the last warmup run gives the numerics
    if M % 16:
        raise ValueError(f"--M {M}: the weight-gradient GEMM contracts over M, which must be divisible by 16")
    linears = [(label, K // shape_div, N // shape_div) for label, K, N in LLAMA3_8B_LINEARS]
    if any(K % 16 or N % 16 for _, K, N in linears):
        raise ValueError(f"--shape-div {shape_div}: every K and N must stay divisible by 16 (torch._scaled_mm); "
                         f"got {[(K, N) for _, K, N in linears]}")
    impls = {"bf16": (_linear_hp, torch.bfloat16)}
    if not cuda:
        impls["fp32"] = (_linear_hp, torch.float32)
    impls["float8 tensorwise"] = (_linear_f8_tensorwise, torch.bfloat16)
    impls["float8 rowwise"] = (_linear_f8_rowwise, torch.bfloat16)
    baselines = [n for n in impls if not n.startswith("float8")]

    print(f"\nFloat8 linear (float8.py, torch._scaled_mm) vs high-precision F.linear, forward + backward, "
          f"{machine()}{f', {torch.get_num_threads()} host thread(s)' if cuda else ''}, torch {torch.__version__}")
    if cuda:
        print(f"device: CUDA GPU. This is the speed comparison: float8 vs bf16 (goal: >= 1.3x on the 8B FFN "
              f"shapes on an H100 with --compile){'' if compile_ else '; eager (run with --compile for fused casts)'}")
    else:
        print("device: CPU. A NUMERICS DEMONSTRATION, not a speed result: torch._scaled_mm on CPU is an "
              "emulation-grade kernel and bf16 matmul is emulated on this CPU (no AVX512-BF16/AMX), so the "
              "times say nothing about a GPU; fp32 is this CPU's native-speed baseline")
    print(f"Llama 3 8B block shapes{f' with K and N / {shape_div}' if shape_div > 1 else ''}, M = {M} tokens per matmul{'' if cuda else ' (the CPU default, so the run takes minutes: at M = 1024 one rep of the emulated bf16 baseline alone takes ~1 min here; 8192 on a GPU)'}; "
          f"x ~ N(0, 1), W ~ N(0, 0.02^2), grad_out ~ N(0, 1), all rounded to bf16 and shared by every impl; "
          f"float8 with bf16 inputs and outputs (as under autocast); {'torch.compile (dynamic=False) on each impl' if compile_ else 'eager'}; "
          f"{reps} interleaved reps after {warmup} warmup run(s) each; time = median (min); "
          f"speedup = baseline / impl, median (min); SQNR (dB) vs float64 from the last warmup run; "
          f"TFLOP/s = 6 M K N / median")
    cols = " | ".join(f"speedup vs {b}" for b in baselines)
    print(f"\n| layer | M x K -> N | impl | fwd+bwd median (min) | TFLOP/s | {cols} | SQNR out / grad_x / grad_W (dB) |")
    print("|---|---|---|---|---|" + "---|" * len(baselines) + "---|")

    gen = torch.Generator().manual_seed(0)
    load0, start = os.getloadavg()[0], time.perf_counter()
    rows = []
    where = (f"{torch.cuda.get_device_name()}, {'compiled' if compile_ else 'eager'}" if cuda else
             "CPU: emulated kernels, numerics only, not a speed result")
    for label, K, N in linears:
        if compile_:
            torch._dynamo.reset()  # a fresh static-shape compile per shape
        x0 = torch.randn(M, K, generator=gen).bfloat16().to(device)
        w0 = (0.02 * torch.randn(N, K, generator=gen)).bfloat16().to(device)
        go0 = torch.randn(M, N, generator=gen).bfloat16().to(device)
        x64, w64, go64 = x0.double(), w0.double(), go0.double()
        ref = (x64 @ w64.t(), go64 @ w64, go64.t() @ x64)  # out, grad_x, grad_W
        del x64, w64, go64

        runs = {}
        for name, (fn, dtype) in impls.items():
            f = torch.compile(fn, dynamic=False) if compile_ else fn
            x = x0.to(dtype, copy=True).requires_grad_()  # a leaf of its own per impl
            w = w0.to(dtype, copy=True).requires_grad_()
            runs[name] = (f, x, w, go0.to(dtype))

        def run(name: str) -> tuple[float, tuple[torch.Tensor, ...]]:
            f, x, w, go = runs[name]
            x.grad = w.grad = None
            _sync(device)
            start = time.perf_counter()
            out = f(x, w)
            out.backward(go)
            _sync(device)
            return time.perf_counter() - start, (out.detach(), x.grad, w.grad)

        sqnr = {}
        for name in impls:
            for _ in range(warmup):
                _, outs = run(name)
            sqnr[name] = [_sqnr_db(r, o) for r, o in zip(ref, outs)]
            del outs
        times = {name: [] for name in impls}
        for _ in range(reps):  # interleaved: bf16, (fp32,) tensorwise, rowwise, bf16, ...
            for name in impls:
                times[name].append(run(name)[0])
        del runs, ref

        flops = 6 * M * K * N
        med = {n: statistics.median(t) for n, t in times.items()}
        low = {n: min(t) for n, t in times.items()}
        for name in impls:
            speedups = " | ".join(f"{med[b] / med[name]:.2f}x ({low[b] / low[name]:.2f})" for b in baselines)
            print(f"| {label} | {M} x {K} -> {N} | {name} | {med[name] * 1e3:.1f} ms ({low[name] * 1e3:.1f}) "
                  f"| {flops / med[name] / 1e12:.3g} | {speedups} | {' / '.join(f'{s:.1f}' for s in sqnr[name])} |")
        f8 = [n for n in impls if n.startswith("float8")]
        rows.append(_row("float8", f"float8 linear vs bf16 F.linear, {label}: {M} x {K} -> {N}, fwd+bwd "
                                   f"({where}): time, and SQNR vs float64", "; ".join(
                                       f"{n.split()[1]} {_ms(times[n])}" for n in f8),
                         "; ".join(f"{n} {_ms(times[n])}" for n in baselines),
                         "speedup vs bf16: " + "; ".join(f"{n.split()[1]} {_ratio(times['bf16'], times[n])}"
                                                         for n in f8),
                         "SQNR out / grad_x / grad_W (dB): " + "; ".join(
                             f"{n.split()[-1]} {' / '.join(f'{x:.1f}' for x in sqnr[n])}" for n in f8 + ["bf16"])))
    print(f"\n{time.perf_counter() - start:.0f} s in all; 1-min load average {load0:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after ({os.cpu_count()} cores: other processes on this machine skew the times)")
    return rows


# ---------------------------------------------------------------------------------------
# checkpoint: ours (checkpoint.py) against torch.distributed.checkpoint (DCP) on the same
# sharded state; blocking vs async save: the training stall per save

CKPT_MODES = ("ours blocking", "ours async", "DCP blocking", "DCP async")


def _disk(path: str) -> str:
    """The file system holding `path`, from `df -T`: type, device, mount point."""
    import subprocess
    try:
        out = subprocess.run(["df", "-T", path], capture_output=True, text=True, check=True).stdout
        dev, fstype, *_, mount = out.splitlines()[-1].split()
        return f"{path} on {fstype} ({dev}, mounted at {mount})"
    except (OSError, subprocess.CalledProcessError, ValueError):
        return f"{path} (df -T failed)"


def _dir_bytes(path: str) -> tuple[int, int]:
    """(bytes, files) under path."""
    n = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            n, files = n + os.path.getsize(os.path.join(root, name)), files + 1
    return n, files


def _evict(path: str) -> None:
    """Drop the files under path from this machine's page cache (they are fsynced, so
    their pages are clean): the next read goes to the disk, or to the VM host's cache."""
    for root, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _local_tensors(model, optimizer) -> list[torch.Tensor]:
    """This rank's tensors of the state (parameter shards, optimizer state); a DTensor's
    local shard."""
    ts = list(model.parameters())
    ts += [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return [getattr(t, "_local_tensor", t).detach() for t in ts]


class _OursSaver:
    """checkpoint.Checkpointer, one save per fresh directory (its root)."""

    def __init__(self, model, optimizer, async_save: bool):
        import checkpoint as ckpt
        self.model, self.optimizer = model, optimizer
        self.ck = ckpt.Checkpointer("", keep=0, async_save=async_save)

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


class _DCPSaver:
    """torch.distributed.checkpoint as TorchTitan uses it: get_state_dict (model and
    optimizer, DTensors under FSDP2) then dcp.save / dcp.async_save (default
    FileSystemWriter: one file per rank, fsync; the async writer thread on a gloo group
    of its own); load = get_state_dict + dcp.load (in place) + set_state_dict."""

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


def _ckpt_rank(rank: int, world: int, cfg: dict) -> dict:
    """One rank: ours on fsdp.py shards and DCP on FSDP2 (fully_shard) shards of the same
    weights (world 1: one plain model for both), one AdamW step each; check that ours
    (and DCP) load back bitwise; then interleaved reps of every save mode (fresh
    directory each) and of cold and warm loads; then training steps with a save in
    flight."""
    import shutil
    args = llama.model_args("debug", dim=cfg["dim"], n_layers=cfg["layers"], vocab_size=cfg["vocab"])
    if world > 1:
        full = llama.build_model(args, "cpu")
        llama.init_weights(full, args, seed=0)
        state = full.state_dict()
        del full
        models = {"ours": _fsdp_setup("ours", args, state, world),
                  "DCP": _fsdp_setup("fully_shard", args, state, world)}
        del state
    else:
        model, opt = _train_setup(args, torch.float32)
        models = {"ours": (model, opt), "DCP": (model, opt)}
    gen = torch.Generator().manual_seed(1000 + rank)
    micro = [torch.randint(0, args.vocab_size, (cfg["batch"], cfg["seq"] + 1), generator=gen)]
    global_tokens = world * cfg["batch"] * cfg["seq"]
    for impl, (model, opt) in models.items():
        if impl == "ours" or world > 1:
            _fsdp_step(model, opt, micro, global_tokens)  # AdamW state exists from here on
    savers = {mode: (_OursSaver if mode.startswith("ours") else _DCPSaver)(
        *models[mode.split()[0]], async_save=mode.endswith("async")) for mode in CKPT_MODES}
    result = {"state_bytes": sum(t.numel() * t.element_size() for t in _local_tensors(*models["ours"])),
              "verify": {}, "stall": {m: [] for m in CKPT_MODES}, "durable": {m: [] for m in CKPT_MODES},
              "cold": {"ours": [], "DCP": []}, "warm": {"ours": [], "DCP": []}, "disk": {}}
    root = cfg["dir"]

    def clear(*paths):
        dist.barrier()
        if rank == 0:
            for p in paths:
                shutil.rmtree(p, ignore_errors=True)
        dist.barrier()

    # Correctness first: save, zero every local tensor, load, compare bitwise.
    for impl, mode in (("ours", "ours blocking"), ("DCP", "DCP blocking")):
        model, opt = models[impl]
        path = os.path.join(root, f"verify-{impl}")
        before = [t.clone() for t in _local_tensors(model, opt)]
        savers[mode].save(path)
        savers[mode].wait()
        with torch.no_grad():
            for t in _local_tensors(model, opt):
                t.zero_()
        savers[mode].load(path)
        after = _local_tensors(model, opt)
        result["verify"][impl] = (len(before), sum(torch.equal(a, b) for a, b in zip(before, after)))
        clear(path)

    # Interleaved reps: every save mode, then cold and warm loads of the blocking saves.
    for rep in range(cfg["reps"]):
        modes = CKPT_MODES if rep % 2 == 0 else CKPT_MODES[::-1]
        paths = {m: os.path.join(root, f"{m.replace(' ', '-')}-{rep}") for m in CKPT_MODES}
        for mode in modes:
            dist.barrier()
            start = time.perf_counter()
            savers[mode].save(paths[mode])
            returned = time.perf_counter()
            savers[mode].wait()
            done = time.perf_counter()
            result["stall"][mode].append(returned - start)
            result["durable"][mode].append(done - start)
        if rep == 0 and rank == 0:  # every mode's save is committed (rank 0 waited for it)
            result["disk"] = {m: _dir_bytes(p) for m, p in paths.items()}
        for impl in (("ours", "DCP") if rep % 2 == 0 else ("DCP", "ours")):
            path = paths[f"{impl} blocking"]
            dist.barrier()
            if rank == 0:
                _evict(path)
            for kind in ("cold", "warm"):
                dist.barrier()
                start = time.perf_counter()
                savers[f"{impl} blocking"].load(path)
                result[kind][impl].append(time.perf_counter() - start)
        clear(*paths.values())

    # Training steps right after an async save at a step boundary, the write in flight
    # (a blocking save loses exactly its stall, measured above).
    variants = [("ours", None), ("ours", "ours async"), ("DCP", "DCP async")]
    if world > 1:
        variants.insert(2, ("DCP", None))  # FSDP2's own no-save baseline
    result["steps"] = {v: {"total": [], "stall": [], "step": [], "flight": [], "wait": []} for v in variants}
    for impl, mode in variants:
        if mode is None and cfg["steps"]:  # one untimed step each first
            _fsdp_step(*models[impl], micro, global_tokens)
    for rep in range(cfg["step_reps"] if cfg["steps"] else 0):
        for impl, mode in (variants if rep % 2 == 0 else variants[::-1]):
            model, opt = models[impl]
            path = os.path.join(root, f"steps-{rep}")
            out = result["steps"][(impl, mode)]
            dist.barrier()
            start = time.perf_counter()
            if mode is not None:
                savers[mode].save(path)
            out["stall"].append(time.perf_counter() - start)
            for _ in range(cfg["steps"]):
                t0 = time.perf_counter()
                _fsdp_step(model, opt, micro, global_tokens)
                out["step"].append(time.perf_counter() - t0)
                out["flight"].append(mode is not None and savers[mode].in_flight())
            t0 = time.perf_counter()
            if mode is not None:
                savers[mode].wait()
            out["wait"].append(time.perf_counter() - t0)
            out["total"].append(time.perf_counter() - start)
            clear(path)
    for s in savers.values():
        s.close()
    return result


def _ck_ratio(a: list[float], b: list[float]) -> str:
    return f"{statistics.median(a) / statistics.median(b):.2f} ({min(a) / min(b):.2f})"


def bench_checkpoint(ranks: list[int], reps: int, dim: int, layers: int, vocab: int, steps: int, step_reps: int,
                     batch: int, seq: int, tmp: str) -> list[dict]:
    """Ours (checkpoint.py) against torch.distributed.checkpoint on the same state:
    parameters + AdamW state (one step taken), float32, sharded by fsdp.py (ours) and by
    FSDP2 (DCP) over gloo ranks. Save (blocking, until durable) and load (cold: evicted
    from the page cache; warm) time, bytes on disk; the training stall per save, blocking
    vs async, and the training steps run while an async write is in flight. Interleaved
    reps, a fresh directory per save; a time is the slowest rank's."""
    import shutil
    import tempfile
    args = llama.model_args("debug", dim=dim, n_layers=layers, vocab_size=vocab)
    n = llama.num_params(args)
    print(f"\nCheckpoint: ours (checkpoint.py) vs torch.distributed.checkpoint (DCP), {machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}; disk: {_disk(tmp)}")
    print(f"state: Llama debug dim {dim}, {layers} layers, vocab {vocab}: {n / 1e6:.1f}M params; parameters + "
          f"AdamW exp_avg + exp_avg_sq (one step taken), float32 = {_mib(12 * n)}. Ours on fsdp.py shards, DCP "
          f"(get_state_dict + FileSystemWriter defaults: one file per rank, fsync) on FSDP2 (fully_shard) shards "
          f"of the same weights; 1 rank = one plain model for both. gloo, 1 compute thread per rank; "
          f"{reps} interleaved reps, a fresh directory under {tmp} per save; time = slowest rank, median (min)")
    import zlib
    x = torch.randn(2**24)  # 64 MiB: what a snapshot costs per byte here (ours: copy + CRC-32; DCP: copy)
    copy, crc = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        x.clone()
        t1 = time.perf_counter()
        zlib.crc32(x.view(torch.uint8).numpy())
        copy.append(t1 - t0)
        crc.append(time.perf_counter() - t1)
    print(f"snapshot cost on this machine, one thread: tensor copy {x.nbytes / min(copy) / 1e9:.1f} GB/s, "
          f"zlib.crc32 {x.nbytes / min(crc) / 1e9:.1f} GB/s")
    rows = []
    for W in ranks:
        base = tempfile.mkdtemp(prefix="nanotitan-bench-ckpt-", dir=tmp)
        try:
            cfg = dict(dim=dim, layers=layers, vocab=vocab, reps=reps, steps=steps, step_reps=step_reps,
                       batch=batch, seq=seq, dir=base)
            load0, start = os.getloadavg()[0], time.perf_counter()
            res = _run_ranks(_ckpt_rank, W, cfg)
            load1, elapsed = os.getloadavg()[0], time.perf_counter() - start
        finally:
            shutil.rmtree(base, ignore_errors=True)

        def slowest(get) -> list[float]:
            return [max(ts) for ts in zip(*(get(r) for r in res))]

        print(f"\n{W} rank(s){' (fsdp.py / FSDP2 shards)' if W > 1 else ' (one process, unsharded)'}; state "
              f"{_mib(sum(r['state_bytes'] for r in res))} over all ranks; {elapsed:.0f} s; 1-min load average "
              f"{load0:.1f} before, {load1:.1f} after ({os.cpu_count()} cores: other processes skew the times)")
        verified = {}
        for impl in ("ours", "DCP"):
            total, equal = zip(*(r["verify"][impl] for r in res))
            verified[impl] = f"{sum(equal)}/{sum(total)}"
            print(f"round trip {impl}: save, zero every local tensor, load: {sum(equal)} of {sum(total)} local "
                  f"tensors bitwise equal over {W} rank(s)")
            if sum(equal) != sum(total):
                raise RuntimeError(f"{impl}: the loaded state differs from the saved one")
        save = {i: slowest(lambda r: r["durable"][f"{i} blocking"]) for i in ("ours", "DCP")}
        cold = {i: slowest(lambda r: r["cold"][i]) for i in ("ours", "DCP")}
        warm = {i: slowest(lambda r: r["warm"][i]) for i in ("ours", "DCP")}
        disk = res[0]["disk"]
        print("\n| impl | save (blocking, durable) | ratio ours/DCP | load cold | ratio | load warm | ratio "
              "| bytes on disk (files) |")
        print("|---|---|---|---|---|---|---|---|")
        for i in ("ours", "DCP"):
            nbytes, files = disk[f"{i} blocking"]
            print(f"| {i} | {_ms(save[i])} | {_ck_ratio(save[i], save['DCP'])} | {_ms(cold[i])} "
                  f"| {_ck_ratio(cold[i], cold['DCP'])} | {_ms(warm[i])} | {_ck_ratio(warm[i], warm['DCP'])} "
                  f"| {nbytes:,} B = {_mib(nbytes)} ({files}) |")
        print("\n| save mode | stall: save() returns | until durable (wait) | stall / its blocking save |")
        print("|---|---|---|---|")
        stalls = {}
        for m in CKPT_MODES:
            stall, durable = slowest(lambda r: r["stall"][m]), slowest(lambda r: r["durable"][m])
            block = save[m.split()[0]]
            stalls[m] = stall
            print(f"| {m} | {_ms(stall)} | {_ms(durable)} | {_ck_ratio(stall, block)} |")
        where = f"{W} rank(s) ({'fsdp.py / FSDP2 shards' if W > 1 else 'one unsharded model'})"
        state_mib = _mib(sum(r["state_bytes"] for r in res))
        rows += [
            _row("checkpoint", f"ours vs DCP, {where}, {state_mib}: blocking save until durable", _ms(save["ours"]),
                 _ms(save["DCP"]), _ratio(save["ours"], save["DCP"]) + " of DCP's time",
                 f"round trip bitwise equal tensors: ours {verified['ours']}, DCP {verified['DCP']}; bytes on disk "
                 f"{disk['ours blocking'][0] / disk['DCP blocking'][0]:.3f}x DCP's"),
            _row("checkpoint", f"{where}: load, cold (evicted from the page cache) / warm",
                 f"{_ms(cold['ours'])} / {_ms(warm['ours'])}", f"{_ms(cold['DCP'])} / {_ms(warm['DCP'])}",
                 f"cold {_ratio(cold['ours'], cold['DCP'])}, warm {_ratio(warm['ours'], warm['DCP'])} of DCP's time"),
            _row("checkpoint", f"{where}: async save, training stall (until save() returns)",
                 _ms(stalls["ours async"]), _ms(stalls["DCP async"]),
                 _ratio(stalls["ours async"], stalls["DCP async"]) + " of DCP's stall",
                 f"stall / own blocking save: ours {_ratio(stalls['ours async'], save['ours'])}, "
                 f"DCP {_ratio(stalls['DCP async'], save['DCP'])}"),
        ]
        if steps:
            print(f"\nAsync save at a step boundary, then {steps} training steps ({batch} x {seq} tokens per rank), "
                  f"then wait until durable; {step_reps} interleaved reps with the same steps without a save. Time "
                  f"lost per save = that total - the no-save total (same model, same rep); a blocking save loses its "
                  f"whole save time (above). In flight: steps that ended with the write still running (any rank).")
            print("\n| model | save mode | stall | step, write in flight [steps] | step, no save | wait after the steps "
                  "| time lost per save | blocking save |")
            print("|---|---|---|---|---|---|---|---|")
            for (impl, mode) in res[0]["steps"]:
                if mode is None:
                    continue
                base_impl = impl if W > 1 else "ours"
                get = lambda key, v=(impl, mode): slowest(lambda r: r["steps"][v][key])  # noqa: E731
                nosave = slowest(lambda r: r["steps"][(base_impl, None)]["total"])
                nosave_step = slowest(lambda r: r["steps"][(base_impl, None)]["step"])
                flight = [any(fs) for fs in zip(*(r["steps"][(impl, mode)]["flight"] for r in res))]
                during = [t for t, f in zip(get("step"), flight) if f]
                lost = [a - b for a, b in zip(get("total"), nosave)]
                print(f"| {('fsdp.py' if impl == 'ours' else 'FSDP2') if W > 1 else 'plain'} | {mode} "
                      f"| {_ms(get('stall'))} | {_ms(during) + f' [{len(during)}]' if during else '- [0]'} "
                      f"| {_ms(nosave_step)} | {_ms(get('wait'))} "
                      f"| {statistics.median(lost) * 1e3:.0f} ms ({min(lost) * 1e3:.0f}) "
                      f"| {_ms(save[impl])} |")
    return rows


# ---------------------------------------------------------------------------------------
# pp: ours (pipeline.py) against torch.distributed.pipelining on the same stage modules

# (label, our schedule, torch.distributed.pipelining schedule, stages per rank). torch's
# interleaved zero bubble (ZB1P) with one stage per rank is ZB-H1, as ours.
PP_SCHEDULES = (("GPipe", "gpipe", "ScheduleGPipe", 1), ("1F1B", "1f1b", "Schedule1F1B", 1),
                ("interleaved 1F1B (v=2)", "interleaved_1f1b", "ScheduleInterleaved1F1B", 2),
                ("zero bubble (ZB-H1)", "zero_bubble", "ScheduleInterleavedZeroBubble", 1))


class _BusyTimer:
    """Wall time a rank spends computing: stage forwards (module hooks), the loss, and
    every torch.autograd.backward / torch.autograd.grad (patched on the module, so the
    runner's B / I, torch's stage_backward* and loss.backward all pass through it), plus
    the W of ours (dW GEMMs outside autograd). Nested spans count once."""

    def __init__(self):
        self.busy, self._depth, self._start = 0.0, 0, 0.0
        for name in ("backward", "grad"):
            setattr(torch.autograd, name, self.wrap(getattr(torch.autograd, name)))

    def enter(self, *_):
        if self._depth == 0:
            self._start = time.perf_counter()
        self._depth += 1

    def exit(self, *_):
        self._depth -= 1
        if self._depth == 0:
            self.busy += time.perf_counter() - self._start

    def wrap(self, fn):
        def timed(*args, **kwargs):
            self.enter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit()
        return timed

    def watch(self, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(self.enter)
        module.register_forward_hook(self.exit)


class _PeerStage(torch.nn.Module):
    """torch's PipelineStage calls submod(x): positions default to 0..S-1 (no TP)."""

    def __init__(self, stage: torch.nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x)


def _pp_rank(rank: int, world: int, cfg: dict) -> dict:
    """One rank: for every (schedule, m): ours and torch's pipelining on the same stage
    modules, loss and gradient check, then interleaved timed steps with busy time."""
    from torch.distributed import pipelining
    import pipeline
    timer = _BusyTimer()
    args = llama.model_args("debug", dim=cfg["dim"], n_layers=cfg["layers"])
    full = llama.build_model(args, "cpu")
    llama.init_weights(full, args, seed=0)
    B, S = cfg["batch"], cfg["seq"]
    device = torch.device("cpu")
    group = dist.group.WORLD
    out = {}
    for label, ours_name, peer_name, v in PP_SCHEDULES:
        if v > 1 and cfg["layers"] < world * v:
            continue
        for m in cfg["micro"]:
            n = world * v
            stages = pipeline.build_stages(full, rank, world, v)  # copies of the weights
            for st in stages.values():
                timer.watch(st)
            params = [p for st in stages.values() for p in st.parameters()]
            gen = torch.Generator().manual_seed(1234)  # the same batch on every rank
            tokens = torch.randint(0, args.vocab_size, (m * B, S + 1), generator=gen)
            x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
            global_tokens = y.numel()

            def loss_fn(logits, labels):
                return train.loss_fn(logits, labels, global_tokens)
            loss_fn = timer.wrap(loss_fn)
            runner = pipeline.PipelineRunner(pipeline.build_schedule(ours_name, world, m, v)[rank], stages, n,
                                             group, loss_fn, (B, S, args.dim), torch.float32, device)
            runner._backward_weight = timer.wrap(runner._backward_weight)
            x_mb, y_mb = list(x.chunk(m)), list(y.chunk(m))

            def ours() -> float:
                return float(runner.step(x_mb, y_mb))

            pstages = [pipelining.PipelineStage(_PeerStage(stages[s]), s, n, device, group=group)
                       for s in sorted(stages)]
            cls = getattr(pipelining, peer_name)
            multi = issubclass(cls, pipelining.schedules.PipelineScheduleMulti)
            sched = cls(pstages if multi else pstages[0], n_microbatches=m, loss_fn=loss_fn,
                        scale_grads=False)  # the loss is already / global tokens, as ours
            first, last = 0 in stages, n - 1 in stages

            def peer() -> float:
                losses = []
                sched.step(*((x,) if first else ()), target=y if last else None, losses=losses,
                           return_outputs=False)
                return float(sum(loss.detach().double() for loss in losses)) if last else 0.0
            impls = {"ours": ours, "torch": peer}
            # Check first: one step each from zero gradients, same weights and batch; abort
            # on every rank together if they differ.
            check = {}
            for name, fn in impls.items():
                for p in params:
                    p.grad = None
                dist.barrier()
                check[name] = (fn(), [p.grad.clone() for p in params])
            (l0, g0), (l1, g1) = check["ours"], check["torch"]
            diff = torch.tensor([abs(l0 - l1) / abs(l0) if l0 else 0.0, max(
                ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item() for a, b in zip(g0, g1))],
                dtype=torch.float64)
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            loss_rel, grad_rel = diff.tolist()
            if not max(loss_rel, grad_rel) <= 1e-4:
                raise RuntimeError(f"pp {label} m={m}: ours and torch differ (relative: loss {loss_rel:.1e}, "
                                   f"max gradient {grad_rel:.1e}); not timing different work")
            for _ in range(cfg["warmup"]):
                for fn in impls.values():
                    for p in params:
                        p.grad = None
                    dist.barrier()
                    fn()
            times = {name: [] for name in impls}
            busy = {name: [] for name in impls}
            for _ in range(cfg["reps"]):
                for name, fn in impls.items():
                    for p in params:
                        p.grad = None
                    dist.barrier()
                    timer.busy = 0.0
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
                    busy[name].append(timer.busy)
            out[(label, m)] = dict(times=times, busy=busy, loss=check["ours"][0], loss_rel=loss_rel,
                                   grad_rel=grad_rel, peer=peer_name, ours=ours_name, v=v)
    return out


def _pp_formula(name: str, p: int, m: int, v: int) -> str:
    """The bubble fraction of pipeline.py's docstring, and per rank the unit-cost replay
    (pipeline.simulate: F 1, B 2, I = W = 1, free communication) of our table."""
    import pipeline
    if name == "zero_bubble":
        closed = (p - 1) / (3 * m + p - 1)  # (p-1)(t_F + t_I - t_W) with t_F = t_I = t_W = 1, 3m busy
    else:
        closed = (p - 1) / (v * m + p - 1)
    sim = pipeline.simulate(pipeline.build_schedule(name, p, m, v), p * v)
    return (f"{100 * closed:.0f}% (sim " + " / ".join(f"{100 * i / sim['makespan']:.0f}%" for i in sim["idle"])
            + ")")


def bench_pp(ranks: list[int], micro: list[int], reps: int, warmup: int, dim: int, layers: int, batch: int,
             seq: int) -> list[dict]:
    """Ours (pipeline.py: build_stages + PipelineRunner) against torch.distributed.pipelining
    (PipelineStage + its schedules) on the same stage modules (the same weights), the same
    batch, float32, gloo, 1 thread per rank. Both: loss per micro-batch = token CE sum /
    global tokens, gradients summed (torch: scale_grads=False); one step each is checked
    equal first. Step = forward + backward of m micro-batches (no optimizer), gradients
    set to None in between; interleaved reps, barrier before each; step time = slowest
    rank. Measured bubble: idle = 1 - busy / step time per rank, busy = wall time inside
    the stage forwards, the loss and every autograd backward / grad call (+ our W)."""
    import pipeline
    args = llama.model_args("debug", dim=dim, n_layers=layers)
    print(f"\nPipeline parallel: ours (pipeline.py) vs torch.distributed.pipelining, {machine()}, "
          f"torch {torch.__version__}, {os.cpu_count()} cores")
    print(f"model debug dim {dim}, {layers} layers, {llama.num_params(args) / 1e6:.2f}M params; micro-batches of "
          f"{batch} x {seq} tokens; float32; gloo, 1 thread per rank; step = forward + backward of m micro-batches "
          f"(no optimizer); 1 checked + {warmup} warmup steps each, then {reps} interleaved reps (ours, torch, ...), "
          f"barrier before each; step time = slowest rank; idle = 1 - busy / step time, busy = time in stage "
          f"forward, loss, autograd backward (and our W)")
    rows = []
    for W in ranks:
        cfg = dict(dim=dim, layers=layers, batch=batch, seq=seq, micro=micro, reps=reps, warmup=warmup)
        load0 = os.getloadavg()[0]
        res = _run_ranks(_pp_rank, W, cfg, timeout_s=120)
        load1 = os.getloadavg()[0]
        splits = "; ".join(f"v={v}: {[len(x) for x in pipeline.split_layers(layers, W * v)]}" for v in (1, 2)
                           if W * v <= layers)
        print(f"\n{W} ranks ({'oversubscribed: ' if W > os.cpu_count() else ''}{os.cpu_count()} cores); layers per "
              f"stage {splits} (embedding on the first, norm + output + loss on the last); 1-min load average "
              f"{load0:.1f} before, {load1:.1f} after (other processes on this machine skew the times)")
        print("\n| schedule | m | impl | step median (min) | ours/torch: median (min) | idle per rank, measured "
              "(median) | idle formula (unit-cost sim of ours, per rank) | ours vs torch, one step: max rel. diff |")
        print("|---|---|---|---|---|---|---|---|")
        per_schedule: dict[str, list[tuple]] = {}  # the summary: one row per schedule, its m values side by side
        for key in res[0]:
            label, m = key
            r0 = res[0][key]
            names = list(r0["times"])
            step = {n: [max(ts) for ts in zip(*(r[key]["times"][n] for r in res))] for n in names}
            med = {n: statistics.median(step[n]) for n in names}
            formula = _pp_formula(r0["ours"], W, m, r0["v"])
            for n in names:
                idle = [statistics.median(1 - b / t for b, t in zip(r[key]["busy"][n], step[n])) for r in res]
                ratio = chk = ""
                if n == "ours" and "torch" in names:
                    ratio = f"{med['ours'] / med['torch']:.2f} ({min(step['ours']) / min(step['torch']):.2f})"
                if n == "torch":
                    chk = f"loss {r0['loss_rel']:.0e}, gradients {r0['grad_rel']:.0e}"
                impl = "ours" if n == "ours" else f"torch {r0['peer']}"
                print(f"| {label} | {m} | {impl} | {med[n] * 1e3:.0f} ms ({min(step[n]) * 1e3:.0f}) | {ratio} "
                      f"| {' / '.join(f'{100 * i:.0f}%' for i in idle)} | {formula} | {chk} |")
                if n == "ours":
                    idle_ours = " / ".join(f"{100 * i:.0f}%" for i in idle)
            if "torch" in names:
                per_schedule.setdefault(label, []).append((m, step, r0, idle_ours, formula))
        for label, per_m in per_schedule.items():
            cells: dict[str, list[str]] = {"ours": [], "torch": [], "ratio": [], "check": []}
            for m, step, r0, idle_ours, formula in per_m:
                cells["ours"].append(f"m={m}: {_ms(step['ours'])}")
                cells["torch"].append(f"m={m}: {_ms(step['torch'])}")
                cells["ratio"].append(f"m={m}: {_ratio(step['ours'], step['torch'])}")
                cells["check"].append(f"m={m}: max rel. diff loss {r0['loss_rel']:.0e}, grads {r0['grad_rel']:.0e}; "
                                      f"idle per rank, ours {idle_ours}, formula {formula}")
            rows.append(_row("PP", f"ours vs torch {per_m[0][2]['peer']}, {label}, {W} ranks: step time "
                                   f"(fwd+bwd of m micro-batches)", "; ".join(cells["ours"]),
                             "; ".join(cells["torch"]), "; ".join(cells["ratio"]) + " of torch's time",
                             "; ".join(cells["check"])))
    return rows


# ---------------------------------------------------------------------------------------
# cp: context parallel (context_parallel.py): the longest sequence that fits a per-rank
# memory budget at cp = 1, 2, 4; step time ring vs all-gather vs no CP; PyTorch's own CP

def _cp_attach(model: llama.Transformer, group, cp: int, seq: int, rotate: str) -> None:
    """(Re)apply context parallel for this sequence length (all-gather bakes it into its
    mask): put the default attention back first, then apply_cp when cp > 1."""
    import context_parallel
    for block in model.layers.values():
        block.attention.attention_fn = llama.causal_attention
    if cp > 1:
        context_parallel.apply_cp(model, group, seq, rotate)


def _cp_step(model, optimizer, tokens: torch.Tensor, cp: int, rank: int, group) -> float:
    """One training step on this rank's shard of one sequence (batch 1): forward with the
    global RoPE positions, backward, gradients summed over cp (the trainer folds cp into
    FSDP; here a plain all-reduce per parameter), AdamW. Returns this rank's loss share
    (the loss is a token sum / S, so the cp shares add up to the full-sequence loss)."""
    import context_parallel
    seq = tokens.shape[1] - 1
    inputs, labels = tokens[:, :-1], tokens[:, 1:]  # labels shifted in the global order, then sharded
    if cp > 1:
        inputs, labels = (context_parallel.shard_sequence(x, rank, cp) for x in (inputs, labels))
    pos = context_parallel.positions(seq, rank, cp)
    loss = train.loss_fn(model(inputs, pos), labels, seq)
    loss.backward()
    if cp > 1:
        for p in model.parameters():
            dist.all_reduce(p.grad, group=group)  # comm: cp group, SUM
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _cp_tokens(seq: int, vocab: int) -> torch.Tensor:
    """The same random sequence on every rank (seeded by its length)."""
    return torch.randint(0, vocab, (1, seq + 1), generator=torch.Generator().manual_seed(1000 + seq))


def _cp_maxrss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _cp_mem_rank(rank: int, world: int, cfg: dict) -> dict:
    """One rank of the memory searches at cp = world, one per attention in cfg["rotates"]:
    every rank runs the same search, its decisions taken on the peak all-reduced (MAX)
    over the ranks, so all agree. Per-rank peak of one step = _LiveBytes (live tensor
    bytes, allocator-free). The process's RSS high-water mark is monotonic: its growth
    is recorded after the first search only."""
    cp, unit, group, budget = world, cfg["unit"], dist.group.WORLD, cfg["budget"]
    args = llama.model_args("debug")
    model, optimizer = _train_setup(args, torch.float32)
    rss0 = _cp_maxrss()  # before the first step: no AdamW state, no gradients yet
    _cp_attach(model, group, cp, unit, cfg["rotates"][0])
    _cp_step(model, optimizer, _cp_tokens(unit, args.vocab_size), cp, rank, group)  # AdamW state exists
    result = {}
    for rotate in cfg["rotates"]:
        peaks: dict[int, int] = {}

        def measure(seq: int) -> int:
            if seq not in peaks:
                _cp_attach(model, group, cp, seq, rotate)
                tokens = _cp_tokens(seq, args.vocab_size)
                seed = list(model.parameters()) + [v for st in optimizer.state.values() for v in st.values()
                                                   if isinstance(v, torch.Tensor)]
                dist.barrier()
                with _LiveBytes(seed) as tally:
                    _cp_step(model, optimizer, tokens, cp, rank, group)
                peak = torch.tensor([tally.peak], dtype=torch.int64)
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
                peaks[seq] = int(peak.item())
            return peaks[seq]

        lo, hi = cfg["fit_seqs"]
        for s in (lo, hi):
            measure(s)
        if budget is None:
            budget = measure(cfg["budget_seq"])
        slope = (peaks[hi] - peaks[lo]) / (hi - lo)  # bytes per token of the whole sequence
        guess = int((budget - (peaks[lo] - slope * lo)) / max(slope, 1.0)) // unit * unit
        seq = min(max(unit, guess), cfg["max_seq"])
        capped, tries = False, 0
        if measure(seq) <= budget:  # walk up in steps of `unit` while it fits
            while True:
                if seq + unit > cfg["max_seq"] or tries >= cfg["max_tries"]:
                    capped = True
                    break
                tries += 1
                if measure(seq + unit) > budget:
                    break
                seq += unit
        else:  # walk down until it fits
            while seq > unit and tries < cfg["max_tries"] and measure(seq) > budget:
                seq -= unit
                tries += 1
            if measure(seq) > budget:
                seq = 0
        result[rotate] = {"peaks": peaks, "budget": budget, "longest": seq, "capped": capped,
                          "rss_growth": _cp_maxrss() - rss0 if rotate == cfg["rotates"][0] else None}
    return result


CP_TIME_CONFIGS = (("no CP", 1, "ring"), ("ring", 2, "ring"), ("all-gather", 2, "allgather"),
                   ("ring", 4, "ring"), ("all-gather", 4, "allgather"))


def _cp_time_rank(rank: int, world: int, cfg: dict) -> dict:
    """One rank of the step-time comparison: every configuration (cp ranks 0..cp-1; the
    others wait at the barrier) from the same weights on the same sequence; first-step
    losses; interleaved timed steps; the communication of one step each; then PyTorch's
    context_parallel tried on all `world` ranks."""
    counter = _CommCounter()
    counter.install(TP_COLLECTIVES)
    args, seq = llama.model_args("debug"), cfg["seq"]
    configs = [c for c in CP_TIME_CONFIGS if c[1] <= world]
    groups = {cp: dist.new_group(list(range(cp))) for cp in sorted({c[1] for c in configs}) if cp > 1}
    tokens = _cp_tokens(seq, args.vocab_size)
    impls = {}
    for name, cp, rotate in configs:
        if rank < cp:
            model, optimizer = _train_setup(args, torch.float32)
            _cp_attach(model, groups.get(cp), cp, seq, rotate)
            impls[(name, cp)] = (model, optimizer)
    result = {"loss": {}, "times": {}, "comm": {}}

    def run(name, cp) -> float | None:
        dist.barrier()
        if (name, cp) not in impls:
            return None
        model, optimizer = impls[(name, cp)]
        loss = _cp_step(model, optimizer, tokens, cp, rank, groups.get(cp))
        if cp > 1:
            t = torch.tensor([loss], dtype=torch.float64)
            dist.all_reduce(t, group=groups[cp])
            loss = t.item()
        return loss

    for name, cp, _ in configs:  # first step: the same weights and tokens for all
        result["loss"][(name, cp)] = run(name, cp)
    for _ in range(cfg["warmup"] - 1):
        for name, cp, _ in configs:
            run(name, cp)
    for rep in range(cfg["reps"]):  # interleaved, alternating the order
        for name, cp, _ in (configs if rep % 2 == 0 else configs[::-1]):
            dist.barrier()
            start = time.perf_counter()
            if (name, cp) in impls:
                model, optimizer = impls[(name, cp)]
                _cp_step(model, optimizer, tokens, cp, rank, groups.get(cp))
                result["times"].setdefault((name, cp), []).append(time.perf_counter() - start)
    for name, cp, _ in configs:
        dist.barrier()
        counter.reset()
        if (name, cp) in impls:
            model, optimizer = impls[(name, cp)]
            _cp_step(model, optimizer, tokens, cp, rank, groups.get(cp))
            result["comm"][(name, cp)] = (dict(counter.calls), dict(counter.bytes))
    del impls
    result["torch_cp"] = _cp_try_torch(rank, world, args, tokens)
    return result


def _cp_try_torch(rank: int, world: int, args: llama.ModelArgs, tokens: torch.Tensor) -> dict:
    """PyTorch's context_parallel (torch.distributed.tensor.experimental) on the same model,
    weights and sequence over all ranks: its load balancer shards inputs, labels and the
    RoPE positions in place; its SDPA dispatch does the ring. Returns the loss of one step
    and step times, or the error (it handles only the CUDA SDPA ops)."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel as torch_cp
        mesh = init_device_mesh("cpu", (world,))
        model, optimizer = _train_setup(args, torch.float32)
        times, loss0 = [], None
        for _ in range(3):
            inputs, labels = tokens[:, :-1].clone(), tokens[:, 1:].clone()
            pos = torch.arange(inputs.shape[1])
            dist.barrier()
            start = time.perf_counter()
            with torch_cp(mesh, buffers=[inputs, labels, pos], buffer_seq_dims=[1, 1, 0],
                          no_restore_buffers={inputs, labels, pos}):
                loss = train.loss_fn(model(inputs, pos), labels, tokens.shape[1] - 1)
                loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
            if loss0 is None:
                t = torch.tensor([loss.item()], dtype=torch.float64)
                dist.all_reduce(t)
                loss0 = t.item()
        return {"loss": loss0, "times": times}
    except Exception as e:  # raised on every rank alike, before any collective of its own
        return {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"}


def _cp_ram() -> str:
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        return f"{kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        return "RAM unknown"


def bench_cp(budget_seq: int, budget_mib: float | None, cps: list[int], rotates: list[str], seq: int, reps: int,
             warmup: int, time_cp: int, parts: tuple[str, ...] = ("memory", "time")) -> list[dict]:
    """Context parallel (context_parallel.py) on the debug Llama, float32, batch 1, random
    tokens; a step is forward + backward + gradient all-reduce over cp + AdamW (no clipping).
    1) Memory: per-rank peak of live tensor bytes in one step (bench._LiveBytes, a
    TorchDispatchMode tally: parameters and AdamW state, plus every storage an op returns
    until Python frees it; independent of the allocator and of other processes; kernel-
    internal scratch and gloo buffers are not seen), the max over ranks. The budget is
    cp=1's peak at `budget_seq` (or `budget_mib`); for each cp the longest seq_len in
    steps of u = budget_seq * cp / 16 that fits is found by an affine fit of two small
    lengths, then verified: it fits and seq_len + u does not (each measured).
    2) Step time at `seq`: no CP (1 rank), ring and all-gather at cp=2 and 4, interleaved.
    3) PyTorch's own context_parallel, tried on the same model."""
    cores = os.cpu_count()
    print(f"\nContext parallel (context_parallel.py), {machine()}, {cores} cores, {_cp_ram()}, "
          f"torch {torch.__version__}; gloo, 1 thread per rank")
    args = llama.model_args("debug")
    psi = llama.num_params(args)
    rows = []
    print(f"model debug (dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, {args.n_kv_heads} KV heads, "
          f"vocab {args.vocab_size}, {psi / 1e6:.2f}M params), float32, batch 1, random tokens; step = forward + "
          f"backward + gradient all-reduce over cp (SUM) + AdamW")

    if "memory" in parts:
        # 1) The longest sequence in the budget.
        load0 = os.getloadavg()[0]
        start = time.perf_counter()
        budget = None if budget_mib is None else int(budget_mib * 2**20)
        found = {}
        for cp in [1] + [c for c in cps if c > 1]:
            unit = max(2 * cp, budget_seq * cp // 16 // (2 * cp) * (2 * cp))
            cfg = dict(rotates=["ring"] if cp == 1 else rotates, unit=unit, budget=budget, budget_seq=budget_seq,
                       fit_seqs=(budget_seq * cp // 4, budget_seq * cp // 2), max_seq=3 * budget_seq * cp, max_tries=8)
            res = _run_ranks(_cp_mem_rank, cp, cfg)
            for rotate in cfg["rotates"]:
                growth = [r[rotate]["rss_growth"] for r in res]
                found[(cp, rotate)] = dict(res[0][rotate], unit=unit,
                                           rss_growth=None if None in growth else max(growth))
                budget = res[0][rotate]["budget"]
        mem_s = time.perf_counter() - start
        print(f"\nLongest sequence whose per-rank peak fits the budget {_mib(budget)} "
              f"({'cp=1 at seq_len ' + str(budget_seq) if budget_mib is None else 'given'}); "
              f"step u = budget_seq x cp / 16; "
              f"searched in {mem_s:.0f} s, 1-min load average {load0:.1f} before")
        print("peak = max over ranks of live tensor bytes in one step (TorchDispatchMode tally of parameters, AdamW "
              "state and every storage an op returns until freed; allocator-independent; kernel scratch and gloo "
              "buffers unseen)")
        print("\n| cp | attention | longest seq_len | ratio to cp=1 | tokens per rank | peak at it | peak at +u "
              "| steps measured |")
        print("|---|---|---|---|---|---|---|---|")
        base = found[(1, "ring")]["longest"]
        for (cp, rotate), f in found.items():
            s, u = f["longest"], f["unit"]
            above = f["peaks"].get(s + u)
            print(f"| {cp} | {'none' if cp == 1 else rotate} | {'>= ' if f['capped'] else ''}{s} | "
                  f"{s / base:.2f} | {s // cp} | {_mib(f['peaks'][s]) if s in f['peaks'] else '-'} | "
                  f"{_mib(above) if above is not None else '-'} | {len(f['peaks'])} |")
            if cp > 1:
                rows.append(_row("CP", f"cp={cp} {rotate} attention vs no CP: longest seq_len whose per-rank peak "
                                       f"fits {_mib(budget)} (no CP's at {budget_seq})",
                                 f"{'>= ' if f['capped'] else ''}{s} ({s // cp} per rank)", f"{base} (no CP)",
                                 f"{s / base:.2f}x the sequence",
                                 f"peak at it {_mib(f['peaks'][s]) if s in f['peaks'] else '-'}, at +{u} tokens "
                                 f"{_mib(above) if above is not None else '-'}"))

        # Validation: peak against seq_len, an affine fit, and the process's RSS high-water mark.
        print("\nValidation of the memory measure: every measured (seq_len: peak); affine fit over them "
              f"against the tokens the rank holds (intercept: parameters + AdamW state 12 Psi = {_mib(12 * psi)}, + "
              f"gradients 16 Psi = {_mib(16 * psi)}; slope: bytes per local token); growth of the process's max RSS "
              "(ru_maxrss, max over ranks, from before the first step to the end of the first search of the process) "
              "vs the largest peak less the parameters (4 Psi)")
        print("\n| cp | attention | seq_len: peak (MiB) | fit intercept | slope per local token | worst fit error "
              "| RSS growth | largest peak - 4 Psi |")
        print("|---|---|---|---|---|---|---|---|")
        for (cp, rotate), f in found.items():
            pts = sorted(f["peaks"].items())
            xs, ys = [s / cp for s, _ in pts], [float(p) for _, p in pts]
            mx, my = statistics.mean(xs), statistics.mean(ys)
            b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            a = my - b * mx
            err = max(abs(a + b * x - y) / y for x, y in zip(xs, ys))
            print(f"| {cp} | {'none' if cp == 1 else rotate} | {', '.join(f'{s}: {p / 2**20:.0f}' for s, p in pts)} "
                  f"| {_mib(a)} | {b / 1024:.1f} KiB | {100 * err:.1f}% "
                  f"| {_mib(f['rss_growth']) if f['rss_growth'] is not None else '-'} "
                  f"| {_mib(max(ys) - 4 * psi)} |")

    if "time" in parts:
        # 2) Step time at a fixed length.
        world = min(time_cp, max(c[1] for c in CP_TIME_CONFIGS))
        load0 = os.getloadavg()[0]
        res = _run_ranks(_cp_time_rank, world, dict(seq=seq, reps=reps, warmup=max(1, warmup)))
        load1 = os.getloadavg()[0]
        configs = [c for c in CP_TIME_CONFIGS if c[1] <= world]
        times = {}
        for name, cp, _ in configs:
            per_rank = [r["times"][(name, cp)] for r in res[:cp]]
            times[(name, cp)] = [max(ts) for ts in zip(*per_rank)]
        base_key = ("no CP", 1)
        ref_loss = res[0]["loss"][base_key]
        print(f"\nStep time at seq_len {seq}: {reps} interleaved repetitions after {max(1, warmup)} warmup, "
              f"median (min); "
              f"a step's time is its slowest rank's; ranks of other configurations wait at a barrier. {cores} cores: "
              f"cp=2 puts one rank on each core, cp=4 puts 4 ranks on {cores} cores (oversubscribed), no CP uses one "
              f"core. 1-min load average {load0:.1f} before, {load1:.1f} after (other processes skew the times)")
        print("\n| attention | cp | step median (min) | ratio to no CP: median (min) | tokens/s per rank | tokens/s all ranks "
              "| attention comm sent per rank (formula) | first-step loss rel. diff vs no CP |")
        print("|---|---|---|---|---|---|---|---|")
        hkv, hd, L = args.kv_heads, args.head_dim, args.n_layers
        for name, cp, rotate in configs:
            ts = times[(name, cp)]
            med = statistics.median(ts)
            bmed, bmin = statistics.median(times[base_key]), min(times[base_key])
            calls, nbytes = res[0]["comm"][(name, cp)]
            attn = {k: v for k, v in nbytes.items() if k != "all_reduce"}
            kv_r = 2 * hkv * (seq // cp) * hd * 4  # packed K and V of this rank's tokens, float32
            formula = L * (3 * cp - 2) * kv_r if rotate == "ring" else L * 2 * (cp - 1) * kv_r
            formula = 0 if cp == 1 else formula
            rel = abs(res[0]["loss"][(name, cp)] - ref_loss) / abs(ref_loss)
            print(f"| {name} | {cp} | {med * 1e3:.0f} ms ({min(ts) * 1e3:.0f}) | {med / bmed:.2f} ({min(ts) / bmin:.2f}) "
                  f"| {seq / cp / med:,.0f} | {seq / med:,.0f} | {_mib(_ring_sent(attn, cp))} ({_mib(formula)}) "
                  f"| {rel:.1e} |")
            if cp > 1:
                where = f"{cp} ranks on {cores} cores{' (oversubscribed)' if cp > cores else ''}"
                rows.append(_row("CP", f"{name} attention, cp={cp} ({where}) vs no CP (1 rank): step time at "
                                       f"seq_len {seq}", _ms(ts), _ms(times[base_key]),
                                 _ratio(ts, times[base_key]) + " of no CP's time",
                                 f"first-step loss rel. diff {rel:.1e}; attention bytes sent per rank "
                                 f"{_mib(_ring_sent(attn, cp))}, formula {_mib(formula)}"))
        print(f"formula (context_parallel.py docstring): ring L (3cp-2) |KV_r| (forward cp-1 K/V blocks, backward cp-1 "
              f"K/V blocks + cp float32 dK/dV accumulators), all-gather L 2(cp-1) |KV_r| (all-gather + reduce-scatter), "
              f"|KV_r| = 2 Hkv (S/cp) hd 4 B; plus the gradient all-reduce of 4 Psi = {_mib(4 * psi)} per step (not in "
              f"the column)")
        tcp = res[0]["torch_cp"]
        ours_ring = times[("ring", world)]
        comparison = f"ours (ring) vs PyTorch's context_parallel, cp={world}: step time at seq_len {seq}"
        if "error" in tcp:
            print(f"\nPyTorch context_parallel (torch.distributed.tensor.experimental), cp={world}: not available on CPU: "
                  f"{tcp['error']}")
            rows.append(_row("CP", comparison, _ms(ours_ring), "does not run", f"no comparison: {tcp['error']}"))
        else:
            rel = abs(tcp["loss"] - ref_loss) / abs(ref_loss)
            ts = [max(t) for t in zip(*(r["torch_cp"]["times"] for r in res))]
            print(f"\nPyTorch context_parallel, cp={world}: first-step loss rel. diff vs no CP {rel:.1e}; 3 steps "
                  f"(not interleaved): median {statistics.median(ts) * 1e3:.0f} ms (min {min(ts) * 1e3:.0f})")
            rows.append(_row("CP", comparison, _ms(ours_ring), _ms(ts) + " (3 steps, not interleaved)",
                             _ratio(ours_ring, ts) + " of PyTorch's time",
                             f"PyTorch's first-step loss rel. diff vs no CP {rel:.1e}"))
    return rows


# ---------------------------------------------------------------------------------------
# all: every bench above with its default arguments, one summary table of their headline rows

BENCHES = {"mfu": "MFU", "fsdp": "FSDP", "tp": "TP", "float8": "float8", "checkpoint": "checkpoint", "pp": "PP",
           "cp": "CP"}  # subcommand -> its rows' technique
# --quick: smoke-test sizes (every code path, seconds to a minute each); never figures.
QUICK_ARGS = {
    "mfu": ["--steps", "1", "--warmup", "0", "--models", "debug"],
    "fsdp": ["--ranks", "2", "--steps", "1", "--rounds", "1", "--dim", "64", "--layers", "1", "--batch", "1",
             "--seq", "32"],
    "tp": ["--ranks", "2", "--reps", "1", "--dim", "64", "--layers", "1", "--seq", "32", "--op-reps", "1",
           "--no-op-shapes"],
    "float8": ["--M", "16", "--reps", "1", "--warmup", "1", "--shape-div", "16"],
    "checkpoint": ["--ranks", "2", "1", "--reps", "1", "--dim", "64", "--layers", "1", "--vocab", "256",
                   "--steps", "1", "--step-reps", "1"],
    "pp": ["--ranks", "2", "--micro", "2", "--reps", "1", "--warmup", "0", "--dim", "64", "--layers", "4",
           "--seq", "32"],
    "cp": ["--budget-seq", "256", "--cps", "2", "--seq", "256", "--reps", "1", "--warmup", "1", "--time-cp", "2"],
}


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _error_line(e: BaseException) -> str:
    """The exception's last line: a failed rank's RuntimeError carries the rank's
    traceback, whose last line is what went wrong there."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def bench_all(parser: argparse.ArgumentParser, names: list[str], quick: bool, out: str, command: str) -> int:
    """Run the benches one after another (each prints its detailed tables on stdout, as
    when run alone), collect their headline rows into one Markdown table and write it to `out`
    with the machine, date, command and wall time per bench; a failed bench becomes a
    FAILED row (its traceback on stderr). Returns the exit status: 1 if any failed."""
    load0, start = os.getloadavg()[0], time.perf_counter()
    rows, walls, failed = [], {}, []
    for i, name in enumerate(names, 1):
        argv = [name] + (QUICK_ARGS[name] if quick else [])
        print(f"[all {i}/{len(names)}] python bench.py {' '.join(argv)}: started at "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            rows += _run_bench(parser.parse_args(argv))
        except Exception as e:
            traceback.print_exc()
            failed.append(name)
            rows.append(_row(BENCHES[name], f"python bench.py {' '.join(argv)}", "-", "-",
                             f"FAILED: {_error_line(e)}", "traceback on stderr"))
        walls[name] = time.perf_counter() - t0
        sys.stdout.flush()
        print(f"[all {i}/{len(names)}] {name}: {'FAILED' if name in failed else 'done'} in {walls[name]:.0f} s; "
              f"{time.perf_counter() - start:.0f} s elapsed", file=sys.stderr, flush=True)
    total = time.perf_counter() - start
    lines = [f"# nanotitan benchmarks: summary{' — QUICK RUN, NOT FIGURES' if quick else ''}", ""]
    if quick:
        lines += ["**A `--quick` run: smoke-test sizes (QUICK_ARGS in bench.py), to check that every bench runs. "
                  "Its numbers are not measurements: do not quote or embed them.**", ""]
    if names != list(BENCHES):
        lines += [f"A subset: {', '.join(names)} (of {', '.join(BENCHES)}).", ""]
    lines += [
        f"- machine: {machine()}, {os.cpu_count()} cores, {_cp_ram()}; torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; command: `{command}`; 1-min load "
        f"average {load0:.1f} before, {os.getloadavg()[0]:.1f} after (other processes skew the times)",
        "- each row: ours against the peer (PyTorch's own implementation, or the stated baseline) on the same model, "
        "ranks and machine in the same run, interleaved; times median (min); a time ratio is ours / peer of the "
        "medians (of the mins): below 1, ours takes less; float8's speedups are bf16 / float8 (above 1: faster); "
        "CP's sequence ratio is ours / no CP (above 1: longer). The detailed tables are this run's stdout "
        "(`python bench.py NAME` prints one bench's)",
        "",
        "| " + " | ".join(SUMMARY_COLUMNS) + " |",
        "|" + "---|" * len(SUMMARY_COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(r[c]) for c in SUMMARY_COLUMNS) + " |" for r in rows]
    lines += ["", "Wall time per bench: " + ", ".join(f"{n} {walls[n]:.0f} s" + (" (FAILED)" if n in failed else "")
                                                    for n in names) + f"; {total:.0f} s in all."]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print("\n" + text)
    print(f"[all] wrote {out}; {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; {total:.0f} s in all",
          file=sys.stderr)
    return 1 if failed else 0


def _run_bench(cli: argparse.Namespace) -> list[dict]:
    if cli.bench == "mfu":
        return bench_mfu(cli.steps, cli.warmup, cli.dtypes, cli.models)
    if cli.bench == "fsdp":
        return bench_fsdp(cli.ranks, cli.steps, cli.warmup, cli.rounds, cli.dim, cli.layers, cli.batch, cli.seq,
                          cli.micro, cli.profile)
    if cli.bench == "tp":
        return bench_tp(cli.ranks, cli.reps, cli.warmup, cli.dim, cli.layers, cli.batch, cli.seq, cli.op_reps,
                        not cli.no_op_shapes)
    if cli.bench == "float8":
        return bench_float8(cli.M, cli.reps, cli.warmup, cli.compile, cli.shape_div)
    if cli.bench == "checkpoint":
        return bench_checkpoint(cli.ranks, cli.reps, cli.dim, cli.layers, cli.vocab, cli.steps, cli.step_reps,
                                cli.batch, cli.seq, cli.tmp)
    if cli.bench == "pp":
        return bench_pp(cli.ranks, cli.micro, cli.reps, cli.warmup, cli.dim, cli.layers, cli.batch, cli.seq)
    if cli.bench == "cp":
        return bench_cp(cli.budget_seq, cli.budget_mib, cli.cps, cli.rotates, cli.seq, cli.reps, cli.warmup,
                        cli.time_cp, cli.parts)
    raise ValueError(f"unknown bench {cli.bench!r}; choose one of {list(BENCHES)}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    mfu = sub.add_parser("mfu", help="single-process training MFU and step-time breakdown")
    mfu.add_argument("--steps", type=int, default=10)
    mfu.add_argument("--warmup", type=int, default=3)
    mfu.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(config.DTYPES))
    mfu.add_argument("--models", nargs="+", default=["debug", "wide"], choices=["debug", "wide"],
                     help="debug: dim 256; wide: dim 1024 (4 layers each)")
    fs = sub.add_parser("fsdp", help="ours vs PyTorch FSDP2 on gloo ranks: step time, memory, bytes")
    fs.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    fs.add_argument("--steps", type=int, default=4, help="timed steps per round")
    fs.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 3: the loss check)")
    fs.add_argument("--rounds", type=int, default=5, help="interleaved rounds per implementation")
    fs.add_argument("--dim", type=int, default=256)
    fs.add_argument("--layers", type=int, default=4)
    fs.add_argument("--batch", type=int, default=4, help="sequences per micro-batch per rank")
    fs.add_argument("--seq", type=int, default=256)
    fs.add_argument("--micro", type=int, default=1, help="micro-batches per step")
    fs.add_argument("--profile", type=int, default=0, help="print the top N self-time ops of one step (rank 0)")
    tp = sub.add_parser("tp", help="ours vs PyTorch DTensor TP on gloo ranks: step time, bytes; async vs sync "
                                   "TP: step time, hidden communication")
    tp.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="the ring ops run at 2 ranks only")
    tp.add_argument("--reps", type=int, default=8, help="timed interleaved steps per implementation")
    tp.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 3: the loss check)")
    tp.add_argument("--dim", type=int, default=512)
    tp.add_argument("--layers", type=int, default=2)
    tp.add_argument("--batch", type=int, default=1)
    tp.add_argument("--seq", type=int, default=512)
    tp.add_argument("--op-reps", type=int, default=8, help="timed interleaved reps of each ring-op variant "
                                                           "(3x for the model's shape)")
    tp.add_argument("--no-op-shapes", action="store_true", help="skip §3.3's comm-heavy and compute-bound shapes")
    f8 = sub.add_parser("float8", help="float8 linear vs bf16 (and fp32 on CPU) on Llama 3 8B shapes: "
                                        "fwd+bwd time and SQNR")
    f8.add_argument("--M", type=int, default=None, help="tokens per matmul (default 8192 on CUDA, 256 on CPU)")
    f8.add_argument("--reps", type=int, default=None, help="timed interleaved reps (default 20 on CUDA, 3 on CPU)")
    f8.add_argument("--warmup", type=int, default=None, help="untimed runs per impl first (default 3 on CUDA, 1 on CPU)")
    f8.add_argument("--compile", action="store_true", help="wrap every impl in torch.compile (slow to compile on CPU)")
    f8.add_argument("--shape-div", type=int, default=1, help="divide every K and N by this (a smoke test; 1 = the "
                                                              "8B shapes)")
    ck = sub.add_parser("checkpoint", help="ours vs torch.distributed.checkpoint on FSDP-sharded state: save/load "
                                           "time, bytes on disk; blocking vs async save: training stall")
    ck.add_argument("--ranks", type=int, nargs="+", default=[2, 1], help="1 = one process, unsharded model")
    ck.add_argument("--reps", type=int, default=3, help="interleaved reps of every save mode and load")
    ck.add_argument("--dim", type=int, default=1024)
    ck.add_argument("--layers", type=int, default=2)
    ck.add_argument("--vocab", type=int, default=4096)
    ck.add_argument("--steps", type=int, default=3, help="training steps after an async save (0: skip)")
    ck.add_argument("--step-reps", type=int, default=3, help="interleaved reps of save + steps")
    ck.add_argument("--batch", type=int, default=1)
    ck.add_argument("--seq", type=int, default=32)
    ck.add_argument("--tmp", default="/tmp", help="where the checkpoints are written (a fresh directory in it)")
    pp = sub.add_parser("pp", help="ours vs torch.distributed.pipelining (GPipe, 1F1B, interleaved 1F1B, zero "
                                   "bubble) on gloo ranks: step time, measured bubble")
    pp.add_argument("--ranks", type=int, nargs="+", default=[2], help="pipeline ranks (4 oversubscribes 2 cores)")
    pp.add_argument("--micro", type=int, nargs="+", default=[4, 8], help="micro-batches per step (m)")
    pp.add_argument("--reps", type=int, default=6, help="timed interleaved steps per implementation")
    pp.add_argument("--warmup", type=int, default=1, help="untimed steps each after the checked one")
    pp.add_argument("--dim", type=int, default=256)
    pp.add_argument("--layers", type=int, default=7, help="7 balances the stages at dim 256 (output ~ 1.2 "
                                                          "layers): v=1 4+3 layers, v=2 2+2+2+1")
    pp.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    pp.add_argument("--seq", type=int, default=256)
    cpp = sub.add_parser("cp", help="context parallel: longest sequence in a per-rank memory budget at cp = 1, 2, "
                                    "4; step time ring vs all-gather vs no CP; PyTorch's context_parallel")
    cpp.add_argument("--budget-seq", type=int, default=2048, help="the budget is cp=1's per-rank peak at this seq_len")
    cpp.add_argument("--budget-mib", type=float, default=None, help="a fixed per-rank budget in MiB instead")
    cpp.add_argument("--cps", type=int, nargs="+", default=[2, 4], help="cp degrees searched besides cp=1")
    cpp.add_argument("--rotates", nargs="+", default=["ring", "allgather"], choices=["ring", "allgather"])
    cpp.add_argument("--seq", type=int, default=4096, help="seq_len of the step-time comparison")
    cpp.add_argument("--reps", type=int, default=5, help="timed interleaved steps per configuration")
    cpp.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration first (the first: losses)")
    cpp.add_argument("--time-cp", type=int, default=4, choices=[2, 4], help="largest cp in the step-time comparison")
    cpp.add_argument("--parts", nargs="+", default=["memory", "time"], choices=["memory", "time"],
                     help="the memory search, the step-time comparison (with PyTorch's CP), or both")
    al = sub.add_parser("all", help="every bench above with its default arguments, one after another; one summary "
                                    "table of their headline figures, written to --out and printed")
    al.add_argument("--out", default=None, help="the summary file (default: bench_all.md in the repo root; with "
                                                "--quick runs/bench_all_quick.md, with --only runs/bench_all_only.md, "
                                                "so a trial never overwrites the figures)")
    al.add_argument("--only", nargs="+", choices=list(BENCHES), default=None, help="run these benches only (a trial)")
    al.add_argument("--quick", action="store_true", help="smoke-test sizes (QUICK_ARGS): checks that everything "
                                                         "runs; the file says so, its numbers are not figures")
    return parser


def main() -> int:
    parser = _parser()
    cli = parser.parse_args()
    if cli.bench != "all":
        _run_bench(cli)
        return 0
    names = [n for n in BENCHES if cli.only is None or n in cli.only]
    root = os.path.dirname(os.path.abspath(__file__))
    out = cli.out or (os.path.join(root, "runs", "bench_all_quick.md") if cli.quick else
                      os.path.join(root, "runs", "bench_all_only.md") if cli.only else
                      os.path.join(root, "bench_all.md"))
    return bench_all(parser, names, cli.quick, out, "python " + " ".join(sys.argv))


if __name__ == "__main__":
    raise SystemExit(main())
