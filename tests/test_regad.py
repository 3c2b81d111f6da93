"""RegAD: spatial transformers, the registration network, its training and file, the few-shot
method built on it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from defectlens import Detector
from defectlens.backbones import build_extractor
from defectlens.components.geometry import compose, invert, rotation, translation, warp
from defectlens.components.registration import (
    BACKBONE_FILE,
    RegistrationNet,
    load_registration,
)
from defectlens.components.stn import MODES, SpatialTransformer
from defectlens.data import find_test_samples
from defectlens.data.synthetic import make_pose_category
from defectlens.errors import DataError, ModelFileError, WeightsError
from defectlens.training.registration import RegistrationConfig, build_registration

from .conftest import IMAGE_SIZE, run_cli


def smooth_map(size: int = 64, channels: int = 2) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack([torch.sin(2 * x + y), torch.cos(x - 3 * y)][:channels]).unsqueeze(0)


def interior(t: torch.Tensor, margin: int) -> torch.Tensor:
    return t[..., margin:-margin, margin:-margin]


def test_inverse_and_composition_are_exact():
    theta = torch.tensor(
        [[[0.9, -0.4, 0.1], [0.3, 1.1, -0.05]], [[1.0, 0.0, 0.2], [0.0, 1.0, 0.0]]]
    )
    identity = torch.eye(2, 3).expand(2, 2, 3)
    assert torch.allclose(compose(theta, invert(theta)), identity, atol=1e-6)
    assert torch.allclose(compose(invert(theta), theta), identity, atol=1e-6)
    # composing is warping twice (up to resampling of a smooth map)
    f = smooth_map()
    a, b = rotation(torch.tensor([0.2])), translation(torch.tensor([[0.1, -0.05]]))
    twice, once = warp(warp(f, a), b), warp(f, compose(a, b))
    assert float(interior(twice - once, 12).abs().max()) < 0.02


@pytest.mark.parametrize("size", [(64, 64), (16, 24), (5, 7)])
def test_the_exported_warp_equals_grid_sample(size):
    from defectlens.components.geometry import warp_by_gather

    x = torch.rand(4, 3, *size)
    theta = compose(rotation(torch.tensor([0.0, 0.5, -1.2, 3.0])), translation(torch.rand(4, 2)))
    theta[:, 0, 0] *= 1.3  # a scale too, and shifts that reach past the borders
    assert torch.allclose(warp_by_gather(x, theta), warp(x, theta), atol=1e-5)


def test_a_known_rotation_is_undone_in_the_image_frame():
    """Each stage reads the previous stage's registered map; its output comes back to the
    image frame, and the last transformer's theta is not needed for that."""
    f1, f2, f3 = smooth_map(64), smooth_map(32), smooth_map(32)
    t1 = rotation(torch.tensor([0.3]))
    t2 = compose(rotation(torch.tensor([-0.1])), translation(torch.tensor([[0.05, 0.0]])))
    t3 = rotation(torch.tensor([0.7]))
    # stage 2 sees stage 1's registered frame, stage 3 the frame of both
    stage_maps = [f1, warp(f2, t1), warp(f3, compose(t1, t2))]
    back = RegistrationNet.to_image_frame(stage_maps, [t1, t2, t3])
    assert back[0] is f1  # the first stage is never resampled
    assert float(interior(stage_maps[1] - f2, 8).abs().max()) > 0.3  # the warps moved them
    assert float(interior(stage_maps[2] - f3, 8).abs().max()) > 0.3
    for original, restored, margin in ((f2, back[1], 8), (f3, back[2], 8)):
        assert float(interior(restored - original, margin).abs().max()) < 0.03
    assert torch.equal(RegistrationNet.to_image_frame(stage_maps, [t1, t2])[2], back[2])


@pytest.mark.parametrize("mode", sorted(MODES))
def test_untrained_transformers_are_exactly_the_identity(mode):
    stn = SpatialTransformer(8, mode).eval()
    x = torch.rand(2, 8, 16, 16)
    with torch.no_grad():
        warped, theta = stn(x)
    assert torch.allclose(theta, torch.eye(2, 3).expand(2, 2, 3))
    assert float((warped - x).abs().max()) < 1e-5


