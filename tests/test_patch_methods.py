"""Uninformed Students, Patch SVDD and segmentation-aided detection, and the blocks under them:
a padding-free patch network's dense pass gives exactly each patch's own descriptor, training
windows see exactly what a whole-image pass sees, coverage maps are means over the covering
patches, and each method fits in seconds, beats chance on generated defects, round-trips
exactly and exports with parity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from defectlens import Detector, load
from defectlens.components.patchnet import PatchNet
from defectlens.data import find_test_samples
from defectlens.errors import DefectLensError, ModelFileError, ParameterError
from defectlens.evaluation import evaluate
from defectlens.methods.students import Students, student_layers


def assert_round_trip_and_export(detector: Detector, root, tmp_path) -> None:
    """Saved and loaded, the detector scores and maps exactly as before; exported, within
    the parity contract, with maps."""
    from defectlens.runtime.export import export_detector

    paths = [s.path for s in find_test_samples(root)][:5]
    loaded = load(detector.save(tmp_path / "m"))
    before, after = detector.predict(paths), loaded.predict(paths)
    assert [p.score for p in before] == [p.score for p in after]
    for a, b in zip(before, after, strict=True):
        assert np.array_equal(a.anomaly_map, b.anomaly_map)
    report = export_detector(detector, tmp_path / "e")
    assert report.max_relative_difference < 1e-4 and report.has_maps


@pytest.mark.parametrize(("patch", "field", "stride"), [(17, 20, 4), (65, 60, 8)])
def test_a_dense_pass_gives_every_patch_its_own_descriptor(patch, field, stride):
    torch.manual_seed(0)
    net = PatchNet(3, student_layers(patch, 4, 5)).eval()
    assert (net.field, net.stride) == (field, stride)
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        dense = net.dense(image)
        assert dense.shape == (1, 5, 64 // stride, 64 // stride)
        before, after = net.padding()
        padded = torch.nn.functional.pad(image, (before, after, before, after), mode="reflect")
        for row, col in [(0, 0), (3, 5), (64 // stride - 1, 2)]:
            y, x = row * stride, col * stride
            alone = net(padded[:, :, y : y + field, x : x + field])
            assert alone.shape[-2:] == (1, 1)
            torch.testing.assert_close(alone[0, :, 0, 0], dense[0, :, row, col])


def test_a_patch_network_refuses_an_image_off_its_grid():
    net = PatchNet(3, student_layers(65, 4, 5))
    with pytest.raises(ParameterError, match="multiples of the patch network's stride 8"):
        net.dense(torch.rand(1, 3, 60, 64))


def test_training_windows_match_the_whole_image_pass():
    from defectlens.methods.students import _Windows

    torch.manual_seed(0)
    nets = [PatchNet(3, student_layers(p, 4, 3)).eval() for p in (17, 65)]
    pixels = torch.rand(2, 3, 64, 64)
    teachers = (torch.rand(2, 3, 16, 16), torch.rand(2, 3, 8, 8))
    windows = _Windows(nets, (pixels, *teachers), crop=32, seed=0)
    inputs, targets = windows.take(torch.tensor([1, 0, 1]))
    with torch.no_grad():
        for k, net in enumerate(nets):
            out = net(inputs[k])
            dense = net.dense(pixels)
            s = net.stride
            assert out.shape[-1] == 32 // s == targets[k].shape[-1]
            # find each window's corner from its teacher cells, then compare with the dense pass
            for j, i in enumerate([1, 0, 1]):
                match = [
                    (y, x)
                    for y in range(0, 64 - 32 + 1, 8)
                    for x in range(0, 64 - 32 + 1, 8)
                    if torch.equal(
                        targets[k][j],
                        teachers[k][i, :, y // s : (y + 32) // s, x // s : (x + 32) // s],
                    )
                ]
                assert len(match) == 1
                y, x = match[0]
                window = dense[i, :, y // s : (y + 32) // s, x // s : (x + 32) // s]
                torch.testing.assert_close(out[j], window, rtol=1e-5, atol=1e-5)


TINY_STUDENTS = {"width": 8, "crop": 32, "max_epochs": 15, "patience": 15}


@pytest.fixture(scope="module")
def students(brick_root):
    return Detector(
        method="students", image_size=64, batch_size=8, method_params=TINY_STUDENTS
    ).fit(brick_root, device="cpu")


def test_students_train_beat_chance_round_trip_and_export(students, brick_root, tmp_path):
    history = students.model_.history
    teacher = [r for r in history if "teacher_epoch" in r]
    own = [r for r in history if "epoch" in r]
    assert teacher and own  # the teacher was distilled first, then the students trained
    for phase in (teacher, own):
        assert phase[-1]["train_loss"] < phase[0]["train_loss"]
        assert all("val_loss" in r for r in phase)
    model = students.model_
    assert [len(scale) for scale in model.net["students"]] == [3, 3]
    assert [len(scale) for scale in model.net["teachers"]] == [1, 1]
    # independent initialisations: the students must not be copies of each other
    first = [next(s.parameters()) for s in model.net["students"][0]]
    assert not torch.equal(first[0], first[1])
    metrics = evaluate(students, brick_root).metrics
    assert metrics["image_auroc"] > 0.65 and metrics["pixel_auroc"] > 0.6, metrics
    assert_round_trip_and_export(students, brick_root, tmp_path)
    # A model saved before `normalise` existed used the paper's global statistics.
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["detector"]["method_params"].pop("normalise") == "global"
    config_path.write_text(json.dumps(config))
    assert load(tmp_path / "m").model_.normalise == "global"


def test_students_with_the_backbone_as_teacher_on_one_scale(brick_root, tmp_path):
    params = {
        **TINY_STUDENTS,
        "patch_sizes": [65],
        "students": 2,
        "max_epochs": 2,
        "teacher": "backbone",
    }
    detector = Detector(method="students", image_size=64, method_params=params).fit(
        brick_root, device="cpu"
    )
    assert detector.model_.strides == (8,) and detector.model_.score_stats.shape == (1, 4)
    assert "teachers" not in detector.model_.net
    paths = [s.path for s in find_test_samples(brick_root)][:3]
    loaded = load(detector.save(tmp_path / "m"))
    assert [p.score for p in detector.predict(paths)] == [p.score for p in loaded.predict(paths)]
    # turned over to the per-position rule without retraining (as the study does), it saves
    # and loads as a "position" model
    from defectlens.data.dataset import find_normal_images
    from defectlens.data.loader import iter_batches

    batch = next(iter_batches(find_normal_images(brick_root)[:8], 64, 8))
    model = detector.model_
    model.normalise_per_position(
        model.prepare(detector.ensure_extractor(), torch.from_numpy(batch.images))
    )
    loaded = load(detector.save(tmp_path / "p"))
    assert loaded.model_.normalise == "position"
    assert [p.score for p in detector.predict(paths)] == [p.score for p in loaded.predict(paths)]


def test_students_normalised_per_position_centre_each_position_on_normal_images(
    brick_root, tmp_path
):
    """normalise="position": on the training images its statistics came from (not the
    validation images, which set the threshold), every position's map has mean 0 and spread 1
    (unless floored), so no position holds every normal image's maximum; saved, loaded and
    exported like the paper's rule."""
    from defectlens.data.dataset import find_normal_images
    from defectlens.data.loader import iter_batches

    params = {**TINY_STUDENTS, "patch_sizes": [65], "students": 2, "max_epochs": 2}
    params |= {"teacher": "backbone", "normalise": "position"}
    detector = Detector(method="students", image_size=64, method_params=params)
    detector.fit(brick_root, device="cpu")
    stats = detector.model_.position_stats
    assert stats.shape == (2, 8, 8)  # 64 px at stride 8
    fitted_on, _ = detector.split_validation(find_normal_images(brick_root))
    maps = np.concatenate(
        [detector.raw_scores(b.images)[0] for b in iter_batches(fitted_on, 64, 8)]
    ).astype(np.float64)
    np.testing.assert_allclose(maps.mean(axis=0), 0.0, atol=1e-4)
    unfloored = stats[1].numpy() > 0.1 * float(stats[1].median()) + 1e-6
    np.testing.assert_allclose(maps.std(axis=0, ddof=1)[unfloored], 1.0, rtol=1e-3)
    assert_round_trip_and_export(detector, brick_root, tmp_path)


