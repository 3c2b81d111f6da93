"""Backends: onnxruntime and torch give the same features, scores, maps and decisions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectlens import Detector, load
from defectlens.backbones import build_extractor
from defectlens.data import find_test_samples
from defectlens.errors import DefectLensWarning, ParameterError
from defectlens.runtime import onnx_graph
from defectlens.runtime.backends import OnnxRuntimeBackend, TorchBackend, make_backend

from .conftest import IMAGE_SIZE

METHODS = {
    "padim": ({}, IMAGE_SIZE),
    "spade": ({"k_images": 3}, IMAGE_SIZE),
    "patchcore": ({"coreset_ratio": 0.2}, IMAGE_SIZE),
    "regad": ({"registration": "identity"}, IMAGE_SIZE),  # trained: tests/test_regad.py
    "differnet": (
        {"hidden": 32, "blocks": 2, "max_epochs": 2, "n_transforms": 2, "n_transforms_test": 2},
        128,
    ),
}


@pytest.mark.parametrize("size", [64, 40, 96])
def test_onnxruntime_features_match_eager_torch(size):
    extractor = build_extractor("efficientnet_lite0", (4, 8, 16, 32), 64)
    images = torch.rand(3, 3, size, size + 32, generator=torch.Generator().manual_seed(size))
    ort_maps = OnnxRuntimeBackend(extractor)(images)
    with torch.no_grad():
        eager = extractor(images)
    for a, b in zip(ort_maps, eager, strict=True):
        assert a.shape == b.shape
        assert float((a - b).abs().max() / b.abs().max()) < 1e-4


@pytest.mark.parametrize("method", sorted(METHODS))
def test_scores_maps_and_decisions_match_across_backends(method, brick_root, tmp_path):
    params, size = METHODS[method]
    detector = Detector(method=method, image_size=size, batch_size=8, method_params=params)
    detector.use_backend("onnxruntime").fit(brick_root)
    paths = [s.path for s in find_test_samples(brick_root)]
    on_ort = detector.predict(paths)
    saved = detector.save(tmp_path / "m")
    on_torch = load(saved, backend="torch").predict(paths)
    assert isinstance(detector.extractor_.backend, OnnxRuntimeBackend)
    for a, b in zip(on_ort, on_torch, strict=True):
        assert abs(a.score - b.score) <= 1e-4 * max(abs(b.score), 1e-12)
        scale = float(np.abs(b.anomaly_map).max()) or 1.0
        assert float(np.abs(a.anomaly_map - b.anomaly_map).max()) <= 1e-4 * scale
        assert a.is_anomalous == b.is_anomalous
        assert (a.mask != b.mask).mean() < 1e-3  # only pixels within rounding of the threshold


def test_graph_is_exported_once_and_a_damaged_cache_is_rebuilt(monkeypatch):
    extractor = build_extractor("efficientnet_lite0", (8, 16), 64)
    path = onnx_graph.backbone_graph(extractor)  # exported by an earlier test or now
    good = path.read_bytes()
    calls = []

    def export(extractor, target):  # as the real export would, without its 10 s
        calls.append(target)
        target.write_bytes(good)

    monkeypatch.setattr(onnx_graph, "export_backbone", export)
    OnnxRuntimeBackend(extractor)
    assert calls == []  # served from the cache
    path.write_bytes(b"not a graph")
    backend = OnnxRuntimeBackend(extractor)
    assert len(calls) == 1 and path.read_bytes() == good
    assert [m.shape[1] for m in backend(torch.rand(1, 3, 64, 64))] == [40, 112]


def test_a_backbone_that_cannot_be_exported_falls_back_to_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFECTLENS_CACHE_DIR", str(tmp_path))

    def broken(extractor, path):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(onnx_graph, "export_backbone", broken)
    extractor = build_extractor("efficientnet_lite0", (8,), 64)
    with pytest.warns(DefectLensWarning, match="unsupported operator.*using torch"):
        backend = make_backend("onnxruntime", extractor)
    assert isinstance(backend, TorchBackend)
    assert not list(tmp_path.rglob("*.partial"))  # no half-written graph left


def test_backend_names_are_checked():
    with pytest.raises(ParameterError, match="unknown backend 'tensorrt'"):
        Detector().use_backend("tensorrt")


def test_the_torch_free_list_of_backend_names_is_the_registry_s():
    from defectlens.runtime.backends import BACKENDS
    from defectlens.runtime.sessions import BACKEND_NAMES

    assert sorted(BACKEND_NAMES) == sorted(BACKENDS)


def test_without_a_writable_cache_the_graph_is_temporary(monkeypatch, tmp_path):
    extractor = build_extractor("efficientnet_lite0", (8,), 64)
    good = onnx_graph.backbone_graph(extractor).read_bytes()  # from the session's cache
    (tmp_path / "file").write_text("a file: no cache folder can be made below it")
    monkeypatch.setenv("DEFECTLENS_CACHE_DIR", str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(onnx_graph.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(onnx_graph, "export_backbone", lambda e, target: target.write_bytes(good))
    backend = OnnxRuntimeBackend(extractor)
    assert backend(torch.rand(1, 3, 64, 64))[0].shape == (1, 40, 8, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the temporary graph is gone
