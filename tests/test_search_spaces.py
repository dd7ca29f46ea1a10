"""Each search space alone (no Ray): the first point is the preset, every sample builds a valid model."""

import json
import warnings

import optuna
import pytest

from distributed.spec import SpecError, build_spec, spec_job
from models import model_class, model_names
from models.transformaly import parse_layers

optuna.logging.set_verbosity(optuna.logging.WARNING)
MODELS = model_names()


def spec_of(model, preset="fast", overrides=None, n_train=40):
    return build_spec(f"{model}-c", model, ("c",), preset, dict(overrides or {}), n_train)


def canonical(model, config):
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    if model == "transformaly":
        from models.transformaly import teacher_depth

        out["layers"] = list(parse_layers(config["layers"], teacher_depth(config["arch"])))
    return out


@pytest.mark.parametrize("preset", ["fast", "paper"])
@pytest.mark.parametrize("model", MODELS)
def test_the_first_point_is_the_preset_field_by_field(model, preset):
    spec = spec_of(model, preset)
    space, points = spec.space()
    trial = optuna.trial.FixedTrial(points[0])
    job = spec_job(spec, "mvtec", "unused").with_trial({**points[0], **space(trial)})
    preset_config = model_class(model).config_class.from_preset(preset).to_dict()
    assert canonical(model, job.config.to_dict()) == canonical(model, preset_config)
    recipe = model_class(model).recipe(preset)
    assert job.recipe.lr == recipe.lr and job.recipe.batch_size == recipe.batch_size
    assert job.recipe.optimizer == recipe.optimizer


def test_the_paper_recipes_are_the_papers():
    halo, hvq, vit = (model_class(m).recipe("paper") for m in ("haloae", "hvq_trans", "transformaly"))
    assert (halo.lr, halo.batch_size, halo.optimizer, halo.epochs, halo.samples_per_epoch) == (1e-4, 4, "adam", 251, 3000)
    assert (hvq.lr, hvq.weight_decay, hvq.grad_clip, hvq.lr_step_epochs, hvq.epochs) == (1e-4, 1e-4, 0.1, 800, 1000)
    assert (vit.lr, vit.batch_size, vit.epochs) == (1e-4, 32, 30)
    # HaloAE counts 3000 samples per epoch: 251 x 3000 samples over 200 images are 3765 passes
    assert spec_of("haloae", "paper", n_train=200).recipe.epochs == 3765
    capped = build_spec("k", "haloae", ("c",), "paper", {}, 200, epochs_cap=5)
    assert capped.recipe.epochs == 5
    assert "--epochs cuts the preset's recipe to 0.1 % of it" in capped.epochs_note   # 5 of 3765 passes, said
    assert spec_of("transformaly", "paper").recipe.epochs == 30


