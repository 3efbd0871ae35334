"""bench/gpu.py, the one GPU check, cannot rot on machines without a GPU: its --dry run
constructs and runs every case at tiny sizes and writes its table, every row with a
status; without --dry and without CUDA it stops instead of reporting CPU numbers."""

import argparse
import math

import pytest
import torch

import context_parallel
from bench import common, gpu


def sections(text: str) -> dict[str, list[dict[str, str]]]:
    """The rows of each '## N.' section's table, as {column: cell}."""
    out, header, name = {}, None, None
    for line in text.splitlines():
        if line.startswith("## "):
            name, header = line[3:5], None  # '1.', '2.', ...
            out[name] = []
        elif line.startswith("|") and name is not None:
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            if header is None:
                header = cells
            elif not line.startswith("|---"):
                out[name].append(dict(zip(header, cells, strict=True)))
    return out


def number(cell: str) -> float:
    return float(cell.split()[0].replace(",", "").rstrip("%"))


def test_dry_run_runs_every_case_and_writes_the_table(tmp_path):
    rows = gpu.main(["--dry", "--out", str(tmp_path)])
    text = (tmp_path / "gpu.md").read_text()
    assert "DRY RUN (`--dry`)" in text and "QUICK RUN" in text
    assert "NVIDIA driver " in text and f"torch {torch.__version__}, CUDA " in text
    tables = sections(text)
    assert list(tables) == ["1.", "2.", "3.", "4."]

    throughput = tables["1."]
    assert [r["mode"] for r in throughput] == ["eager", "torch.compile per block"]
    for r in throughput:
        assert r["status"] == "pass", r
        assert number(r["tokens/s"]) > 0 and number(r["MFU"]) > 0 and " ms (min " in r["step"]

    float8_rows = tables["2."]
    assert len(float8_rows) == len(gpu.FFN_LINEARS) * 2 * 3  # shapes x (GEMM, linear) x (bf16, 2 recipes)
    assert {r["impl"] for r in float8_rows} == {
        "bf16 torch.mm", "float8 tensorwise scaled_mm", "float8 rowwise scaled_mm",
        "bf16 nn.Linear", "float8 tensorwise Float8Linear", "float8 rowwise Float8Linear"}
    for r in float8_rows:
        assert r["status"] == "pass", r
        assert number(r["time"]) > 0 and number(r["TFLOP/s"]) > 0
        if r["impl"].startswith("float8"):
            assert " median, " in r["speedup vs bf16"]
            assert all(gpu.SQNR_MIN_DB <= float(s) < 60 for s in r["SQNR vs bf16 (dB)"].split(" / ")), r

    attention = tables["3."]
    assert [r["tokens"] for r in attention] == ["128", "256"]
    for r in attention:
        assert r["status"] == "pass", r
        assert r["kernel"] in context_parallel.KERNELS
        assert number(r["ours fwd+bwd"]) > 0 and number(r["SDPA fwd+bwd"]) > 0
        assert all(math.isfinite(float(e)) for e in r["rel. diff out / dq / dk / dv"].split(" / "))

    techniques = {r["case"]: r for r in tables["4."]}
    expected = [case for _, case, _ in gpu.TECHNIQUES] + [
        "checkpoint sync save, then load=latest", "checkpoint async save, then load=latest",
        "FSDP at world size 1 (apply_fsdp directly)"]
    assert list(techniques)[:-1] == expected
    for case in expected:
        assert techniques[case]["status"] == "pass", techniques[case]
        assert math.isfinite(float(techniques[case]["final loss"]))
    assert "resumed at step 3" in techniques["checkpoint sync save, then load=latest"]["detail"]
    assert techniques["ring attention block kernels (block_forward, block_backward)"]["status"] == "see section 3"
    assert "Not covered at world size 1" in text and "tensor_parallel.py" in text and "pipeline.py" in text

    assert rows and all(list(r) == list(common.SUMMARY_COLUMNS) for r in rows)


def test_without_cuda_it_refuses_to_report_cpu_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device: run with --dry on CPU"):
        gpu.main(["--out", str(tmp_path)])
    assert not (tmp_path / "gpu.md").exists()


def test_a_case_that_disagrees_is_a_failed_row_and_the_others_still_run(monkeypatch):
    """Block kernels that compute something else than SDPA: each attention row says
    FAILED with the differences, and the section goes on to the next length."""
    right = context_parallel.block_forward

    def wrong(*args):
        out, lse = right(*args)
        return 2 * out, lse
    monkeypatch.setattr(context_parallel, "block_forward", wrong)
    failures = []
    lines, _ = gpu.attention(argparse.Namespace(tokens=[128, 256], warmup=1, reps=1), torch.device("cpu"), failures)
    assert failures == ["3: attention at 128 tokens", "3: attention at 256 tokens"]
    rows = sections("\n".join(lines))["3."]
    assert all(r["status"].startswith("FAILED: RuntimeError: out, dq, dk, dv differ from SDPA's by 1.0e+00")
               for r in rows), rows
