"""The ensemble artifact: one folder that loads in one call, on CPU or GPU, without Ray.

::

    RUN/ensemble/
      ensemble.json                 format, per class: members, normalisers, fusion rule and
                                    weights, blur, image-score rule, threshold, validation report;
                                    each member's file, relative to this folder: the run's
                                    ../best/<model>/<classes>/model.safetensors (one copy, keep the
                                    run folder together), or a copy under members/ for an ensemble
                                    saved outside the run folder of its members; a member that
                                    is fitted, not trained (the memory bank), is refitted on every
                                    training normal once the fusion is chosen and saved under
                                    members/<model>/<class>.safetensors; "files": the SHA-256 of
                                    each member file

Loading runs no code from the folder: members are ``.safetensors`` files; a member path that
leaves the ensemble's run folder (the folder holding it) is refused, and so is a member file whose
SHA-256 is not the one recorded when the ensemble was written (tampered with, or half-copied).

>>> from ensembles import Ensemble
>>> ens = Ensemble.load("runs/demo/ensemble")
>>> out = ens.predict(images, class_name="washer")   # images [B,3,H,W] in [0,1], or PIL images
>>> out["scores"], out["maps"], out["anomalous"]
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anomaly_data.records import DatasetError
from anomaly_data.storage import check_reachable, is_uri, local_mirror, parse_location
from anomaly_data.transforms import resize_image
from ensembles.fusion import QuantileNormalizer, RankTable, blur, fuse_maps
from ensembles.runtime import path_within
from models import ConfigError, model_from_bytes
from models.checkpoint_files import CONVERT_HINT

FORMAT = 2  # 1: before member files were .safetensors with their SHA-256 recorded (ensembles.convert)
CONFIG_FILE = "ensemble.json"


class EnsembleError(ValueError):
    """A missing, incomplete or incompatible ensemble folder, or a bad query."""


@dataclass
class FusionChoice:
    """How member maps become one: the members with a non-zero weight are fused by ``rule``
    (``weighted`` uses the weights themselves), blurred by ``sigma`` (a fraction of the side),
    and the image score is ``map_max`` or ``member_mix`` (``image_weights`` over the members'
    normalised own scores)."""

    rule: str
    weights: list[float]
    sigma: float
    image_rule: str
    image_weights: list[float]

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self, members: list[str]) -> str:
        """E.g. ``map haloae+patchcore (mean, blur 0.031), image score patchcore (member_mix)``."""
        mapped = [m for m, w in zip(members, self.weights) if w > 0]
        scored = mapped if self.image_rule == "map_max" else [m for m, w in zip(members, self.image_weights) if w > 0]
        rule = f"{self.rule}, " if len(mapped) > 1 else ""
        return (f"map {'+'.join(mapped)} ({rule}blur {self.sigma:.3f}), "
                f"image score {'+'.join(scored)} ({self.image_rule})")

    def members_used(self, members: list[str]) -> list[str]:
        """Those of ``members`` that the map or the image score uses."""
        image = self.image_weights if self.image_rule == "member_mix" else [0.0] * len(members)
        return [m for m, w, v in zip(members, self.weights, image) if w > 0 or v > 0]


@dataclass
class ClassFusion:
    """Everything fitted on one class's validation set."""

    class_name: str
    members: list[str]                      # model names, in fusion order
    member_files: dict[str, str]            # model -> path relative to the ensemble folder
    weights_used: dict[str, str]            # model -> imagenet / packaged / file / random
    resolution: int                         # side of the maps the ensemble fuses at
    pixel_norm: dict[str, dict]             # model -> QuantileNormalizer
    image_norm: dict[str, dict]
    ranks: dict[str, list[float]]           # model -> RankTable quantiles (rank_mean)
    rule: str
    weights: list[float]
    sigma: float                            # blur sigma as a fraction of the side
    image_rule: str
    image_weights: list[float]
    threshold: float                        # image score above which an image is anomalous
    map_range: list[float]                  # fused-map values shown as 0 and 255 in map pictures:
                                            # median validation-normal pixel, strongest defect pixel
    validation: list[dict[str, Any]] = field(default_factory=list)
    ablations: dict[str, dict] = field(default_factory=dict)  # "fused:a+b" -> FusionChoice, for the report

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def choice(self) -> FusionChoice:
        return FusionChoice(self.rule, self.weights, self.sigma, self.image_rule, self.image_weights)

    @property
    def members_used(self) -> list[str]:
        """Members the map or the image score uses."""
        return self.choice.members_used(self.members)


def to_tensor_batch(images, side: int) -> torch.Tensor:
    """``[B,3,H,W]`` float in [0,1] from a tensor (as it is), or from PIL images or ``uint8``
    arrays, resized to ``side`` as the datasets are (``anomaly_data.transforms.resize_image``)."""
    if torch.is_tensor(images):
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise EnsembleError("float images must be in [0, 1] (divide uint8 pixels by 255)")
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise EnsembleError(f"images must be [B,3,H,W] (or [3,H,W]); got {tuple(images.shape)}")
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    items = images if isinstance(images, (list, tuple)) else [images]
    arrays = []
    for item in items:
        arr = np.asarray(item.convert("RGB")) if hasattr(item, "convert") else np.asarray(item)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        arr = resize_image(np.ascontiguousarray(arr[..., :3], dtype=np.uint8), side)
        arrays.append(torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0)
    return torch.stack(arrays)


