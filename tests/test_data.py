import numpy as np
import pytest
from PIL import Image

from defectlens.data import find_normal_images, find_test_samples, read_image, read_mask
from defectlens.data.loader import iter_batches
from defectlens.data.synthetic import DEFECTS, make_category
from defectlens.errors import DataError, DataWarning


def _save(array, path, mode=None):
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_read_image_converts_every_kind_to_rgb_uint8(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    rgb = np.stack([grey, grey // 2, grey // 4], axis=2)
    rgba = np.dstack([rgb, np.full((8, 8), 255, np.uint8)])
    paths = {
        "grey.png": _save(grey, tmp_path / "grey.png"),
        "rgb.jpg": _save(rgb, tmp_path / "rgb.bmp"),
        "rgba.png": _save(rgba, tmp_path / "rgba.png"),
        "grey16.png": _save((grey.astype(np.uint16) * 257), tmp_path / "grey16.png"),
        "tiff": _save(rgb, tmp_path / "rgb.tif"),
    }
    for path in paths.values():
        image = read_image(path)
        assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(read_image(paths["grey.png"])[..., 1], grey)
    np.testing.assert_array_equal(read_image(paths["rgba.png"]), rgb)
    # 16-bit data scaled by its full range, not clipped: 257 * v maps back to v.
    np.testing.assert_array_equal(read_image(paths["grey16.png"])[..., 0], grey)


def test_transparent_pixels_read_as_black(tmp_path):
    rgba = np.full((4, 4, 4), 200, np.uint8)
    rgba[..., 3] = 0
    assert read_image(_save(rgba, tmp_path / "clear.png")).max() == 0


def test_corrupt_and_missing_images_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"broken\.png: unreadable or corrupt"):
        read_image(bad)
    with pytest.raises(DataError, match="file not found"):
        read_image(tmp_path / "absent.png")


def test_mask_must_match_its_image(tmp_path):
    mask = np.zeros((6, 8), np.uint8)
    mask[2, 3] = 255
    path = _save(mask, tmp_path / "m.png")
    assert read_mask(path, (6, 8)).sum() == 1
    with pytest.raises(DataError, match="mask is 8x6 but its image is 9x6"):
        read_mask(path, (6, 9))


def test_dataset_discovery(tmp_path):
    root = make_category(tmp_path, "gravel", n_train=4, n_test_good=2, n_test_per_defect=1)
    assert len(find_normal_images(root)) == 4
    assert find_normal_images(root / "train" / "good") == find_normal_images(root)
    samples = find_test_samples(root)
    assert sum(s.label == 0 for s in samples) == 2
    defective = [s for s in samples if s.label == 1]
    assert {s.defect for s in defective} == set(DEFECTS)
    assert all(s.mask is not None and s.mask.name == f"{s.path.stem}_mask.png" for s in defective)
    # given test/ or one of its folders instead of the root: the root is named
    for wrong in (root / "test", root / "test" / "good"):
        with pytest.raises(DataError, match=f"the dataset root is probably {root}$"):
            find_test_samples(wrong)


def test_images_in_sub_folders_are_never_dropped_without_a_word(tmp_path):
    """fit and evaluate read a folder's own images; images one level down (a batch folder,
    a defect type's sub-folder) were skipped silently: a model fitted on 4 of 24 images."""
    import shutil

    root = make_category(tmp_path, "gravel", n_train=6, n_test_good=2, n_test_per_defect=1)
    good = root / "train" / "good"
    (good / "batch").mkdir()
    for path in sorted(good.glob("*.png"))[2:]:
        shutil.move(path, good / "batch" / path.name)
    (good / "results" / "overlays").mkdir(parents=True)  # a predict run's, not data: not counted
    (good / "results" / ".defectlens-results.json").write_text("{}")
    shutil.copy(good / "batch" / "002.png", good / "results" / "overlays" / "002.png.png")
    with pytest.warns(
        DataWarning, match=r"good: ignored 4 image\(s\) in its sub-folders \(e\.g\. batch/"
    ):
        assert len(find_normal_images(root)) == 2
    hole = root / "test" / "hole"
    (hole / "sub").mkdir()
    for path in list(hole.glob("*.png")):
        shutil.move(path, hole / "sub" / path.name)
    with pytest.warns(DataWarning, match=r"hole: ignored 1 image\(s\) in its sub-folders"):
        assert "hole" not in {s.defect for s in find_test_samples(root)}


def test_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        find_normal_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        find_normal_images(tmp_path / "empty")
    with pytest.raises(DataError, match="no test/ folder"):
        find_test_samples(tmp_path / "empty")


def test_synthetic_data_is_deterministic_with_real_defects(tmp_path):
    a = make_category(tmp_path / "a", "grass", n_train=2, n_test_good=1, n_test_per_defect=2)
    b = make_category(tmp_path / "b", "grass", n_train=2, n_test_good=1, n_test_per_defect=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    for defect in DEFECTS:
        for i in range(2):
            mask = read_mask(a / "ground_truth" / defect / f"{i:03d}_mask.png", (128, 128))
            assert 10 < mask.sum() < 0.2 * mask.size  # a visible but local defect


def test_batches_skip_unreadable_files_and_report_them(tmp_path):
    good = [_save(np.full((10, 12), i * 40, np.uint8), tmp_path / f"{i}.png") for i in range(3)]
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    errors = []
    batches = list(
        iter_batches([good[0], bad, good[1], good[2]], 32, 2, lambda s, e: errors.append(s))
    )
    assert [len(b.sources) for b in batches] == [1, 2]
    assert errors == [bad]
    assert batches[0].sizes == [(10, 12)]
    assert batches[0].images.shape == (1, 3, 32, 32)
    with pytest.raises(DataError):
        list(iter_batches([bad], 32, 2))
