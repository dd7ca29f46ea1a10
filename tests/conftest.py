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
