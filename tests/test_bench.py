"""The benchmarks that CI runs on their CPU path: ``bench/gpu.py`` (tiny settings) and
``bench/overhead.py``."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run_bench(*args, timeout=900):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_the_gpu_bench_runs_its_cpu_path_and_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    run_bench("bench.gpu", "--tiny", "--out", str(out))
    figures = json.loads(out.read_text())
    rows = figures["training"]
    mixed = "bf16" if not torch.cuda.is_available() else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert {(r["model"], r["precision"]) for r in rows} == {(m, p) for m in ("haloae", "hvq_trans", "transformaly")
                                                            for p in ("fp32", mixed)}
    assert all(r["img_per_s"] > 0 and math.isfinite(r["loss"]) for r in rows)
    fit = figures["patchcore_fit"]
    assert fit["fit_s"] > 0 and fit["memory_bank"] > 0
    if torch.cuda.is_available():  # where a GPU is, its memory is measured
        assert figures["device"] != "cpu" and all(r["peak_gib"] > 0 for r in rows)
    else:
        assert figures["device"] == "cpu" and all(r["peak_gib"] is None for r in rows)


def test_the_overhead_bench_prints_a_line_per_figure_and_the_default_plan_costs_less():
    text = run_bench("bench.overhead", "--models", "hvq_trans,patchcore", "--presets", "fast", "--epochs", "2")
    found = {name: float(value) for value, name in re.findall(r"^overhead: hvq_trans fast ([\d.]+) % \((\S+)\)$",
                                                                text, re.M)}
    assert set(found) == {"every-epoch", "default"}, text
    assert 0 < found["default"] < found["every-epoch"] < 100
    assert "fitted in one pass" in text and "patchcore" in text
    assert "bytes per trial" not in text  # only for the paper preset


def test_the_overhead_bench_reads_a_finished_searchs_shares(tmp_path):
    trial = tmp_path / "run" / "tune" / "search" / "trial_1"
    trial.mkdir(parents=True)
    lines = [{"config": {"model": "haloae"}, "time_this_iter_s": 10.0, "train_seconds": 9.0},
             {"config": {"model": "haloae"}, "time_this_iter_s": 10.0, "epoch_seconds": 8.0},  # an earlier version's
             {"config": {"model": "patchcore"}, "time_this_iter_s": 4.0, "epoch_seconds": 1.0}]
    (trial / "result.json").write_text("\n".join(map(json.dumps, lines)) + "\n{cut shor")
    text = run_bench("bench.overhead", "--run", str(tmp_path / "run"))
    assert "overhead: haloae search 15.0 % (run)" in text and "overhead: patchcore search 75.0 % (run)" in text
