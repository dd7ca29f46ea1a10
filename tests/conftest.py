import os
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# the demo dataset and the prepared-splits cache of this session only (Ray workers inherit it)
os.environ["ANOMALY_ENSEMBLE_CACHE"] = tempfile.mkdtemp(prefix="anomaly-ensemble-tests-")

import pytest  # noqa: E402
import torch  # noqa: E402

from anomaly_data.synthetic import generate_dataset  # noqa: E402

# two cores shared with Ray workers: one intra-op thread per process avoids oversubscription
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic dataset (MVTec layout) of all five classes, generated once per session."""
    root = tmp_path_factory.mktemp("synthetic")
    return generate_dataset(root, seed=0, image_size=64, n_train=24, n_test_good=4, n_test_per_defect=2)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synthetic_root):
    """Two briefly trained members for 'washer', their best.json index, and the fitted ensemble."""
    import warnings

    from torch.utils.data import DataLoader

    from anomaly_data import prepare_splits
    from ensembles.build import build_ensemble
    from models import create_model
    from models.training import fit

    run = tmp_path_factory.mktemp("run")
    splits = prepare_splits("mvtec", synthetic_root, ["washer"], image_size=64)
    index = []
    for name, config in {"hvq_trans": {"image_size": 64, "levels": 2, "codebook_size": 16},
                         "transformaly": {"image_size": 64, "layers": "0-1"},
                         "patchcore": {"image_size": 64}}.items():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = create_model(name, "fast", **config)
        fit(model, DataLoader(splits.train, batch_size=6, shuffle=True), epochs=2, lr=2e-3)
        model.save(run / f"{name}.safetensors")
        index.append({"model": name, "classes": ["washer"], "checkpoint": str(run / f"{name}.safetensors")})
    ensemble = build_ensemble(index, "mvtec", synthetic_root, ["washer"], run / "ensemble")
    return run, ensemble


@pytest.fixture(scope="session")
def pasted_only():
    """``dataset -> dataset``: the validation normals and the defects of the foreign-content family
    (a photo texture, CutPaste, a scar). The models' learning tests set their bars on these kinds;
    the in-place family (distortion, re-tone) is harder on purpose, so that it predicts subtle test
    defects, and a few training epochs of a tiny model are not meant to localise it."""
    from anomaly_data.defects import VALIDATION_DEFECTS

    pasted = {f"synthetic_{k}" for k in VALIDATION_DEFECTS if k in ("perlin_foreign", "cutpaste", "scar")}

    def keep(dataset):
        return dataset.subset([i for i, d in enumerate(dataset.defects) if d == "good" or d in pasted])
    return keep