@pytest.mark.parametrize(
    ("phase_s", "students_get"),
    [(300.0, 5.0), (60.0, 6.0)],  # the teacher took 5 minutes: 10 - 5; took 1: max_minutes
)
def test_students_training_shares_one_deadline(brick_root, monkeypatch, phase_s, students_get):
    """The students get what reading the maps and distilling the teacher left of
    teacher_minutes + max_minutes, so a slow teacher phase cannot push the fit past it; and
    never more than max_minutes, so a teacher that stops early hands on no spare time."""
    import defectlens.methods.students as module

    clock = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    given = []
    regress = Students._regress

    def timed_regress(self, nets, train, val, minutes, progress, desc):
        given.append(minutes)
        history = regress(self, nets, train, val, minutes, progress, desc)
        clock[0] += phase_s  # each phase "took" this long
        return history

    monkeypatch.setattr(Students, "_regress", timed_regress)
    params = {**TINY_STUDENTS, "max_epochs": 1, "max_minutes": 6, "teacher_minutes": 4}
    Detector(method="students", image_size=64, method_params=params).fit(brick_root, device="cpu")
    assert given == pytest.approx([4.0, students_get])  # the teacher its 4 minutes


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"patch_sizes": [33]}, "patch_sizes must be values from"),
        ({"patch_sizes": [17, 17]}, "patch_sizes has repeated values"),
        ({"students": 1}, "students must be"),
        ({"crop": 36}, "crop must be a multiple of 8"),
        ({"weight_decay": -1}, "weight_decay"),
        ({"normalise": "pixel"}, "normalise must be one of"),
    ],
)
def test_students_bad_parameters_are_clear_errors(params, message):
    with pytest.raises(ParameterError, match=message):
        Students(**params)


