"""What each study trains, built and checked before Ray starts.

A ``StudySpec`` says, for one study: the model config that is fixed (the preset, then the
``--set MODEL.KEY=VALUE`` values), which of its fields the user pinned (never sampled by the
search), the training recipe (the preset's, then ``--set`` recipe keys, ``--batch-size``, and
``--epochs`` as a cap), and the search space with its first point (the fixed config itself).
Every way this can be wrong (an unknown preset, model or key, a value of the wrong type, a
combination the model refuses, a first point outside its space) is a ``SpecError`` here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import optuna

from anomaly_data import DatasetError, split_train_validation
from distributed.studies import ReportPlan
from distributed.trial import TrainJob
from models import ConfigError, ModelConfig, model_class
from models.config import Recipe, check_value, value_of
from search_spaces import get_space


class SpecError(ValueError):
    """A bad ``--preset`` / ``--set`` / recipe value (the CLI turns it into exit 2)."""


def parse_sets(items: list[str], models: list[str]) -> dict[str, dict[str, Any]]:
    """``["haloae.halo=3", "hvq_trans.lr=1e-4"]`` -> ``{"haloae": {"halo": 3}, "hvq_trans": {"lr": 1e-4}}``,
    each value checked against its field's type; a key is a model-config field or a recipe field."""
    out: dict[str, dict[str, Any]] = {m: {} for m in models}
    for item in items:
        key, eq, text = item.partition("=")
        model, dot, name = key.strip().partition(".")
        if not eq or not dot or not name:
            raise SpecError(f"--set {item!r}: expected MODEL.KEY=VALUE, e.g. --set haloae.halo=3")
        if model not in out:
            raise SpecError(f"--set {item!r}: model {model!r} is not among the models of this run {models}")
        types = {**Recipe.field_types(), **model_class(model).config_class.field_types()}
        if name not in types:
            raise SpecError(f"--set {key}: {model} has no key {name!r}; model keys: "
                            f"{sorted(model_class(model).config_class.field_types())}; "
                            f"training keys: {sorted(Recipe.field_types())}")
        try:
            out[model][name] = check_value(f"--set {key}", value_of(text), types[name])
        except ConfigError as err:
            raise SpecError(str(err)) from None
    return out


@dataclass(frozen=True)
class StudySpec:
    key: str
    model: str
    classes: tuple[str, ...]
    preset: str
    config: ModelConfig
    """The model's config before the search (preset, then --set), checked."""
    pinned: frozenset[str]
    """Fields the user fixed with --set: the search never samples them."""
    recipe: Recipe
    epochs_note: str
    """How the epochs were arrived at (for the log and config.json)."""

    def base(self) -> dict[str, Any]:
        """What the search space reads: the fixed config and the recipe's learning rate."""
        return {**self.config.to_dict(), "lr": self.recipe.lr}

    def space(self):
        return get_space(self.model, self.base(), self.pinned)

    def first_point(self) -> dict[str, Any]:
        return self.space()[1][0]

    def summary(self) -> dict[str, Any]:
        return {"model": self.model, "classes": list(self.classes), "preset": self.preset,
                "pinned": sorted(self.pinned), "recipe": self.recipe.to_dict(),
                "epochs": self.epochs_note, "model_config": self.config.to_dict()}


def study_recipe(model: str, preset: str, overrides: dict[str, Any], n_train: int,
                 epochs_cap: int | None, batch_size: int | None) -> tuple[Recipe, str]:
    """The preset's recipe with the user's values, its epochs as passes over ``n_train`` images."""
    cls = model_class(model)
    values = {k: v for k, v in overrides.items() if k in Recipe.field_types()}
    if batch_size is not None:
        values["batch_size"] = batch_size
    try:
        recipe = Recipe.build(cls.config_class.recipes.get(preset, {}), **values)
    except ConfigError as err:
        raise SpecError(f"{model} (preset {preset}): {err}") from None
    passes = recipe.passes(n_train)
    note = f"{passes} epoch(s) of {n_train} training images"
    if recipe.samples_per_epoch:
        note += f" (the paper's {recipe.epochs} epochs of {recipe.samples_per_epoch} samples)"
    if not cls.trains:
        passes, note = 1, "fitted in one pass (no training)"
    elif epochs_cap is not None and epochs_cap < passes:
        passes, note = epochs_cap, (f"{epochs_cap} epoch(s): --epochs cuts the preset's recipe to "
                                    f"{100 * epochs_cap / passes:.1f} % of it (the preset's: {note})")
    return recipe.replace(epochs=passes, samples_per_epoch=0), note


