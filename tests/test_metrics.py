"""The figures around a step (metrics.py): the CPU peak is measured long enough, cached
per machine, re-measured when an MFU above 100% shows it stale, and an MFU that still
cannot be true is marked, never printed as if it were; training.dtype auto picks by
measurement (both outcomes, by injecting the measured rates into the cache)."""

import json
import os

import pytest
import torch

import metrics
import train
from test_train import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _seed(path, **flops_by_dtype: float) -> None:
    """Write a peak cache holding these rates for this machine, as if measured here."""
    cache = {metrics._cache_key(d): {"flops": f, "measured": "seeded by the test"} for d, f in flops_by_dtype.items()}
    path.write_text(json.dumps(cache))


def _run(tmp_path, *overrides: str) -> list[dict]:
    return train.main(["--config", os.path.join(ROOT, "configs/debug.yaml"), *TINY, "training.steps=3",
                       f"run.dir={tmp_path / 'run'}", f"data.cache_dir={os.path.join(ROOT, '.cache/data')}",
                       *overrides])


def test_the_peak_is_measured_once_and_cached(tmp_path):
    """The key names CPU model, torch version, threads and dtype; a second call reads it."""
    path = tmp_path / "peak.json"
    flops, source = metrics.cpu_peak("float32", str(path))
    key = metrics._cache_key("float32")
    assert metrics.cpu_model() in key and torch.__version__ in key and f"{torch.get_num_threads()} threads" in key
    assert json.loads(path.read_text())[key]["flops"] == flops > 1e8  # any CPU of the last 20 years
    assert "best of 0.5 s" in source
    assert metrics.cpu_peak("float32", str(path)) == (flops, source)  # cached: the same figure, not measured again
    path.write_text("{not json")  # a cache cut short by a crash is not trusted: measured again
    assert metrics.cpu_peak("float32", str(path))[0] > 1e8


def test_a_stale_peak_is_remeasured_and_mfu_never_shows_above_100(tmp_path, capsys):
    """A peak cached while the machine was busy (here: 1 MFLOP/s, seeded) makes the first
    MFU come out above 100%; the run says the peak looks stale, re-measures it once, and
    logs a believable MFU from then on. The cache then holds the new measurement."""
    cache = tmp_path / "peak.json"
    _seed(cache, float32=1e6)
    history = _run(tmp_path, "training.dtype=float32", f"run.peak_cache={cache}")
    out = capsys.readouterr().out
    assert "looks stale" in out and "re-measuring" in out
    assert all(r["mfu"] <= 100 for r in history), history  # re-measured before the first line was written
    assert not any("mfu_note" in r for r in history)
    assert json.loads(cache.read_text())[metrics._cache_key("float32")]["flops"] > 1e8


def test_a_given_peak_that_is_too_low_marks_the_mfu(tmp_path, capsys):
    """run.peak_flops is the user's figure: not re-measured; an MFU above 100% from it is
    printed with its reason and recorded with a note, not as a plain number."""
    cache = tmp_path / "peak.json"
    history = _run(tmp_path, "training.dtype=float32", "run.peak_flops=1e6", f"run.peak_cache={cache}")
    assert all(r["mfu"] > 100 and "not a real MFU" in r["mfu_note"] for r in history)
    assert "not a real MFU" in capsys.readouterr().out
    assert not cache.exists()  # nothing measured


@pytest.mark.parametrize("bf16, fp32, picked", [(2e11, 1e11, "bfloat16"), (5e10, 1.5e11, "float32")])
def test_dtype_auto_picks_by_the_measured_rates(tmp_path, capsys, bf16, fp32, picked):
    cache = tmp_path / "peak.json"
    _seed(cache, bfloat16=bf16, float32=fp32)
    name, why = metrics.pick_dtype(torch.device("cpu"), str(cache))
    assert name == picked and f"{bf16 / 1e9:.0f} GFLOP/s" in why and f"{fp32 / 1e9:.0f} GFLOP/s" in why
    _run(tmp_path, "training.dtype=auto", f"run.peak_cache={cache}", "training.steps=2")
    assert f"training.dtype auto: {picked}, because" in capsys.readouterr().out
    assert f"dtype: {picked}" in (tmp_path / "run" / "config.yaml").read_text()  # what ran


def test_dtype_auto_on_a_gpu_is_bf16():
    assert metrics.pick_dtype(torch.device("cuda", 0), "unused.json")[0] == "bfloat16"
