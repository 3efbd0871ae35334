"""The composition matrix: every combination of the parallel techniques that fits in 16
ranks, trained through train.main and compared with the single-process run.

The product: dp {none, FSDP 2, HSDP 2 x 2} x tp {none, sync, async} (2, sequence and
loss parallel) x pp {none, GPipe, 1F1B, interleaved 1F1B (2 stages per rank), zero
bubble} (2, 2 micro-batches) x cp {1, 2} x float8 {off, on (tensorwise; with FSDP the
float8 all-gather)} x activation checkpointing {none, full}; selective checkpointing (per
op, every 2nd block) on the layouts of at most 2 ranks and the 4D layout. What needs
more than 16 ranks (HSDP x TP x PP x CP = 32) is left out of CI (one such layout is the
opt-in `-m slow` test at the end); nothing is refused any more: async TP runs float8
matmuls in its rings, and zero bubble runs with everything (its split backward splits the autograd graph, so FSDP, CP, async TP and
float8 split with it; activation checkpointing runs its stages' full backward in I, said
in the log). Everything else runs 3 SGD steps
(momentum: a wrong gradient scale shows) in one set of ranks per world size, train.main
called once per combination, and each loss and gradient norm is compared with the
single-process run: float32 within distributed.PARITY_BOUNDS (loss 2e-6, gradient norm
3e-7, the step-1 gradient norm 1e-7: ~10x the float32 rounding achieved, 1.7e-7, 1.6e-8
and 8.7e-9 here); float8 against the single-process float8 run with the same
micro-batches (a tensorwise activation scale spans one micro-batch) within FLOAT8_BOUND,
with CP (each cp rank scales its own tokens) within FLOAT8_CP_BOUND. A deliberately
wrong run (FSDP with half the lr, as averaging instead of summing gradients would give)
must fail the loss bound by 1000x (9.7e-3). NANOTITAN_MATRIX_TABLE=path writes the
table of docs/matrix.md. On 16 ranks CI runs the float32 combinations without checkpointing
(22 layouts); their float8 and checkpointing variants (70 more) are the opt-in
`-m slow` part (about 11 minutes on 2 cores). CI's share: about 5 minutes. The whole
matrix, and its table: python -m pytest tests/test_matrix.py -m "slow or not slow".
"""

from __future__ import annotations

import itertools
import math
import os
from typing import NamedTuple

import pytest
from distributed import PARITY_BOUNDS, run_on_ranks

import config
import data
import planner
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3

# test_context_parallel's model (8 heads and 4 KV heads: whole heads on each tp rank)
# with 2 layers (4 for interleaved 1F1B: pp 2 x 2 stages of one layer), on test_train's
# TINY data (dim 64, seq 32, batch 8), float32, SGD with momentum (a wrong gradient
# scale shows in the loss; Adam would normalize it away); the lr warms up over 2 steps,
# then decays. The data: a .bin shard of the first CORPUS_TOKENS of the builtin corpus
# (the builtin tokenizer), so that no run lists the standard library again.
SETUP = ["model.dim=64", "model.n_heads=8", "model.n_kv_heads=4", "data.seq_len=32",
         "training.batch_size=8", "training.warmup_steps=2", f"training.steps={STEPS}", "training.dtype=float32",
         "training.optimizer=sgd", "training.lr=0.5", "training.momentum=0.9", "run.eval_every=0",
         "run.log_every=1", "run.peak_flops=1e12"]
BATCH = 8
PP_MICROBATCHES = 2
CORPUS_TOKENS = 1 << 17

# The axes. Each parallel degree is 2 when on; HSDP is 2 replicas x 2 shards.
DP = {"none": (1, 1), "fsdp": (1, 2), "hsdp": (2, 2)}  # (dp_replicate, dp_shard)
TP = ("none", "sync", "async")
PP = ("none", "gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")
CP = (1, 2)
FLOAT8 = (False, True)
AC = {"none": ["activation_checkpoint.mode=none"], "full": ["activation_checkpoint.mode=full"],
      "op": ["activation_checkpoint.mode=selective", "activation_checkpoint.selective_option=op"],
      "every2": ["activation_checkpoint.mode=selective", "activation_checkpoint.selective_option=2"]}
AC_PRODUCT = ("none", "full")
AC_SELECTIVE = ("op", "every2")

