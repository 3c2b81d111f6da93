"""Ensembles: members fitted as they would be alone, scores standardised on normal validation
images, combined; saved and loaded exactly; refused clearly where they cannot go."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from defectlens import Detector
from defectlens.data.dataset import find_test_samples
from defectlens.data.loader import iter_batches
from defectlens.errors import ModelFileError, ParameterError
from defectlens.runtime.deployed import ExportedModel

from .conftest import IMAGE_SIZE, run_cli


@pytest.fixture(scope="module")
def ensemble(brick_root):
    return Detector(method="ensemble", image_size=IMAGE_SIZE, batch_size=8).fit(brick_root)


def test_members_are_fitted_as_they_would_be_alone(ensemble, fitted):
    padim = ensemble.model_.models[0]
    alone = fitted.model_.fitted_state()  # the session's PaDiM: same images, same seed
    for name, tensor in padim.fitted_state().items():
        assert torch.equal(tensor, alone[name]), name


def test_standardisation_puts_members_on_one_scale(ensemble, brick_root):
    extractor = ensemble.ensure_extractor()
    _, val = ensemble.plan_fit(brick_root)
    images = torch.from_numpy(np.concatenate([b.images for b in iter_batches(val, IMAGE_SIZE, 8)]))
    outputs = ensemble.model_._member_outputs(extractor, images)
    raw = [float(scores.mean()) for scores, _ in outputs]
    assert max(raw) / min(raw) > 3  # Mahalanobis and kNN distances: different scales
    stats = ensemble.model_.normalisation
    for i, (scores, _) in enumerate(outputs):
        standard = (scores - stats[i, 0]) / stats[i, 1]
        assert abs(float(standard.mean())) < 1e-4 and abs(float(standard.std()) - 1) < 1e-3


def test_a_member_without_its_own_score_is_scored_by_its_smoothed_map(ensemble, fitted, brick_root):
    model, extractor = ensemble.model_, ensemble.ensure_extractor()
    _, val = ensemble.plan_fit(brick_root)
    images = torch.from_numpy(next(iter_batches(val, IMAGE_SIZE, 8)).images)
    (padim_scores, padim_maps), _ = model._member_outputs(extractor, images)
    side = padim_maps.shape[-1]  # PaDiM's grid: stride 4, so sigma 4 px is 1 cell
    assert model.score_smoothing.tolist() == [4.0 * side / IMAGE_SIZE, 0.0]  # PatchCore: own
    raw_max = padim_maps.flatten(1).amax(1)
    assert bool((padim_scores < raw_max).all())  # smoothing lowers a peak, never raises it
    # Close to the score PaDiM gives alone (upsampled, then smoothed at full size): the same
    # smoothing, applied on the grid instead.
    own = fitted.score_batch(images.numpy())[0].reshape(len(images), -1).max(1)
    assert np.allclose(padim_scores.numpy(), own, rtol=0.05)


def test_models_saved_before_score_smoothing_keep_raw_maxima(ensemble, brick_root, tmp_path):
    state = ensemble.model_.fitted_state()
    del state["score_smoothing"]
    old = Detector(method="ensemble", image_size=IMAGE_SIZE, batch_size=8)
    old.model_.load_fitted_state(state)
    assert old.model_.score_sigma == 0.0 and old.model_.score_smoothing.tolist() == [0.0, 0.0]
    extractor = ensemble.ensure_extractor()
    _, val = ensemble.plan_fit(brick_root)
    images = torch.from_numpy(next(iter_batches(val, IMAGE_SIZE, 8)).images)
    (scores, maps), _ = old.model_._member_outputs(extractor, images)
    assert torch.equal(scores, maps.flatten(1).amax(1))
    with pytest.raises(ParameterError, match="score_sigma"):
        Detector(method="ensemble", method_params={"score_sigma": -1})


def test_saved_and_loaded_exactly_and_combined_as_asked(ensemble, brick_root, tmp_path):
    images = [s.path for s in find_test_samples(brick_root)][:6]
    before = ensemble.predict(images)
    loaded = Detector.load(ensemble.save(tmp_path / "ens"))
    after = loaded.predict(images)
    assert [p.score for p in after] == [p.score for p in before]
    pairs = zip(after, before, strict=True)
    assert all(np.array_equal(a.anomaly_map, b.anomaly_map) for a, b in pairs)
    assert loaded.model_.members == ("padim", "patchcore")
    loaded.model_.combine = "max"
    pairs = zip(loaded.predict(images), after, strict=True)
    assert all(m.score >= p.score - 1e-6 for m, p in pairs)


def test_bad_members_are_refused():
    for members, message in (
        (["padim"], "at least two different members"),
        (["padim", "padim"], "at least two different members"),
        (["padim", "memae"], "members"),
        ("padim", "list of method names"),
    ):
        with pytest.raises(ParameterError, match=message):
            Detector(method="ensemble", method_params={"members": members})
    with pytest.raises(ParameterError, match="not a member"):
        Detector(method="ensemble", method_params={"member_params": {"spade": {}}})
    with pytest.raises(ParameterError, match="member padim: unknown parameter 'zz'; it takes: "):
        Detector(method="ensemble", method_params={"member_params": {"padim": {"zz": 1}}})


def test_export_runs_every_member_and_refuses_edited_member_lists(
    ensemble, brick_root, tmp_path, monkeypatch, capsys
):
    saved = ensemble.save(tmp_path / "e")
    code, _, err = run_cli(monkeypatch, capsys, "export", saved, "--out", tmp_path / "x")
    assert code == 0, err
    config = json.loads((tmp_path / "x" / "config.json").read_text())
    finish = config["finish"]
    assert [m["finish"]["kind"] for m in finish["members"]] == ["mahalanobis", "patch_knn"]
    outputs = config["graphs"]["head"]["outputs"]
    assert outputs[-1] == "m1_patches" and all(n.startswith("m0_map") for n in outputs[:-1])
    images = [s.path for s in find_test_samples(brick_root)][:4]
    exported = ExportedModel(tmp_path / "x")
    pairs = zip(exported.predict(images), ensemble.predict(images), strict=True)
    assert all(abs(a.score - b.score) <= 1e-4 * max(1.0, abs(b.score)) for a, b in pairs)

    def edited(change) -> str:
        folder = tmp_path / f"edit{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tmp_path / "x", folder)
        data = json.loads((folder / "config.json").read_text())
        change(data["finish"])
        (folder / "config.json").write_text(json.dumps(data))
        with pytest.raises(ModelFileError) as caught:
            ExportedModel(folder)
        return str(caught.value)

    assert "2 to 16 members" in edited(lambda f: f["members"].pop())
    assert "cannot be a member" in edited(lambda f: f["members"][0].update(finish=copy.deepcopy(f)))
    assert "do not fit its finish" in edited(lambda f: f["members"][0].update(outputs=9))
    assert "combine" in edited(lambda f: f.update(combine="median"))


def test_int8_export_refits_every_member_on_the_quantised_backbone(
    ensemble, brick_root, tmp_path, monkeypatch, capsys
):
    saved = ensemble.save(tmp_path / "e")
    args = ["export", saved, "--out", tmp_path / "q", "--int8", "--calibration", brick_root]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["precision"] == "int8" and config["finish"]["kind"] == "ensemble"
    assert config["int8"]["threshold_int8"] != config["int8"]["threshold_fp32"]
    exported = ExportedModel(tmp_path / "q")
    images = [s.path for s in find_test_samples(brick_root)][:4]
    threshold = config["thresholds"]["image"]
    assert all(p.is_anomalous == (p.score > threshold) for p in exported.predict(images))
