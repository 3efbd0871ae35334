"""bench/ cannot rot silently: one comparison runs end to end at its --quick sizes, and
the helpers every bench shares do what the tables claim."""

import os

import pytest
import torch

from bench import common, tp


def test_tp_bench_runs_and_writes_its_table(tmp_path):
    """The TP bench at its smoke-test sizes: ours sync, DTensor and ours async on 2 gloo
    ranks, the loss parity assertion, the byte count at the dispatcher (DTensor's
    functional collectives and async TP's sends included), the Markdown file."""
    rows = tp.main(["--quick", "--out", str(tmp_path)])
    text = (tmp_path / "tp.md").read_text()
    assert "QUICK RUN" in text and "command: `python bench/tp.py --quick --out" in text
    assert "send" in text  # async TP's ring, seen by comm.CommCounter
    step, sent, async_tp = rows
    assert "asserted: first 3 losses within" in step["check"]
    assert "ours 1.000x, DTensor" in sent["result"]  # ours sends exactly tensor_parallel.py's formula
    assert " median, " in async_tp["result"] and " min, spread " in async_tp["result"]


def test_ratio_gives_median_min_and_spread():
    ours, peer = [1.0, 2.0, 3.0], [2.0, 2.0, 2.0]
    assert common.ratio(ours, peer) == "1.00x median, 0.50x min, spread 0.50-1.50 over 3 rounds"


def test_parity_check_raises_beyond_the_reordering_bound():
    tol = common.parity_tol(torch.float32, 1000, 2)
    assert tol == pytest.approx(2000 * 2**-23)
    assert common.check_parity("same", [1.0, 2.0], [1.0, 2.0 * (1 + tol / 2)], tol) <= tol
    with pytest.raises(RuntimeError, match="differ by 1.0e-02"):
        common.check_parity("different", [1.01], [1.0], tol)


def test_quick_runs_do_not_overwrite_the_figures():
    class Args:
        quick, out = True, None
    assert common.out_dir(Args) == os.path.join(common.ROOT, "runs", "bench")


def test_fsdp_pp_bench_counts_fewer_gathers_once_per_step(tmp_path):
    """bench/fsdp_pp.py at its smoke-test sizes (PP 2 x FSDP 2, 2 micro-batches, one
    block per stage): gathered once per step, rank 0 all-gathers its 2 units once (the
    root and the block); per micro-batch, the block 2 x 2 times more: 5."""
    from bench import fsdp_pp

    (row,) = fsdp_pp.main(["--quick", "--out", str(tmp_path)])
    assert "all-gathers 2 vs 5 per step" in row["check"] and "losses asserted equal" in row["check"]
    assert "| gathered once per step |" in (tmp_path / "fsdp_pp.md").read_text()