# Tolerances: the largest relative difference from the reference over every step, as
# (loss, gradient norm). float32: the loss-parity tests' bounds, derived from float32
# rounding over 10 steps (3 here amplify less).
FLOAT32_BOUNDS = (PARITY_BOUNDS["loss"], PARITY_BOUNDS["grad_norm"])
STEP1_GRAD_NORM_BOUND = PARITY_BOUNDS["grad_norm_step1"]  # float32: the gradient at the initial weights
FLOAT8_BOUND = 4e-6  # float8 vs the single-process float8 run with the same micro-batches
FLOAT8_CP_BOUND = 1e-4  # float8 with CP: each cp rank scales its own tokens


class Combo(NamedTuple):
    dp: str
    tp: str
    pp: str
    cp: int
    float8: bool
    ac: str

    @property
    def dp_size(self) -> int:
        return math.prod(DP[self.dp])

    @property
    def world(self) -> int:
        return self.dp_size * (2 if self.tp != "none" else 1) * (2 if self.pp != "none" else 1) * self.cp

    @property
    def fsdp(self) -> bool:
        """train.py applies FSDP over dp_shard x cp (and HSDP over dp_replicate)."""
        return self.dp_size * self.cp > 1

    @property
    def micro_batch(self) -> int:
        """Sequences per forward on one rank: what one float8 tensorwise scale of an
        activation or gradient spans (the weights' scales are global)."""
        return BATCH // self.dp_size // (PP_MICROBATCHES if self.pp != "none" else 1)

    @property
    def layers(self) -> int:
        return 4 if self.pp == "interleaved_1f1b" else 2

    def __str__(self) -> str:
        return (f"dp={self.dp} tp={self.tp} pp={self.pp} cp={self.cp} float8={'on' if self.float8 else 'off'} "
                f"ac={self.ac}")

    def overrides(self) -> list[str]:
        replicate, shard = DP[self.dp]
        out = [f"model.n_layers={self.layers}", f"parallel.dp_replicate={replicate}", f"parallel.dp_shard={shard}",
               f"parallel.cp={self.cp}", f"training.micro_batch_size={BATCH // self.dp_size}"]  # no accumulation
        if self.tp != "none":
            out += ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.loss_parallel=true",
                    f"parallel.async_tp={'true' if self.tp == 'async' else 'false'}"]
        if self.pp != "none":
            out += ["parallel.pp=2", f"parallel.pp_schedule={self.pp}", f"parallel.pp_microbatches={PP_MICROBATCHES}",
                    f"parallel.pp_stages_per_rank={2 if self.pp == 'interleaved_1f1b' else 1}"]
        if self.float8:
            out += ["float8.enabled=true", "float8.recipe=tensorwise"]
            if self.fsdp:
                out += ["float8.fsdp_float8_all_gather=true"]
        return out + AC[self.ac]

    def clashes(self) -> list[str]:
        """What config.validate names when it refuses this combination; empty: it runs.
        Nothing is refused now; a future refusal goes here and is asserted by name."""
        return []


def _layouts(world_max: int = 16) -> list[tuple]:
    return [x for x in itertools.product(DP, TP, PP, CP) if Combo(*x, False, "none").world <= world_max]


# The product with AC none / full; selective AC (per op, every 2nd block) on the layouts
# of at most 2 ranks (each technique alone) and the 4D layout, float8 off and on.
PRODUCT = [Combo(*c) for c in itertools.product(DP, TP, PP, CP, FLOAT8, AC_PRODUCT)]
SELECTIVE_LAYOUTS = _layouts(2) + [("fsdp", "sync", "1f1b", 2)]
SELECTIVE = [Combo(*layout, f8, ac) for layout in SELECTIVE_LAYOUTS for f8 in FLOAT8 for ac in AC_SELECTIVE]
OVER_16 = [c for c in PRODUCT if c.world > 16]  # hsdp x tp x pp x cp = 32 ranks
MATRIX = [c for c in PRODUCT + SELECTIVE if c.world <= 16]
REFUSED = [c for c in MATRIX if c.clashes()]
RUNS = [c for c in MATRIX if not c.clashes()]
WORLDS = sorted({c.world for c in RUNS})
OPT_IN = [c for c in RUNS if c.world == 16 and (c.float8 or c.ac != "none")]  # -m slow
TIMEOUT = {1: 300, 2: 300, 4: 600, 8: 1200, 16: 1800}  # s; a hang fails sooner (gloo's 60 s)