def test_cover_mean_is_the_mean_of_the_covering_patches():
    from defectlens.components.coverage import cover_mean

    rng = np.random.default_rng(0)
    scores = rng.random((2, 5, 4)).astype(np.float32)
    span = 3  # each patch covers 3 x 3 cells
    got = cover_mean(scores, span)
    assert got.shape == (2, 7, 6)
    for b in range(2):
        for y in range(7):
            for x in range(6):
                covering = [
                    scores[b, i, j]
                    for i in range(5)
                    for j in range(4)
                    if i <= y < i + span and j <= x < j + span
                ]
                assert got[b, y, x] == pytest.approx(np.mean(covering), rel=1e-5)


def test_patch_svdd_dense_embeddings_are_each_patchs_own():
    from defectlens.methods.patchsvdd import _PatchSVDDNet

    torch.manual_seed(0)
    net = _PatchSVDDNet(8).eval()
    image = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        small, large = net.dense(image)
        assert small.shape[-2:] == ((96 - 32) // 4 + 1,) * 2
        assert large.shape[-2:] == ((96 - 64) // 16 + 1,) * 2
        for row, col in [(0, 0), (3, 7), (16, 16)]:
            patch = image[:, :, 4 * row : 4 * row + 32, 4 * col : 4 * col + 32]
            torch.testing.assert_close(net.embed(patch)[0], small[0, :, row, col])
        for row, col in [(0, 0), (1, 2), (2, 2)]:
            patch = image[:, :, 16 * row : 16 * row + 64, 16 * col : 16 * col + 64]
            torch.testing.assert_close(net.embed(patch)[0], large[0, :, row, col])


def test_position_pairs_are_labelled_by_where_the_second_patch_lies():
    from defectlens.methods.patchsvdd import NEIGHBOURS, neighbour_pairs, position_pairs

    # every pixel holds its own coordinates, so a patch's top-left value is its corner
    side = 256
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    images = torch.stack([ys, xs, ys * 0], 0).float()[None].repeat(64, 1, 1, 1)
    generator = torch.Generator().manual_seed(0)
    first, second, label = position_pairs(images, 32, generator)
    corners, seconds = first[:, :2, 0, 0], second[:, :2, 0, 0]
    for start, end, c in zip(corners.tolist(), seconds.tolist(), label.tolist(), strict=True):
        for a, b, w in zip(start, end, NEIGHBOURS[c], strict=True):
            if w == 0:
                assert b == a
            elif b in (0, side - 32):  # clipped at the border: moved towards it, or not at all
                assert (b - a) * w >= 0
            else:  # 3/4 K to K along a moved axis
                assert (b - a) * w >= 24 and abs(b - a) <= 32
    a, b = neighbour_pairs(images, 64, generator)
    shift = (b[:, :2, 0, 0] - a[:, :2, 0, 0]).abs()
    assert bool((shift <= 2).all()) and bool((shift.sum(dim=1) > 0).any())


@pytest.fixture(scope="module")
def patchsvdd(brick_root):
    # the defaults, 20 steps: with the He-initialised encoder enough to beat chance on these
    # generated textures (with PyTorch's default initialisation it took svdd_weight=1)
    params = {"max_epochs": 20, "patience": 20, "batch_size": 32, "coreset_ratio": 1.0}
    return Detector(method="patchsvdd", image_size=64, batch_size=8, method_params=params).fit(
        brick_root, device="cpu"
    )


def test_patchsvdd_fits_beats_chance_round_trips_and_exports(patchsvdd, brick_root, tmp_path):
    model = patchsvdd.model_
    # by default each epoch is judged by the position + SVDD' loss on validation pairs
    assert all(r["val_loss"] > 3.0 and "synthetic_auroc" not in r for r in model.history)
    # 64 px images: 9 x 9 small patches and one large patch per training image, all kept
    n_train = len(patchsvdd.fit_images_)
    assert model.bank_small.shape == (81 * n_train, 64)
    assert model.bank_large.shape == (n_train, 64)
    metrics = evaluate(patchsvdd, brick_root).metrics
    assert metrics["image_auroc"] > 0.65 and metrics["pixel_auroc"] > 0.7, metrics
    assert_round_trip_and_export(patchsvdd, brick_root, tmp_path)
    # A model saved before `select_by` existed had its epoch chosen by the loss.
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    del config["detector"]["method_params"]["select_by"]
    config_path.write_text(json.dumps(config))
    assert load(tmp_path / "m").model_.select_by == "loss"


def test_patchsvdd_banks_rebuild_at_another_ratio_without_retraining(patchsvdd):
    from defectlens.data.loader import iter_batches

    model = patchsvdd.model_
    full_small, full_large = model.bank_small, model.bank_large
    weights = {k: v.clone() for k, v in model.net.state_dict().items()}
    images = next(iter_batches(patchsvdd.fit_images_, 64, 64)).images
    assert len(images) == len(patchsvdd.fit_images_)
    full_maps = patchsvdd.score_batch(images[:2])[0]
    try:
        model.coreset_ratio = 0.1
        model.build_banks(model.inputs(torch.from_numpy(images), None))
        # the coreset's share of the same embeddings: rows of the full banks
        assert len(model.bank_small) == int(np.ceil(0.1 * len(full_small)))
        assert len(model.bank_large) == int(np.ceil(0.1 * len(full_large)))
        exact = "donot_use_mm_for_euclid_dist"
        nearest = torch.cdist(model.bank_small, full_small, compute_mode=exact).min(dim=1)
        assert nearest.values.max() < 1e-6
        assert all(torch.equal(weights[k], v) for k, v in model.net.state_dict().items())
        # a bank that is a subset scores every patch at least as far from normal
        assert (patchsvdd.score_batch(images[:2])[0] >= full_maps - 1e-6).all()
    finally:
        model.coreset_ratio = 1.0
        model.build_banks(model.inputs(torch.from_numpy(images), None))
    assert model.bank_small.shape == full_small.shape
    np.testing.assert_allclose(patchsvdd.score_batch(images[:2])[0], full_maps, atol=1e-6)


def test_synthetic_check_rewards_maps_that_find_the_pasted_defects():
    from defectlens.training.synthetic_check import SyntheticCheck

    images = torch.full((4, 3, 64, 64), 0.5)
    check = SyntheticCheck(images, seed=0)
    assert check.images.shape == (8, 3, 64, 64) and check.labels.tolist() == [0] * 4 + [1] * 4
    assert torch.equal(check.images[:4], images) and not check.masks[:4].any()
    assert bool(check.masks[4:].flatten(1).any(dim=1).all())  # every copy has a defect
    masks = check.masks.float()
    assert check.measure(masks) == 1.0
    assert check.measure(torch.nn.functional.avg_pool2d(masks[:, None], 4)[:, 0]) > 0.95
    assert check.measure(torch.zeros(8, 16, 16)) == 0.5
    # low on the defects: images tie (each map's maximum is 0), every pixel is misranked
    assert check.measure(-masks) == 0.25
    assert torch.equal(SyntheticCheck(images, seed=0).images, check.images)  # seeded


def test_patchsvdd_keeps_the_epoch_that_best_finds_synthetic_defects(brick_root, monkeypatch):
    from defectlens.methods.patchsvdd import PatchSVDD

    errors, states = iter([0.4, 0.1, 0.3]), []

    def judged(self):
        states.append({k: v.clone() for k, v in self.net.state_dict().items()})
        return next(errors)

    monkeypatch.setattr(PatchSVDD, "_synthetic_error", judged)
    params = {"max_epochs": 3, "patience": 3, "coreset_ratio": 1.0, "select_by": "synthetic"}
    model = (
        Detector(method="patchsvdd", image_size=64, method_params=params)
        .fit(brick_root, device="cpu")
        .model_
    )
    assert [r["val_loss"] for r in model.history] == [0.4, 0.1, 0.3]
    assert [r["synthetic_auroc"] for r in model.history] == [0.6, 0.9, 0.7]
    kept = model.net.state_dict()
    assert all(torch.equal(kept[k], states[1][k]) for k in kept)  # the second epoch's
    # the authors' rule: the position loss (about 2 ln 8 at chance), not the check
    params["select_by"] = "loss"
    model = (
        Detector(method="patchsvdd", image_size=64, method_params=params)
        .fit(brick_root, device="cpu")
        .model_
    )
    assert len(states) == 3 and all(r["val_loss"] > 3.0 for r in model.history)
    with pytest.raises(ParameterError, match="select_by"):
        Detector(method="patchsvdd", method_params={"select_by": "auroc"})


def test_patchsvdd_fit_says_what_chose_the_epoch(brick_root, tmp_path, monkeypatch, capsys):
    from tests.conftest import run_cli

    args = ["fit", brick_root, "--method", "patchsvdd", "--image-size", "64", "-q"]
    args += ["--param", "max_epochs=2", "--param", "coreset_ratio=0.1", "--out", tmp_path / "m"]
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 0, stderr
    assert "validation loss" in stdout and "synthetic" not in stdout
    args[-1] = tmp_path / "s"
    args += ["--param", "select_by=synthetic"]
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 0, stderr
    assert "synthetic-defect AUROC" in stdout and "validation loss" not in stdout


def test_patchsvdd_draws_pairs_from_each_image_pairs_per_image_times_an_epoch(
    brick_root, monkeypatch
):
    from defectlens.methods.patchsvdd import PatchSVDD

    drawn, loss = [], PatchSVDD.loss
    monkeypatch.setattr(PatchSVDD, "loss", lambda self, i: drawn.append(i) or loss(self, i))
    params = {"max_epochs": 1, "pairs_per_image": 3, "batch_size": 16, "coreset_ratio": 1.0}
    detector = Detector(method="patchsvdd", image_size=64, method_params=params)
    detector.fit(brick_root, device="cpu")
    counts = torch.bincount(torch.cat(drawn), minlength=detector.n_fit_images_)
    assert counts.tolist() == [3] * detector.n_fit_images_


def test_patchsvdd_needs_64_px_images(brick_root):
    with pytest.raises(DefectLensError, match="at least 64 px"):
        Detector(method="patchsvdd", image_size=32, method_params={"max_epochs": 1}).fit(
            brick_root, device="cpu"
        )


def test_edges_are_the_structure_map():
    from defectlens.methods.segaided import edge_structure

    flat = torch.zeros(1, 3, 16, 16)
    assert float(edge_structure(flat).max()) < 1e-5  # no edges, borders included
    step = flat.clone()
    step[..., 8:] = 1.0  # a vertical step from grey 0.5 to 1 in [0, 1] units
    edges = edge_structure(step)[0, 0]
    assert float(edges[:, 7:9].min()) > 1.0 and float(edges[:, :6].max()) < 1e-5


def test_a_decoder_with_skips_reads_them_and_one_without_keeps_its_names():
    from defectlens.components.autoencoder import ConvDecoder, ConvEncoder

    plain = ConvDecoder(16, (8, 4), 3, convs=2)
    assert next(iter(plain.state_dict())) == "layers.0.0.weight"  # saved models load
    encoder = ConvEncoder(1, (4, 8, 16))
    stages = encoder.stage_outputs(torch.rand(2, 1, 32, 32))
    assert [s.shape[-1] for s in stages] == [16, 8, 4]
    decoder = ConvDecoder(16, (8, 4, 4), 3, skip_channels=(8, 4))
    out = decoder(stages[-1], stages[-2::-1])
    assert out.shape == (2, 3, 32, 32)
    changed = [t.clone() for t in stages]
    changed[0] += 1.0  # the finest skip must reach the output
    assert not torch.allclose(decoder(changed[-1], changed[-2::-1]), out)


def test_segaided_fits_beats_chance_round_trips_and_exports(brick_root, tmp_path):
    params = {"space": "pixels", "input_size": 64, "max_epochs": 25, "patience": 25}
    params["widths"] = [8, 16, 32]
    detector = Detector(method="segaided", image_size=64, batch_size=8, method_params=params).fit(
        brick_root, device="cpu"
    )
    history = detector.model_.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    metrics = evaluate(detector, brick_root).metrics
    assert metrics["image_auroc"] > 0.65 and metrics["pixel_auroc"] > 0.8, metrics
    assert_round_trip_and_export(detector, brick_root, tmp_path)
    with pytest.raises(ParameterError, match="at least 2 widths"):
        Detector(method="segaided", method_params={"widths": [8]})
    with pytest.raises(ParameterError, match="structure_clusters"):
        Detector(method="segaided", method_params={"structure_clusters": 1})
    # A model saved before segaided had `space` and `structure_clusters` loads as pixels.
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    del config["detector"]["method_params"]["space"]
    del config["detector"]["method_params"]["structure_clusters"]
    config_path.write_text(json.dumps(config))
    old = load(tmp_path / "m")
    assert old.model_.space == "pixels"
    paths = [s.path for s in find_test_samples(brick_root)][:3]
    assert [p.score for p in old.predict(paths)] == [p.score for p in detector.predict(paths)]


def test_segaided_on_features_segments_them_fits_round_trips_and_exports(brick_root, tmp_path):
    params = {"max_epochs": 15, "patience": 15, "structure_clusters": 4}  # features: the default
    detector = Detector(method="segaided", image_size=64, batch_size=8, method_params=params).fit(
        brick_root, device="cpu"
    )
    model = detector.model_
    assert model.structure_centres.shape == (4, model.feature_mean.numel())
    assert float(model.structure_temperature) > 0
    # The clusters follow the input's device and dtype (training moves only the network).
    grid = torch.randn(1, model.feature_mean.numel(), 4, 4, dtype=torch.float64)
    assert model.structure(grid).dtype == torch.float64
    history = model.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    metrics = evaluate(detector, brick_root).metrics
    assert metrics["image_auroc"] > 0.65 and metrics["pixel_auroc"] > 0.8, metrics
    assert_round_trip_and_export(detector, brick_root, tmp_path)
    # A config edited to another cluster count: the error says which weight does not fit.
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["detector"]["method_params"]["structure_clusters"] = 5
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"size mismatch for structure_encoder\."):
        load(tmp_path / "m")


def test_a_patch_coverage_finish_checks_its_spec_at_load():
    from defectlens.runtime.finish import make_finish

    banks = {"bank_small": np.zeros((4, 8), np.float32), "bank_large": np.zeros((2, 8), np.float32)}
    spec = {"kind": "patch_coverage", "index": "exact", "patch_sizes": [32, 64], "strides": [4, 16]}
    make_finish(spec, banks)  # the spec Patch SVDD writes
    with pytest.raises(ParameterError, match=r"multiples of finish\.strides"):
        make_finish({**spec, "strides": [5, 16]}, banks)
    with pytest.raises(ParameterError, match="list of two numbers"):
        make_finish({**spec, "patch_sizes": 32}, banks)
    with pytest.raises(ParameterError, match="non-empty float32"):
        make_finish(spec, {**banks, "bank_large": np.zeros((0, 8), np.float32)})
