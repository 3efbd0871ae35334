"""CP: context parallel (context_parallel.py): how much longer a sequence fits per rank,
what it costs in step time, and PyTorch's own context_parallel on the same model.

    python bench/cp.py [--quick] [--budget-seq 2048] [--cps 2 4] [--seq 4096] [--parts memory time]

The debug Llama, float32, batch 1, random tokens; a step = forward + backward + the
gradient all-reduce over cp (SUM) + AdamW. There is no peer to time against on CPU
(PyTorch's context_parallel handles only the CUDA attention ops: tried, and reported).
1) Memory: a step's per-rank peak = the parameters and AdamW state held + the CPU
   allocator's peak during the step (bench.common.peak_bytes), the max over ranks. The
   budget is cp=1's peak at --budget-seq; for each cp and attention (ring, all-gather)
   the longest seq_len in steps of u = budget_seq x cp / 16 that fits: from the guess of
   an affine fit of two small lengths, up in doubling steps, then bisection; verified:
   it fits and seq_len + u does not (both measured).
2) Step time at --seq: no CP (1 rank), ring and all-gather at cp = 2 and 4, interleaved;
   the first-step losses must equal no CP's within float32's reordering bound (ring
   attention merges blocks in another order), else it raises; the attention bytes of a
   step (comm.CommCounter) against context_parallel.py's formula.
"""

import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702

import argparse
import time

import torch
import torch.distributed as dist

import context_parallel
import llama
import comm
import train
from bench import common

TIME_CONFIGS = (("no CP", 1, "ring"), ("ring", 2, "ring"), ("all-gather", 2, "allgather"), ("ring", 4, "ring"),
                ("all-gather", 4, "allgather"))
QUICK = dict(budget_seq=512, cps=[2], seq=256, reps=2, time_cp=2)


def attach(model: llama.Transformer, group, cp: int, seq: int, rotate: str) -> None:
    """(Re)apply context parallel for this sequence length (all-gather bakes it into its
    mask): the default attention back first, then apply_cp when cp > 1."""
    for block in model.layers.values():
        block.attention.attention_fn = llama.causal_attention
    if cp > 1:
        context_parallel.apply_cp(model, group, seq, rotate)


def step(model, optimizer, tokens: torch.Tensor, cp: int, rank: int, group) -> float:
    """One step on this rank's shard of one sequence; returns this rank's loss share (a
    token sum / S: the cp shares add up to the full-sequence loss)."""
    seq = tokens.shape[1] - 1
    inputs, labels = tokens[:, :-1], tokens[:, 1:]  # shifted in the global order, then sharded
    if cp > 1:
        inputs, labels = (context_parallel.shard_sequence(x, rank, cp) for x in (inputs, labels))
    loss = train.loss_fn(model(inputs, context_parallel.positions(seq, rank, cp)), labels, seq)
    loss.backward()
    if cp > 1:
        for p in model.parameters():
            dist.all_reduce(p.grad, group=group)  # comm: cp group, SUM
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def sequence(seq: int, vocab: int) -> torch.Tensor:
    """The same random sequence on every rank (seeded by its length)."""
    return torch.randint(0, vocab, (1, seq + 1), generator=torch.Generator().manual_seed(1000 + seq))


def mem_rank(rank: int, world: int, cfg: dict) -> dict:
    """The searches at cp = world, one per attention; every rank decides on the peak
    all-reduced (MAX), so all agree."""
    cp, unit, group, budget = world, cfg["unit"], dist.group.WORLD, cfg["budget"]
    args = llama.model_args("debug")
    model, optimizer = common.build(args)
    attach(model, group, cp, unit, cfg["rotates"][0])
    step(model, optimizer, sequence(unit, args.vocab_size), cp, rank, group)  # AdamW state exists from here
    result = {}
    for rotate in cfg["rotates"]:
        peaks: dict[int, int] = {}

        def measure(seq: int) -> int:
            if seq not in peaks:
                attach(model, group, cp, seq, rotate)
                tokens = sequence(seq, args.vocab_size)
                held = common.held_bytes(common.state_tensors(model, optimizer))
                dist.barrier()

                def one_step():
                    with torch.profiler.record_function("cp step"):
                        step(model, optimizer, tokens, cp, rank, group)
                peak = torch.tensor([held + common.peak_bytes(one_step, "cp step")])
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
                peaks[seq] = int(peak.item())
            return peaks[seq]
        lo, hi = cfg["fit_seqs"]
        if budget is None:
            budget = measure(cfg["budget_seq"])
        slope = (measure(hi) - measure(lo)) / (hi - lo)  # bytes per token of the whole sequence
        guess = int((budget - (peaks[lo] - slope * lo)) / max(slope, 1.0)) // unit * unit
        seq, capped = longest(lambda n: measure(n) <= budget, unit, min(max(unit, guess), cfg["max_seq"]),
                              cfg["max_seq"])
        result[rotate] = {"peaks": peaks, "budget": budget, "longest": seq, "capped": capped}
    return result