# (loss, grad norm) largest relative differences of each run, filled by test_matrix:
# from the single-process run, and for float8 with CP also from its CP anchor
RESULTS: dict[Combo, tuple[float, float]] = {}
ANCHOR_RESULTS: dict[Combo, tuple[float, float]] = {}


# ---------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """The first CORPUS_TOKENS of the builtin training corpus as a .bin shard."""
    tokenizer = data.load_tokenizer("builtin")
    builtin = data.load_dataset("builtin", tokenizer, "train", 32, os.path.join(ROOT, ".cache/data"))
    path = str(tmp_path_factory.mktemp("corpus") / "builtin-prefix.bin")
    data.write_bin(path, builtin.tokens(0, CORPUS_TOKENS), tokenizer)
    return path


def _argv(run_dir: str, corpus: str, *overrides: str) -> list[str]:
    return ["--config", os.path.join(ROOT, "configs/debug.yaml"), *SETUP, f"data.dataset={corpus}",
            f"run.dir={run_dir}", *overrides]


def _curve(argv: list[str]) -> list[tuple[float, float]]:
    return [(r["loss"], r["grad_norm"]) for r in train.main(argv)]


def _train_many(rank: int, world: int, runs: list[tuple[str, list[str]]]) -> dict[str, list[tuple[float, float]]]:
    """train.main for each (name, argv) in turn in this one set of ranks (main reuses the
    harness's default group and destroys only the groups it made): name -> the
    (loss, grad norm) of every step as this rank logged it."""
    out = {}
    for name, argv in runs:
        try:
            out[name] = _curve(argv)
        except Exception as e:
            raise RuntimeError(f"{name}: {type(e).__name__}: {e}") from e
    return out


_references: dict[tuple[int, bool, int], list[tuple[float, float]]] = {}


def _reference(tmp_path_factory, corpus: str, layers: int, float8: bool, micro_batch: int = BATCH
               ) -> list[tuple[float, float]]:
    """The single-process run (in this process), the global batch in micro-batches of
    `micro_batch` (gradient accumulation): the oracle."""
    key = (layers, float8, micro_batch)
    if key not in _references:
        run_dir = str(tmp_path_factory.mktemp(f"ref-{layers}-{'float8' if float8 else 'float32'}-{micro_batch}"))
        f8 = ["float8.enabled=true", "float8.recipe=tensorwise"] if float8 else []
        _references[key] = _curve(_argv(run_dir, corpus, f"model.n_layers={layers}",
                                        f"training.micro_batch_size={micro_batch}", *f8))
    return _references[key]


def _reference_of(tmp_path_factory, corpus: str, c: Combo) -> list[tuple[float, float]]:
    """float32: the plain single-process run; float8: the one whose micro-batches are
    the forwards of one rank of c (the activation and gradient scales then span the same
    tokens; the weight scales are global in both)."""
    return _reference(tmp_path_factory, corpus, c.layers, c.float8, c.micro_batch if c.float8 else BATCH)


# Float8 with CP: each cp rank scales its own tokens, which no single process does. The
# anchors: the CP-2 float8 run (2 ranks, nothing else) with the micro-batches of c, for
# every (layers, micro-batch) of a float8 CP combination; each within FLOAT8_CP_BOUND of
# the single-process run, and every float8 CP combination within FLOAT8_BOUND of its anchor.
ANCHORS = sorted({(c.layers, c.micro_batch) for c in RUNS if c.float8 and c.cp > 1})
_anchors: dict[tuple[int, int], list[tuple[float, float]]] = {}


def _anchor_runs(root, corpus: str) -> list[tuple[str, list[str]]]:
    cp2 = Combo("none", "none", "none", 2, True, "none").overrides()
    return [(f"anchor {layers} {micro}", _argv(str(root / f"anchor-{layers}-{micro}"), corpus, *cp2,
                                               f"model.n_layers={layers}", f"training.micro_batch_size={micro}"))
            for layers, micro in ANCHORS]


