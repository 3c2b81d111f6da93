"""Ensembles: members fitted as they would be alone, scores standardised on normal validation
images, combined; saved and loaded exactly; refused clearly where they cannot go."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectlens import Detector
from defectlens.data.dataset import find_test_samples
from defectlens.errors import ParameterError

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
    from defectlens.data.loader import iter_batches

    images = torch.from_numpy(np.concatenate([b.images for b in iter_batches(val, IMAGE_SIZE, 8)]))
    outputs = ensemble.model_._member_outputs(extractor, images)
    raw = [float(scores.mean()) for scores, _ in outputs]
    assert max(raw) / min(raw) > 3  # Mahalanobis and kNN distances: different scales
    stats = ensemble.model_.normalisation
    for i, (scores, _) in enumerate(outputs):
        standard = (scores - stats[i, 0]) / stats[i, 1]
        assert abs(float(standard.mean())) < 1e-4 and abs(float(standard.std()) - 1) < 1e-3


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


def test_bad_members_and_export_are_refused(model_dir, tmp_path, monkeypatch, capsys, ensemble):
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
    saved = ensemble.save(tmp_path / "e")
    code, _, err = run_cli(monkeypatch, capsys, "export", saved, "--out", tmp_path / "x")
    assert code == 2 and "ensemble cannot be exported yet" in err
