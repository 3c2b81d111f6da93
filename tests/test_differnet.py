"""DifferNet on the generated data: the flow trains, inverts, scores and survives a round trip."""

import numpy as np
import pytest
import torch

from defectlens import Detector, load
from defectlens.components.augment import TransformRanges, apply_transforms, sample_parameters
from defectlens.data import find_test_samples
from defectlens.evaluation import evaluate
from defectlens.methods.differnet import build_flow

PARAMS = {
    "hidden": 128,
    "max_epochs": 12,
    "patience": 12,
    "n_transforms": 4,
    "n_transforms_test": 2,
}


@pytest.fixture(scope="module")
def differnet(brick_root):
    return Detector(method="differnet", image_size=128, batch_size=16, method_params=PARAMS).fit(
        brick_root
    )


def test_training_lowers_the_loss(differnet):
    history = differnet.model_.history
    assert len(history) >= 2
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all("val_loss" in h for h in history)  # early stopping watched validation images


def test_flow_is_invertible():
    flow = build_flow(24, blocks=4, hidden=32, clamp=3.0, seed=0)
    for p in flow.parameters():  # leave the identity initialisation
        torch.nn.init.normal_(p, std=0.1) if p.dtype.is_floating_point else None
    x = torch.randn(16, 24)
    z, log_det = flow(x)
    back, inverse_log_det = flow(z, rev=True)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_det, -inverse_log_det, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(z, x)


def test_differnet_separates_defective_from_good(differnet, brick_root):
    m = evaluate(differnet, brick_root).metrics
    assert m["image_auroc"] > 0.7
    assert m["pixel_auroc"] > 0.6  # gradient maps point at the defect more often than not


def test_round_trip_reproduces_scores_and_maps(differnet, brick_root, tmp_path):
    paths = [s.path for s in find_test_samples(brick_root)][:4]
    loaded = load(differnet.save(tmp_path / "dn"))
    before, after = differnet.predict(paths), loaded.predict(paths)
    assert [p.score for p in before] == [p.score for p in after]
    assert all(
        np.array_equal(a.anomaly_map, b.anomaly_map) for a, b in zip(before, after, strict=True)
    )


def test_transforms_are_differentiable_and_identity_first():
    g = torch.Generator().manual_seed(0)
    params = sample_parameters(3, TransformRanges(), g, identity_first=True)
    image = torch.rand(1, 3, 32, 32, requires_grad=True)
    copies = apply_transforms(image, params)
    assert copies.shape == (3, 3, 32, 32)
    torch.testing.assert_close(copies[0], image[0].detach().clamp(0, 1), atol=1e-5, rtol=0)
    copies.sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_too_small_images_are_refused(brick_root):
    from defectlens.errors import DefectLensError

    with pytest.raises(DefectLensError, match="at least 128"):
        Detector(method="differnet", image_size=64, method_params=PARAMS).fit(brick_root)
