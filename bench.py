"""Benchmarks, each printed as a Markdown table with the machine it ran on.

    python bench.py mfu        # single-process training: MFU and where the step time goes
    python bench.py fsdp       # ours vs PyTorch FSDP2 on 2 and 4 gloo ranks: time, memory, bytes
    python bench.py float8     # float8 linear (torch._scaled_mm) vs bf16/fp32 on Llama 3 8B shapes

Protocol (DESIGN.md): compare like with like on the same machine in the same run,
interleave repetitions, report the median and the min; on CPU, MFU is against this
machine's measured GEMM peak, never a vendor figure. Later techniques add their
comparisons against PyTorch's own implementations here.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import platform
import socket
import statistics
import time
import weakref

import torch
import torch.distributed as dist

import float8
import fsdp
import llama
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


def _train_setup(args: llama.ModelArgs, dtype: torch.dtype, seed: int = 0):
    model = llama.build_model(args, "cpu")
    llama.init_weights(model, args, seed)
    if dtype == torch.float64:
        model.to(torch.float64)
    cfg = train.TrainingConfig(lr=1e-3)
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


def bench_mfu(steps: int, warmup: int, dtypes: list[str]) -> None:
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
    peaks = {name: train.measure_gemm_peak(train.DTYPES[name], reps=10) for name in dtypes}
    print(f"\nMFU, single process, {machine()}, torch {torch.__version__}")
    print("peak = measured 1024^3 GEMM: " + ", ".join(f"{n} {p / 1e9:.0f} GFLOP/s" for n, p in peaks.items()))
    print("\n| model | dtype | params | batch x seq | step median (min) | tokens/s | MFU | matmul | attention | other |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (label, (args, batch, seq)), name in itertools.product(shapes.items(), dtypes):
        peak = peaks[name]
        autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=name == "bfloat16")
        model, optimizer = _train_setup(args, train.DTYPES[name])
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

    def install(self) -> None:
        for name in COLLECTIVES:
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
    optimizer = train.build_optimizer(model, train.TrainingConfig(lr=1e-3))
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


def _fsdp_rank(rank: int, world: int, port: int, cfg: dict, queue) -> None:
    """One rank: build both, check equal losses, time interleaved rounds, then measure
    memory and communication of one step each; rank 0 optionally profiles."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
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
        queue.put((rank, result))
    except BaseException:
        import traceback
        queue.put((rank, {"error": traceback.format_exc()}))
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_fsdp_ranks(world: int, cfg: dict) -> list[dict]:
    """Spawn `world` fresh processes (1 thread each, gloo) and collect their results."""
    import torch.multiprocessing as tmp
    ctx = tmp.get_context("spawn")
    queue = ctx.SimpleQueue()
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # read by the children at import
    results = {}
    try:
        procs = tmp.start_processes(_fsdp_rank, args=(world, _free_port(), cfg, queue), nprocs=world,
                                    join=False, start_method="spawn")
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
               seq: int, micro: int, profile: int) -> None:
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
    for W in ranks:
        cfg = dict(dim=dim, layers=layers, batch=batch, seq=seq, micro=micro, steps=steps,
                   warmup=warmup, rounds=rounds, profile=profile)
        load0 = os.getloadavg()[0]
        res = _run_fsdp_ranks(W, cfg)
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
        for n in names:
            calls, nbytes = res[0]["comm"][n]
            ag = sum(v for k, v in nbytes.items() if k.startswith("all_gather"))
            rs = sum(v for k, v in nbytes.items() if k.startswith("reduce_scatter"))
            ar = nbytes.get("all_reduce", 0)
            other = {k: v for k, v in nbytes.items() if not k.startswith(("all_gather", "reduce_scatter", "all_reduce"))}
            sent = ag * (W - 1) + rs * (W - 1) / W + ar * 2 * (W - 1) / W
            ncalls = "/".join(str(sum(v for k, v in calls.items() if k.startswith(p)))
                              for p in ("all_gather", "reduce_scatter", "all_reduce"))
            ratio = f"{med[n] / med['fully_shard']:.2f} ({min(times[n]) / min(times['fully_shard']):.2f})"
            print(f"| {n} | {med[n] * 1e3:.0f} ms ({min(times[n]) * 1e3:.0f}) | {ratio} "
                  f"| {_mib(mem[n])} ({mem[n] / mem['fully_shard']:.2f}) | {_mib(state[n])} "
                  f"| {_mib(ag)} / {_mib(rs)} / {ar} B ({ncalls}){' + ' + str(other) if other else ''} "
                  f"| {_mib(sent)} ({_mib(ag_sent + rs_sent)}) |")
        print("c10d ops seen by the dispatcher in that step (rank 0): "
              + "; ".join(f"{n}: {res[0]['c10d'][n]}" for n in names))
        if profile:
            for n in names:
                wall, top, total = res[0]["profile"][n]
                print(f"\nprofile rank 0, {n}: step {wall * 1e3:.0f} ms, op self time {total * 1e3:.0f} ms; top ops "
                      f"(self ms per step, calls):")
                print("; ".join(f"{k} {t * 1e3:.1f} ({c})" for k, t, c in top))


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


def bench_float8(M: int | None, reps: int | None, warmup: int | None, compile_: bool) -> None:
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
    print(f"Llama 3 8B block shapes, M = {M} tokens per matmul{'' if cuda else ' (the CPU default, so the run takes minutes: at M = 1024 one rep of the emulated bf16 baseline alone takes ~1 min here; 8192 on a GPU)'}; "
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
    for label, K, N in LLAMA3_8B_LINEARS:
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
    print(f"\n{time.perf_counter() - start:.0f} s in all; 1-min load average {load0:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after ({os.cpu_count()} cores: other processes on this machine skew the times)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    mfu = sub.add_parser("mfu", help="single-process training MFU and step-time breakdown")
    mfu.add_argument("--steps", type=int, default=10)
    mfu.add_argument("--warmup", type=int, default=3)
    mfu.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(train.DTYPES))
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
    f8 = sub.add_parser("float8", help="float8 linear vs bf16 (and fp32 on CPU) on Llama 3 8B shapes: "
                                        "fwd+bwd time and SQNR")
    f8.add_argument("--M", type=int, default=None, help="tokens per matmul (default 8192 on CUDA, 256 on CPU)")
    f8.add_argument("--reps", type=int, default=None, help="timed interleaved reps (default 20 on CUDA, 3 on CPU)")
    f8.add_argument("--warmup", type=int, default=None, help="untimed runs per impl first (default 3 on CUDA, 1 on CPU)")
    f8.add_argument("--compile", action="store_true", help="wrap every impl in torch.compile (slow to compile on CPU)")
    cli = parser.parse_args()
    if cli.bench == "mfu":
        bench_mfu(cli.steps, cli.warmup, cli.dtypes)
    elif cli.bench == "fsdp":
        bench_fsdp(cli.ranks, cli.steps, cli.warmup, cli.rounds, cli.dim, cli.layers, cli.batch, cli.seq,
                   cli.micro, cli.profile)
    elif cli.bench == "float8":
        bench_float8(cli.M, cli.reps, cli.warmup, cli.compile)


if __name__ == "__main__":
    main()
