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


def test_the_papers_setting_is_kept_unless_beaten_by_the_margin(tmp_path):
    from types import SimpleNamespace

    import pandas as pd

    from distributed.results import SEARCH_MARGIN, best_result
    from distributed.train import CHECKPOINT_MODEL

    def trial(name, score, **config):
        ckpt = tmp_path / name
        ckpt.mkdir()
        (ckpt / CHECKPOINT_MODEL).write_bytes(b"x")
        frame = pd.DataFrame({"val_score": [score - 0.1, score], "checkpoint_path": [str(ckpt)] * 2})
        return SimpleNamespace(error=None, metrics_dataframe=frame, best_checkpoints=None, config=config)

    paper = {"stages": "2,3", "k": 1}
    default = trial("default", 0.90, stages="2,3", k=1, lr=1e-3)
    close = trial("close", 0.90 + SEARCH_MARGIN / 2, stages="1,2", k=4)
    far = trial("far", 0.90 + 2 * SEARCH_MARGIN, stages="1,2", k=2)
    assert best_result([default, close], paper) is default
    assert best_result([default, close, far], paper) is far
    assert best_result([default, close]) is close                # no paper setting given: plain best
    assert best_result([close, far], paper) is far               # the paper's trial failed or was not run