def test_rotation_scale_scales_only_the_diagonal_as_regad_does():
    to_theta, _ = MODES["rotation_scale"]
    theta = to_theta(torch.tensor([[math.pi / 6, 2.0, 0.5]]))[0]
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    assert torch.allclose(theta, torch.tensor([[2 * c, -s, 0.0], [s, 0.5 * c, 0.0]]))


@pytest.fixture(scope="module")
def pose_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pose")
    return [make_pose_category(root, n, n=12, size=64) for n in ("coins", "camera", "clock")]


@pytest.fixture(scope="module")
def registration(pose_pool, tmp_path_factory):
    config = RegistrationConfig(
        shots=2, batch_size=4, steps_per_epoch=6, max_epochs=4, patience=10, pose_jitter=20.0
    )
    out = tmp_path_factory.mktemp("reg") / "reg"
    path, record = build_registration(pose_pool, out, image_size=IMAGE_SIZE, config=config)
    return path, record


def test_registration_training_lowers_its_loss_and_is_saved_small(registration):
    path, record = registration
    history = record["history"]
    assert len(history) == 4
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert min(h["val_loss"] for h in history) < history[0]["val_loss"]
    config = json.loads((path / "config.json").read_text())
    assert config["backbone"] == "efficientnet_lite0" and config["image_size"] == IMAGE_SIZE
    assert set(config["training"]["categories"]) == {"coins", "camera", "clock"}
    assert (path / "model.safetensors").stat().st_size < 2_000_000
    net, _ = load_registration(path)
    for p in net.parameters():
        assert not p.requires_grad
    # training moved the transformers away from the identity
    bias = net.transformers["16"].localise[-1]
    assert float(bias.weight.abs().max()) > 0


def test_the_epoch_is_chosen_on_held_out_training_images_only(pose_pool, tmp_path):
    config = RegistrationConfig(steps_per_epoch=2, max_epochs=2, batch_size=2, val_fraction=0.25)
    pool = [pose_pool[0] / "train" / "good", *pose_pool[1:]]  # named coins, not good
    _, record = build_registration(
        pool, tmp_path / "r", image_size=IMAGE_SIZE, config=config, exclude=["clock"]
    )
    assert record["excluded"] == ["clock"]
    assert record["categories"] == {
        "coins": {"train": 9, "val": 3},
        "camera": {"train": 9, "val": 3},
    }


def test_a_registration_trained_with_its_backbone_saves_and_needs_that_backbone(
    pose_pool, tmp_path
):
    """`backbone_learning_rate` tunes the backbone too; the tuned one is saved as a weights
    file in the registration folder, and a fit must use it."""
    config = RegistrationConfig(
        shots=2, batch_size=2, steps_per_epoch=2, max_epochs=1, backbone_learning_rate=1e-3
    )
    path, _ = build_registration(pose_pool, tmp_path / "r", image_size=IMAGE_SIZE, config=config)
    tuned = path / BACKBONE_FILE
    config_json = json.loads((path / "config.json").read_text())
    assert config_json["backbone_weights"] == BACKBONE_FILE
    original = build_extractor("efficientnet_lite0", (4, 8, 16), IMAGE_SIZE)
    extractor = build_extractor("efficientnet_lite0", (4, 8, 16), IMAGE_SIZE, str(tuned))
    assert config_json["weights_sha256"] == extractor.weights_sha256 != original.weights_sha256
    before, after = original.weights_state(), extractor.weights_state()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    early = "_blocks.0.", "_conv_stem."  # before the first tap: trained; the head: untouched
    assert any(k.startswith(early) for k in changed)
    assert not any(k.startswith(("_conv_head", "_fc", "_blocks.15.")) for k in changed)
    assert all("running_" not in k for k in changed)  # batch-norm statistics stay ImageNet's
    # eager torch: exporting onnxruntime graphs for these weights would take most of a minute
    params = {"registration": str(path)}
    refused = Detector(method="regad", image_size=IMAGE_SIZE, method_params=params, shots=2)
    with pytest.raises(ModelFileError, match=f"weights={tuned}"):
        refused.use_backend("torch").fit(pose_pool[0])
    detector = Detector(
        method="regad", image_size=IMAGE_SIZE, weights=str(tuned), method_params=params, shots=2
    ).use_backend("torch")
    detector.fit(pose_pool[0])
    assert detector.ensure_extractor().weights_sha256 == extractor.weights_sha256