@torch.no_grad()
def run_members(models: dict[str, Any], x: torch.Tensor, resolution: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each model's ``(image scores [B], maps [B,1,R,R])``: its own scoring path (``prepare`` resizes
    the input), the map resized once, from the model's size to the fusion resolution."""
    out = {}
    for name, net in models.items():
        scores, maps = net.score(net.prepare(x))
        if tuple(maps.shape[-2:]) != (resolution, resolution):
            maps = F.interpolate(maps, size=(resolution, resolution), mode="bilinear", align_corners=False)
        out[name] = (scores.float(), maps.float())
    return out


def fuse_outputs(fusion: ClassFusion, outputs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 choice: FusionChoice | None = None):
    """``(image scores [B], fused blurred maps [B,1,R,R])`` from member outputs, by the class's
    kept fusion or by ``choice`` (an ablation's). Tensor operations only: the exported graphs
    (``ensembles.export``) trace it."""
    choice = choice or fusion.choice
    used = [(m, w) for m, w in zip(fusion.members, choice.weights) if w > 0]
    maps = [QuantileNormalizer(**fusion.pixel_norm[m])(outputs[m][1]) for m, _ in used]
    ranks = [RankTable(fusion.ranks[m]) for m, _ in used] if choice.rule == "rank_mean" else None
    fused = maps[0] if len(maps) == 1 else fuse_maps(maps, choice.rule, [w for _, w in used], ranks)
    fused = blur(fused, choice.sigma)
    if choice.image_rule == "map_max":
        scores = fused.flatten(1).amax(1)
    else:
        mixed = [(m, w) for m, w in zip(fusion.members, choice.image_weights) if w > 0]
        parts = torch.stack([QuantileNormalizer(**fusion.image_norm[m])(outputs[m][0]) for m, _ in mixed])
        w = torch.as_tensor([w for _, w in mixed], dtype=parts.dtype, device=parts.device)
        scores = torch.einsum("m,mb->b", w / w.sum(), parts)
    return scores, fused


def normalised_member_scores(fusion: ClassFusion, outputs: dict[str, tuple[torch.Tensor, torch.Tensor]]
                             ) -> dict[str, torch.Tensor]:
    """Each member's own image scores ``[B]`` normalised as the fusion sees them."""
    return {m: QuantileNormalizer(**fusion.image_norm[m])(scores) for m, (scores, _) in outputs.items()}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def member_path(folder: Path, rel: str, where: str) -> Path:
    """The file a member entry ``rel`` names, inside the ensemble's run folder (the folder that
    holds ``folder``; symbolic links followed); anything else is refused, ``where`` naming the entry."""
    target = path_within(folder, rel, (folder.parent,))
    if target is None:
        raise EnsembleError(f"{where} names {rel!r}, outside the ensemble's run folder {folder.resolve().parent}: "
                            "an ensemble only loads files of its own run; it is not loaded")
    return target


def checked_member(folder: Path, rel: str, digests: dict[str, str], where: str) -> tuple[Path, bytes]:
    """``member_path`` and the file's bytes, read once: present, and its SHA-256 the one recorded
    in ``digests``."""
    path = member_path(folder, rel, where)
    if not path.is_file():
        raise EnsembleError(f"{where} is missing: {path}")
    if rel not in digests:
        raise EnsembleError(f"{where}: no SHA-256 is recorded for {rel!r} in {folder / CONFIG_FILE}; "
                            "rebuild the ensemble (or convert it: python -m ensembles.convert RUN_DIR)")
    data = path.read_bytes()
    found = hashlib.sha256(data).hexdigest()
    if found != digests[rel]:
        raise EnsembleError(f"{path} changed since the ensemble was written (SHA-256 {found[:16]}..., recorded "
                            f"{digests[rel][:16]}...): it is not loaded. A tampered or half-copied member file: "
                            "copy the run folder again, or rebuild the ensemble")
    return path, data


def local_ensemble(uri: str) -> Path:
    """This node's copy of the ensemble folder at ``uri`` and of its run's ``best/``."""
    try:
        uri = parse_location(uri)
        if "/" not in uri.split("://", 1)[1]:
            raise EnsembleError(f"{uri}: give the ensemble folder's URI, e.g. s3://BUCKET/runs/a/ensemble")
        run, name = uri.rsplit("/", 1)
        check_reachable(uri, must_exist=True)
        return local_mirror(run, [name, "best"]) / name
    except DatasetError as err:
        raise EnsembleError(str(err)) from None


