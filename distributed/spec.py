"""What each study trains, built and checked before Ray starts.

A ``StudySpec`` says, for one study: the model config that is fixed (the preset, then the
``--set MODEL.KEY=VALUE`` values), which of its fields the user pinned (never sampled by the
search), the training recipe (the preset's, then ``--set`` recipe keys, ``--batch-size``, and
``--epochs`` as a cap), and the search space with its first point (the fixed config itself).
Every way this can be wrong (an unknown preset, model or key, a value of the wrong type, a
combination the model refuses, a first point outside its space) is a ``CliError`` here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any

import optuna

from anomaly_data import DatasetError, split_train_validation
from distributed.trial import TrainJob, job_from_trial_config
from models import ConfigError, config_fields, model_class
from models.training import Recipe, recipe_fields
from search_spaces import get_space


class SpecError(ValueError):
    """A bad ``--preset`` / ``--set`` / recipe value (the CLI turns it into exit 2)."""


def coerce(option: str, value: Any, annotation: str) -> Any:
    """``value`` (JSON-parsed from the command line) as a field annotated ``annotation``
    ("int", "float | None", "tuple[int, ...]", ...); other annotations ("Any") are free-form and
    left to the model's own checks."""
    kinds = {part.strip() for part in str(annotation).split("|")}
    if value is None and "None" in kinds:
        return None
    kind = next(iter(kinds - {"None"}), "Any").split("[")[0]

    def bad(expected: str) -> SpecError:
        return SpecError(f"{option}={json.dumps(value)}: expected {expected}")

    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad("an integer")
    if kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise bad("a number")
    if kind == "tuple":
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise bad("a JSON list, e.g. [1,2]")
    if kind == "str" and not isinstance(value, str):
        raise bad("a string")
    return value


def parse_sets(items: list[str], models: list[str]) -> dict[str, dict[str, Any]]:
    """``["haloae.halo=3", "hvq_trans.lr=1e-4"]`` -> ``{"haloae": {"halo": 3}, "hvq_trans": {"lr": 1e-4}}``,
    each value of its field's type; a key is a model-config field or a recipe field."""
    out: dict[str, dict[str, Any]] = {m: {} for m in models}
    recipe = {f.name: f for f in dataclasses.fields(Recipe)}
    for item in items:
        key, eq, text = item.partition("=")
        model, dot, name = key.strip().partition(".")
        if not eq or not dot or not name:
            raise SpecError(f"--set {item!r}: expected MODEL.KEY=VALUE, e.g. --set haloae.halo=3")
        if model not in out:
            raise SpecError(f"--set {item!r}: model {model!r} is not among the models of this run {models}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        fields = config_fields(model)
        if name not in fields and name not in recipe:
            raise SpecError(f"--set {key}: {model} has no key {name!r}; model keys: {sorted(fields)}; "
                            f"training keys: {sorted(recipe)}")
        out[model][name] = coerce(f"--set {key}", value, (fields.get(name) or recipe[name]).type)
    return out


@dataclass(frozen=True)
class StudySpec:
    key: str
    model: str
    classes: tuple[str, ...]
    preset: str
    model_config: dict[str, Any]
    """Every field of the model's config before the search (preset, then --set)."""
    pinned: frozenset[str]
    """Fields the user fixed with --set: the search never samples them."""
    recipe: Recipe
    epochs_note: str
    """How the epochs were arrived at (for the log and config.json)."""

    def base(self) -> dict[str, Any]:
        """What the search space sees: the fixed config and the recipe's learning rate."""
        return {**self.model_config, "lr": self.recipe.lr}

    def space(self):
        return get_space(self.model, self.base(), self.pinned)

    def first_point(self) -> dict[str, Any]:
        return self.space()[1][0]

    def summary(self) -> dict[str, Any]:
        return {"model": self.model, "classes": list(self.classes), "preset": self.preset,
                "pinned": sorted(self.pinned), "recipe": dataclasses.asdict(self.recipe),
                "epochs": self.epochs_note, "model_config": self.model_config}


def check_model_config(model: str, values: dict[str, Any], where: str) -> dict[str, Any]:
    """The full config (every field) of ``values``, checked by the model without a backbone."""
    cls = model_class(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = cls.config_class(**values)
            cls.check_config(config)
    except ConfigError as err:
        raise SpecError(f"{where}: {err}") from None
    except (TypeError, ValueError) as err:
        raise SpecError(f"{where}: {model} config {values}: {err}") from None
    return dataclasses.asdict(config)


def study_recipe(model: str, preset: str, overrides: dict[str, Any], n_train: int,
                 epochs_cap: int | None, batch_size: int | None) -> tuple[Recipe, str]:
    """The preset's recipe with the user's values, its epochs as passes over ``n_train`` images."""
    cls = model_class(model)
    values = {**cls.recipes.get(preset, {}), **{k: v for k, v in overrides.items() if k in recipe_fields()}}
    if batch_size is not None:
        values["batch_size"] = batch_size
    recipe = Recipe(**values)
    try:
        recipe.check(f"{model} (preset {preset})")
    except ConfigError as err:
        raise SpecError(str(err)) from None
    passes = recipe.passes(n_train)
    note = f"{passes} epoch(s) of {n_train} training images"
    if recipe.samples_per_epoch:
        note += f" (the paper's {recipe.epochs} epochs of {recipe.samples_per_epoch} samples)"
    if not cls.trains:
        passes, note = 1, "fitted in one pass (no training)"
    elif epochs_cap is not None and epochs_cap < passes:
        passes, note = epochs_cap, f"{epochs_cap} epoch(s) (--epochs; the preset's: {note})"
    return dataclasses.replace(recipe, epochs=passes, samples_per_epoch=0), note


def build_spec(key: str, model: str, classes: tuple[str, ...], preset: str, overrides: dict[str, Any],
               n_train: int, epochs_cap: int | None = None, batch_size: int | None = None) -> StudySpec:
    cls = model_class(model)
    if preset not in cls.presets:
        raise SpecError(f"--preset {preset!r}: {model} has no such preset; choose one of {sorted(cls.presets)}")
    fields = config_fields(model)
    values = {**cls.presets[preset], **{k: v for k, v in overrides.items() if k in fields}}
    pinned = frozenset(k for k in overrides if k in fields or k == "lr")  # lr: the one searched recipe field
    if len(classes) > 1 and "num_classes" in fields and "num_classes" not in overrides:
        values["num_classes"] = len(classes)  # a unified model: one codebook set per class (HVQ-Trans)
    config = check_model_config(model, values, f"{model} with --preset {preset}")
    recipe, note = study_recipe(model, preset, overrides, n_train, epochs_cap, batch_size)
    spec = StudySpec(key, model, tuple(classes), preset, config, pinned, recipe, note)
    check_first_point(spec)
    return spec


def check_first_point(spec: StudySpec) -> None:
    """The first point lies in its space and builds a config the model accepts (that it is the
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
    job = job_from_trial_config(spec_job(spec, "", ""), {**points[0], **derived})
    check_model_config(spec.model, job.model_config, f"{spec.key} (first point of the search)")


def spec_job(spec: StudySpec, dataset: str, root: str, seed: int = 0, skip_bad_images: bool = False
             ) -> dict[str, Any]:
    """The ``TrainJob`` (as a dict) that trains ``spec`` before the search changes anything."""
    return TrainJob(model=spec.model, dataset=dataset, root=root, classes=list(spec.classes), preset=spec.preset,
                    model_config=dict(spec.model_config), recipe=dataclasses.asdict(spec.recipe), seed=seed,
                    skip_bad_images=skip_bad_images).to_dict()


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