def _cp_anchors(tmp_path_factory, corpus: str, out: dict | None = None) -> dict:
    """The anchors, from `out` (rank 0's results of a 2-rank group that ran _anchor_runs)
    or from a 2-rank run of their own."""
    if not _anchors:
        if out is None:
            out = run_on_ranks(_train_many, 2, _anchor_runs(tmp_path_factory.mktemp("anchors"), corpus),
                               timeout=TIMEOUT[2])[0]
        for layers, micro in ANCHORS:
            curve = out[f"anchor {layers} {micro}"]
            ref = _reference(tmp_path_factory, corpus, layers, True, micro)
            assert max(_differences(curve, ref)) <= FLOAT8_CP_BOUND, (layers, micro, curve, ref)
            _anchors[layers, micro] = curve
    return _anchors


def _differences(got: list[tuple[float, float]], ref: list[tuple[float, float]]) -> tuple[float, float]:
    """Largest relative difference over the steps: (loss, grad norm)."""
    assert len(got) == len(ref) == STEPS, (got, ref)
    return tuple(max(abs(a[i] - b[i]) / abs(b[i]) for a, b in zip(got, ref)) for i in (0, 1))


def _bounds(c: Combo) -> tuple[float, float]:
    """(loss, gradient norm) bounds of c against its reference."""
    return FLOAT32_BOUNDS if not c.float8 else (FLOAT8_CP_BOUND,) * 2 if c.cp > 1 else (FLOAT8_BOUND,) * 2


# ---------------------------------------------------------------------------------------
# 1. What is refused is refused by config.validate, naming the clash


def test_the_matrix_covers_the_product():
    assert len(PRODUCT) == 3 * 3 * 5 * 2 * 2 * 2
    assert len(set(MATRIX)) == len(MATRIX) == len(PRODUCT) - len(OVER_16) + len(SELECTIVE)
    assert all(c.dp == "hsdp" and c.tp != "none" and c.pp != "none" and c.cp == 2 for c in OVER_16)
    assert set(RUNS) | set(REFUSED) == set(MATRIX) and not set(RUNS) & set(REFUSED)


def test_refused_combinations_are_refused_by_validate():
    """Nothing is refused (the paper's layouts compose); a refused combination would have
    to be refused by config.validate naming every clash (one that runs is validated by
    train.main itself, in test_matrix)."""
    assert not REFUSED, [str(c) for c in REFUSED]
    for c in REFUSED:
        cfg = config.load_config(os.path.join(ROOT, "configs/debug.yaml"), SETUP + c.overrides())
        with pytest.raises(ValueError) as e:
            config.validate(cfg, c.world)
        for clash in c.clashes():
            assert clash in str(e.value), (str(c), clash, str(e.value))


# ---------------------------------------------------------------------------------------
# 2. The references


def test_references_train_and_float8_is_in_use(tmp_path_factory, corpus):
    """The oracles learn (a wrong step can be seen), and the float8 bound tells float8
    from float32 and one float8 micro-batch split from another."""
    for layers in sorted({c.layers for c in RUNS}):
        float32 = _reference(tmp_path_factory, corpus, layers, False)
        assert float32[-1][0] < float32[0][0] - 0.1, float32
        float8 = {c.micro_batch: _reference_of(tmp_path_factory, corpus, c) for c in RUNS
                  if c.layers == layers and c.float8}
        for m, curve in float8.items():
            assert max(_differences(curve, float32)) > FLOAT8_BOUND, (layers, m, curve, float32)
            for other in float8:
                if other != m:
                    assert max(_differences(curve, float8[other])) > 2 * FLOAT8_BOUND, (layers, m, other)


# ---------------------------------------------------------------------------------------
# 3. The matrix, one set of ranks per world size


@pytest.mark.parametrize("world,opt_in", [pytest.param(w, False, id=str(w)) for w in WORLDS] + [
    pytest.param(16, True, id="16-float8-ac", marks=pytest.mark.slow)])
