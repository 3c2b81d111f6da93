import numpy as np
import pytest
import torch

from defectlens import Detector
from defectlens.data import find_normal_images, find_test_samples, read_image
from defectlens.evaluation import evaluate
from defectlens.methods import Padim

from .conftest import IMAGE_SIZE


def test_padim_detects_synthetic_defects(fitted, brick_root):
    result = evaluate(fitted, brick_root)
    m = result.metrics
    assert m["image_auroc"] > 0.8
    assert m["pixel_auroc"] > 0.85
    assert m["aupro"] > 0.5


def test_a_missing_mask_is_named_not_silently_dropping_pixel_metrics(fitted, brick_root, tmp_path):
    import shutil

    from defectlens.errors import DefectLensWarning

    root = tmp_path / "brick"
    shutil.copytree(brick_root, root)
    mask = next(iter(sorted((root / "ground_truth").rglob("*_mask.png"))))
    mask.unlink()
    with pytest.warns(DefectLensWarning, match=f"no mask, e.g. test/.*{mask.name[:-9]}"):
        metrics = evaluate(fitted, root).metrics
    assert "pixel_auroc" not in metrics or metrics["pixel_auroc"] != metrics["pixel_auroc"]


def test_one_path_is_one_image_and_other_objects_are_clear_errors(fitted, brick_root, tmp_path):
    from PIL import Image

    from defectlens.errors import DataError

    path = find_test_samples(brick_root)[0].path
    assert len(list(fitted.iter_predict(str(path)))) == 1  # not one per character
    folder = path.parent  # a folder: its images, as `defectlens predict FOLDER` reads them
    by_folder = fitted.predict(folder)
    assert [p.source for p in by_folder] == [str(f) for f in sorted(folder.glob("*.png"))]
    alone = fitted.predict(sorted(folder.glob("*.png"))[0])[0].score
    assert by_folder[0].score == pytest.approx(alone, rel=1e-5)  # batch sizes differ
    with pytest.raises(DataError, match="no images in this folder"):
        fitted.predict(tmp_path)
    for wrong, said in ((Image.open(path), "PIL image"), (None, "NoneType"), (b"png", "bytes")):
        with pytest.raises(DataError, match=said):
            fitted.predict(wrong)
    with pytest.raises(DataError, match=r"image 0: .*PIL image"):
        Detector(image_size=IMAGE_SIZE).fit([Image.open(path)])


def test_settings_changed_after_fit_are_said_before_scoring_or_saving(fitted, brick_root, tmp_path):
    from defectlens.errors import ParameterError

    path = find_test_samples(brick_root)[0].path
    for name, value, said in (
        ("image_size", IMAGE_SIZE * 2, "fitted at"),
        ("batch_size", 0, "batch_size must be at least 1"),
        ("sigma", -1.0, "sigma must be >= 0"),
        ("method", "patchcore", "build a new Detector"),
    ):
        before = getattr(fitted, name)
        setattr(fitted, name, value)
        try:
            with pytest.raises(ParameterError, match=said):
                fitted.predict(path)
        finally:
            setattr(fitted, name, before)
    fitted.target_far = 0.5  # a saved model would claim a rate its threshold was not set for
    try:
        with pytest.raises(ParameterError, match="calibrate"):
            fitted.save(tmp_path / "m")
    finally:
        fitted.target_far = 0.01
    assert not (tmp_path / "m").exists()


def test_detector_follows_scikit_learns_parameter_conventions(brick_root, tmp_path):
    from sklearn.base import clone

    from defectlens.errors import ParameterError

    asked = {"n_channels": 20}
    d = Detector(image_size=IMAGE_SIZE, batch_size=8, method_params=asked)
    assert (
        repr(d)
        == f"Detector(image_size={IMAGE_SIZE}, batch_size=8, method_params={asked!r})  # not fitted"
    )
    assert d.get_params()["method_params"] is asked  # stored as given: what clone checks
    copy = clone(d)
    assert copy.get_params() == d.get_params() and copy.model_.n_channels == 20
    d.fit(brick_root)
    assert repr(d).endswith("# fitted") and d.fit_images_
    # Loaded, it holds every parameter of the method (exact restore) but shows what was asked.
    d.save(tmp_path / "m")
    loaded = Detector.load(tmp_path / "m")
    assert repr(loaded) == repr(d) and len(loaded.method_params) > len(asked)
    with pytest.raises(ParameterError, match="multiple of 32"):
        d.set_params(image_size=100)
    assert d.image_size == IMAGE_SIZE and d.thresholds_ is not None  # a bad value changes nothing
    d.set_params(method="patchcore")  # like a new Detector: unfitted, the method's defaults
    assert d.method == "patchcore" and d.thresholds_ is None and not hasattr(d, "fit_images_")
    assert d.model_.coreset_ratio == 0.1 and d.image_size == IMAGE_SIZE
    with pytest.raises(ParameterError, match="unknown parameter 'bogus'"):
        d.set_params(bogus=1)


