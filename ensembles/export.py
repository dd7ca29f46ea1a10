"""Export the fused ensemble to ONNX or OpenVINO: one graph per class, run without torch.

    python -m ensembles.export --ensemble RUN/ensemble --format onnx|openvino --out DIR [--classes a,b]

``DIR`` holds ``export.json`` (per class: the graph file, its input side, the members in the
order of its member-score output, the threshold and the map's display range, and the largest
difference measured against the torch ensemble) and one graph per class: ``<class>.onnx``, or
``<class>.xml`` + ``<class>.bin`` for OpenVINO (weights kept in float32). Each graph takes images
``[B, 3, R, R]`` (float32 in [0, 1], any batch) and returns the fused map ``[B, 1, R, R]``, the
image score ``[B]`` and the members' normalised image scores ``[B, M]`` (``--members used``: only
the members the fusion uses run, and only their scores come out): members, fitted
statistics, normalisers, fusion rule, blur and image rule are all inside it.

``ensembles.runtime.ExportedEnsemble`` loads the folder with ``onnxruntime`` or ``openvino``
alone; ``python -m ensembles.query --ensemble DIR`` scores images with it.

Checked on export: the graph and the torch ensemble are run on the same images and the largest
difference of maps and scores, relative to their largest magnitude, must be within
``TOLERANCE`` (float32), or the export fails naming the class.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ensembles.ensemble import Ensemble, EnsembleError, fuse_outputs, normalised_member_scores, run_members
from ensembles.runtime import EXPORT_FILE, EXPORT_FORMAT, ExportedClass, ExportedEnsemble, ExportError

TOLERANCE = 1e-4        # relative: max |graph - torch| / max |torch|, float32
OPSET = 18
CHECK_BATCH = 3


class FusedClass(nn.Module):
    """One class of the ensemble as one module: its members (all, or ``members``: those the
    fusion uses must be among them), normalisers and fusion."""

    def __init__(self, ensemble: Ensemble, class_name: str, members: list[str] | None = None):
        super().__init__()
        self.fusion = ensemble.fusion_for(class_name)
        self.names = list(members or self.fusion.members)
        self.members = nn.ModuleList([ensemble.members[self.fusion.member_files[m]] for m in self.names])

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        outputs = run_members(dict(zip(self.names, self.members)), images, self.fusion.resolution)
        scores, maps = fuse_outputs(self.fusion, outputs)
        members = normalised_member_scores(self.fusion, outputs)
        return maps, scores, torch.stack([members[m] for m in self.names], 1)


def onnx_graph(module: nn.Module, example: Tensor, path: Path) -> None:
    """``module`` as an ONNX graph at ``path`` with a dynamic batch (torch.export, then ONNX)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), dynamo=True, opset_version=OPSET, verbose=False,
                                    input_names=["images"], output_names=["map", "score", "member_scores"][:3],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.save(str(path))


def member_that_fails(ensemble: Ensemble, class_name: str, out: Path) -> str | None:
    """The first member whose own graph cannot be exported, to name it in the error."""
    fusion = ensemble.fusion_for(class_name)
    example = torch.rand(2, 3, fusion.resolution, fusion.resolution)
    for name in fusion.members:
        net = ensemble.members[fusion.member_files[name]]
        try:
            onnx_graph(MemberOnly(net), example, out / f".probe-{name}.onnx")
        except Exception as err:  # noqa: BLE001 -- any exporter failure is the answer
            while err.__cause__ is not None:  # the exporter wraps what failed in its own error
                err = err.__cause__
            return f"{name} ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        finally:
            (out / f".probe-{name}.onnx").unlink(missing_ok=True)
    return None


class MemberOnly(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images: Tensor):
        return self.net.score(self.net.prepare(images))


def write_graph(ensemble: Ensemble, class_name: str, fmt: str, out: Path, members: list[str]) -> dict:
    """One class's graph over ``members``; returns its ``export.json`` entry."""
    fusion = ensemble.fusion_for(class_name)
    side = fusion.resolution
    onnx_path = out / f"{class_name}.onnx"
    try:
        onnx_graph(FusedClass(ensemble, class_name, members).eval(), torch.rand(2, 3, side, side), onnx_path)
    except Exception as err:  # noqa: BLE001 -- say which member, then stop
        culprit = member_that_fails(ensemble, class_name, out)
        what = f"member {culprit} cannot be exported" if culprit else f"the fusion cannot be exported ({err})"
        raise ExportError(f"class {class_name}: {what}; build the ensemble without it to export the rest") from None
    file = onnx_path.name
    if fmt == "openvino":
        import openvino

        model = openvino.convert_model(str(onnx_path))
        openvino.save_model(model, str(out / f"{class_name}.xml"), compress_to_fp16=False)
        onnx_path.unlink()
        file = f"{class_name}.xml"
    return {"file": file, "resolution": side, "members": members, "threshold": fusion.threshold,
            "map_range": list(fusion.map_range)}


