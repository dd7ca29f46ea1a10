"""ONNX / OpenVINO export of the fused ensemble, checked against the torch ensemble."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly_data import read_image
from ensembles.ensemble import Ensemble, FusionChoice, fuse_outputs
from ensembles.export import TOLERANCE, export_ensemble, largest_difference
from ensembles.runtime import ExportedEnsemble, ExportError

REPO = Path(__file__).resolve().parents[1]


def washer_test_images(synthetic_root) -> list[np.ndarray]:
    return [read_image(p) for p in sorted((synthetic_root / "washer" / "test").rglob("*.png"))]


@pytest.fixture(scope="module")
def exports(tiny_run, tmp_path_factory, synthetic_root):
    """The tiny ensemble exported to both formats, checked on every test image of its class."""
    run, _ = tiny_run
    ensemble = Ensemble.load(run / "ensemble", "cpu")
    images = {"washer": washer_test_images(synthetic_root)}
    out = tmp_path_factory.mktemp("export")
    folders = {fmt: export_ensemble(ensemble, fmt, out / fmt, check_images=images) for fmt in ("onnx", "openvino")}
    folders["onnx-used"] = export_ensemble(ensemble, "onnx", out / "onnx-used", check_images=images, members="used")
    return ensemble, folders


def test_an_export_of_the_used_members_runs_only_them(exports, synthetic_root):
    ensemble, folders = exports
    fusion = ensemble.fusion_for("washer")
    entry = json.loads((folders["onnx-used"] / "export.json").read_text())["classes"]["washer"]
    assert entry["members"] == fusion.members_used
    assert sorted(entry["left_out"]) == sorted(set(fusion.members) - set(fusion.members_used))
    exported = ExportedEnsemble.load(folders["onnx-used"])
    difference = largest_difference(ensemble, exported, "washer", washer_test_images(synthetic_root))
    assert difference["maps"] <= TOLERANCE and difference["scores"] <= TOLERANCE, difference


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_every_test_image_scores_as_in_torch(exports, synthetic_root, fmt):
    ensemble, folders = exports
    config = json.loads((folders[fmt] / "export.json").read_text())
    entry = config["classes"]["washer"]
    assert config["runtime"] == fmt and (folders[fmt] / entry["file"]).is_file()
    exported = ExportedEnsemble.load(folders[fmt])
    difference = largest_difference(ensemble, exported, "washer", washer_test_images(synthetic_root))
    assert difference["maps"] <= TOLERANCE and difference["scores"] <= TOLERANCE, difference
    fusion = ensemble.fusion_for("washer")
    assert set(entry["members"]) >= set(fusion.members_used)          # whatever the fusion uses is inside
    for member in set(fusion.members) - set(entry["members"]):        # and anything left out is named, with why
        assert "left out" in entry["left_out"][member]
    for member in entry["members"]:
        assert difference[f"member:{member}"] <= TOLERANCE, (member, difference)


@pytest.mark.parametrize("rule", ["mean", "max", "rank_mean"])
@pytest.mark.parametrize("image_rule, sigma", [("map_max", 0.0), ("member_mix", 1 / 32)])
def test_every_fusion_rule_exports_with_the_same_values(tiny_run, tmp_path, rule, image_rule, sigma):
    """The fusion alone (members' outputs as inputs), for each rule the ensemble can choose."""
    import onnxruntime

    run, _ = tiny_run
    fusion = Ensemble.load(run / "ensemble", "cpu").fusion_for("washer")
    n = len(fusion.members)
    choice = FusionChoice(rule, [1 / n] * n, sigma, image_rule, [1 / n] * n)
    fusion = dataclasses.replace(fusion, rule=choice.rule, weights=choice.weights, sigma=sigma,
                                 image_rule=image_rule, image_weights=choice.image_weights)

    class Fusion(torch.nn.Module):
        def forward(self, maps, scores):
            outputs = {m: (scores[:, j], maps[:, j:j + 1]) for j, m in enumerate(fusion.members)}
            fused_scores, fused = fuse_outputs(fusion, outputs)
            return fused, fused_scores

    g = torch.Generator().manual_seed(0)
    maps, scores = torch.rand(4, n, 32, 32, generator=g) * 50, torch.rand(4, n, generator=g) * 50
    module = Fusion()
    with torch.no_grad():
        program = torch.onnx.export(module, (maps, scores), dynamo=True, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch")}, {0: torch.export.Dim("batch")}))
    program.save(str(tmp_path / "fusion.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "fusion.onnx"))
    maps, scores = torch.rand(3, n, 32, 32, generator=g) * 50, torch.rand(3, n, generator=g) * 50
    got = session.run(None, {i.name: v.numpy() for i, v in zip(session.get_inputs(), (maps, scores))})
    want = module(maps, scores)
    for g_, w in zip(got, want):
        assert np.abs(g_ - w.numpy()).max() <= TOLERANCE * max(np.abs(w.numpy()).max(), 1e-12)


def test_the_runtime_needs_no_torch_and_the_query_reads_an_export(exports, synthetic_root, tmp_path, tiny_run):
    _, folders = exports
    run, _ = tiny_run
    images = sorted((synthetic_root / "washer" / "test").rglob("*.png"))[:4]
    blocked = (
        "import sys, json\n"
        "class Block:\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from pathlib import Path\n"
        "from anomaly_data.io import read_image\n"
        "from ensembles.runtime import ExportedEnsemble, result_row\n"
        f"ens = ExportedEnsemble.load({str(folders['onnx'])!r})\n"
        f"out = ens.predict([read_image(Path(p)) for p in {[str(p) for p in images]!r}], 'washer')\n"
        "print(json.dumps([result_row(out, i) for i in range(len(out['scores']))]))\n"
        "assert 'torch' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", blocked], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    no_torch = json.loads(done.stdout)

    def query(ensemble) -> list[dict]:
        out = subprocess.run([sys.executable, "-m", "ensembles.query", "--ensemble", str(ensemble), "--out",
                              str(tmp_path / Path(ensemble).name), *map(str, images)],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return [json.loads(line) for line in out.stdout.splitlines()]

    torch_rows, onnx_rows = query(run / "ensemble"), query(folders["onnx"])
    for t, o, n in zip(torch_rows, onnx_rows, no_torch):
        assert t.keys() == o.keys() and t["anomalous"] == o["anomalous"] == n["anomalous"]
        assert o["score"] == pytest.approx(t["score"], rel=TOLERANCE, abs=1e-6) == n["score"]
        assert o["members"].keys() == t["members"].keys()


def test_a_member_that_cannot_be_exported_is_named(tiny_run, tmp_path, monkeypatch):
    run, _ = tiny_run
    ensemble = Ensemble.load(run / "ensemble", "cpu")
    fusion = ensemble.fusion_for("washer")
    net = ensemble.members[fusion.member_files["patchcore"]]
    real = net.score

    def unexportable(x):
        if torch.compiler.is_exporting():
            raise RuntimeError("an operator with no ONNX form")
        return real(x)

    monkeypatch.setattr(net, "score", unexportable)
    with pytest.raises(ExportError, match=r"class washer: member patchcore \(RuntimeError: an operator with no ONNX"):
        export_ensemble(ensemble, "onnx", tmp_path / "out")


def test_haloae_exports_with_the_same_values(tmp_path):
    """The member the tiny ensemble does not have: halo attention (padded blocks, masks) as ONNX."""
    import onnxruntime

    from ensembles.export import MemberOnly, onnx_graph
    from models import create_model

    torch.manual_seed(0)
    net = create_model("haloae", "fast", image_size=64).eval()
    onnx_graph(MemberOnly(net), torch.rand(2, 3, 64, 64), tmp_path / "haloae.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "haloae.onnx"))
    images = torch.rand(3, 3, 64, 64)   # another batch size than the one exported with
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        want = MemberOnly(net)(images)
    for g, w in zip(got, want):
        assert np.abs(g - w.numpy()).max() <= TOLERANCE * np.abs(w.numpy()).max()
