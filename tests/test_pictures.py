"""The pictures: `python pipeline.py draw` and `python plot.py`.

  * every schedule in pipeline.SCHEDULES draws (through `draw`, and one through the
    command line) a valid PNG of a sensible size; the boxes drawn are the simulator's:
    one per compute action of the schedule, in each rank's order, never overlapping, and
    the idle fraction they leave equals `simulate`'s bubble;
  * a schedule that cannot run is the check's own message, `error:` and exit 2;
  * plot.py draws two hand-written runs and one real tiny train.py run to a valid PNG; a
    missing or empty metrics.jsonl is `error:` naming the file, exit 2;
  * without matplotlib both say `pip install matplotlib`.
"""

import importlib
import json
import os
import struct
import subprocess
import sys

import pytest

import pipeline
import plot
import train
from test_train import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_png(path) -> tuple[int, int]:
    """A PNG (signature, then the IHDR chunk's width and height) of a sensible size."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 150, (width, height)
    assert 5_000 < len(data) < 2_000_000, len(data)
    return width, height


def _args(name: str, pp: int = 4, m: int = 8) -> tuple[str, int, int, int]:
    """The first stages-per-rank the schedule accepts (interleaved schedules need 2)."""
    for v in (1, 2):
        try:
            pipeline.check_schedule_args(name, pp, m, v)
            return name, pp, m, v
        except ValueError:
            pass
    raise AssertionError(f"{name} accepts neither 1 nor 2 stages per rank with pp {pp}, m {m}")


@pytest.mark.parametrize("name", list(pipeline.SCHEDULES))
def test_draw_every_schedule_as_the_simulator_times_it(name, tmp_path):
    name, pp, m, v = _args(name)
    boxes = pipeline.draw(name, pp, m, v, str(tmp_path / "s.png"))
    check_png(tmp_path / "s.png")
    actions = pipeline.build_schedule(name, pp, m, v)
    sim = pipeline.simulate(actions, pp * v)
    for r, order in enumerate(actions):  # a box per compute action, in the rank's order
        row = [(a, start, end) for rank, a, start, end in boxes if rank == r]
        assert [a for a, _, _ in row] == [a for a in order if a.kind in pipeline.COMPUTE]
        assert all(end0 <= start1 for (_, _, end0), (_, start1, _) in zip(row, row[1:]))  # no overlap
    busy = sum(end - start for _, _, start, end in boxes)
    makespan = max(end for *_, end in boxes)
    assert makespan == sim["makespan"]
    assert abs((1 - busy / (pp * makespan)) - sum(sim["idle"]) / (pp * sim["makespan"])) < 1e-9


def test_draw_command_line(tmp_path):
    name, pp, m, v = _args("interleaved_1f1b")
    out = tmp_path / "i.png"
    proc = subprocess.run([sys.executable, "pipeline.py", "draw", name, "--pp", str(pp), "--microbatches", str(m),
                           "--stages-per-rank", str(v), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}: {2 * m * v * pp} actions" in proc.stdout
    check_png(out)


@pytest.mark.parametrize("argv, words", [
    (["magic", "--pp", "2", "--microbatches", "4"], ["parallel.pp_schedule='magic'", "gpipe", "zero_bubble"]),
    (["interleaved_1f1b", "--pp", "4", "--microbatches", "6", "--stages-per-rank", "2"],
     ["multiple of parallel.pp=4", "parallel.pp_microbatches=6"]),
    (["1f1b", "--pp", "4", "--microbatches", "2"], ["at least parallel.pp=4 micro-batches"]),
    (["gpipe", "--pp", "2", "--microbatches", "4", "--stages-per-rank", "2"], ["only interleaved_1f1b"]),
    (["gpipe", "--pp", "0", "--microbatches", "4"], ["--pp=0 must be >= 1"]),
])
def test_draw_refuses_what_the_schedule_checks_refuse(argv, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        pipeline.main(["draw", *argv, "--out", str(tmp_path / "x.png")])
    assert exit.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("pipeline.py draw: error: ") and all(w in last for w in words), last
    assert not (tmp_path / "x.png").exists()


def _write_run(run_dir, losses: list[float], parallel: dict) -> None:
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step, loss in enumerate(losses, 1):
            record = {"step": step, "loss": loss, "grad_norm": 1 / step, "lr": 1e-3, "tokens_per_sec": 1000 + step,
                      "mfu": None, "memory_gb": 0.1}
            if step % 5 == 0:
                record["val_loss"] = loss + 0.1
            f.write(json.dumps(record) + "\n")
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write("parallel:\n" + "".join(f"  {k}: {v}\n" for k, v in parallel.items()))


def test_plot_hand_written_runs_and_a_real_one(tmp_path):
    _write_run(tmp_path / "single", [9 - 0.1 * i for i in range(20)], {"dp_shard": -1, "pp": 1})
    _write_run(tmp_path / "pp2", [9 - 0.1 * i for i in range(20)], {"dp_shard": 1, "pp": 2, "pp_schedule": "1f1b"})
    train.main(["--config", os.path.join(ROOT, "configs/debug.yaml"), *TINY, "training.steps=3",
                "run.peak_flops=1e12", f"run.dir={tmp_path / 'real'}",
                f"data.cache_dir={os.path.join(ROOT, '.cache/data')}"])
    assert plot.label(str(tmp_path / "single")) == "single"
    assert plot.label(str(tmp_path / "pp2")) == "pp2 (pp=2 1f1b)"
    out = tmp_path / "curves.png"
    plot.main([str(tmp_path / d) for d in ("single", "pp2", "real")] + ["--out", str(out)])
    check_png(out)


def test_plot_refuses_a_missing_or_empty_run(tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit:
        plot.main([str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")])
    assert exit.value.code == 2
    assert f"error: {tmp_path / 'empty' / 'metrics.jsonl'} is empty" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "plot.py", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("plot.py: error: ") and str(tmp_path / "missing" / "metrics.jsonl") in last, last
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_both_say_how_to_install_it(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        pipeline.draw("1f1b", 2, 4, 1, str(tmp_path / "x.png"))
    monkeypatch.delitem(sys.modules, "plot")
    with pytest.raises(ImportError, match="pip install matplotlib"):
        importlib.import_module("plot")