def test_registration_folder_problems_are_one_line_errors(registration, tmp_path):
    path, _ = registration
    with pytest.raises(ModelFileError, match="no such registration model"):
        load_registration(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        (broken / name).write_bytes((path / name).read_bytes())
    with open(broken / "model.safetensors", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        load_registration(broken)


def test_a_registration_for_another_size_or_backbone_is_refused_at_fit(registration, brick_root):
    path, _ = registration
    detector = Detector(
        method="regad", image_size=96, shots=2, method_params={"registration": str(path)}
    )
    with pytest.raises(ModelFileError, match="image size 64, not 96"):
        detector.fit(brick_root)
    other = Detector(method="regad", backbone="efficientnet_lite0", image_size=IMAGE_SIZE, shots=2)
    with pytest.raises(WeightsError, match="no registration model ships"):
        other.fit(brick_root)


def test_identity_regad_is_padim_on_the_augmented_support(brick_root):
    kwargs = {"image_size": IMAGE_SIZE, "shots": 3, "shot_seed": 4, "batch_size": 8}
    regad = Detector(method="regad", method_params={"registration": "identity"}, **kwargs)
    padim = Detector(
        method="padim", augment_support=True, method_params={"n_channels": 100}, **kwargs
    )
    regad.use_backend("torch").fit(brick_root)
    padim.use_backend("torch").fit(brick_root)
    assert regad.fit_images_ == padim.fit_images_
    # RegAD's default keeps 100 of the 176 channels, the same ones PaDiM draws with its seed
    assert regad.model_.channel_index.numel() == 100
    assert torch.equal(regad.model_.channel_index, padim.model_.channel_index)
    assert torch.allclose(regad.model_.mean, padim.model_.mean, atol=1e-4)
    paths = [s.path for s in find_test_samples(brick_root)][:6]
    for a, b in zip(regad.predict(paths), padim.predict(paths), strict=True):
        assert a.score == pytest.approx(b.score, rel=1e-3)


@pytest.fixture(scope="module")
def regad_detector(registration, brick_root):
    path, _ = registration
    return Detector(
        method="regad", image_size=IMAGE_SIZE, shots=4, method_params={"registration": str(path)}
    ).fit(brick_root)


def test_regad_scores_defects_higher_and_round_trips_exactly(regad_detector, brick_root, tmp_path):
    assert regad_detector.augment_support  # RegAD's default
    samples = find_test_samples(brick_root)
    predictions = regad_detector.predict([s.path for s in samples])
    scores = np.array([p.score for p in predictions])
    labels = np.array([s.label for s in samples])
    assert scores[labels == 1].mean() > scores[labels == 0].mean()
    saved = regad_detector.save(tmp_path / "m")
    config = json.loads((saved / "config.json").read_text())
    assert config["detector"]["shots"] == 4 and config["detector"]["augment_support"] is True
    loaded = Detector.load(saved)
    for a, b in zip(predictions, loaded.predict([s.path for s in samples]), strict=True):
        assert a.score == b.score
        assert np.array_equal(a.anomaly_map, b.anomaly_map)


def test_regad_model_needs_its_registration_tensors(regad_detector, tmp_path):
    from safetensors.torch import load_file

    saved = regad_detector.save(tmp_path / "m")
    tensors = load_file(str(saved / "model.safetensors"))
    regad = type(regad_detector.model_)()
    with pytest.raises(ModelFileError, match="registration"):
        regad.load_fitted_state({k: v for k, v in tensors.items() if not k.startswith("reg")})


def test_regad_cli_trains_a_registration_and_fits_few_shot(
    monkeypatch, capsys, pose_pool, brick_root, tmp_path
):
    code, out, err = run_cli(
        monkeypatch, capsys, "regad", "train", *pose_pool, "--out", tmp_path / "reg",
        "--image-size", IMAGE_SIZE, "--steps", 2, "--epochs", 1, "--batch-size", 2, "-q",
    )  # fmt: skip
    assert code == 0, err
    assert "3 categories, 1 epochs" in out
    code, out, err = run_cli(
        monkeypatch, capsys, "fit", brick_root, "--method", "regad", "--shots", 2,
        "--registration", tmp_path / "reg", "--image-size", IMAGE_SIZE, "--out",
        tmp_path / "model", "-q",
    )  # fmt: skip
    assert code == 0, err
    assert "fitted on 2 image(s)" in out
    code, out, err = run_cli(
        monkeypatch, capsys, "regad", "train", pose_pool[0], "--out", tmp_path / "one",
        "--image-size", IMAGE_SIZE, "-q",
    )  # fmt: skip
    assert code == 2 and "at least two categories" in err
    code, out, err = run_cli(
        monkeypatch, capsys, "regad", "train", tmp_path / "mistyped", "--out", tmp_path / "one",
        "--image-size", IMAGE_SIZE, "-q",
    )  # fmt: skip
    assert code == 2 and "mistyped: no such" in err
    code, out, err = run_cli(
        monkeypatch, capsys, "regad", "train", *pose_pool, "--out", tmp_path / "x",
        "--exclude", "nothere", "-q",
    )  # fmt: skip
    assert code == 2 and "no pool category has that name" in err


def test_backbone_hook_replaces_each_stage_output():
    extractor = build_extractor("efficientnet_lite0", (4, 8, 16), IMAGE_SIZE)
    images = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    seen = []

    def zero_stride_4(stride: int, x: torch.Tensor) -> torch.Tensor:
        seen.append(stride)
        return torch.zeros_like(x) if stride == 4 else x

    plain = extractor(images)
    hooked = extractor(images, between=zero_stride_4)
    assert seen == [4, 8, 16]
    assert float(hooked[0].abs().max()) == 0
    assert not torch.allclose(hooked[1], plain[1])  # the next stage read the replaced map


def test_regad_exports_with_parity_and_backends_agree(regad_detector, brick_root, tmp_path):
    from defectlens.runtime.deployed import ExportedModel
    from defectlens.runtime.export import export_detector

    from .test_export import assert_same_predictions

    thetas = regad_detector.model_.net.transformers["4"].localise[-1].bias
    assert not torch.allclose(thetas, torch.tensor([0.0, 1.0, 1.0]))  # a trained registration
    paths = [s.path for s in find_test_samples(brick_root)]
    expected = regad_detector.predict(paths)
    report = export_detector(regad_detector, tmp_path / "export", "onnx")
    assert report.max_relative_difference < 1e-4 and report.has_maps
    assert_same_predictions(expected, ExportedModel(report.path).predict(paths))
    on_torch = Detector.load(regad_detector.save(tmp_path / "m"), backend="torch")
    assert_same_predictions(expected, on_torch.predict(paths))


def test_the_shipped_registration_loads_offline_and_fits_the_default_backbone():
    from defectlens.components.registration import check_registration_fits
    from defectlens.methods.regad import default_registration

    path = default_registration("efficientnet_lite0", 256)
    assert path is not None and (path / "model.safetensors").stat().st_size < 2_000_000
    net, config = load_registration(path)
    extractor = build_extractor("efficientnet_lite0", (4, 8, 16), 256)
    check_registration_fits(config, extractor, str(path))  # same weights, size and taps
    # trained only on the freely licensed pose categories
    from defectlens.data.synthetic import POSE_SOURCES

    assert set(config["training"]["categories"]) == set(POSE_SOURCES)
    with torch.no_grad():
        maps = net.image_frame_features(extractor, torch.rand(1, 3, 256, 256))
    assert [m.shape[1] for m in maps] == [24, 40, 112]
    assert default_registration("efficientnet_lite0", 512) is None


def test_training_devices_are_checked(monkeypatch, capsys, pose_pool, tmp_path):
    from defectlens.errors import ParameterError
    from defectlens.training.loop import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "cpu:x", "meta"):
        with pytest.raises(ParameterError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        code, _, err = run_cli(
            monkeypatch, capsys, "regad", "train", *pose_pool, "--out", tmp_path / "r",
            "--device", "cuda", "-q",
        )  # fmt: skip
        assert code == 2 and "no CUDA device" in err and not (tmp_path / "r").exists()


def test_a_short_pool_entry_fails_before_any_image_is_read(pose_pool, tmp_path, monkeypatch):
    import defectlens.training.registration as registration

    small = tmp_path / "small"
    small.mkdir()
    for p in sorted(pose_pool[0].rglob("*.png"))[:2]:
        (small / p.name).write_bytes(p.read_bytes())

    def no_decoding(*args, **kwargs):
        raise AssertionError("images were decoded before the pool was checked")

    monkeypatch.setattr(registration, "iter_batches", no_decoding)
    with pytest.raises(DataError, match=r"small: 2 normal images.*needs at least"):
        registration.load_pool([*pose_pool, small], IMAGE_SIZE, RegistrationConfig(shots=2))
