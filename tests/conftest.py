"""Shared fixtures: a small synthetic MVTec-layout dataset and a PaDiM detector fitted on it.

Everything is generated from scikit-image textures; no test touches ../shared/data.
"""

from __future__ import annotations

import pytest
import torch

from defectlens import Detector
from defectlens.data.synthetic import make_category

IMAGE_SIZE = 64  # small images keep the suite fast; the maths is size-independent

torch.set_num_threads(2)  # the thread setting we ship and benchmark with


@pytest.fixture(scope="session")
def brick_root(tmp_path_factory):
    return make_category(
        tmp_path_factory.mktemp("data"), "brick", n_train=30, n_test_good=10, n_test_per_defect=3
    )


@pytest.fixture(scope="session")
def fitted(brick_root):
    return Detector(image_size=IMAGE_SIZE, batch_size=8).fit(brick_root)


@pytest.fixture(scope="session")
def model_dir(fitted, tmp_path_factory):
    return fitted.save(tmp_path_factory.mktemp("models") / "brick")
