"""Adding a model is one file in models/, one in search_spaces/ and one registration.

The test copies the packages into a temporary tree, adds a toy detector there (a model file
whose class carries ``@register_model``, and its search space) and nothing else, and runs it
through a tiny search with the ordinary command. The copy keeps the toy out of this process's
registry and out of the checkout.
"""

import csv
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("anomaly_data", "distributed", "ensembles", "models", "search_spaces")

TOY_MODEL = '''
"""A toy detector: a 1x1-conv colour autoencoder; the map is its squared reconstruction error."""

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from models import register_model
from models.base import AnomalyModel
from models.config import ModelConfig, PositiveInt


@dataclass(frozen=True)
class ToyConfig(ModelConfig):
    width: PositiveInt = 2
    image_size: PositiveInt = 32
    weights: str = "none"

    presets = {"fast": {}, "paper": {"width": 3}}
    recipes = {"fast": {"lr": 1e-2, "epochs": 2, "batch_size": 8}, "paper": {"lr": 1e-2, "epochs": 2}}


@register_model(space="search_spaces.toy")
class Toy(AnomalyModel):
    name = "toy"
    config_class = ToyConfig
    backbone_field = None

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.net = nn.Sequential(nn.Conv2d(3, config.width, 1), nn.ReLU(), nn.Conv2d(config.width, 3, 1))

    def loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        x = self.prepare(batch["image"])
        return {"loss": (self.net(x) - x).pow(2).mean()}

    def map_of(self, x: Tensor) -> Tensor:
        return (self.net(x) - x).pow(2).mean(dim=1, keepdim=True)
'''

TOY_SPACE = '''
"""The toy's space: its width and the learning rate."""

from search_spaces import lr_range

DERIVES = {}


def space(trial, base):
    trial.suggest_int("width", 1, 4)
    trial.suggest_float("lr", *lr_range(base["lr"]), log=True)
    return {}


def defaults(base):
    return {"width": base["width"], "lr": base["lr"]}
'''


def test_a_toy_fourth_model_runs_through_a_search_with_nothing_else_changed(tmp_path, synthetic_root):
    tree = tmp_path / "tree"
    for package in PACKAGES:
        shutil.copytree(REPO / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "models" / "toy.py").write_text(textwrap.dedent(TOY_MODEL))
    (tree / "search_spaces" / "toy.py").write_text(textwrap.dedent(TOY_SPACE))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_AUTH_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "-m", "distributed.tune", "--dataset", "mvtec", "--root", str(synthetic_root),
         "--classes", "brick", "--models", "toy", "--trials", "2", "--epochs", "2", "--grace-epochs", "1",
         "--run-dir", str(run)],
        cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(run / "trials.csv") as f:
        trials = [row for row in csv.DictReader(f) if row["model"] == "toy"]
    assert len(trials) == 2 and all(row["status"] == "ok" for row in trials), trials
    assert "2" in {row["config/width"] for row in trials}  # the first point is the preset's
    assert (run / "best" / "toy" / "brick" / "model.safetensors").is_file()
    with open(run / "results.csv") as f:
        members = {row["member"] for row in csv.DictReader(f)}
    assert "toy" in members
    assert "toy" not in sys.modules and not (REPO / "models" / "toy.py").exists()