def test_maps_and_masks_have_the_original_resolution(fitted, brick_root):
    sample = find_test_samples(brick_root)[-1]
    image = read_image(sample.path)[:100, :90]  # an odd size, not the model's
    prediction = fitted.predict(image)[0]
    assert prediction.anomaly_map.shape == (100, 90)
    assert prediction.mask.shape == (100, 90) and prediction.mask.dtype == bool
    assert prediction.score == pytest.approx(float(prediction.anomaly_map.max()))


def test_decision_and_mask_are_consistent(fitted, brick_root):
    """With image score = map maximum and equal thresholds, flagged <=> non-empty mask."""
    predictions = fitted.predict([s.path for s in find_test_samples(brick_root)])
    assert fitted.thresholds_.pixel == fitted.thresholds_.image
    assert all(p.is_anomalous == bool(p.mask.any()) for p in predictions)


def test_arrays_and_files_score_the_same(fitted, brick_root):
    path = find_test_samples(brick_root)[0].path
    from_file = fitted.predict(path)[0]
    from_array = fitted.predict(read_image(path))[0]
    assert from_file.score == from_array.score


def test_validation_images_are_held_out_and_seeded(brick_root):
    images = find_normal_images(brick_root)
    detector = Detector(image_size=IMAGE_SIZE)
    fit_a, val_a = detector.split_validation(images)
    _, val_b = detector.split_validation(images)
    assert val_a == val_b and len(val_a) == 3
    assert not set(fit_a) & set(val_a) and len(fit_a) + len(val_a) == len(images)


def test_threshold_comes_from_validation_images_only(brick_root):
    images = find_normal_images(brick_root)
    detector = Detector(image_size=IMAGE_SIZE).fit(images[:20], val_images=images[20:])
    val_scores = [p.score for p in detector.predict(images[20:])]
    assert detector.thresholds_.image == pytest.approx(max(val_scores))
    assert detector.thresholds_.n_validation == len(images) - 20


def test_channel_subset_is_seeded_and_recorded(brick_root):
    images = find_normal_images(brick_root)[:6]
    a = Detector(image_size=IMAGE_SIZE, method_params={"n_channels": 50, "seed": 3}).fit(images)
    b = Detector(image_size=IMAGE_SIZE, method_params={"n_channels": 50, "seed": 3}).fit(images)
    c = Detector(image_size=IMAGE_SIZE, method_params={"n_channels": 50, "seed": 4}).fit(images)
    assert a.model_.channel_index.numel() == 50
    assert torch.equal(a.model_.channel_index, b.model_.channel_index)
    assert not torch.equal(a.model_.channel_index, c.model_.channel_index)
    assert a.params()["method_params"]["n_channels"] == 50


def test_ledoit_wolf_option_fits_and_scores(brick_root):
    images = find_normal_images(brick_root)
    detector = Detector(image_size=IMAGE_SIZE, method_params={"shrinkage": "ledoit_wolf"})
    detector.fit(images)
    test = find_test_samples(brick_root)
    scores = np.array([p.score for p in detector.predict([s.path for s in test])])
    labels = np.array([s.label for s in test])
    assert scores[labels == 1].mean() > scores[labels == 0].mean()


def test_fitted_state_is_packed_and_sized_by_positions_not_images(fitted):
    state = fitted.model_.fitted_state()
    c = 24 + 40 + 112
    positions = (IMAGE_SIZE // 4) ** 2
    assert state["mean"].shape == (positions, c)
    assert state["inv_chol_packed"].shape == (positions, c * (c + 1) // 2)


def test_unfitted_and_invalid_use():
    from defectlens.errors import DefectLensError

    with pytest.raises(DefectLensError, match="not fitted"):
        Detector(image_size=IMAGE_SIZE).predict(np.zeros((32, 32), np.uint8))
    with pytest.raises(DefectLensError, match="multiple of 32"):
        Detector(image_size=100)
    with pytest.raises(DefectLensError, match="unknown method"):
        Detector(method="nope")
    with pytest.raises(DefectLensError, match="unknown parameter 'bogus'"):
        Detector(method_params={"bogus": 1})
    with pytest.raises(ValueError, match="shrinkage"):
        Padim(shrinkage="oas")
