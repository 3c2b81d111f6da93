"""A generated corpus of bad inputs, tried the way a careless or unlucky user would.

Every case must end in a clear outcome: exit status 2 with one `defectlens: error:` line that
names the problem (or 1 with every input listed), never a traceback, never a hang, and never a
change to any file the user owns (checked with a snapshot of the sandbox before and after).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectlens.data import find_test_samples

from .conftest import IMAGE_SIZE, read_csv, run_cli, snapshot


def _png_header_only(width: int, height: int) -> bytes:
    """A few dozen bytes claiming a huge image: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.fixture
def sandbox(tmp_path, brick_root, monkeypatch):
    """A working directory with the user's own files, data, and a few traps."""
    root = tmp_path / "work"
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "todo.txt").write_text("call supplier")
    (root / "notes" / "config.json").write_text('{"mine": true}')
    (root / "photos").mkdir()
    (root / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8 not really")
    shutil.copytree(brick_root / "train" / "good", root / "data" / "train" / "good")
    (root / "file.txt").write_text("a file, not a folder")
    (root / "deep").mkdir()
    (root / "deep" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "corrupt").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (root / "corrupt" / name).write_bytes(b"\x89PNG\r\n\x1a\n\x00garbage")
    (root / "bomb").mkdir()
    good = sorted((root / "data" / "train" / "good").iterdir())
    for path in good[:3]:
        shutil.copy(path, root / "bomb" / path.name)
    (root / "bomb" / "huge.png").write_bytes(_png_header_only(50_000, 50_000))
    (root / "single").mkdir()
    shutil.copy(good[0], root / "single" / "only.png")
    monkeypatch.chdir(root)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-hub"))
    return root


def _ok_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    *warnings, last = err.strip().splitlines()
    assert last.startswith("defectlens: error:"), err  # one error line, maybe after warnings
    assert all(w.startswith("defectlens: warning:") for w in warnings), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in last, (fragment, err)


FIT = ["fit", "data", "--image-size", str(IMAGE_SIZE), "-q"]

FIT_CASES = [
    # where the model goes
    (["--out", "."], ["current directory"]),
    (["--out", ".."], ["ancestor of the current one"]),
    (["--out", "data"], ["which this command reads"]),
    (["--out", "notes"], ["not a defectlens model", "todo.txt"]),
    (["--out", "photos"], ["not a defectlens model"]),
    (["--out", "deep"], ["not a defectlens model's"]),
    (["--out", "file.txt"], ["exists and is not a folder"]),
    (["--out", "file.txt/model"], ["is not a folder"]),
    (["--out", "link-to-notes"], ["symbolic link"]),
    (["--out", ""], ["path is empty"]),
    (["--out", "x" * 250], ["too long for the file system"]),
    (["--out", "deep/" + "y" * 300 + "/m"], ["too long for the file system"]),
    # parameters that used to give a silent wrong answer or a traceback
    (["--out", "m", "--n-channels", "0"], ["n_channels must be at least 1"]),
    (["--out", "m", "--n-channels", "-5"], ["n_channels must be at least 1"]),
    (["--out", "m", "--image-size", "0"], ["'--image-size': 0 is not in the range 32<=x"]),
    (["--out", "m", "--image-size", "100"], ["multiple of 32"]),
    (["--out", "m", "--image-size", "65536"], ["'--image-size': 65536 is not in the range"]),
    (["--out", "m", "--image-size", "abc"], ["'abc' is not a valid integer"]),
    (["--out", "m", "--batch-size", "0"], ["'--batch-size': 0 is not in the range 1<=x<=4096"]),
    (["--out", "m", "--batch-size", "-3"], ["'--batch-size': -3 is not in the range 1<=x<=4096"]),
    (["--out", "m", "--val-fraction", "1.5"], ["'--val-fraction': 1.5 is not in the range 0<=x<1"]),
    (["--out", "m", "--val-fraction", "nan"], ["'--val-fraction': 'nan' is not a finite number"]),
    (["--out", "m", "--target-far", "-0.1"], ["'--target-far': -0.1 is not in the range 0<=x<1"]),
    (["--out", "m", "--target-far", "inf"], ["'--target-far': 'inf' is not a finite number"]),
    (["--out", "m", "--seed", "-1"], ["seed must be at least 0"]),
    (["--out", "m", "--method", ""], ["unknown method ''"]),
    (
        ["--out", "m", "--method", "patchcore", "--coreset-ratio", "0"],
        ["'--coreset-ratio': 0.0 is not in the range 0<x<=1"],
    ),
    (["--out", "m", "--method", "patchcore", "--coreset-ratio", "nan"], ["'nan' is not a finite"]),
    (
        ["--out", "m", "--method", "spade", "--k-images", "0"],
        ["'--k-images': 0 is not in the range 1<=x<=10000"],
    ),
    (["--out", "m", "--param", "bogus=1"], ["unknown parameter 'bogus'"]),
    (["--out", "m", "--param", 'n_channels="abc"'], ["n_channels must be an integer"]),
    (["--out", "m", "--param", "n_channels=true"], ["n_channels must be an integer"]),
    (["--out", "m", "--param", "epsilon=-1"], ["epsilon must be >= 0.0"]),
    (["--out", "m", "--param", "shrinkage=maybe"], ["shrinkage must be one of"]),
    (["--out", "m", "--param", "strides=[3]"], ["no feature tap at stride"]),
    (["--out", "m", "--param", "strides=[]"], ["strides needs at least 1"]),
    (["--out", "m", "--param", "strides=4"], ["strides must be a list"]),
    (["--out", "m", "--method", "differnet", "--param", "max_minutes=0"], ["max_minutes"]),
    (["--out", "m", "--method", "differnet", "--param", "n_transforms_map=99"], ["exceed"]),
    (["--out", "m", "--method", "patchcore", "--param", "patch_size=2"], ["odd"]),
    (["--out", "m", "--backbone", "vgg"], ["unknown backbone 'vgg'"]),
    (["--out", "m", "--backbone", "resnet18"], ["--weights PATH"]),
    (["--out", "m", "--backbone", "resnet18", "--weights", "file.txt"], ["file.txt"]),
    (["--out", "m", "--backbone", "resnet18", "--weights", "notes"], ["notes"]),
    (["--out", "m", "--max-pixels", "0"], ["0 is not in the range x>=1"]),
    (["--out", "m", "--n-channels", "100000"], ["n_channels is 100000", "176 channels"]),
]


@pytest.mark.parametrize(("extra", "fragments"), FIT_CASES, ids=lambda v: " ".join(v)[:40])
def test_fit_refuses_bad_destinations_and_parameters(
    sandbox, monkeypatch, capsys, extra, fragments
):
    (sandbox / "link-to-notes").symlink_to("notes")
    before = snapshot(sandbox)
    code, _, err = run_cli(monkeypatch, capsys, *FIT, *extra)
    _ok_error(code, err, *fragments)
    after = snapshot(sandbox)
    after.pop("m", None)  # an empty model folder is never created, but be explicit
    assert after == before


def test_a_bad_channel_count_is_said_before_the_backbone_is_exported(
    sandbox, monkeypatch, capsys, tmp_path
):
    # A first export of the backbone's graph takes half a minute: a parameter the backbone
    # cannot satisfy must be refused before it, leaving no graph in an empty cache.
    cache = tmp_path / "fresh-cache"
    monkeypatch.setenv("DEFECTLENS_CACHE_DIR", str(cache))
    code, _, err = run_cli(monkeypatch, capsys, *FIT, "--out", "m", "--n-channels", "177")
    _ok_error(code, err, "n_channels is 177", "176 channels")
    assert not cache.exists() or not any(cache.rglob("*.onnx"))


DATA_CASES = [
    ("nowhere", ["nowhere: no such file or directory"]),
    ("file.txt", ["file.txt: not a folder"]),
    ("notes", ["no images found"]),
    ("corrupt", ["corrupt/a.png: unreadable or corrupt image", "(and 2 more)"]),
    ("bomb", ["huge.png: 50000 x 50000", "over the limit"]),
    ("single", ["need at least 2 normal images"]),
]


@pytest.mark.parametrize(("data", "fragments"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_fit_refuses_bad_data_before_any_work(sandbox, monkeypatch, capsys, data, fragments):
    before = snapshot(sandbox)
    code, _, err = run_cli(monkeypatch, capsys, "fit", data, "--out", "m", "-q")
    _ok_error(code, err, *fragments)
    assert snapshot(sandbox) == before


def test_fit_survives_odd_entries_in_the_data_folder(sandbox, monkeypatch, capsys):
    """Broken links, a named pipe and non-image files among the training images are named in
    warnings and left out; the fit goes on (and does not hang on the pipe)."""
    folder = sandbox / "data" / "train" / "good"
    (folder / "dangling.png").symlink_to("nowhere.png")
    os.mkfifo(folder / "pipe.png")
    (folder / "readme.txt").write_text("how these were taken")
    code, _, err = run_cli(monkeypatch, capsys, *FIT, "--out", "m")
    assert code == 0, err
    assert "dangling.png: ignored, broken symbolic link" in err
    assert "pipe.png: ignored, not a regular file" in err
    assert "ignored 1 file(s) that are not images (e.g. readme.txt)" in err
    assert (sandbox / "m" / "config.json").is_file()


def test_fit_replaces_only_its_own_model_and_keeps_a_folder_holding_more(
    sandbox, monkeypatch, capsys
):
    code, _, err = run_cli(monkeypatch, capsys, *FIT, "--out", "m")
    assert code == 0, err
    config = (sandbox / "m" / "config.json").read_text()
    code, _, err = run_cli(monkeypatch, capsys, *FIT, "--out", "m", "--seed", "1")
    assert code == 0, err
    assert (sandbox / "m" / "config.json").read_text() != config  # replaced
    (sandbox / "m" / "metrics.json").write_text("{}")  # for serve's model card: kept
    code, _, err = run_cli(monkeypatch, capsys, *FIT, "--out", "m", "--seed", "2")
    assert code == 0 and (sandbox / "m" / "metrics.json").read_text() == "{}", err
    (sandbox / "m" / "notes.txt").write_text("mine")  # anything else: not replaced
    code, _, err = run_cli(monkeypatch, capsys, *FIT, "--out", "m")
    _ok_error(code, err, "holds notes.txt")
    assert (sandbox / "m" / "notes.txt").exists()
    assert sorted(p.name for p in sandbox.iterdir() if p.name.startswith(".")) == []


# -- models that were edited, truncated or tampered with --------------------------------------
def _edit(config: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        config = config[key]
    if value is _DELETE:
        del config[last]
    else:
        config[last] = value


_DELETE = object()
CONFIG_CASES = [
    ("extra", 1, "unknown key 'extra'"),
    ("tensors_sha256", _DELETE, "missing key 'tensors_sha256'"),
    ("backbone_weights.sha256", _DELETE, "missing key backbone_weights.'sha256'"),
    ("backbone_weights.sha256", "abc", "backbone_weights.sha256 must be a SHA-256"),
    ("format_version", 99, "model format version 99"),
    ("format_version", True, "model format version True"),
    ("detector", [], "'detector' must be an object"),
    ("detector.image_size", "256", "image_size must be an integer"),
    ("detector.image_size", 65536, "image_size must be at most 2048"),
    ("detector.image_size", 128, "image size 128 needs"),
    ("detector.sigma", 1e6, "sigma must be <= 64"),
    ("detector.sigma", -1, "sigma must be >= 0"),
    ("detector.batch_size", -1, "batch_size must be at least 1"),
    ("detector.method", "nope", "unknown method 'nope'"),
    ("detector.method", ["padim"], "unknown method ['padim']"),
    ("detector.backbone", "vgg", "unknown backbone 'vgg'"),
    ("detector.colour", "red", "unknown key detector.'colour'"),
    ("detector.seed", _DELETE, "missing key detector.'seed'"),
    ("detector.method_params.bogus", 1, "unknown parameter 'bogus'"),
    ("detector.method_params.n_channels", "abc", "n_channels must be an integer"),
    ("detector.method_params.epsilon", _DELETE, "missing key detector.method_params.'epsilon'"),
    ("detector.method_params", None, "method_params must be an object"),
    ("thresholds.image", float("nan"), "thresholds.image must be a finite number"),
    ("thresholds.pixel", "high", "thresholds.pixel must be a number"),
    ("thresholds.n_validation", 0, "thresholds.n_validation must be at least 1"),
    ("thresholds.validation_max", _DELETE, "missing key thresholds.'validation_max'"),
]


@pytest.mark.parametrize(
    ("key", "value", "message"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES]
)
def test_edited_model_config_is_refused_by_name(
    model_dir, brick_root, tmp_path, monkeypatch, capsys, key, value, message
):
    model = tmp_path / "m"
    shutil.copytree(model_dir, model)
    config = json.loads((model / "config.json").read_text())
    _edit(config, key, value)
    (model / "config.json").write_text(json.dumps(config))  # NaN becomes the NaN literal
    image = brick_root / "test" / "good" / "000.png"
    code, _, err = run_cli(monkeypatch, capsys, "predict", model, image, "--json", "-q")
    _ok_error(code, err, "config.json", message)


def test_damaged_model_files_are_refused(model_dir, brick_root, tmp_path, monkeypatch, capsys):
    def fresh(name):
        target = tmp_path / name
        shutil.copytree(model_dir, target)
        return target

    cases = []
    m = fresh("list")
    (m / "config.json").write_text("[1, 2]")
    cases.append((m, "not a defectlens model config"))
    m = fresh("deep")
    (m / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    cases.append((m, "config.json"))
    m = fresh("dirconfig")
    (m / "config.json").unlink()
    (m / "config.json").mkdir()
    cases.append((m, "missing config.json"))
    m = fresh("truncated")
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append((m, "checksum mismatch"))
    m = fresh("file")
    shutil.rmtree(m)
    m.write_text("not a folder")
    cases.append((m, "not a model directory"))
    image = brick_root / "test" / "good" / "000.png"
    for model, message in cases:
        code, _, err = run_cli(monkeypatch, capsys, "predict", model, image, "--json", "-q")
        _ok_error(code, err, message)


def test_tampered_tensors_with_a_matching_checksum_are_refused(model_dir, tmp_path):
    """A NaN written into the tensors (and the checksum updated) must not load: NaN compares
    as 'good' against any threshold."""
    from safetensors.torch import load_file, save_file

    from defectlens import load
    from defectlens.errors import ModelFileError
    from defectlens.outputs import file_sha256

    model = tmp_path / "m"
    shutil.copytree(model_dir, model)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["mean"][0, 0] = float("nan")
    save_file(tensors, str(model / "model.safetensors"))
    config = json.loads((model / "config.json").read_text())
    config["tensors_sha256"] = file_sha256(model / "model.safetensors")
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="NaN or infinite"):
        load(model)
    tensors["mean"] = tensors["mean"][:10]
    tensors["mean"][0, 0] = 0.0
    save_file(tensors, str(model / "model.safetensors"))
    config["tensors_sha256"] = file_sha256(model / "model.safetensors")
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="inconsistent shapes"):
        load(model)


# -- predict: every input listed, every good image scored -------------------------------------
def _mixed_inputs(folder: Path, good: Path) -> dict[str, str | None]:
    """A folder of every kind of bad input beside good images; name -> expected error text."""
    folder.mkdir()
    image = Image.open(good)
    shutil.copy(good, folder / "a.png")
    image.convert("RGB").save(folder / "a.jpg")  # same stem as a.png
    frames = [image.convert("P"), image.rotate(90).convert("P")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    (folder / "bomb.png").write_bytes(_png_header_only(50_000, 50_000))
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    (folder / "notes.txt").write_text("hello")
    (folder / "dangling.png").symlink_to("nowhere.png")
    (folder / "loop").symlink_to(".")
    os.mkfifo(folder / "pipe.png")
    (folder / ".hidden.png").write_bytes(b"")
    shutil.copy(good, folder / "com,ma.png")
    shutil.copy(good, os.fsdecode(os.fsencode(str(folder)) + b"/bad\xffname.png"))
    shutil.copy(good, folder / "new\nline.png")
    (folder / "sub").mkdir()
    shutil.copy(good, folder / "sub" / "a.png")  # same name in a sub-folder
    return {
        "a.png": None,
        "a.jpg": None,
        "anim.gif": None,
        "com,ma.png": None,
        "bad\\xffname.png": None,
        "new\nline.png": None,
        "sub/a.png": None,
        "bomb.png": "over the limit",
        "empty.png": "empty file",
        "text.png": "unreadable or corrupt image",
        "notes.txt": "not an image type",
        "dangling.png": "broken symbolic link",
        "loop": "symbolic link loop",
        "pipe.png": "not a regular file",
    }


def test_predict_lists_every_input_and_scores_every_good_one(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    good = find_test_samples(brick_root)[0].path
    folder = tmp_path / "in"
    expected = _mixed_inputs(folder, good)
    before = snapshot(folder)
    code, _, err = run_cli(
        monkeypatch, capsys, "predict", model_dir, folder, "--out", tmp_path / "o", "-q"
    )
    assert code == 1, err
    assert "Traceback" not in err
    rows = {r["path"][len(str(folder)) + 1 :]: r for r in read_csv(tmp_path / "o" / "results.csv")}
    assert set(rows) == set(expected)
    for name, problem in expected.items():
        row = rows[name]
        if problem is None:
            assert row["error"] == "" and row["predicted"] in ("good", "defective"), row
            assert float(row["score"]) > 0
        else:
            assert row["predicted"] == "error" and problem in row["error"], row
    overlays = sorted(
        str(p.relative_to(tmp_path / "o" / "overlays"))
        for p in (tmp_path / "o" / "overlays").rglob("*.png")
    )
    assert "a.png.png" in overlays and "a.jpg.png" in overlays and "sub/a.png.png" in overlays
    assert len(overlays) == 7
    assert snapshot(folder) == before
    for line in err.splitlines():
        assert line.startswith("defectlens: warning:"), line  # one line per warning


def test_predict_with_no_scorable_input_is_one_error_whether_found_early_or_late(
    model_dir, tmp_path, monkeypatch, capsys
):
    """All missing (found before the model loads) and all corrupt (found while scoring) end
    the same way: exit status 2, one error line, and every input's row kept."""
    (tmp_path / "text.png").write_text("not a picture")
    for name, inputs in (("missing", ["nowhere.png"]), ("corrupt", [tmp_path / "text.png"])):
        out = tmp_path / name
        code, _, err = run_cli(monkeypatch, capsys, "predict", model_dir, *inputs, "--out", out)
        assert code == 2 and "defectlens: error: nothing could be scored:" in err, err
        assert "Traceback" not in err and "scored 0 image" not in err
        assert [r["predicted"] for r in read_csv(out / "results.csv")] == ["error"]


def test_predict_names_on_the_command_line(model_dir, brick_root, tmp_path, monkeypatch, capsys):
    """Named explicitly, a broken link or a missing file is a row, not the end of the batch."""
    good = find_test_samples(brick_root)[0].path
    (tmp_path / "dangling.png").symlink_to("nowhere.png")
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "predict",
        model_dir,
        good,
        tmp_path / "dangling.png",
        tmp_path / "missing.png",
        str(tmp_path / "*.bmp"),
        "--json",
        "-q",
    )
    assert code == 1, err
    lines = [json.loads(line) for line in out.splitlines()]  # every input has its line
    assert [(r["path"], r["predicted"]) for r in lines if r["predicted"] != "error"] == [
        (str(good), lines[-1]["predicted"])
    ]
    failed = {Path(r["path"]).name: r["error"] for r in lines if r["predicted"] == "error"}
    assert sorted(failed) == ["*.bmp", "dangling.png", "missing.png"]
    assert failed["missing.png"].endswith("missing.png: no such file or directory")
    assert all(r["score"] is None for r in lines if r["predicted"] == "error")
    assert "dangling.png: broken symbolic link" in err
    assert "missing.png: no such file or directory" in err
    assert "*.bmp: pattern matches no files" in err


@pytest.mark.parametrize(
    ("setup", "fragments"),
    [
        (lambda o: o.write_text("x"), ["exists and is not a folder"]),
        (lambda o: (o.mkdir(), (o / "results.csv").write_text("mine")), ["did not write"]),
        (lambda o: (o.mkdir(), (o / "overlays").mkdir()), ["already holds overlays"]),
    ],
    ids=["file", "user-results", "user-overlays"],
)
def test_predict_checks_its_output_folder_first(
    brick_root, tmp_path, monkeypatch, capsys, setup, fragments
):
    out = tmp_path / "o"
    setup(out)
    before = snapshot(tmp_path)
    # The model does not even exist: the output is checked before anything is loaded.
    code, _, err = run_cli(
        monkeypatch, capsys, "predict", tmp_path / "no-model", brick_root, "--out", out, "-q"
    )
    _ok_error(code, err, *fragments)
    assert snapshot(tmp_path) == before


def test_output_folder_that_cannot_be_written(model_dir, brick_root, tmp_path, monkeypatch, capsys):
    """A read-only mount (root ignores permission bits, so the probe is what must fail)."""
    import errno

    import defectlens.outputs as outputs

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only)
    code, _, err = run_cli(monkeypatch, capsys, "fit", brick_root, "--out", tmp_path / "m", "-q")
    _ok_error(code, err, "cannot write there (Read-only file system)")


def test_evaluate_skips_unreadable_images_and_masks_and_says_so(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    data = tmp_path / "data"
    shutil.copytree(brick_root, data)
    (data / "test" / "good" / "000.png").write_bytes(b"corrupt")
    mask = data / "ground_truth" / "hole" / "000_mask.png"
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(mask)  # wrong size
    inverted = data / "ground_truth" / "spot" / "000_mask.png"
    values = np.asarray(Image.open(inverted))
    Image.fromarray(np.where(values > 0, 255, 1).astype(np.uint8)).save(inverted)
    code, _, err = run_cli(
        monkeypatch, capsys, "evaluate", model_dir, data, "--out", tmp_path / "e", "-q"
    )
    assert code == 1, err
    assert "skipped test/good/000.png" in err and "skipped test/hole/000.png: mask" in err
    assert "is its background 1 instead of 0?" in err
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["n_skipped"] == 2 and set(metrics["skipped"]) == {
        "test/good/000.png",
        "test/hole/000.png",
    }
    assert metrics["n_images"] == len(find_test_samples(brick_root)) - 2
    rows = read_csv(tmp_path / "e" / "scores.csv")
    assert sum(r["error"] != "" for r in rows) == 2 and len(rows) == metrics["n_images"] + 2


def test_nan_scores_are_errors_not_good_parts(fitted, brick_root, monkeypatch):
    """A model that outputs NaN must not pass a part: the image is reported, not scored."""
    from defectlens.errors import ScoringError
    from defectlens.methods.base import MethodOutput

    paths = [s.path for s in find_test_samples(brick_root)][:3]
    original = type(fitted.model_).forward

    def broken(self, extractor, images):
        out = original(self, extractor, images)
        return MethodOutput(maps=out.maps * float("nan"), scores=out.scores)

    monkeypatch.setattr(type(fitted.model_), "forward", broken)
    with pytest.raises(ScoringError, match="non-finite"):
        fitted.predict(paths[0])
    errors = []
    assert list(fitted.iter_predict(paths, on_error=lambda n, e: errors.append(n))) == []
    assert errors == [str(p) for p in paths]


def test_internal_errors_exit_3_with_one_line_and_debug_shows_the_traceback(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    import defectlens.evaluation

    def boom(*args, **kwargs):
        raise RuntimeError("something we did not foresee")

    monkeypatch.setattr(defectlens.evaluation, "evaluate", boom)
    args = ["evaluate", model_dir, brick_root, "--out", tmp_path / "e", "-q"]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 3
    assert err.strip() == (
        "defectlens: internal error: RuntimeError: something we did not foresee "
        "(a bug: rerun as `defectlens --debug COMMAND ...` for the traceback and please report it)"
    )
    code, _, err = run_cli(monkeypatch, capsys, "--debug", *args)
    assert code == 3 and "Traceback" in err


def test_out_of_memory_is_a_user_error_with_advice(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    import defectlens.evaluation

    def exhausted(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
            "allocate memory: you tried to allocate 68719476736 bytes"
        )

    monkeypatch.setattr(defectlens.evaluation, "evaluate", exhausted)
    code, _, err = run_cli(
        monkeypatch, capsys, "evaluate", model_dir, brick_root, "--out", tmp_path / "e", "-q"
    )
    _ok_error(code, err, "out of memory", "--batch-size")


def test_bare_command_shows_help_and_usage_errors_are_one_line(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys)
    assert code == 2 and "Usage:" in err and "Commands:" in err
    code, _, err = run_cli(monkeypatch, capsys, "nonsense")
    _ok_error(code, err, "No such command 'nonsense'", "--help")
    code, _, err = run_cli(monkeypatch, capsys, "predict")
    _ok_error(code, err, "Missing argument 'MODEL'", "predict --help")


def test_validation_images_that_are_training_images_are_warned_about(sandbox, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, *FIT, "--out", "m", "--val", "data/train/good")
    assert code == 0, err
    assert "validation images are also training images" in err


def test_interrupted_fit_saves_nothing_and_keeps_the_old_model(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    from defectlens.detector import Detector

    model = tmp_path / "m"
    shutil.copytree(model_dir, model)
    before = snapshot(model)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Detector, "fit", interrupted)
    code, _, err = run_cli(monkeypatch, capsys, "fit", brick_root, "--out", model, "-q")
    assert code == 130
    assert "nothing was saved" in err and "Traceback" not in err
    assert snapshot(model) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
