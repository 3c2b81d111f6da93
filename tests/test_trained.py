"""The methods that train their own network on pixels (MemAE, MNAD, GradCon, OGNet) and the
shared trainer under them: each fits in seconds at a tiny size, beats chance on generated
defects, round-trips exactly, exports with parity where it can; the trainer's early stopping,
time budget, best-epoch restore and NaN guard each do what they say."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from defectlens import Detector, load
from defectlens.data import find_test_samples
from defectlens.errors import DefectLensError, ParameterError
from defectlens.evaluation import evaluate
from defectlens.training.loop import StopRule, TrainingDiverged, train_epochs
from defectlens.training.trainer import TrainConfig, fit_minibatches

TINY = {
    "memae": {"widths": [8, 16, 32], "memory_items": 50},
    "mnad": {"widths": [8, 16, 32], "query_channels": 32},
    "gradcon": {"widths": [8, 16, 16, 16]},
    "ognet": {"widths": [8, 16, 32], "phase_two_steps": 10},
}


def fit_tiny(root, method: str, **extra) -> Detector:
    params = {"input_size": 64, "max_epochs": 25, "patience": 25, **TINY[method], **extra}
    return Detector(method=method, image_size=64, batch_size=8, method_params=params).fit(
        root, device="cpu"
    )


@pytest.fixture(scope="module", params=sorted(TINY))
def trained(request, brick_root):
    return request.param, fit_tiny(brick_root, request.param)


def test_trains_beats_chance_and_round_trips(trained, brick_root, tmp_path):
    _, detector = trained
    history = detector.model_.history
    phase_one = [r for r in history if "epoch" in r]
    assert phase_one[-1]["train_loss"] < phase_one[0]["train_loss"]
    assert all("val_loss" in r for r in phase_one)  # validation images watched, not test
    metrics = evaluate(detector, brick_root).metrics
    assert metrics["image_auroc"] > 0.6 or metrics["pixel_auroc"] > 0.75, metrics
    paths = [s.path for s in find_test_samples(brick_root)][:5]
    saved = detector.save(tmp_path / "m")
    loaded = load(saved)
    before, after = detector.predict(paths), loaded.predict(paths)
    assert [p.score for p in before] == [p.score for p in after]
    for a, b in zip(before, after, strict=True):
        assert np.array_equal(a.anomaly_map, b.anomaly_map)
    assert loaded.model_.history == json.loads(json.dumps(history))  # the losses are kept
    assert all(math.isfinite(p.score) for p in before)


def test_export_parity_or_a_clear_refusal(trained, tmp_path):
    from defectlens.runtime.export import export_detector

    method, detector = trained
    if method == "gradcon":  # the gradient score needs autograd
        with pytest.raises(ParameterError, match="gradient_weight=0"):
            export_detector(detector, tmp_path / "e")
        return
    report = export_detector(detector, tmp_path / "e")
    assert report.max_relative_difference < 1e-4 and report.has_maps


def test_gradcon_without_the_gradient_term_exports(brick_root, tmp_path):
    from defectlens.runtime.export import export_detector

    detector = fit_tiny(brick_root, "gradcon", gradient_weight=0.0, max_epochs=3)
    assert export_detector(detector, tmp_path / "e").max_relative_difference < 1e-4


def test_training_is_seeded_and_deterministic(brick_root):
    a = fit_tiny(brick_root, "memae", max_epochs=2)
    b = fit_tiny(brick_root, "memae", max_epochs=2)
    c = fit_tiny(brick_root, "memae", max_epochs=2, seed=1)
    state_a, state_b = a.model_.fitted_state(), b.model_.fitted_state()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(state_a["net.memory.items"], c.model_.fitted_state()["net.memory.items"])


def test_mnad_items_follow_queries_and_stay_normalised(brick_root):
    detector = fit_tiny(brick_root, "mnad", max_epochs=2)
    model = detector.model_
    items = model.net.memory.items
    assert torch.allclose(items.norm(dim=1), torch.ones(items.shape[0]), atol=1e-5)
    fresh = model.new_network().memory.items
    assert not torch.allclose(items, fresh)  # moved by the update rule, not by gradients
    assert not any(p is items for p in model.net.parameters())
    low, high = model.psnr_range
    assert low <= high  # normalisation from the validation images


def test_mnad_test_time_update_is_off_by_default(brick_root):
    detector = fit_tiny(brick_root, "mnad", max_epochs=2)
    paths = [s.path for s in find_test_samples(brick_root)][:6]
    first = [p.score for p in detector.predict(paths)]
    assert [p.score for p in detector.predict(paths)] == first  # deterministic
    detector.model_.test_time_update = True
    detector.model_.update_threshold = 1.0  # every image counts as normal
    before = detector.model_.net.memory.items.clone()
    detector.predict(paths)
    assert not torch.equal(before, detector.model_.net.memory.items)


def test_mnad_test_time_update_starts_from_a_settled_memory(brick_root):
    """With the update on, the memory follows the validation images before the normal ranges
    are measured: a short fit's scores then stay on the scale of its threshold, pass after
    pass (unsettled, the first update dropped them to about -800 and nothing was flagged)."""
    detector = fit_tiny(brick_root, "mnad", max_epochs=2, test_time_update=True)
    paths = [s.path for s in find_test_samples(brick_root)]
    passes = [np.array([p.score for p in detector.predict(paths)]) for _ in range(3)]
    threshold = detector.thresholds_.image
    for scores in passes:
        assert np.abs(scores).max() < 50 * max(abs(threshold), 1.0), scores.min()
    assert np.allclose(passes[1], passes[2], atol=1e-2 * max(abs(threshold), 1.0))


# -- the trainer ------------------------------------------------------------------------------
class _Line(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))


def test_early_stopping_keeps_the_best_epoch():
    module = _Line()
    val_losses = iter([3.0, 1.0, 2.0, 2.5, 2.7, 9.0])

    def run_epoch(epoch: int) -> float:
        module.w.data += 1  # each epoch changes the weights
        return 1.0

    history = train_epochs(module, run_epoch, lambda: next(val_losses), StopRule(10, 3, 10.0))
    assert len(history) == 5  # epochs 3-5 did not improve on epoch 2: patience 3
    assert history[-1]["stopped"] == "patience"
    assert module.w.item() == 2.0  # the weights after epoch 2, the best one


def test_the_time_budget_stops_training(monkeypatch):
    import defectlens.training.loop as loop

    clock = iter(range(0, 10_000, 40))  # each reading 40 s later
    monkeypatch.setattr(loop.time, "monotonic", lambda: next(clock))
    module = _Line()
    history = train_epochs(module, lambda e: 1.0 / (e + 1), None, StopRule(100, 100, 2.0))
    assert history[-1]["stopped"] == "time budget" and len(history) < 5


def test_no_epoch_is_started_that_would_end_past_the_budget(monkeypatch):
    import defectlens.training.loop as loop

    clock = [0.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: clock[0])

    def run_epoch(epoch: int) -> float:
        clock[0] += 50.0  # each epoch takes 50 s; the budget is 120 s
        return 1.0 / (epoch + 1)

    history = train_epochs(_Line(), run_epoch, None, StopRule(100, 100, 2.0))
    # a third epoch would have ended at 150 s: the budget is a ceiling
    assert len(history) == 2 and history[-1]["stopped"] == "time budget"
    assert clock[0] <= 120.0


def test_a_nan_loss_keeps_the_last_good_weights():
    module = _Line()
    data = torch.ones(8, 1)
    calls = {"n": 0}

    def loss(batch: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        value = ((module.w - 3) ** 2).mean()
        return value * (float("nan") if calls["n"] > 6 else 1.0)

    config = TrainConfig(learning_rate=0.1, batch_size=4, max_epochs=10, patience=10)
    with pytest.warns(UserWarning, match="NaN or infinite"):
        history = fit_minibatches(module, loss, data, None, config)
    assert history[-1]["stopped"] == "non-finite loss"
    assert math.isfinite(module.w.item()) and module.w.item() > 0  # epoch 3's weights


def test_a_loss_that_is_nan_from_the_start_saves_nothing(brick_root, tmp_path, monkeypatch):
    from defectlens.methods.memae import MemAE

    module = _Line()
    config = TrainConfig(batch_size=4, max_epochs=3)
    with pytest.raises(TrainingDiverged, match="first epoch"):
        fit_minibatches(module, lambda b: module.w.sum() * math.nan, torch.ones(8, 1), None, config)
    monkeypatch.setattr(MemAE, "loss", lambda self, x: self.net(x)[0].sum() * math.nan)
    detector = Detector(method="memae", image_size=64, method_params={"input_size": 64})
    with pytest.raises(DefectLensError, match="NaN or infinite in the first epoch"):
        detector.fit(brick_root, device="cpu")
    assert detector.thresholds_ is None  # nothing fitted, nothing to save


def test_bad_parameters_and_devices_are_one_line_errors(brick_root):
    for method, params in [
        ("memae", {"widths": [8, 0]}),
        ("memae", {"input_size": 60}),  # not divisible by 2^4
        ("memae", {"shrink_threshold": 1.0}),
        ("mnad", {"alpha": 2.0}),
        ("mnad", {"test_time_update": "yes"}),
        ("gradcon", {"gradient_weight": -1}),
        ("ognet", {"phase_two_steps": 0}),
        ("memae", {"no_such": 1}),
    ]:
        with pytest.raises((ParameterError, DefectLensError)):
            Detector(method=method, method_params=params)
    with pytest.raises(ParameterError, match="device"):
        Detector(method="memae").fit(brick_root, device="tpu")


def test_cli_fits_a_trained_method_and_reports_its_training(
    brick_root, tmp_path, monkeypatch, capsys
):
    from tests.conftest import run_cli

    out = tmp_path / "m"
    code, stdout, stderr = run_cli(
        monkeypatch,
        capsys,
        "fit",
        str(brick_root),
        "--method",
        "ognet",
        "--image-size",
        "64",
        "--param",
        "input_size=64",
        "--param",
        "widths=[8,16]",
        "--param",
        "max_epochs=2",
        "--param",
        "phase_two_steps=2",
        "--device",
        "cpu",
        "--out",
        str(out),
        "-q",
    )
    assert code == 0, stderr
    assert "trained 2 epoch(s), stopped by max_epochs; kept epoch" in stdout
    config = json.loads((out / "config.json").read_text())
    assert [r.get("phase") for r in config["training"]["history"]] == [None, None, 2]
    code, _, stderr = run_cli(
        monkeypatch,
        capsys,
        "fit",
        str(brick_root),
        "--method",
        "memae",
        "--device",
        "tpu",
        "--out",
        str(tmp_path / "x"),
        "-q",
    )
    assert code != 0 and "unknown device 'tpu'" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "x").exists()


def test_an_input_size_above_the_image_size_is_one_clear_error(brick_root):
    detector = Detector(method="memae", image_size=64, method_params={"input_size": 128})
    with pytest.raises(DefectLensError, match="input_size 128 is larger than the image size 64"):
        detector.fit(brick_root, device="cpu")


def test_calibrate_sets_the_thresholds_fit_sets(trained, brick_root):
    _, detector = trained
    fitted = detector.thresholds_
    from defectlens.data.dataset import find_normal_images

    val = detector.split_validation(find_normal_images(brick_root))[1]
    assert detector.calibrate(val).thresholds_.to_dict() == fitted.to_dict()


@pytest.mark.parametrize("method", sorted(TINY))
def test_feature_space_fits_round_trips_and_exports(method, brick_root, tmp_path):
    """space=features: the network reconstructs the backbone's standardised maps."""
    from defectlens.runtime.export import export_detector

    extra = {"phase_two_steps": 5} if method == "ognet" else {}
    if method == "gradcon":
        extra = {"gradient_weight": 0.0}  # exportable
    params = {"space": "features", "max_epochs": 6, **extra}
    detector = Detector(method=method, image_size=64, batch_size=8, method_params=params)
    detector.fit(brick_root, device="cpu")
    model = detector.model_
    assert model.strides == (8, 16) and model.feature_std.shape == (40 + 112,)
    metrics = evaluate(detector, brick_root).metrics
    assert metrics["image_auroc"] > 0.6 or metrics["pixel_auroc"] > 0.75, metrics
    paths = [s.path for s in find_test_samples(brick_root)][:4]
    loaded = load(detector.save(tmp_path / "m"))
    assert [p.score for p in loaded.predict(paths)] == [p.score for p in detector.predict(paths)]
    assert export_detector(detector, tmp_path / "e").max_relative_difference < 1e-4


def test_feature_space_widths_must_fit_the_feature_grid(brick_root):
    params = {"space": "features", "widths": [8, 8, 8, 8]}  # 64 px images: an 8 x 8 grid
    detector = Detector(method="memae", image_size=64, method_params=params)
    with pytest.raises(DefectLensError, match="8 x 8 feature grid"):
        detector.fit(brick_root, device="cpu")
    with pytest.raises(ParameterError, match="space"):
        Detector(method="memae", method_params={"space": "voxels"})