@pytest.mark.parametrize("model", MODELS)
def test_space_samples_build_valid_models(model):
    spec = spec_of(model, overrides={"image_size": 64})
    space, points = spec.space()
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for point in points:
        study.enqueue_trial(point)
    seen = []
    for i in range(6):
        trial = study.ask()
        constants = space(trial)
        if i == 0:
            assert trial.params == points[0]                     # the preset's point comes first
        job = spec_job(spec, "mvtec", "unused").with_trial({**trial.params, **constants})
        assert job.recipe.lr == trial.params.get("lr", job.recipe.lr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = job.build_model()                              # raises ConfigError if inconsistent
        seen.append(net.config.to_dict())
        study.tell(trial, 0.5)
    assert len({str(s) for s in seen}) > 1                       # the space does vary the model


@pytest.mark.parametrize("model,pinned", [("haloae", {"halo": 3, "channels": [64, 48, 32, 16],
                                                      "heads": [2, 2, 2], "kernels": [3, 3, 3]}),
                                          ("hvq_trans", {"levels": 2, "lr": 5e-4}),
                                          ("transformaly", {"layers": [1, 4]})])
def test_a_field_fixed_with_set_is_never_sampled(model, pinned):
    from distributed.spec import parse_sets

    sets = parse_sets([f"{model}.{k}={json.dumps(v)}" for k, v in {"image_size": 64, **pinned}.items()], [model])
    spec = spec_of(model, overrides=sets[model])
    space, _ = spec.space()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(8):
        trial = study.ask()
        job = spec_job(spec, "mvtec", "unused").with_trial({**trial.params, **space(trial)})
        values = {**job.config.to_dict(), "lr": job.recipe.lr}
        for key, value in pinned.items():
            got = values[key]
            assert (list(got) if isinstance(got, tuple) else got) == value, key
        study.tell(trial, 0.5)


def test_the_papers_halo_block_is_a_choice_on_its_grid():
    from search_spaces.haloae import block_choices

    assert 12 in block_choices(64, 12)                          # 256 px / stride 4: the paper's block
    assert block_choices(16) == [2, 4, 6, 8, 10, 12, 16] and block_choices(8, 8) == [2, 4, 6, 8]


@pytest.mark.parametrize("overrides,expected", [
    ({"halo": "big"}, "haloae.halo"), ({"blocks": 3}, "no key 'blocks'"), ({"halo": 40}, "halo=40")])
def test_bad_values_are_refused_with_the_option_named(overrides, expected):
    from distributed.spec import parse_sets

    items = [f"haloae.{k}={v}" for k, v in overrides.items()]
    with pytest.raises(SpecError, match=expected):
        sets = parse_sets(items, ["haloae"])
        spec_of("haloae", overrides=sets["haloae"])


def test_the_papers_setting_is_kept_unless_beaten_by_the_margin_on_neither_metric_lost(tmp_path):
    from types import SimpleNamespace

    import pandas as pd

    from distributed.results import SEARCH_MARGIN, best_result, choose_trial
    from distributed.checkpoints import CHECKPOINT_MODEL

    def trial(name, score, image=None, **config):
        ckpt = tmp_path / name
        ckpt.mkdir()
        (ckpt / CHECKPOINT_MODEL).write_bytes(b"x")
        image = score if image is None else image
        frame = pd.DataFrame({"val_score": [score - 0.1, score], "val_image_auroc": [image - 0.1, image],
                              "val_pixel_auroc": [2 * score - image - 0.1, 2 * score - image],
                              "checkpoint_path": [str(ckpt)] * 2})
        return SimpleNamespace(error=None, metrics_dataframe=frame, best_checkpoints=None, config=config)

    paper = {"stages": "2,3", "k": 1}
    default = trial("default", 0.90, stages="2,3", k=1, lr=1e-3)
    close = trial("close", 0.90 + SEARCH_MARGIN / 2, stages="1,2", k=4)
    far = trial("far", 0.90 + 2 * SEARCH_MARGIN, stages="1,2", k=2)
    assert best_result([default, close], paper) is default
    assert best_result([default, close, far], paper) is far
    assert best_result([default, close]) is close                # no paper setting given: plain best
    assert best_result([close, far], paper) is far               # the paper's trial failed or was not run
    # a larger val_score bought with a lower image AUROC than the paper's does not replace it ...
    one_sided = trial("one_sided", 0.90 + 4 * SEARCH_MARGIN, image=0.89, stages="1,2", k=3)
    assert best_result([default, one_sided], paper) is default
    # ... and a smaller win on both metrics is preferred to it
    assert best_result([default, one_sided, far], paper) is far
    assert best_result([default, one_sided]) is one_sided        # without a paper setting: plain best
    # the log says why the paper's setting was kept, and nothing when the top trial was taken
    assert choose_trial([default, one_sided], paper)[1] == (
        "the paper's setting is kept over the top trial (stages=1,2, k=3): it loses on val_image_auroc "
        "(0.890 against 0.900)")
    assert "within 0.01" in choose_trial([default, close], paper)[1]
    assert choose_trial([default, one_sided, far], paper)[1] == "" and choose_trial([default, close])[1] == ""
    # a metric a trial did not report (NaN in Tune's frame) is not counted as a loss
    unreported = trial("unreported", 0.90 + 2 * SEARCH_MARGIN, stages="1,2", k=5)
    unreported.metrics_dataframe["val_image_auroc"] = float("nan")
    assert best_result([default, unreported], paper) is unreported