def build_spec(key: str, model: str, classes: tuple[str, ...], preset: str, overrides: dict[str, Any],
               n_train: int, epochs_cap: int | None = None, batch_size: int | None = None) -> StudySpec:
    config_class = model_class(model).config_class
    if preset not in config_class.presets:
        raise SpecError(f"--preset {preset!r}: {model} has no such preset; choose one of {sorted(config_class.presets)}")
    fields = config_class.field_types()
    values = {k: v for k, v in overrides.items() if k in fields}
    pinned = frozenset(k for k in overrides if k in fields or k == "lr")  # lr: the one searched recipe field
    if len(classes) > 1 and "num_classes" in fields and "num_classes" not in overrides:
        values["num_classes"] = len(classes)  # a unified model: one codebook set per class (HVQ-Trans)
    config = checked(lambda: config_class.from_preset(preset, **values), f"{model} with --preset {preset}")
    recipe, note = study_recipe(model, preset, overrides, n_train, epochs_cap, batch_size)
    spec = StudySpec(key, model, tuple(classes), preset, config, pinned, recipe, note)
    check_first_point(spec)
    return spec


def checked(build, where: str):
    """``build()``, a ``ConfigError`` it raises as a ``SpecError`` from ``where``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build()
    except (TypeError, ValueError) as err:  # ConfigError is a ValueError
        raise SpecError(f"{where}: {err}") from None


def check_first_point(spec: StudySpec) -> None:
    """The first point lies in its space and gives a config the model accepts (that it is the
    fixed config field by field is tests/test_search_spaces.py's check, for every preset)."""
    space, points = spec.space()
    trial = optuna.trial.FixedTrial(points[0])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            derived = space(trial)
    except (ValueError, KeyError) as err:
        raise SpecError(f"{spec.key}: the search space of {spec.model} does not hold the preset's point "
                        f"{points[0]} ({err}); change --set or --preset") from None
    checked(lambda: spec_job(spec, "", "").with_trial({**points[0], **derived}), f"{spec.key} (first point of the search)")


def spec_job(spec: StudySpec, dataset: str, root: str, seed: int = 0, skip_bad_images: bool = False,
             precision: str = "auto", plan: ReportPlan = ReportPlan()) -> TrainJob:
    """The ``TrainJob`` that trains ``spec`` before the search changes anything."""
    return TrainJob(model=spec.model, dataset=dataset, root=root, classes=tuple(spec.classes), config=spec.config,
                    recipe=spec.recipe, seed=seed, skip_bad_images=skip_bad_images, precision=precision, plan=plan)


def training_images(records: dict, classes, val_fraction: float, seed: int) -> int:
    """Training normals of ``classes`` once the validation normals are held out (no decoding)."""
    try:
        return sum(len(split_train_validation(records[c].train, val_fraction, seed)[0]) for c in classes)
    except DatasetError as err:
        raise SpecError(str(err)) from None


def build_specs(studies, records: dict, preset: str, sets: list[str], epochs_cap: int | None = None,
                batch_size: int | None = None, image_size: int | None = None, seed: int = 0,
                val_fraction: float = 0.2) -> dict[str, StudySpec]:
    """One checked ``StudySpec`` per study (``distributed.studies.Study``), before Ray starts."""
    models = list(dict.fromkeys(s.model for s in studies))
    overrides = parse_sets(sets, models)
    if image_size is not None:
        for values in overrides.values():
            values.setdefault("image_size", image_size)
    return {s.key: build_spec(s.key, s.model, tuple(s.classes), preset, overrides[s.model],
                              training_images(records, s.classes, val_fraction, seed), epochs_cap, batch_size)
            for s in studies}
