"""SPADE and PatchCore on the generated data: detection, determinism, round trips, edge cases."""

import numpy as np
import pytest
import torch

from defectlens import Detector, load
from defectlens.data import find_normal_images, find_test_samples
from defectlens.evaluation import evaluate

from .conftest import IMAGE_SIZE


@pytest.fixture(scope="module", params=["spade", "patchcore"])
def nn_detector(request, brick_root):
    params = {"coreset_ratio": 0.1} if request.param == "patchcore" else {}
    # PatchCore reads stride 8 and 16 only: 128 px gives it a 16 x 16 patch grid.
    return Detector(method=request.param, image_size=128, method_params=params).fit(brick_root)


def test_nearest_neighbour_methods_detect_defects(nn_detector, brick_root):
    m = evaluate(nn_detector, brick_root).metrics
    assert m["image_auroc"] > 0.75
    assert m["pixel_auroc"] > 0.85


def test_round_trip_identical(nn_detector, brick_root, tmp_path):
    paths = [s.path for s in find_test_samples(brick_root)][:12]
    loaded = load(nn_detector.save(tmp_path / "m"))
    before, after = nn_detector.predict(paths), loaded.predict(paths)
    assert [p.score for p in before] == [p.score for p in after]
    assert all(
        np.array_equal(a.anomaly_map, b.anomaly_map) for a, b in zip(before, after, strict=True)
    )


def test_patchcore_bank_is_the_requested_coreset(brick_root):
    images = find_normal_images(brick_root)[:8]
    params = {"coreset_ratio": 0.25, "seed": 1}
    a = Detector(method="patchcore", image_size=IMAGE_SIZE, method_params=params).fit(images)
    b = Detector(method="patchcore", image_size=IMAGE_SIZE, method_params=params).fit(images)
    n_fit = len(images) - 1  # one image is held out for the threshold
    patches = n_fit * (IMAGE_SIZE // 8) ** 2
    assert a.model_.bank.shape == (int(np.ceil(0.25 * patches)), 40 + 112)  # stride 8 + 16
    assert torch.equal(a.model_.bank, b.model_.bank)


def test_patchcore_approximate_index_round_trip(brick_root, tmp_path):
    images = find_normal_images(brick_root)[:10]
    params = {"coreset_ratio": 0.5, "index": "hnsw"}
    detector = Detector(method="patchcore", image_size=IMAGE_SIZE, method_params=params)
    detector.fit(images)
    loaded = load(detector.save(tmp_path / "hnsw"))
    assert loaded.predict(images[0])[0].score == detector.predict(images[0])[0].score


def test_spade_caps_k_at_the_training_set(brick_root):
    images = find_normal_images(brick_root)
    detector = Detector(method="spade", image_size=IMAGE_SIZE, method_params={"k_images": 50})
    detector.fit(images[:1], val_images=images[1:3])  # a single training image works
    assert detector.model_.effective_k == 1
    test = find_test_samples(brick_root)
    scores = {s.label: [] for s in test}
    for s, p in zip(test, detector.predict([s.path for s in test]), strict=True):
        scores[s.label].append(p.score)
    assert np.isfinite(scores[0]).all() and np.isfinite(scores[1]).all()


def test_invalid_parameters():
    from defectlens.errors import DefectLensError

    with pytest.raises(DefectLensError, match=r"coreset_ratio must be <= 1\.0"):
        Detector(method="patchcore", method_params={"coreset_ratio": 2.0})
    with pytest.raises(DefectLensError, match="index must be one of exact, hnsw, ivf"):
        Detector(method="patchcore", method_params={"index": "annoy"})
    with pytest.raises(DefectLensError, match="at least 1"):
        Detector(method="spade", method_params={"k_images": 0})