def export_class(ensemble: Ensemble, class_name: str, fmt: str, out: Path, images: list[np.ndarray],
                 members: str = "all") -> dict:
    """Write one class's graph and check it against the torch ensemble on ``images``. ``members``:
    ``all`` (each member's score in the output, as the torch query prints them) or ``used`` (only
    those the fusion uses: faster). A member whose own score the runtime gets wrong is left out of
    the graph (and named) when the fusion does not use it; when it does, the export fails naming it."""
    fusion = ensemble.fusion_for(class_name)
    used = set(fusion.members_used)
    left_out = {} if members == "all" else {m: "the fusion does not use it (--members used)"
                                            for m in fusion.members if m not in used}
    members = [m for m in fusion.members if m not in left_out]
    while True:
        entry = write_graph(ensemble, class_name, fmt, out, members)
        runner = ExportedEnsemble(out, fmt, {class_name: ExportedClass(class_name, **entry)})
        entry["checked"] = largest_difference(ensemble, runner, class_name, images)
        wrong = [m for m in members if entry["checked"][f"member:{m}"] > TOLERANCE]
        if not wrong:
            break
        if used & set(wrong):
            raise ExportError(f"class {class_name}: the {fmt} runtime computes member(s) {sorted(used & set(wrong))} "
                              f"wrongly (relative difference to torch {entry['checked']}); export to another format")
        for m in wrong:
            left_out[m] = (f"its {fmt} graph differs from torch by {entry['checked'][f'member:{m}']:.2g} "
                           "(relative); the fusion does not use it, so it was left out")
        members = [m for m in members if m not in wrong]
    if max(entry["checked"][k] for k in ("maps", "scores")) > TOLERANCE:
        raise ExportError(f"class {class_name}: the {fmt} graph differs from the torch ensemble by "
                          f"{entry['checked']} (relative), more than {TOLERANCE}")
    return {**entry, "left_out": left_out}


def relative_difference(got, want) -> float:
    reference = np.asarray(want, dtype=np.float64)
    return float(np.abs(np.asarray(got, dtype=np.float64) - reference).max() / max(np.abs(reference).max(), 1e-12))


def largest_difference(ensemble: Ensemble, exported: ExportedEnsemble, class_name: str,
                       images: list[np.ndarray]) -> dict[str, float]:
    """Max |exported - torch| / max |torch| on ``images``: of the maps, of the scores, and of each
    member's normalised image score (``member:<name>``)."""
    want = ensemble.predict(images, class_name)
    got = exported.predict(images, class_name)
    out = {key: relative_difference(got[key], want[key]) for key in ("maps", "scores")}
    for member, values in got["member_scores"].items():
        out[f"member:{member}"] = relative_difference(values, want["member_scores"][member])
    return out


def export_ensemble(ensemble: Ensemble, fmt: str, out: str | Path, classes: list[str] | None = None,
                    check_images: dict[str, list[np.ndarray]] | None = None, members: str = "all") -> Path:
    """Export ``classes`` (default all) into ``out``; each graph is checked against the torch
    ensemble on ``check_images[class]`` (default: a few random images); ``members`` as in
    ``export_class``."""
    if fmt not in ("onnx", "openvino"):
        raise ExportError(f"--format {fmt!r}: choose onnx or openvino")
    needed = ["onnx", "onnxscript", "onnxruntime"] + (["openvino"] if fmt == "openvino" else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"exporting to {fmt} needs {', '.join(missing)}: pip install 'anomaly-ensemble[export]'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ensemble.members = {k: m.to("cpu").eval() for k, m in ensemble.members.items()}
    ensemble.device = torch.device("cpu")
    rng = np.random.default_rng(0)
    entries = {}
    for name in classes or ensemble.class_names:
        side = ensemble.fusion_for(name).resolution
        images = (check_images or {}).get(name) or \
            [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(CHECK_BATCH)]
        entries[name] = export_class(ensemble, name, fmt, out, images, members)
    (out / EXPORT_FILE).write_text(json.dumps({"format": EXPORT_FORMAT, "runtime": fmt, "classes": entries},
                                              indent=2) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ensembles.export", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ensemble", required=True, help="an ensemble folder (RUN/ensemble), or its s3:// / gs:// URI")
    p.add_argument("--format", required=True, choices=("onnx", "openvino"))
    p.add_argument("--out", required=True, type=Path, help="the export folder")
    p.add_argument("--classes", default=None, help="comma-separated classes (default: all)")
    p.add_argument("--members", choices=("all", "used"), default="all",
                   help="all: every member runs, its score in the output as the torch query prints it; used: "
                        "only the members the fusion uses (faster; the other members' scores are left out)")
    a = p.parse_args(argv)
    try:
        ensemble = Ensemble.load(a.ensemble, "cpu")
        classes = [c.strip() for c in a.classes.split(",")] if a.classes else None
        for c in classes or []:
            ensemble.fusion_for(c)
        out = export_ensemble(ensemble, a.format, a.out, classes, members=a.members)
    except (EnsembleError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, entry in json.loads((out / EXPORT_FILE).read_text())["classes"].items():
        print(f"[export] {name}: {out / entry['file']} (max relative difference to torch: maps "
              f"{entry['checked']['maps']:.1e}, scores {entry['checked']['scores']:.1e})", flush=True)
        for member, why in entry["left_out"].items():
            print(f"[export] {name}: member {member} left out: {why}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
