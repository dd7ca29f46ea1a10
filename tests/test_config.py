"""The one config base (typed fields checked when made, presets as data) and the model registry."""

import dataclasses
import importlib
from typing import Annotated, Literal

import pytest

from models import ConfigError, ModelConfig, model_class, model_names, register_model
from models.base import AnomalyModel
from models.config import Fraction, NonNegativeInt, OddInt, PositiveInt, Range, check_value, value_of
from models.haloae import HaloAEConfig
from models.training import Recipe


@pytest.mark.parametrize("value, hint, expected", [
    (3, int, 3), (3, float, 3.0), ([1, 2], tuple[int, ...], (1, 2)), (None, float | None, None),
    (0.5, float | None, 0.5), ("adam", Literal["adam", "adamw"], "adam"), (5, OddInt, 5), (0, NonNegativeInt, 0),
    ([1, "relu1_1"], tuple[int | str, ...], (1, "relu1_1")), (True, bool, True)])
def test_values_of_the_right_type_are_kept_in_their_fields_form(value, hint, expected):
    got = check_value("x", value, hint)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value, hint, message", [
    (True, int, "an integer"), (2.5, int, "an integer"), ("3", int, "an integer"),
    (float("nan"), float, "a number"), (1, bool, "true or false"), (4, OddInt, r"\(odd\)"),
    (0, PositiveInt, ">= 1"), (-1, NonNegativeInt, ">= 0"), ("sgd", Literal["adam", "adamw"], '"adam", "adamw"'),
    ([1, 0], tuple[PositiveInt, ...], "a list, each an integer >= 1"), (3, tuple[int, ...], "a list"),
    (1.0, Fraction, "< 1"), (0.0, Annotated[float, Range(0, open_low=True)], "> 0")])
def test_a_value_of_the_wrong_type_names_the_option_and_what_it_must_be(value, hint, message):
    with pytest.raises(ConfigError, match=rf"^opt=.*: expected .*{message}"):
        check_value("opt", value, hint)


def test_command_line_values_are_json_or_the_text_itself():
    assert value_of("3") == 3 and value_of("[1,2]") == [1, 2] and value_of("null") is None
    assert value_of("vgg19") == "vgg19" and value_of("true") is True


def test_a_config_is_checked_when_made_and_when_replaced():
    with pytest.raises(ConfigError, match="haloae: halo=-1: expected an integer >= 0"):
        HaloAEConfig(halo=-1)
    with pytest.raises(ConfigError, match="haloae: halo=9 exceeds block=8"):  # a rule between fields
        HaloAEConfig().replace(halo=9)
    config = HaloAEConfig(heads=[2, 2])
    assert config.heads == (2, 2)                                          # JSON lists become tuples
    assert config.replace(halo=3).halo == 3 and config.halo == 2           # a copy, the original untouched
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) \['blocks'\]"):
        config.replace(blocks=3)


def test_presets_are_data_next_to_the_config_and_build_checked_configs():
    for name in model_names():
        config_class = model_class(name).config_class
        assert issubclass(config_class, ModelConfig) and config_class.owner == name
        assert set(config_class.presets) >= {"paper", "fast"} and set(config_class.recipes) >= {"paper", "fast"}
        for preset in config_class.presets:
            Recipe.build(config_class.recipes[preset])                    # every recipe is a valid Recipe
            assert dataclasses.asdict(config_class.from_preset(preset)).keys() == config_class.field_types().keys()
    with pytest.raises(ConfigError, match="haloae: unknown preset 'huge'"):
        HaloAEConfig.from_preset("huge")


def test_a_recipe_is_checked_like_a_model_config():
    with pytest.raises(ConfigError, match="recipe: lr=0: expected a number > 0"):
        Recipe(lr=0)
    with pytest.raises(ConfigError, match="recipe: optimizer=\"sgd\""):
        Recipe(optimizer="sgd")
    with pytest.raises(ConfigError, match="lr_gamma"):
        Recipe(lr_gamma=2.0)


def test_the_registry_is_the_one_list_of_models_with_their_search_spaces():
    names = model_names()
    assert names == sorted(names) and {"haloae", "hvq_trans", "transformaly", "patchcore"} <= set(names)
    for name in names:
        space = importlib.import_module(model_class(name).search_space)
        assert callable(space.space) and callable(space.defaults)
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        model_class("nope")


@dataclasses.dataclass(frozen=True)
class NoSizeConfig(ModelConfig):
    weights: str = "none"


def model_without_size(name: str) -> type[AnomalyModel]:
    return type(name, (AnomalyModel,), {"name": name, "config_class": NoSizeConfig, "backbone_field": None})


def test_a_second_model_under_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="two models are registered as 'haloae'"):
        register_model(space="search_spaces.haloae")(model_without_size("haloae"))
    assert model_class("haloae").__name__ == "HaloAE"


def test_a_config_is_frozen_and_a_model_config_without_the_contract_fields_is_refused():
    config = HaloAEConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.halo = 99
    with pytest.raises(TypeError, match=r"lacks the field\(s\) \['image_size'\]"):
        register_model(space="search_spaces.haloae")(model_without_size("no_size"))
    with pytest.raises(ConfigError, match="NoSizeConfig: unknown parameter"):   # an unregistered config's name
        NoSizeConfig.build({"typo": 1})
    with pytest.raises(ConfigError, match="haloae: unknown preset 'huge'"):
        model_class("haloae").recipe("huge")
