"""Transformaly: a frozen ViT teacher, per-layer student blocks, and two Gaussian scores.

After Cohen & Avidan, "Transformaly - Two (Feature Spaces) Are Better Than One" (CVPR-W 2022).

- A frozen timm ViT (any ``vit_*`` model with ``.blocks``) is the teacher. It runs **once** per
  image and only as deep as needed: up to the deepest chosen layer for training, through every
  block and the final norm only when the pretrained CLS score is used.
- For each chosen layer ``l`` a freshly initialised student (``student_depth`` blocks shaped
  like the teacher's) learns to map the teacher's *input* of block ``l`` to the teacher's
  *output* of block ``l`` on normal images, over all tokens (MSE).
- Image score = ``-(w_a * loglik_a + w_b * loglik_b)`` (higher = more anomalous) with
  (a) the Gaussian log-likelihood of the teacher's final-norm CLS feature after PCA whitening
  (components kept until the cumulative explained variance reaches ``whitening_threshold``) and
  (b) the Gaussian log-likelihood of the per-layer student error vector (one mean squared error
  over tokens and dims per chosen layer). Both Gaussians are fitted by ``fit_statistics`` on
  the training normals and saved as buffers: **call ``fit_statistics`` before ``predict``**
  (``models.training.fit`` does); scoring before raises ``NotFittedError``.
- Anomaly map (not in the original): per-patch student error (mean over dims of the squared
  error, averaged over the chosen layers) on the patch grid, upsampled bilinearly to
  ``image_size`` and blurred with ``map_blur_sigma`` (then to the input's size). The map needs no fitted statistics.

Differences from the original on purpose: the teacher runs once (not twice) and in eval mode
(no dropout); the PCA keeps the right number of components (the original kept one too few);
the layer set, student depth and the weighting of the two scores are parameters.

>>> model = Transformaly.from_config("fast", layers="1-3")   # doctest: +SKIP
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Iterable

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor, nn

from models import backbones, register_model
from models.base import AnomalyModel
from models.config import ConfigError, Fraction, ModelConfig, NonNegative, NonNegativeInt, PositiveInt, Range
from models.layers.blur import gaussian_blur
from models.layers.frozen_cache import FROZEN_OUTPUTS, caching_allowed, input_key
from models.layers.gaussian import GaussianDensity, NotFittedError, PCAWhitening


@dataclass(frozen=True)
class TransformalyConfig(ModelConfig):
    arch: str = "vit_tiny_patch16_224"
    """timm ViT teacher (a ``vit_*`` model with ``.blocks``), built at ``image_size``."""
    image_size: Annotated[int, Range(16)] = 128
    """Input side in px; inputs of another size are resized to it (the map comes back at the input size)."""
    patch_size: NonNegativeInt = 0
    """Patch side in px of the teacher; 0 = the architecture's own. Pretrained patch embeddings are resampled."""
    weights: str = "none"
    """Teacher weights: "imagenet" (model hub), a state-dict file path, or "none" (random, with a warning)."""
    layers: Any = "1-5"
    """Teacher blocks that get a student: a list/tuple of 0-based block indices, or a string of
    inclusive ranges and indices such as "2-11" or "1-3,7". Indices must be unique and < depth."""
    student_depth: PositiveInt = 1
    """Blocks per student."""
    whitening_threshold: float = 0.9
    """PCA keeps the fewest components whose cumulative explained variance is >= this, in (0, 1]."""
    pretrained_score_weight: NonNegative = 1.0
    """Weight of score (a), the CLS-feature log-likelihood; 0 drops it (and the teacher stops at the deepest chosen layer)."""
    student_score_weight: NonNegative = 1.0
    """Weight of score (b), the student-error log-likelihood; 0 drops it."""
    covariance_shrinkage: Fraction = 0.01
    """Both Gaussians: covariance <- (1-a) * covariance + a * mean variance * I, a in [0, 1)."""
    map_blur_sigma: NonNegative = 4.0
    """Gaussian blur (px at ``image_size``) of the upsampled patch-error map; 0 = none."""

    presets = {
        # the original: ViT-B/16 at 384 px, ImageNet weights, students on blocks 2..11
        "paper": {"arch": "vit_base_patch16_384", "image_size": 384, "patch_size": 0, "weights": "imagenet",
                  "layers": "2-11", "student_depth": 1, "whitening_threshold": 0.9},
        # offline and CPU-sized: a random ViT-Tiny at 128 px with 8 px patches (16x16 grid)
        "fast": {"arch": "vit_tiny_patch16_224", "image_size": 128, "patch_size": 8, "weights": "none",
                 "layers": "1-5", "student_depth": 1, "whitening_threshold": 0.9},
    }
    # the original: Adam 1e-4, 30 epochs, batch 32 (its README; the code's default is 6)
    recipes = {
        "paper": dict(lr=1e-4, epochs=30, batch_size=32, optimizer="adam", weight_decay=0.0, grad_clip=0.0),
        "fast": dict(lr=1e-3, epochs=20, batch_size=8, optimizer="adamw", weight_decay=1e-5, grad_clip=1.0),
    }

    def check(self) -> None:
        """The rules between fields (each field's type and range is checked by ``ModelConfig``)."""
        self.need(self.arch.startswith("vit_") and timm.is_model(self.arch), f"arch={self.arch!r} must be a timm "
                  "ViT name starting with 'vit_', e.g. 'vit_tiny_patch16_224', 'vit_base_patch16_384'")
        self.need(not self.patch_size or self.image_size % self.patch_size == 0,
                  f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        self.need(0 < self.whitening_threshold <= 1, f"whitening_threshold={self.whitening_threshold} must be in (0, 1]")
        self.need(self.pretrained_score_weight > 0 or self.student_score_weight > 0,
                  "pretrained_score_weight and student_score_weight are both 0; at least one score must be used")
        parse_layers(self.layers, teacher_depth(self.arch))


def parse_layers(spec: Any, depth: int) -> tuple[int, ...]:
    """Block indices from ``spec`` (ints, or a string like ``"2-11"`` / ``"1-3,7"``), validated against ``depth``."""
    allowed = f"indices 0..{depth - 1} of the teacher's {depth} blocks"
    if isinstance(spec, str):
        indices: list[int] = []
        for part in (p.strip() for p in spec.split(",")):
            try:
                if "-" in part:
                    first, last = (int(v) for v in part.split("-"))
                    if last < first:
                        raise ValueError
                    indices.extend(range(first, last + 1))
                else:
                    indices.append(int(part))
            except ValueError:
                raise ConfigError(f"transformaly: layers={spec!r} is not a list of {allowed} nor a "
                                  "string of inclusive ranges such as '2-11' or '1-3,7'") from None
    elif isinstance(spec, int) and not isinstance(spec, bool):
        indices = [spec]
    elif isinstance(spec, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        indices = list(spec)
    else:
        raise ConfigError(f"transformaly: layers={spec!r} must be a list of {allowed} or a range string like '2-11'")
    if not indices:
        raise ConfigError(f"transformaly: layers={spec!r} is empty; choose at least one of {allowed}")
    if len(set(indices)) != len(indices):
        raise ConfigError(f"transformaly: layers={spec!r} repeats a block; give each of {allowed} at most once")
    bad = [i for i in indices if not 0 <= i < depth]
    if bad:
        raise ConfigError(f"transformaly: layers={spec!r} has {bad} outside {allowed}")
    return tuple(sorted(indices))


def fresh_student_block(teacher_block: nn.Module) -> nn.Module:
    """A block shaped like ``teacher_block`` but freshly initialised (no teacher weight is kept)."""
    block = copy.deepcopy(teacher_block)
    for module in block.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()  # norms, layer scales
    for p in block.parameters():
        p.requires_grad_(True)
    return block.train()


def build_teacher(config: TransformalyConfig, keep_blocks: int) -> tuple[nn.Module, str]:
    """The frozen timm ViT with only its first ``keep_blocks`` blocks and no classifier, and its weights label."""
    kwargs: dict[str, Any] = {"img_size": config.image_size, "num_classes": 0}
    if config.patch_size:
        kwargs["patch_size"] = config.patch_size
    try:
        with backbones.frozen_init():
            teacher = timm.create_model(config.arch, pretrained=False, **kwargs)
    except Exception as err:  # timm raises assertion/type errors for impossible geometries
        raise ConfigError(f"transformaly: cannot build {config.arch!r} with image_size={config.image_size}, "
                          f"patch_size={config.patch_size}: {err}") from err
    teacher.blocks = teacher.blocks[:keep_blocks]
    state = backbones.full_model_state_dict(config.arch, config.weights)
    if state is None:
        warnings.warn(f"transformaly: random {config.arch} teacher (weights='none'); its CLS features and "
                      "block mappings carry no pretrained knowledge, scores are much weaker", stacklevel=4)
        label = "random"
    else:
        state = checkpoint_filter_fn(state, teacher)  # resamples position and patch embeddings
        own = teacher.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise backbones.WeightsError(f"{config.arch} weights ({config.weights}) lack {len(missing)} "
                                         f"tensors, e.g. {missing[:3]}")
        teacher.load_state_dict({k: state[k] for k in own}, strict=True)
        label = backbones.weights_label(config.weights)
    return backbones.freeze(teacher), label


def teacher_depth(arch: str) -> int:
    """Blocks of the timm ViT ``arch``."""
    with torch.device("meta"):  # the structure only, no memory or init cost
        model = timm.create_model(arch, pretrained=False)
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise ConfigError(f"transformaly: arch={arch!r} has no '.blocks'; choose a plain timm ViT ('vit_*')")
    return len(model.blocks)


@register_model(space="search_spaces.transformaly")
class Transformaly(AnomalyModel):
    """Frozen ViT teacher + per-layer student blocks; Gaussian image score, student-error map."""

    name: ClassVar[str] = "transformaly"
    config_class: ClassVar[type] = TransformalyConfig
    backbone_field: ClassVar[str] = "arch"

    def __init__(self, config: TransformalyConfig):
        super().__init__(config)
        depth = teacher_depth(config.arch)
        self.layers = parse_layers(config.layers, depth)
        self.uses_cls = config.pretrained_score_weight > 0
        keep = depth if self.uses_cls else self.layers[-1] + 1
        self.teacher, self.weights_used = build_teacher(config, keep)
        self.num_prefix_tokens = int(getattr(self.teacher, "num_prefix_tokens", 1))
        self.grid_size = tuple(self.teacher.patch_embed.grid_size)
        self.students = nn.ModuleList(
            nn.Sequential(*(fresh_student_block(self.teacher.blocks[layer]) for _ in range(config.student_depth)))
            for layer in self.layers)
        self.cls_whitening = PCAWhitening()
        self.cls_gaussian = GaussianDensity()
        self.error_gaussian = GaussianDensity()
        self.register_buffer("statistics_fitted", torch.zeros((), dtype=torch.bool))

    def frozen_modules(self) -> list[nn.Module]:
        return [self.teacher]

    # ----- teacher and students --------------------------------------------------------
    @torch.no_grad()
    def teacher_states(self, x: Tensor, with_cls: bool) -> tuple[list[Tensor], Tensor | None]:
        """One teacher pass over a prepared batch: ``states[i]`` is the input of block ``i`` (and
        ``states[i+1]`` its output).

        Runs up to the deepest chosen layer, or through every block and the final norm when
        ``with_cls`` (then also returns the pooled CLS feature). In eval mode a batch seen before
        is not run again (``layers.frozen_cache``: validations refit and score the same images).
        """
        if not caching_allowed(self):
            return self._teacher_pass(x, with_cls)
        # cached through every block, so that every choice of layers of the search shares the entry
        states, cls = FROZEN_OUTPUTS.get_or_compute(input_key(self.frozen_digest(), x),
                                                    lambda: self._teacher_pass(x, with_cls=True))
        return (states, cls) if with_cls else (states[:self.layers[-1] + 2], None)

    def _teacher_pass(self, x: Tensor, with_cls: bool) -> tuple[list[Tensor], Tensor | None]:
        t = self.teacher
        last = len(t.blocks) if with_cls else self.layers[-1] + 1
        states: list[Tensor] = []
        hooks = [block.register_forward_pre_hook(lambda _, args, kwargs: states.append(args[0] if args else kwargs["x"]),
                                                 with_kwargs=True) for block in t.blocks[:last]]
        hooks.append(t.blocks[last - 1].register_forward_hook(lambda _, args, out: states.append(out)))
        try:
            t.forward_intermediates(x, indices=[last - 1], stop_early=True, intermediates_only=True, output_fmt="NLC")
        finally:
            for hook in hooks:
                hook.remove()
        cls = t.forward_head(t.norm(states[-1]), pre_logits=True) if with_cls else None
        return states, cls

    def student_errors(self, states: list[Tensor]) -> Tensor:
        """Squared student error per layer and token, mean over dims: ``[B, L, tokens]``."""
        errors = [(student(states[layer]) - states[layer + 1]).pow(2).mean(-1)
                  for layer, student in zip(self.layers, self.students)]
        return torch.stack(errors, 1)

    def loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        states, _ = self.teacher_states(self.prepare(batch["image"]), with_cls=False)
        per_layer = self.student_errors(states).mean(-1).mean(0)  # MSE over batch, tokens, dims
        parts = {f"layer_{layer}": per_layer[j] for j, layer in enumerate(self.layers)}
        return {"loss": per_layer.sum(), **parts}

    # ----- maps and scores ---------------------------------------------------------------
    def map_from_errors(self, errors: Tensor, out_size: tuple[int, int]) -> Tensor:
        patches = errors[:, :, self.num_prefix_tokens:].mean(1)
        grid = patches.reshape(patches.shape[0], 1, *self.grid_size)
        maps = F.interpolate(grid, size=out_size, mode="bilinear", align_corners=False)
        return gaussian_blur(maps, self.config.map_blur_sigma)

    def map_of(self, x: Tensor) -> Tensor:
        states, _ = self.teacher_states(x, with_cls=False)
        return self.map_from_errors(self.student_errors(states), tuple(x.shape[-2:]))

    def score_parts(self, x: Tensor) -> dict[str, Tensor]:
        """Of a prepared batch: the log-likelihoods of the used scores (``pretrained_loglik``,
        ``student_loglik``), the image score and the map."""
        if not torch.compiler.is_exporting() and not bool(self.statistics_fitted):  # checked before an export
            raise NotFittedError("transformaly: call fit_statistics(train_loader) on the training normals before "
                                 "scoring images (models.training.fit does it after training); anomaly_map needs no fit")
        states, cls = self.teacher_states(x, with_cls=self.uses_cls)
        errors = self.student_errors(states)
        out = {"map": self.map_from_errors(errors, tuple(x.shape[-2:]))}
        score = torch.zeros(x.shape[0], device=x.device)
        if self.uses_cls:
            out["pretrained_loglik"] = self.cls_gaussian.log_prob(self.cls_whitening(cls.float()))
            score = score - self.config.pretrained_score_weight * out["pretrained_loglik"]
        if self.config.student_score_weight > 0:
            out["student_loglik"] = self.error_gaussian.log_prob(errors.mean(-1))
            score = score - self.config.student_score_weight * out["student_loglik"]
        out["score"] = score
        return out

    def score(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(-(w_a * loglik_a + w_b * loglik_b) [B], student-error map)``; needs ``fit_statistics``."""
        parts = self.score_parts(x)
        return parts["score"], parts["map"]

    @torch.no_grad()
    def fit_statistics(self, loader: Iterable[dict[str, Any]]) -> None:
        """Fit the CLS-feature PCA + Gaussian and the student-error Gaussian on the training normals."""
        was_training = self.training
        self.eval()
        device = next(self.students.parameters()).device
        cls_features, layer_errors = [], []
        for batch in loader:
            states, cls = self.teacher_states(self.prepare(batch["image"].to(device)), with_cls=self.uses_cls)
            if self.uses_cls:
                cls_features.append(cls.float())
            layer_errors.append(self.student_errors(states).mean(-1).float())
        self.train(was_training)
        if not layer_errors:
            raise ValueError("transformaly.fit_statistics: the loader is empty; give it the training normals")
        shrinkage = self.config.covariance_shrinkage
        if self.uses_cls:
            features = torch.cat(cls_features)
            self.cls_whitening.fit(features, self.config.whitening_threshold)
            self.cls_gaussian.fit(self.cls_whitening(features), shrinkage)
        if self.config.student_score_weight > 0:
            self.error_gaussian.fit(torch.cat(layer_errors), shrinkage)
        self.statistics_fitted.fill_(True)


__all__ = ["Transformaly", "TransformalyConfig", "parse_layers", "teacher_depth"]
