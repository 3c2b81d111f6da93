import shutil
import warnings
from dataclasses import replace

import numpy as np
import pytest

from defectlens import Detector
from defectlens.errors import DataWarning, ParameterError
from defectlens.thresholds import Thresholds, from_normal_scores

from .conftest import run_cli, snapshot


def test_threshold_is_a_quantile_of_normal_scores():
    scores = np.arange(1, 101, dtype=float)  # 1..100
    t = from_normal_scores(scores, target_far=0.05)
    assert (scores > t.image).mean() <= 0.05
    assert t.image == 96.0 and t.pixel == t.image and t.n_validation == 100


def test_few_validation_images_give_their_maximum():
    t = from_normal_scores(np.array([3.0, 1.0, 2.0]), target_far=0.01)
    assert t.image == 3.0 and t.validation_max == 3.0


def test_invalid_inputs():
    with pytest.raises(ValueError):
        from_normal_scores(np.array([]), 0.01)
    with pytest.raises(ValueError):
        from_normal_scores(np.array([1.0]), 1.5)


def test_a_threshold_set_by_hand_moves_the_pixel_one_only_where_they_were_equal():
    same = from_normal_scores(np.array([1.0, 2.0, 3.0]), 0.01)
    moved = same.set_by_hand(2.5)
    assert (moved.image, moved.pixel, moved.manual) == (2.5, 2.5, True)
    assert moved.validation_max == 3.0 and not same.manual  # the evidence is kept
    own_scale = replace(same, pixel=40.0)  # a method whose image score is not its map's peak
    assert own_scale.set_by_hand(2.5).pixel == 40.0
    assert own_scale.set_by_hand(2.5, pixel=30.0).pixel == 30.0
    with pytest.raises(ParameterError, match="image threshold must be a number"):
        same.set_by_hand("2.5")
    with pytest.raises(ParameterError, match="finite"):
        same.set_by_hand(float("nan"))


def test_thresholds_read_back_with_or_without_the_manual_mark():
    t = from_normal_scores(np.array([1.0, 2.0]), 0.01).set_by_hand(1.5)
    assert Thresholds.from_dict(t.to_dict()) == t
    old = {k: v for k, v in t.to_dict().items() if k != "manual"}  # saved before the mark
    assert Thresholds.from_dict(old).manual is False
    with pytest.raises(ParameterError, match=r"thresholds\.manual must be true or false"):
        Thresholds.from_dict({**t.to_dict(), "manual": 1})


def test_the_threshold_command_shows_sets_and_recalibrates_in_place(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    model = tmp_path / "m"
    shutil.copytree(model_dir, model)
    before = Detector.load(model).thresholds_
    code, out, _ = run_cli(monkeypatch, capsys, "threshold", model)
    assert code == 0 and f"image threshold {before.image:.6g} (target_far 0.01)" in out
    image = brick_root / "test" / "good" / "000.png"
    score = Detector.load(model).predict(image)[0].score
    # by hand, below the image's score: it is now flagged, and the command says normal
    # validation images scored above the new threshold
    low = min(score, before.validation_max) - 1.0
    code, out, err = run_cli(monkeypatch, capsys, "threshold", model, "--value", low)
    assert code == 0 and "(set by hand)" in out and "some good parts will be flagged" in err
    loaded = Detector.load(model)
    assert loaded.thresholds_.manual and loaded.thresholds_.image == low
    assert loaded.thresholds_.pixel == low  # PaDiM: the image score is the map's peak
    assert loaded.predict(image)[0].is_anomalous
    # back to normal images, at another rate: calibrated, no longer manual
    code, out, _ = run_cli(
        monkeypatch, capsys, "threshold", model, "--calibrate", brick_root / "test" / "good",
        "--target-far", 0.2, "-q",
    )  # fmt: skip
    assert code == 0 and "(target_far 0.2)" in out
    loaded = Detector.load(model)
    assert not loaded.thresholds_.manual and loaded.target_far == 0.2
    assert loaded.thresholds_.n_validation == len(list((brick_root / "test" / "good").iterdir()))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--value", 1, "--calibrate", "x"], "--value and --calibrate exclude each other"),
        (["--pixel", 1], "--pixel is for --value"),
        (["--target-far", 0.1], "--target-far is for --calibrate"),
        (["--value", "nan"], "'nan' is not a finite number"),
    ],
)
def test_the_threshold_command_refuses_bad_options_and_leaves_the_model(
    args, message, model_dir, monkeypatch, capsys
):
    before = snapshot(model_dir)
    code, _, err = run_cli(monkeypatch, capsys, "threshold", model_dir, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(model_dir) == before


def test_an_export_keeps_its_models_threshold(fitted, tmp_path, monkeypatch, capsys):
    from defectlens.runtime.export import export_detector

    path = export_detector(fitted, tmp_path / "e").path
    code, _, err = run_cli(monkeypatch, capsys, "threshold", path, "--value", 1)
    assert code == 2 and "deployment export" in err, err


def test_calibrating_on_images_the_model_was_fitted_on_is_warned(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    """Label-free: fitted images score far below unseen normal ones; a threshold from them
    would flag good parts. (The command's check: `Detector.calibrate` may follow a deliberate
    change of the scoring, so it does not compare.)"""
    model = tmp_path / "m"
    shutil.copytree(model_dir, model)
    args = ["threshold", model, "--calibrate"]
    code, _, err = run_cli(monkeypatch, capsys, *args, brick_root / "train" / "good", "-q")
    assert code == 0 and "were they fitted on?" in err
    shutil.rmtree(model)
    shutil.copytree(model_dir, model)
    code, _, err = run_cli(monkeypatch, capsys, *args, brick_root / "test" / "good", "-q")
    assert code == 0 and "fitted on" not in err  # unseen normal images
    assert "is rough" not in err  # ten of them: enough, as for fit
    few = tmp_path / "few"
    few.mkdir()
    for source in sorted((brick_root / "test" / "good").iterdir())[:3]:
        shutil.copy(source, few / source.name)
    code, _, err = run_cli(monkeypatch, capsys, *args, few, "-q")
    assert code == 0 and "a threshold from 3 normal image(s) is rough" in err
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        Detector.load(model_dir).calibrate(brick_root / "train" / "good")


def test_an_interrupt_after_the_save_says_the_change_is_kept(
    model_dir, tmp_path, monkeypatch, capsys
):
    """Ctrl-C while the summary prints, after the model was rewritten: not "interrupted" and
    130, which would read as a change that was not made."""
    from defectlens.cli import threshold as threshold_command

    model = tmp_path / "m"
    shutil.copytree(model_dir, model)

    def print_thresholds(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(threshold_command, "_print_thresholds", print_thresholds)
    code, _, err = run_cli(monkeypatch, capsys, "threshold", model, "--value", 123.5)
    assert code == 0 and f"interrupted after {model} was saved; it is kept" in err
    assert Detector.load(model).thresholds_.image == 123.5
    code, _, err = run_cli(monkeypatch, capsys, "threshold", model)  # before the save: 130
    assert code == 130 and err.strip() == "defectlens: interrupted"


def test_a_threshold_takes_numpy_numbers(model_dir):
    detector = Detector.load(model_dir)
    assert detector.set_threshold(np.float32(2.5)).thresholds_.image == 2.5
    assert type(detector.thresholds_.image) is float
    assert detector.set_threshold(np.int64(3)).thresholds_.image == 3.0
