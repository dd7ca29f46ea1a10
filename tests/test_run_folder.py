"""ensembles.run_folder: class-group keys, the layout paths and the best-checkpoint index."""

import json
import subprocess
import sys
from pathlib import Path

from ensembles.run_folder import (BEST_INDEX_FILE, best_dir, group_key, read_best_index, train_run_dir,
                                  update_best_index)


def test_group_key_and_paths(tmp_path):
    assert group_key(["washer"]) == "washer" and group_key(["a", "b", "c"]) == "a+b+c"
    assert best_dir(tmp_path, "hvq_trans", ["a", "b"]) == tmp_path / "best" / "hvq_trans" / "a+b"
    assert train_run_dir(tmp_path, "abc_00001") == tmp_path / "train" / "train-abc_00001"


def test_best_index_replaces_the_entries_of_the_same_model_and_classes(tmp_path):
    assert read_best_index(tmp_path) == []
    first = [{"model": "m", "classes": ["a"], "v": 1}, {"model": "m", "classes": ["b"], "v": 1}]
    assert update_best_index(tmp_path, first) == first
    index = update_best_index(tmp_path, [{"model": "m", "classes": ["a"], "v": 2}])
    assert index == [first[1], {"model": "m", "classes": ["a"], "v": 2}]
    assert json.loads((tmp_path / BEST_INDEX_FILE).read_text()) == index == read_best_index(tmp_path)


def test_run_folder_needs_neither_ray_nor_distributed():
    code = ("import sys, ensembles.run_folder, ensembles.build\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'distributed')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_a_moved_run_folder_reads_its_own_best_checkpoints(tmp_path):
    old, new = tmp_path / "machine_a" / "run", tmp_path / "machine_b" / "run"
    old.mkdir(parents=True)
    update_best_index(old, [{"model": "m", "classes": ["a"], "checkpoint": str(best_dir(old, "m", ["a"]) / "model.safetensors")}])
    new.parent.mkdir()
    old.rename(new)
    assert read_best_index(new)[0]["checkpoint"] == str(best_dir(new, "m", ["a"]) / "model.safetensors")
