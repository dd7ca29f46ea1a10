"""Search efficiency: Optuna TPE + ASHA against random search with the same trial budget.

    python -m bench.search [--model hvq_trans] [--class brick] [--trials 8] [--epochs 4] [--seeds 0,1]

Runs ``python -m distributed.tune`` on one synthetic class for each (search, seed), with the
same number of trials and epochs (one worker: trials train in their own process), and
reads every reported epoch back from the Tune results: the best validation score reached as
a function of wall time since the study started, and the total time and epochs spent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import machine, table

REPO = Path(__file__).resolve().parents[1]


def reported_epochs(study_dir: Path) -> list[tuple[float, float]]:
    """``(timestamp, val_score)`` of every epoch every trial reported."""
    points = []
    for result in study_dir.rglob("result.json"):
        for line in result.read_text().splitlines():
            row = json.loads(line)
            if row.get("val_score") is not None:
                points.append((float(row["timestamp"]), float(row["val_score"])))
    return sorted(points)


def best_so_far(points: list[tuple[float, float]], at: list[float]) -> list[float]:
    start = points[0][0] if points else 0.0
    out = []
    for t in at:
        seen = [s for ts, s in points if ts - start <= t and s == s]
        out.append(max(seen) if seen else float("nan"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="hvq_trans")
    p.add_argument("--class", dest="class_name", default="brick")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seeds", default="0,1")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    print(f"machine: {machine()}\n{a.model} on synthetic '{a.class_name}', {a.trials} trials x up to {a.epochs} epochs\n")
    curves, rows = {}, []
    for seed in [int(s) for s in a.seeds.split(",")]:
        for search in ("tpe", "random"):
            run = work / f"{search}-{seed}"
            cmd = [sys.executable, "-m", "distributed.tune", "--classes", a.class_name, "--models", a.model,
                   "--trials", str(a.trials), "--epochs", str(a.epochs), "--search", search,
                   "--seed", str(seed), "--no-ensemble", "--run-dir", str(run)]
            out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
            points = reported_epochs(run / "tune")
            span = points[-1][0] - points[0][0] if points else float("nan")
            curves[(search, seed)] = points
            rows.append({"search": search, "seed": seed, "best_val_score": max(s for _, s in points),
                         "epochs_run": len(points), "wall_s": span})
    print(table(rows, "{:.3f}"))
    horizon = max(r["wall_s"] for r in rows)
    marks = [round(horizon * f) for f in (0.25, 0.5, 0.75, 1.0)]
    curve_rows = [{"search": s, "seed": seed, **{f"best@{m}s": v for m, v in zip(marks, best_so_far(pts, marks))}}
                  for (s, seed), pts in curves.items()]
    print("\nbest validation score reached by wall time since the study started:")
    print(table(curve_rows, "{:.3f}"))
    mean = {s: sum(r["best_val_score"] for r in rows if r["search"] == s) / len(a.seeds.split(",")) for s in ("tpe", "random")}
    time_ = {s: sum(r["wall_s"] for r in rows if r["search"] == s) / len(a.seeds.split(",")) for s in ("tpe", "random")}
    print(f"\nsummary: TPE+ASHA best {mean['tpe']:.3f} in {time_['tpe']:.0f} s vs random {mean['random']:.3f} in "
          f"{time_['random']:.0f} s (mean over seeds {a.seeds})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
