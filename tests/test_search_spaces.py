"""Each search space alone (no Ray): paper defaults first, every sample builds a valid model."""

import warnings

import optuna
import pytest

from distributed.train import job_from_trial_config
from search_spaces import base_config, get_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("model", ["haloae", "hvq_trans", "transformaly", "patchcore"])
def test_space_samples_build_valid_models(model):
    overrides = {"image_size": 64}
    base = base_config(model, "fast", overrides)
    space, points = get_space(model, base)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for point in points:
        study.enqueue_trial(point)
    job_base = {"model": model, "dataset": "mvtec", "root": "unused", "classes": ["c"], "preset": "fast",
                "model_config": overrides}
    seen = []
    for i in range(6):
        trial = study.ask()
        constants = space(trial)
        if i == 0:
            assert trial.params == points[0]                     # the paper's setting comes first
        job = job_from_trial_config(job_base, {**trial.params, **constants})
        assert job.lr == trial.params.get("lr", job.lr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = job.build_model()                              # raises ConfigError if inconsistent
        seen.append(net.config_dict())
        study.tell(trial, 0.5)
    assert len({str(s) for s in seen}) > 1                       # the space does vary the model


def test_haloae_blocks_fit_the_feature_grid():
    from search_spaces.haloae import block_choices

    assert block_choices(16) == [2, 4, 8, 16] and block_choices(60) == [2, 4, 6, 10, 12]
