"""Neural Batch Sampling and what it reads: pasted synthetic defects are marked by their
masks, the method fits on synthetic or on real labelled anomalies (and says which in
config.json and metrics.json), beats chance, round-trips exactly and exports with parity;
bad anomaly folders, too few images and a non-finite episode are handled clearly."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from defectlens import Detector, load
from defectlens.data import synthetic
from defectlens.data.synthetic import ALL_DEFECTS, make_category, paste_defect
from defectlens.errors import DataError, DefectLensError, DefectLensWarning, ParameterError
from defectlens.evaluation import evaluate
from tests.conftest import run_cli
from tests.test_patch_methods import assert_round_trip_and_export

TINY = {"max_epochs": 4, "patience": 4, "steps": 32, "snapshots": 4, "predictor_steps": 60}


@pytest.mark.parametrize("size", [64, 128, 300])
@pytest.mark.parametrize("kind", ALL_DEFECTS)
def test_a_pasted_defect_changes_only_what_its_mask_marks(kind, size):
    rng = np.random.default_rng(0)
    image = rng.uniform(0.3, 0.7, (size, size, 3))
    pasted, mask = paste_defect(image, np.random.default_rng(1), (kind,))
    assert pasted.shape == image.shape and mask.shape == (size, size) and mask.any()
    changed = np.abs(pasted - image).max(axis=2) > 0.01  # blurred edges: tails below
    assert changed[mask].mean() > 0.5  # what is marked was changed...
    # ...and nothing far from the mark (soft defects fade out over a few pixels)
    near = ndimage.binary_dilation(mask, iterations=max(4, size // 8))
    assert not changed[~near].any()
    again, same = paste_defect(image, np.random.default_rng(1), (kind,))
    assert np.array_equal(again, pasted) and np.array_equal(same, mask)  # seeded


def test_paste_defect_refuses_a_small_image():
    with pytest.raises(ValueError, match="at least 64 px"):
        paste_defect(np.zeros((32, 32)), np.random.default_rng(0))


@pytest.fixture(scope="module")
def nbs(brick_root):
    return Detector(method="nbs", image_size=64, batch_size=8, method_params=TINY).fit(
        brick_root, device="cpu"
    )


def test_nbs_with_synthetic_defects_beats_chance_round_trips_and_exports(nbs, brick_root, tmp_path):
    model = nbs.model_
    assert len(model.net.snapshots) == 4
    rewards = [r["reward"] for r in model.history]
    assert len(rewards) == len(model.history) and all(0 <= r <= 1 for r in rewards)
    kept = [r for r in model.history if r.get("best")][-1]
    assert kept["val_loss"] == pytest.approx(1 - kept["reward"])
    # the snapshots are the autoencoder at different points of one episode, not copies
    first = [next(ae.parameters()) for ae in model.net.snapshots]
    assert not torch.equal(first[0], first[-1])
    assert model.supervision.startswith("synthetic defects pasted on")
    assert model.supervision.endswith("(scratch, spot, hole, patch, smudge)")  # the default
    metrics = evaluate(nbs, brick_root).metrics
    assert metrics["supervision"] == model.supervision
    assert metrics["image_auroc"] > 0.65 and metrics["pixel_auroc"] > 0.7, metrics
    assert_round_trip_and_export(nbs, brick_root, tmp_path)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["training"]["supervision"] == model.supervision
    assert load(tmp_path / "m").supervision == model.supervision


def test_models_of_unsupervised_methods_say_so(fitted, brick_root):
    assert evaluate(fitted, brick_root).metrics["supervision"] == "normal images only"


@pytest.fixture(scope="module")
def anomaly_root(tmp_path_factory):
    """Real labelled anomalies: another crop set of the same texture, its test defects only."""
    root = make_category(
        tmp_path_factory.mktemp("anomalies"),
        "brick",
        n_train=1,
        n_test_good=1,
        n_test_per_defect=1,
        seed=7,
    )
    shutil.rmtree(root / "train")
    return root


def test_nbs_learns_from_real_anomalies_in_pixel_space(brick_root, anomaly_root):
    params = {**TINY, "space": "pixels", "input_size": 64, "widths": [8, 16, 32]}
    params["anomalies"] = str(anomaly_root)
    detector = Detector(method="nbs", image_size=64, batch_size=8, method_params=params)
    detector.fit(brick_root, device="cpu")
    assert detector.supervision.startswith(
        f"5 real anomalous images from {anomaly_root} (3 train the predictor, 2 choose"
    )
    assert detector.params()["method_params"]["anomalies"] == str(anomaly_root)
    metrics = evaluate(detector, brick_root).metrics
    assert metrics["image_auroc"] > 0.6, metrics


def test_evaluating_on_the_data_the_anomalies_came_from_is_warned(nbs, brick_root, monkeypatch):
    """fit warns when --anomalies is DATA itself; evaluate, which may run long after, too."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DefectLensWarning)
        evaluate(nbs, brick_root)  # synthetic defects: nothing of the test split was learned
    monkeypatch.setitem(nbs.method_params, "anomalies", str(brick_root))
    with pytest.warns(DefectLensWarning, match="learned from the labelled defects of"):
        evaluate(nbs, brick_root)


