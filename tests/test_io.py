import json
import shutil

import pytest
import torch

from defectlens import Detector, load
from defectlens.backbones.resnet import BasicBlock, TappedResNet
from defectlens.data import find_normal_images, find_test_samples
from defectlens.errors import DefectLensError, ModelFileError

from .conftest import IMAGE_SIZE


def test_round_trip_gives_identical_scores_and_maps(fitted, model_dir, brick_root):
    paths = [s.path for s in find_test_samples(brick_root)]
    loaded = load(model_dir)
    before, after = fitted.predict(paths), loaded.predict(paths)
    assert [p.score for p in before] == [p.score for p in after]
    assert all((a.anomaly_map == b.anomaly_map).all() for a, b in zip(before, after, strict=True))
    assert loaded.thresholds_ == fitted.thresholds_
    assert loaded.params() == fitted.params()


def test_model_directory_holds_json_and_safetensors_only(model_dir):
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["format"] == "defectlens-model" and config["format_version"] == 2
    assert config["detector"]["method"] == "padim"


def _copy(model_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(model_dir, target)
    return target


def test_corrupt_tensor_file_is_refused(model_dir, tmp_path):
    copy = _copy(model_dir, tmp_path)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        load(copy)


def test_unknown_format_version_and_bad_config(model_dir, tmp_path):
    copy = _copy(model_dir, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config["format_version"] = 99
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="format version 99"):
        load(copy)
    (copy / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="corrupt JSON"):
        load(copy)
    with pytest.raises(ModelFileError, match="no such model directory"):
        load(tmp_path / "missing")
    (copy / "config.json").unlink()
    with pytest.raises(ModelFileError, match=r"missing config\.json"):
        load(copy)


def test_missing_tensor_file(model_dir, tmp_path):
    copy = _copy(model_dir, tmp_path)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match=r"missing model\.safetensors"):
        load(copy)


def test_save_never_clobbers_a_foreign_folder(fitted, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(DefectLensError, match="not a defectlens model"):
        fitted.save(tmp_path / "photos")
    assert (tmp_path / "photos" / "holiday.jpg").exists()
    # Overwriting an existing model is fine, and leaves no temporary folders behind.
    fitted.save(tmp_path / "m")
    fitted.save(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "photos"]


def test_backbone_weights_must_match_the_fitted_ones(brick_root, tmp_path):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"resnet18-{seed}.pth")
        torch.save(TappedResNet(BasicBlock, (2, 2, 2, 2)).state_dict(), paths[-1])
    images = find_normal_images(brick_root)[:6]
    detector = Detector(backbone="resnet18", weights=str(paths[0]), image_size=IMAGE_SIZE)
    saved = detector.fit(images).save(tmp_path / "r18")
    assert load(saved).predict(images[0])[0].score == detector.predict(images[0])[0].score
    with pytest.raises(ModelFileError, match="differs"):
        load(saved, weights=str(paths[1]))