def test_matrix(tmp_path_factory, corpus, world, opt_in):
    """Every combination of `world` ranks, one after the other in the same processes:
    every rank logs the same loss; loss and grad norm at every step within the bound of
    the single-process run. At 2 ranks also one deliberately wrong run (FSDP 2 with the
    lr halved, as averaging instead of summing the gradients over the 2 ranks would do),
    which must fail the comparison by far."""
    combos = [c for c in RUNS if c.world == world and (c in OPT_IN) == opt_in]
    root = tmp_path_factory.mktemp(f"matrix-{world}{'-opt-in' if opt_in else ''}")
    runs = [(str(c), _argv(str(root / f"run{i}"), corpus, *c.overrides())) for i, c in enumerate(combos)]
    wrong = Combo("fsdp", "none", "none", 1, False, "none")
    if world == 2:
        runs.append(("wrong", _argv(str(root / "wrong"), corpus, *wrong.overrides(), "training.lr=0.25")))
        runs += _anchor_runs(root, corpus) if not _anchors else []
    if world == 1:
        out = [_train_many(0, 1, runs)]  # in this process (a size-1 group)
    else:
        out = run_on_ranks(_train_many, world, runs, timeout=TIMEOUT[world])
    anchors = _cp_anchors(tmp_path_factory, corpus, out[0] if world == 2 else None) if any(
        c.float8 and c.cp > 1 for c in combos) else {}

    failures = []
    for rank in range(1, world):  # the logged loss is reduced over every rank
        failures += [f"{name}: rank {rank} logged another loss" for name, _ in runs
                     if [x[0] for x in out[rank][name]] != [x[0] for x in out[0][name]]]
    for c in combos:
        got = out[0][str(c)]
        ref = _reference_of(tmp_path_factory, corpus, c)
        RESULTS[c] = loss, grad_norm = _differences(got, ref)
        if loss > _bounds(c)[0] or grad_norm > _bounds(c)[1]:
            failures.append(f"{c}: loss {loss:.2e}, grad norm {grad_norm:.2e} > {_bounds(c)[0]:.0e}, "
                            f"{_bounds(c)[1]:.0e}\n"
                            f"    got {got}\n    ref {ref}")
        if c.float8 and c.cp > 1:
            anchor = anchors[c.layers, c.micro_batch]
            ANCHOR_RESULTS[c] = loss, grad_norm = _differences(got, anchor)
            if max(loss, grad_norm) > FLOAT8_BOUND:
                failures.append(f"{c}: vs its CP anchor: loss {loss:.2e}, grad norm {grad_norm:.2e} > "
                                f"{FLOAT8_BOUND:.0e}\n    got {got}\n    anchor {anchor}")
        step1 = abs(got[0][1] - ref[0][1]) / ref[0][1]
        if not c.float8 and step1 > STEP1_GRAD_NORM_BOUND:
            failures.append(f"{c}: step-1 grad norm {step1:.2e} > {STEP1_GRAD_NORM_BOUND:.0e}")
    if world == 2:
        ref = _reference_of(tmp_path_factory, corpus, wrong)
        assert abs(out[0]["wrong"][0][1] - ref[0][1]) <= STEP1_GRAD_NORM_BOUND * ref[0][1]  # same gradient at init
        assert _differences(out[0]["wrong"], ref)[0] > 1000 * FLOAT32_BOUNDS[0], out[0]["wrong"]  # the step is seen
    assert not failures, f"{len(failures)} of {len(combos)} runs on {world} ranks failed:\n" + "\n".join(failures)


# ---------------------------------------------------------------------------------------
# 4. The table of docs/matrix.md


def _cell(c: Combo) -> str:
    if c.clashes():
        return "refused"
    if c not in RESULTS:
        return "not run"
    loss, grad_norm = RESULTS[c]
    return " / ".join("0" if x == 0 else f"{x:.1e}" for x in (loss, grad_norm))