def test_an_anomaly_without_its_mask_is_named(brick_root, anomaly_root, tmp_path):
    broken = tmp_path / "anomalies"
    shutil.copytree(anomaly_root, broken)
    (broken / "ground_truth" / "hole" / "000_mask.png").unlink()
    detector = Detector(method="nbs", image_size=64, method_params={"anomalies": str(broken)})
    with pytest.raises(DataError, match=r"test/hole/000\.png: no mask"):
        detector.fit(brick_root, device="cpu")


def test_an_anomaly_mask_of_the_wrong_size_is_named(
    brick_root, anomaly_root, tmp_path, monkeypatch, capsys
):
    broken = tmp_path / "anomalies"
    shutil.copytree(anomaly_root, broken)
    mask = broken / "ground_truth" / "spot" / "000_mask.png"
    Image.new("L", (50, 40)).save(mask)
    code, _, stderr = run_cli(
        monkeypatch,
        capsys,
        "fit",
        brick_root,
        "--method",
        "nbs",
        "--image-size",
        "64",
        "--anomalies",
        broken,
        "--out",
        tmp_path / "model",
        "--quiet",
    )
    assert code != 0 and "Traceback" not in stderr
    assert f"{mask}: mask is 50x40 but its image is 128x128" in stderr
    assert not (tmp_path / "model").exists()


def test_an_anomaly_folder_without_defects_is_refused(brick_root, tmp_path):
    (tmp_path / "test" / "good").mkdir(parents=True)
    detector = Detector(method="nbs", image_size=64, method_params={"anomalies": str(tmp_path)})
    with pytest.raises(DataError, match="no defective images"):
        detector.fit(brick_root, device="cpu")


def test_nbs_needs_four_training_images_and_64_px(brick_root):
    images = sorted((brick_root / "train" / "good").iterdir())[:4]  # 3 fit, 1 validates
    with pytest.raises(DataError, match=r"at least 4 normal training images .*, got 3"):
        Detector(method="nbs", image_size=64, method_params=TINY).fit(images, device="cpu")
    with pytest.raises(DefectLensError, match="at least 64 px"):
        Detector(method="nbs", image_size=32, method_params=TINY).fit(brick_root, device="cpu")
    with pytest.raises(ParameterError, match="steps"):
        Detector(method="nbs", method_params={"snapshots": 8, "steps": 4})
    with pytest.raises(ParameterError, match="unknown defect kind 'dent'"):
        Detector(method="nbs", method_params={"defects": "self,dent"})


def test_nbs_learns_from_the_defect_kinds_asked_for(brick_root, monkeypatch):
    asked = []
    original = synthetic.paste_defect

    def paste(image, rng, kinds):
        asked.append(kinds)
        return original(image, rng, kinds)

    monkeypatch.setattr(synthetic, "paste_defect", paste)
    params = {**TINY, "max_epochs": 1, "defects": "self"}
    detector = Detector(method="nbs", image_size=64, batch_size=8, method_params=params)
    detector.fit(brick_root, device="cpu")
    assert asked and set(asked) == {synthetic.SELF_TEXTURE_DEFECTS}
    assert detector.model_.supervision.endswith("(cutpaste, scar, blob, stain)")


def test_a_non_finite_episode_stops_training_and_keeps_the_last_good_one(brick_root, monkeypatch):
    from defectlens.methods.nbs import NBS

    real = NBS._fit_predictor
    calls = []

    def failing_after_two(self, episodes, generator):
        calls.append(1)
        return real(self, episodes, generator) if len(calls) <= 2 else float("nan")

    monkeypatch.setattr(NBS, "_fit_predictor", failing_after_two)
    detector = Detector(method="nbs", image_size=64, batch_size=8, method_params=TINY)
    with pytest.warns(DefectLensWarning, match="NaN or infinite at epoch 3"):
        detector.fit(brick_root, device="cpu")
    history = detector.model_.history
    assert len(history) == 3 and history[-1]["stopped"] == "non-finite loss"
    assert any(r.get("best") for r in history[:2])
    assert np.isfinite(detector.predict([brick_root / "test" / "good" / "000.png"])[0].score)


def test_the_command_line_warns_when_the_labelled_defects_are_the_test_split(
    brick_root, tmp_path, monkeypatch, capsys
):
    code, _, stderr = run_cli(
        monkeypatch,
        capsys,
        "fit",
        brick_root,
        "--method",
        "nbs",
        "--image-size",
        "64",
        "--anomalies",
        brick_root,
        *("--param", "max_epochs=1", "--param", "steps=8", "--param", "snapshots=2"),
        *("--param", "predictor_steps=5", "--out", tmp_path / "m", "--quiet"),
    )
    assert code == 0, stderr
    assert "is DATA itself: its test/ defects now teach the model" in stderr
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["training"]["supervision"].startswith("15 real anomalous images")