def longest(fits, unit: int, guess: int, top: int) -> tuple[int, bool]:
    """The longest multiple of `unit` up to `top` that fits (0 if none), starting at the
    affine guess: from there up in doubling steps until one does not fit, then bisect.
    Also whether `top` still fit (the search was capped)."""
    lo, hi, step = (guess, None, unit) if fits(guess) else (0, guess, unit)
    while hi is None:
        if lo + step > top:
            return lo, True
        lo, hi, step = (lo + step, None, 2 * step) if fits(lo + step) else (lo, lo + step, step)
    while hi - lo > unit:
        mid = (lo + hi) // 2 // unit * unit
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, False


def time_rank(rank: int, world: int, cfg: dict) -> dict:
    """Every configuration (on ranks 0..cp-1; the others wait at the barrier) from the
    same weights on the same sequence: first-step losses, interleaved timed steps, the
    collectives of one more step; then PyTorch's context_parallel on all ranks."""
    args, seq = llama.model_args("debug"), cfg["seq"]
    configs = [c for c in TIME_CONFIGS if c[1] <= world]
    groups = {cp: dist.new_group(list(range(cp))) for cp in sorted({c[1] for c in configs}) if cp > 1}
    tokens = sequence(seq, args.vocab_size)
    impls = {}
    for name, cp, rotate in configs:
        if rank < cp:
            impls[name, cp] = common.build(args)
            attach(impls[name, cp][0], groups.get(cp), cp, seq, rotate)
    out = {"loss": {}, "times": {}, "comm": {}}
    for name, cp, _ in configs:
        dist.barrier()
        if (name, cp) in impls:
            loss = torch.tensor([step(*impls[name, cp], tokens, cp, rank, groups.get(cp))], dtype=torch.float64)
            if cp > 1:
                dist.all_reduce(loss, group=groups[cp])
            out["loss"][name, cp] = loss.item()
    for rep in range(cfg["reps"]):  # interleaved, alternating the order
        for name, cp, _ in (configs if rep % 2 == 0 else configs[::-1]):
            dist.barrier()
            start = time.perf_counter()
            if (name, cp) in impls:
                step(*impls[name, cp], tokens, cp, rank, groups.get(cp))
                out["times"].setdefault((name, cp), []).append(time.perf_counter() - start)
    for name, cp, _ in configs:
        dist.barrier()
        if (name, cp) in impls:
            with comm.CommCounter() as seen:
                step(*impls[name, cp], tokens, cp, rank, groups.get(cp))
            out["comm"][name, cp] = sum(b * comm.RING[k](cp) for (_, k), b in seen.bytes.items() if k != "all_reduce")
    out["torch_cp"] = try_torch_cp(world, args, tokens)
    return out