def table() -> str:
    """Markdown: one row per parallel layout, a column per float8 x AC variant; each cell
    the largest relative loss / grad-norm difference from the single-process run."""
    variants = [(f8, ac) for f8 in FLOAT8 for ac in AC_PRODUCT]
    head = ["ranks", "dp", "tp", "pp", "cp"] + [f"{'float8' if f8 else 'float32'}, AC {ac}" for f8, ac in variants]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layout in _layouts():
        row = [Combo(*layout, f8, ac) for f8, ac in variants]
        lines.append(f"| {row[0].world} | {' | '.join(map(str, layout))} | " + " | ".join(map(_cell, row)) + " |")
    sel_variants = [(f8, ac) for f8 in FLOAT8 for ac in AC_SELECTIVE]
    head = ["ranks", "dp", "tp", "pp", "cp"] + [
        f"{'float8' if f8 else 'float32'}, AC {'selective op' if ac == 'op' else 'every 2nd block'}"
        for f8, ac in sel_variants]
    lines += ["", "Selective activation checkpointing, on the layouts of at most 2 ranks and the 4D layout:", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layout in SELECTIVE_LAYOUTS:
        row = [Combo(*layout, f8, ac) for f8, ac in sel_variants]
        lines.append(f"| {row[0].world} | {' | '.join(map(str, layout))} | " + " | ".join(map(_cell, row)) + " |")

    def worst(cs: list[Combo], results: dict = RESULTS) -> str:
        got = [results[c] for c in cs if c in results]
        return f"loss {max(x[0] for x in got):.1e}, grad norm {max(x[1] for x in got):.1e}" if got else "none run"

    ran = [c for c in RUNS if c in RESULTS]
    float8_cp = [c for c in ran if c.float8 and c.cp > 1]
    lines += [
        "",
        f"{len(ran)} of {len(RUNS)} runnable combinations run, {STEPS} steps each; {len(REFUSED)} refused by "
        f"`config.validate` ({len(MATRIX)} in all; the {len(OVER_16)} combinations of HSDP x TP x PP x CP need 32 "
        f"ranks). Largest relative difference from the single-process run: float32 "
        f"{worst([c for c in ran if not c.float8])} (bounds {FLOAT32_BOUNDS[0]:.0e}, {FLOAT32_BOUNDS[1]:.0e}); "
        f"float8 (against the float8 run with the same micro-batches) {worst([c for c in ran if c.float8 and c.cp == 1])} (bound "
        f"{FLOAT8_BOUND:.0e}); float8 with CP {worst(float8_cp)} (bound {FLOAT8_CP_BOUND:.0e}: each cp rank "
        f"scales its own tokens), and against the CP-2 float8 run with the same micro-batches "
        f"{worst(float8_cp, ANCHOR_RESULTS)} (bound {FLOAT8_BOUND:.0e}).",
    ]
    return "\n".join(lines) + "\n"


INTRO = ("Every combination of FSDP / HSDP, TP (sync, async; sequence and loss parallel), PP (each schedule), CP, "
         "Float8 and activation checkpointing that fits in 16 gloo ranks (each degree 2), trained for 3 SGD-momentum "
         "steps through train.main and compared with the single-process run (float8 with the single-process float8 "
         "run of the same micro-batches); what config.validate refuses is checked to be refused. Each cell: the "
         "largest relative loss / gradient-norm difference over the 3 steps.")


def test_table():
    """With NANOTITAN_MATRIX_TABLE=path, after the whole matrix ran and passed: write the
    table there (docs/matrix.md's composition matrix)."""
    text = table()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == len(_layouts()) + 1 + len(SELECTIVE_LAYOUTS) + 1
    path = os.environ.get("NANOTITAN_MATRIX_TABLE")
    if path:
        missing = [str(c) for c in RUNS if c not in RESULTS]
        assert not missing, (f"run the whole module, opt-in part too (-m \"slow or not slow\"), to write the "
                             f"table; not run: {missing[:5]}...")
        assert all(RESULTS[c][i] <= _bounds(c)[i] for c in RUNS for i in (0, 1))
        stamp = planner.stamp(f"NANOTITAN_MATRIX_TABLE={path} python -m pytest tests/test_matrix.py")
        with open(path, "w") as f:
            f.write(f"# The composition matrix\n\n{stamp}\n\n{INTRO}\n\n{text}")


# ---------------------------------------------------------------------------------------
# 5. Opt-in: the 32-rank layout CI leaves out (python -m pytest tests/test_matrix.py -m slow)


@pytest.mark.slow
def test_hsdp_pp_cp_tp_on_32_ranks(tmp_path_factory, corpus):
    """HSDP 2 x 2 x PP 2 (1F1B) x CP 2 x TP 2 (async) on 32 gloo ranks, float32, against
    the single-process run within the float32 bounds. Minutes on 2 cores: not in CI."""
    c = Combo("hsdp", "async", "1f1b", 2, False, "none")
    assert c.world == 32
    root = tmp_path_factory.mktemp("matrix-32")
    out = run_on_ranks(_train_many, 32, [(str(c), _argv(str(root / "run"), corpus, *c.overrides()))],
                       timeout=3600, pg_timeout_s=600)
    loss, grad_norm = _differences(out[0][str(c)], _reference_of(tmp_path_factory, corpus, c))
    print(f"{c}: loss {loss:.1e}, grad norm {grad_norm:.1e}")
    assert loss <= FLOAT32_BOUNDS[0] and grad_norm <= FLOAT32_BOUNDS[1], (loss, grad_norm)