class Ensemble:
    """Fused members per class; ``predict`` gives scores, fused maps and decisions."""

    def __init__(self, fusions: dict[str, ClassFusion], members: dict[str, Any], folder: Path | None = None,
                 device: str | torch.device = "cpu", data: dict[str, Any] | None = None):
        self.fusions = fusions
        self.members = members  # member file -> loaded model
        self.folder = folder
        self.device = torch.device(device)
        self.data = data or {}  # how the validation set was made (seed, val_fraction): also the test split's seed

    @property
    def class_names(self) -> list[str]:
        return list(self.fusions)

    # ----- persistence -----------------------------------------------------------------
    @classmethod
    def load(cls, folder, device: str | torch.device | None = None) -> "Ensemble":
        """From a folder, or an ``s3://`` / ``gs://`` URI of one (fetched once into this node's
        cache with the run's ``best/`` members it refers to)."""
        folder = local_ensemble(folder) if is_uri(str(folder)) else Path(folder)
        config_path = folder / CONFIG_FILE
        if not config_path.is_file():
            raise EnsembleError(f"{folder} is not an ensemble folder: {CONFIG_FILE} is missing")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise EnsembleError(f"{config_path} is not valid JSON ({err})") from None
        if config.get("format") == 1:
            raise EnsembleError(f"{config_path} is an ensemble of an earlier version (format 1: pickled member "
                                f"files, no SHA-256 recorded); it is not loaded: {CONVERT_HINT}")
        if config.get("format") != FORMAT:
            raise EnsembleError(f"{config_path} has format {config.get('format')!r}; this version reads format "
                                f"{FORMAT}: rebuild the ensemble with this version (python -m distributed.tune)")
        fusions = {name: ClassFusion(**f) for name, f in config["classes"].items()}
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        members = {}
        for fusion in fusions.values():
            for model, rel in fusion.member_files.items():
                if rel in members:
                    continue
                path, data = checked_member(folder, rel, config.get("files", {}),
                                            f"member {model} of class {fusion.class_name}")
                try:
                    members[rel] = model_from_bytes(data, path, device).eval()
                except ConfigError as err:
                    raise EnsembleError(str(err)) from None
        return cls(fusions, members, folder, device, config.get("data"))

    def save(self, folder, sources: dict[str, Path]) -> Path:
        """Write the folder; ``sources`` maps each member file (relative) to its checkpoint."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for rel, src in sources.items():
            target = member_path(folder, rel, f"member file {rel!r}")
            if rel.startswith("../"):  # the run's best/ copy, referred to, not copied
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if Path(src).resolve() != target.resolve():
                shutil.copy2(src, target)
        files = sorted({rel for f in self.fusions.values() for rel in f.member_files.values()})
        config = {"format": FORMAT, "data": self.data, "classes": {n: f.to_dict() for n, f in self.fusions.items()},
                  "files": {rel: file_sha256(folder / rel) for rel in files}}
        tmp = folder / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        tmp.replace(folder / CONFIG_FILE)
        self.folder = folder
        return folder

    # ----- scoring ---------------------------------------------------------------------
    def fusion_for(self, class_name: str | None) -> ClassFusion:
        if class_name is None:
            if len(self.fusions) == 1:
                return next(iter(self.fusions.values()))
            raise EnsembleError(f"this ensemble covers {self.class_names}: say which class the images are")
        if class_name not in self.fusions:
            raise EnsembleError(f"unknown class {class_name!r}; this ensemble covers {self.class_names}")
        return self.fusions[class_name]

    def member_trains(self, class_name: str, model: str) -> bool:
        return bool(self.members[self.fusion_for(class_name).member_files[model]].trains)

    def member_outputs(self, images, class_name: str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each member's own ``(image scores [B], maps [B,1,R,R])``, maps at the fusion resolution."""
        fusion = self.fusion_for(class_name)
        models = {m: self.members[fusion.member_files[m]] for m in fusion.members}
        return run_members(models, to_tensor_batch(images, fusion.resolution).to(self.device), fusion.resolution)

    def fuse(self, fusion: ClassFusion, outputs: dict[str, tuple[torch.Tensor, torch.Tensor]],
             choice: FusionChoice | None = None):
        """``(image scores [B], fused blurred maps [B,1,R,R])`` from member outputs, by the class's
        kept fusion or by ``choice`` (an ablation's)."""
        return fuse_outputs(fusion, outputs, choice)

    def predict(self, images, class_name: str | None = None) -> dict[str, Any]:
        """Scores, fused maps ``[B,1,R,R]``, decisions at the validation threshold, member outputs
        (raw) and member image scores normalised as the fusion sees them (``member_scores``)."""
        fusion = self.fusion_for(class_name)
        outputs = self.member_outputs(images, fusion.class_name)
        scores, maps = self.fuse(fusion, outputs)
        return {"scores": scores.cpu(), "maps": maps.cpu(), "anomalous": (scores >= fusion.threshold).cpu(),
                "threshold": fusion.threshold, "class_name": fusion.class_name,
                "members": {m: (s.cpu(), mp.cpu()) for m, (s, mp) in outputs.items()},
                "member_scores": {m: s.cpu() for m, s in normalised_member_scores(fusion, outputs).items()}}
