"""The exported ensemble at run time, without torch: ONNX Runtime or OpenVINO, NumPy and PIL.

    from ensembles.runtime import ExportedEnsemble
    ens = ExportedEnsemble.load("export/")          # a folder written by python -m ensembles.export
    out = ens.predict([rgb_uint8_array], "washer")  # scores, maps [B,1,R,R], anomalous, member_scores

``python -m ensembles.query --ensemble export/ IMAGE`` uses it and prints the same JSON lines as
for the torch ensemble. Images are resized to the graph's input side exactly as the torch
ensemble's queries resize them (``anomaly_data.transforms.resize_image``); the fused map is
brought back to each image's size by ``map_png``, which the torch query uses as well.

This module and what it imports never import torch (a test runs it with torch blocked).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomaly_data.transforms import resize_image

EXPORT_FILE = "export.json"
EXPORT_FORMAT = 1
RUNTIMES = ("onnx", "openvino")


class ExportError(ValueError):
    """A missing or incompatible export folder, or a member that cannot be exported."""


@dataclass
class ExportedClass:
    """What a query needs of one class besides its graph."""

    class_name: str
    file: str                    # the graph, relative to the export folder
    resolution: int              # input side of the graph
    members: list[str]           # order of the graph's member-score output
    threshold: float
    map_range: list[float]
    checked: dict[str, float] | None = None   # max relative difference to the torch ensemble, on export
    left_out: dict[str, str] | None = None    # members not in the graph, and why


def path_within(folder: Path, rel: str, roots: tuple[Path, ...]) -> Path | None:
    """``folder / rel`` (symbolic links followed) when it lies strictly inside one of ``roots``
    and ``rel`` is a plain relative path; None otherwise (absolute, a URI, or leaving them)."""
    if Path(rel).is_absolute() or "://" in rel or "\\" in rel:
        return None
    target = (folder / rel).resolve()
    return target if any(target != r and target.is_relative_to(r) for r in (r.resolve() for r in roots)) else None


def is_export(folder: str | Path) -> bool:
    return (Path(folder) / EXPORT_FILE).is_file()


class ExportedEnsemble:
    """Per class, one graph: images ``[B,3,R,R]`` float32 in [0, 1] -> ``map [B,1,R,R]``,
    ``score [B]``, ``member_scores [B, M]`` (each member's normalised image score)."""

    def __init__(self, folder: Path, runtime: str, classes: dict[str, ExportedClass]):
        self.folder, self.runtime, self.classes = folder, runtime, classes
        self._runs: dict[str, Any] = {}

    @classmethod
    def load(cls, folder: str | Path) -> "ExportedEnsemble":
        folder = Path(folder)
        if not is_export(folder):
            raise ExportError(f"{folder} is not an exported ensemble: {EXPORT_FILE} is missing "
                              "(make one with python -m ensembles.export)")
        config = json.loads((folder / EXPORT_FILE).read_text())
        if config.get("format") != EXPORT_FORMAT or config.get("runtime") not in RUNTIMES:
            raise ExportError(f"{folder / EXPORT_FILE}: format {config.get('format')!r} / runtime "
                              f"{config.get('runtime')!r} is not one this version reads; export again")
        classes = {name: ExportedClass(name, **c) for name, c in config["classes"].items()}
        for name, spec in classes.items():
            if path_within(folder, spec.file, (folder,)) is None:
                raise ExportError(f"{folder / EXPORT_FILE}: class {name} names the graph {spec.file!r}, outside the "
                                  "export folder: an export only loads files of its own; it is not loaded")
        return cls(folder, config["runtime"], classes)

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    def fusion_for(self, class_name: str | None) -> ExportedClass:
        if class_name is None:
            if len(self.classes) == 1:
                return next(iter(self.classes.values()))
            raise ExportError(f"this ensemble covers {self.class_names}: say which class the images are")
        if class_name not in self.classes:
            raise ExportError(f"unknown class {class_name!r}; this ensemble covers {self.class_names}")
        return self.classes[class_name]

    def graph(self, class_name: str):
        """A callable ``images -> (map, score, member_scores)`` for the class, compiled once."""
        if class_name not in self._runs:
            path = self.folder / self.classes[class_name].file
            if self.runtime == "onnx":
                import onnxruntime

                session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                name = session.get_inputs()[0].name
                self._runs[class_name] = lambda x: session.run(None, {name: x})
            else:
                import openvino

                # f32 on purpose: on CPUs with bf16 OpenVINO would otherwise compute in bf16
                compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
                self._runs[class_name] = lambda x: [compiled(x)[out] for out in compiled.outputs]
        return self._runs[class_name]

    def predict(self, images: list[np.ndarray], class_name: str | None = None) -> dict[str, Any]:
        """As ``Ensemble.predict`` (NumPy arrays): ``scores``, ``maps``, ``anomalous``, ``threshold``,
        ``class_name``, ``member_scores``; ``images`` are ``uint8 [H, W, 3]`` arrays of any size."""
        spec = self.fusion_for(class_name)
        x = np.stack([resize_image(np.ascontiguousarray(img[..., :3], dtype=np.uint8), spec.resolution)
                      for img in images]).astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
        maps, scores, members = self.graph(spec.class_name)(np.ascontiguousarray(x))
        return {"scores": np.asarray(scores), "maps": np.asarray(maps), "anomalous": np.asarray(scores) >= spec.threshold,
                "threshold": spec.threshold, "class_name": spec.class_name,
                "member_scores": {m: np.asarray(members)[:, j] for j, m in enumerate(spec.members)}}


# ----- what a query answers: shared by the torch ensemble's query, the server and this runtime -----
def result_row(result: dict, i: int) -> dict:
    """The answer for image ``i`` of a ``predict`` result: class, score, decision, threshold and
    each member's normalised image score."""
    return {"class": result["class_name"], "score": float(result["scores"][i]), "anomalous": bool(result["anomalous"][i]),
            "threshold": float(result["threshold"]),
            "members": {m: float(v[i]) for m, v in result["member_scores"].items()}}


def resize_bilinear(values: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` resized bilinearly with half-pixel centres (``F.interpolate(..., "bilinear",
    align_corners=False)`` without antialiasing), in float32."""
    def axis(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * np.float32(n_in / n_out) - 0.5, 0)
        low = np.minimum(src.astype(np.int64), n_in - 1)
        return low, np.minimum(low + 1, n_in - 1), (src - low).astype(np.float32)

    values = np.asarray(values, dtype=np.float32)
    (y0, y1, wy), (x0, x1, wx) = axis(values.shape[0], size_hw[0]), axis(values.shape[1], size_hw[1])
    top = values[y0][:, x0] * (1 - wx) + values[y0][:, x1] * wx
    bottom = values[y1][:, x0] * (1 - wx) + values[y1][:, x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


def map_png(fused, size_hw: tuple[int, int], value_range: list[float]) -> Image.Image:
    """The fused map (``[1, R, R]`` or ``[R, R]``) at the image's size as an 8-bit picture: 0 = the
    median validation-normal pixel, 255 = the strongest defect pixel seen on validation."""
    lo, hi = value_range
    values = resize_bilinear(np.asarray(fused, dtype=np.float32).reshape(np.shape(fused)[-2:]), size_hw)
    scaled = np.clip((values - lo) / max(hi - lo, 1e-12), 0, 1)
    return Image.fromarray(np.round(scaled * 255).astype(np.uint8))