def try_torch_cp(world: int, args: llama.ModelArgs, tokens: torch.Tensor) -> dict:
    """PyTorch's context_parallel (torch.distributed.tensor.experimental) on the same
    model, weights and sequence over all ranks: its load balancer shards inputs, labels
    and positions in place, its SDPA dispatch does the ring. Returns the first loss and
    3 step times, or the error (on CPU: no sharding strategy for the CPU attention op)."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel as torch_cp
        mesh = init_device_mesh("cpu", (world,))
        model, optimizer = common.build(args)
        times, loss0 = [], None
        for _ in range(3):
            inputs, labels, pos = tokens[:, :-1].clone(), tokens[:, 1:].clone(), torch.arange(tokens.shape[1] - 1)
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
                total = torch.tensor([loss.item()], dtype=torch.float64)
                dist.all_reduce(total)
                loss0 = total.item()
        return {"loss": loss0, "times": times}
    except Exception as e:  # raised on every rank alike, before any collective of its own
        return {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"}


def memory(cli: argparse.Namespace) -> tuple[list[str], list[dict]]:
    budget, found = None if cli.budget_mib is None else int(cli.budget_mib * 2**20), {}
    for cp in [1] + [c for c in cli.cps if c > 1]:
        unit = max(2 * cp, cli.budget_seq * cp // 16 // (2 * cp) * (2 * cp))
        cfg = dict(rotates=["ring"] if cp == 1 else cli.rotates, unit=unit, budget=budget, budget_seq=cli.budget_seq,
                   fit_seqs=(cli.budget_seq * cp // 4, cli.budget_seq * cp // 2), max_seq=3 * cli.budget_seq * cp)
        res = common.run_on_ranks(mem_rank, cp, cfg, timeout=3600, pg_timeout_s=600)
        for rotate in cfg["rotates"]:
            found[cp, rotate] = dict(res[0][rotate], unit=unit)
            budget = res[0][rotate]["budget"]
    base, cells, rows = found[1, "ring"]["longest"], [], []
    for (cp, rotate), f in found.items():
        s, u, peaks = f["longest"], f["unit"], f["peaks"]
        longest = f"{'>= ' if f['capped'] else ''}{s}"
        at, above = (common.mib(peaks[x]) if x in peaks else "-" for x in (s, s + u))
        cells.append([cp, "none" if cp == 1 else rotate, longest, f"{s / max(base, 1):.2f}", s // cp, at, above, len(peaks)])
        if cp > 1:
            rows.append(common.row("CP", f"cp={cp} {rotate} attention vs no CP: longest seq_len whose per-rank peak "
                                         f"fits {common.mib(budget)} (no CP's at {cli.budget_seq})",
                                   f"{longest} ({s // cp} per rank)", f"{base} (no CP)", f"{s / max(base, 1):.2f}x the sequence",
                                   f"peak at it {at}, at +{u} tokens {above}"))
    lines = ["### The longest sequence in a per-rank memory budget", "",
             f"Budget {common.mib(budget)} ({'cp=1 at seq_len ' + str(cli.budget_seq) if cli.budget_mib is None else 'given'}"
             "); peak = parameters + AdamW state + the CPU allocator's peak in the step, max over ranks.",
             *common.table(["cp", "attention", "longest seq_len", "ratio to cp=1", "tokens per rank", "peak at it",
                            "peak at +u", "lengths measured"], cells)]
    return lines, rows


def step_time(cli: argparse.Namespace) -> tuple[list[str], list[dict]]:
    args, world = llama.model_args("debug"), cli.time_cp
    res = common.run_on_ranks(time_rank, world, dict(seq=cli.seq, reps=cli.reps), timeout=3600, pg_timeout_s=600)
    configs = [c for c in TIME_CONFIGS if c[1] <= world]
    times = {(n, cp): common.slowest([r["times"][n, cp] for r in res[:cp]]) for n, cp, _ in configs}
    base, ref = times["no CP", 1], res[0]["loss"]["no CP", 1]
    tol = common.parity_tol(torch.float32, cli.seq, args.n_layers)
    kv = 2 * args.kv_heads * args.head_dim * 4 * args.n_layers  # K and V bytes per local token, all layers
    cells, rows = [], []
    for name, cp, rotate in configs:
        rel = common.check_parity(f"CP {name} cp={cp}: first-step loss vs no CP", [res[0]["loss"][name, cp]], [ref], tol)
        formula = 0 if cp == 1 else (3 * cp - 2 if rotate == "ring" else 2 * (cp - 1)) * kv * (cli.seq // cp)
        sent = res[0]["comm"][name, cp]
        cells.append([name, cp, common.ms(times[name, cp]), common.ratio(times[name, cp], base) if cp > 1 else "",
                      f"{cli.seq / cp / (sorted(times[name, cp])[len(base) // 2]):,.0f}",
                      f"{common.mib(sent)} ({common.mib(formula)})", f"{rel:.1e}"])
        if cp > 1:
            where = f"{cp} ranks on {os.cpu_count()} cores{' (oversubscribed)' if cp > os.cpu_count() else ''}"
            rows.append(common.row("CP", f"{name} attention, cp={cp} ({where}) vs no CP (1 rank): step time at "
                                         f"seq_len {cli.seq}", common.ms(times[name, cp]), common.ms(base),
                                   common.ratio(times[name, cp], base), f"asserted: first-step loss within {rel:.0e} "
                                   f"(bound {tol:.0e}); attention bytes sent per rank {common.mib(sent)}, formula "
                                   f"{common.mib(formula)}"))
    tcp, ring = res[0]["torch_cp"], times["ring", world]
    comparison = f"ours (ring) vs PyTorch's context_parallel, cp={world}: step time at seq_len {cli.seq}"
    if "error" in tcp:
        torch_line = f"PyTorch's context_parallel, cp={world}: does not run here: {tcp['error']}"
        rows.append(common.row("CP", comparison, common.ms(ring), "does not run", f"no comparison: {tcp['error']}"))
    else:
        ts = common.slowest([r["torch_cp"]["times"] for r in res])
        rel = abs(tcp["loss"] - ref) / abs(ref)
        torch_line = f"PyTorch's context_parallel, cp={world}: first-step loss rel. diff vs no CP {rel:.1e}; {common.ms(ts)}"
        rows.append(common.row("CP", comparison, common.ms(ring), common.ms(ts) + " (3 steps, not interleaved)",
                               common.ratio(ring, ts), f"PyTorch's first-step loss rel. diff vs no CP {rel:.1e}"))
    lines = [f"### Step time at seq_len {cli.seq}", "",
             f"{cli.reps} interleaved reps after the checked first step; a step = its slowest rank; ranks outside a "
             f"configuration wait at a barrier. First-step losses asserted within {tol:.1e} of no CP's (float32 eps x "
             f"seq x layers). Attention bytes a ring sends per rank (comm.CommCounter, the gradient all-reduce left "
             f"out) against context_parallel.py's formula: ring L (3cp-2) |KV_r|, all-gather L 2(cp-1) |KV_r|, |KV_r| "
             f"= 2 Hkv (S/cp) hd 4 B.",
             *common.table(["attention", "cp", "step", "vs no CP", "tokens/s per rank", "attention bytes sent "
                            "(formula)", "first-step loss rel. diff"], cells), torch_line]
    return lines, rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-seq", type=int, default=2048, help="the budget: cp=1's per-rank peak at this seq_len")
    parser.add_argument("--budget-mib", type=float, default=None, help="a fixed per-rank budget in MiB instead")
    parser.add_argument("--cps", type=int, nargs="+", default=[2, 4], help="cp degrees searched besides cp=1")
    parser.add_argument("--rotates", nargs="+", default=["ring", "allgather"], choices=["ring", "allgather"])
    parser.add_argument("--seq", type=int, default=4096, help="seq_len of the step-time comparison")
    parser.add_argument("--reps", type=int, default=5, help="timed interleaved steps per configuration")
    parser.add_argument("--time-cp", type=int, default=4, choices=[2, 4], help="largest cp in the step-time comparison")
    parser.add_argument("--parts", nargs="+", default=["memory", "time"], choices=["memory", "time"])
    cli = common.parse(parser, argv, QUICK)
    args = llama.model_args("debug")
    intro = (f"Llama debug (dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, {args.kv_heads} KV heads, "
             f"vocab {args.vocab_size}, {llama.num_params(args) / 1e6:.2f}M parameters), float32, batch 1; step = "
             "forward + backward + gradient all-reduce over cp + AdamW; gloo, 1 thread per rank.")
    parts = (fn(cli) for part, fn in (("memory", memory), ("time", step_time)) if part in cli.parts)
    return common.report("cp", "CP: context parallel (context_parallel.py)", intro, parts, cli)


if __name__ == "__main__":
    main()
