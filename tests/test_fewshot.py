"""Few-shot mode for every method: K seeded images, the rest validate, RegAD's support
augmentations on request."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from defectlens import Detector
from defectlens.components.augment import N_SUPPORT_VERSIONS, augment_support
from defectlens.data.dataset import find_normal_images
from defectlens.errors import DataError, DataWarning, DefectLensWarning

from .conftest import IMAGE_SIZE, run_cli


def test_support_augmentations_are_regads_22_fixed_versions():
    images = torch.rand(2, 3, 32, 32)
    versions = augment_support(images)
    assert N_SUPPORT_VERSIONS == 22 and versions.shape == (44, 3, 32, 32)
    assert torch.equal(versions, augment_support(images))  # deterministic
    per_image = versions.view(2, 22, 3, 32, 32)
    assert torch.equal(per_image[:, 0], images)  # the original first
    assert torch.equal(per_image[:, 17], images.flip(-1))
    grey = per_image[:, 18]
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 0], grey[:, 2])
    assert torch.equal(per_image[:, 20], images.flip(-1).flip(-2))  # half turn
    # every version differs from the original (no accidental identities)
    differences = (per_image - images.unsqueeze(1)).abs().flatten(2).amax(dim=2)
    assert bool((differences[:, 1:] > 0).all())


def test_a_few_shot_fit_uses_exactly_its_k_seeded_images(brick_root):
    images = find_normal_images(brick_root)
    few = Detector(image_size=IMAGE_SIZE, shots=3, shot_seed=7).use_backend("torch")
    few.fit(brick_root)
    chosen = np.random.default_rng(7).choice(len(images), 3, replace=False)
    assert few.fit_images_ == [str(images[i]) for i in sorted(chosen)]
    assert few.thresholds_.n_validation == len(images) - 3  # all the others validate
    # the same Gaussian as a normal fit on exactly those images
    plain = Detector(image_size=IMAGE_SIZE).use_backend("torch")
    plain.fit(few.fit_images_, val_images=[images[0]])
    assert torch.allclose(few.model_.mean, plain.model_.mean, atol=1e-5)
    other = Detector(image_size=IMAGE_SIZE, shots=3, shot_seed=8).fit(brick_root)
    assert other.fit_images_ != few.fit_images_


def test_augmented_support_fits_on_the_22_versions_of_each_image(brick_root):
    few = Detector(image_size=IMAGE_SIZE, shots=2, augment_support=True).use_backend("torch")
    few.fit(brick_root)
    from defectlens.data.loader import iter_batches

    (batch,) = iter_batches(few.fit_images_, IMAGE_SIZE, 8)
    expanded = augment_support(torch.from_numpy(batch.images))
    extractor = few.ensure_extractor()
    embedding = few.model_._embed(extractor, expanded)  # (P, C, 44)
    assert embedding.shape[2] == 2 * N_SUPPORT_VERSIONS
    assert torch.allclose(few.model_.mean, embedding.mean(dim=2), atol=1e-4)


@pytest.mark.parametrize(
    "method,params",
    [("padim", {}), ("patchcore", {"coreset_ratio": 0.5}), ("spade", {"k_images": 1})],
)
def test_every_method_fits_from_one_image(method, params, brick_root):
    """K = 1 works: with augmentation the covariance comes from the 22 versions alone."""
    detector = Detector(
        method=method, image_size=IMAGE_SIZE, shots=1, augment_support=True, method_params=params
    ).fit(brick_root)
    assert len(detector.fit_images_) == 1
    scores = [p.score for p in detector.predict(find_normal_images(brick_root)[:3])]
    assert all(np.isfinite(scores))


@pytest.mark.parametrize(
    "method,params,message",
    [
        ("spade", {"k_images": 5}, "k_images 5 is more than the 2 image\\(s\\) fitted on"),
        ("patchcore", {"coreset_ratio": 0.001, "num_neighbors": 50}, "num_neighbors 50 is more"),
    ],
)
def test_a_neighbour_count_above_what_was_fitted_is_said(method, params, message, brick_root):
    """Capped when scoring, but saved as given: the fit says what the value means here."""
    with pytest.warns(DefectLensWarning, match=message):
        Detector(method=method, image_size=IMAGE_SIZE, shots=2, method_params=params).fit(
            brick_root
        )


def test_too_few_images_for_the_shots_is_a_one_line_error(brick_root, tmp_path):
    images = find_normal_images(brick_root)
    with pytest.raises(DataError, match=f"only {len(images)} exist"):
        Detector(image_size=IMAGE_SIZE, shots=len(images)).fit(brick_root)
    # with explicit validation images, all of them may be the support set
    with pytest.warns(DataWarning, match="also training images"):
        Detector(image_size=IMAGE_SIZE, shots=len(images)).fit(images, val_images=images[:1])


def test_few_shot_options_on_the_command_line(monkeypatch, capsys, brick_root, tmp_path):
    code, out, err = run_cli(
        monkeypatch, capsys, "fit", brick_root, "--shots", 4, "--shot-seed", 2,
        "--augment-support", "--image-size", IMAGE_SIZE, "--out", tmp_path / "m", "-q",
    )  # fmt: skip
    assert code == 0, err
    assert out.count(".png") == 4
    config = json.loads((tmp_path / "m" / "config.json").read_text())["detector"]
    assert (config["shots"], config["shot_seed"], config["augment_support"]) == (4, 2, True)
    code, out, err = run_cli(
        monkeypatch, capsys, "fit", brick_root, "--shots", 500, "--image-size", IMAGE_SIZE,
        "--out", tmp_path / "n", "-q",
    )  # fmt: skip
    assert code == 2
    assert "--shots 500 needs 500 normal images plus at least one for validation" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "n").exists()
    # the same check from Python names the parameter, not the flag
    with pytest.raises(DataError, match=r"^shots=500 needs 500 normal images.*; lower shots or"):
        Detector(image_size=IMAGE_SIZE, shots=500).fit(brick_root)


def test_models_saved_before_few_shot_existed_still_load(model_dir, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    config = json.loads((old / "config.json").read_text())
    for key in ("shots", "shot_seed", "augment_support"):
        config["detector"].pop(key)
    (old / "config.json").write_text(json.dumps(config))
    loaded = Detector.load(old)
    assert loaded.shots is None and loaded.augment_support is False
