import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from defectlens.data import find_test_samples

from .conftest import read_csv, snapshot
from .conftest import run_cli as run


def test_fit_evaluate_predict_end_to_end(brick_root, tmp_path, monkeypatch, capsys):
    model = tmp_path / "model"
    code, out, _ = run(
        monkeypatch,
        capsys,
        "fit",
        brick_root,
        "--method",
        "padim",
        "--image-size",
        64,
        "--out",
        model,
        "--quiet",
    )
    assert code == 0 and "saved" in out
    results = tmp_path / "eval"
    code, out, _ = run(
        monkeypatch,
        capsys,
        "evaluate",
        model,
        brick_root,
        "--out",
        results,
        "--save-maps",
        "--quiet",
    )
    assert code == 0 and "image AUROC" in out
    metrics = json.loads((results / "metrics.json").read_text())
    for key in (
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "image_f1_max",
        "false_alarm_rate",
        "miss_rate",
    ):
        assert 0.0 <= metrics[key] <= 1.0
    rows = read_csv(results / "scores.csv")
    assert list(rows[0]) == ["path", "score", "label", "predicted", "error"]
    assert rows[0]["path"].startswith("test/")
    some = rows[-1]["path"]
    saved_map = np.load(results / "maps" / f"{some}.npy")
    assert saved_map.dtype == np.float32 and saved_map.shape == (128, 128)
    report = (results / "report.html").read_text()
    assert "ROC" in report and "data:image/png;base64" in report

    pred = tmp_path / "pred"
    defect_dir = brick_root / "test" / "hole"
    code, out, _ = run(monkeypatch, capsys, "predict", model, defect_dir, "--out", pred, "-q")
    assert code == 0
    rows = read_csv(pred / "results.csv")
    assert len(rows) == 3 and all(r["error"] == "" for r in rows)
    assert len(list((pred / "overlays").glob("*.png"))) == 3
    assert len(list((pred / "masks").glob("*.png"))) == 3


def test_fit_warns_of_a_rough_threshold_and_of_an_option_shots_ignores(
    brick_root, tmp_path, monkeypatch, capsys
):
    args = ["fit", brick_root, "--image-size", 64, "--out", tmp_path / "m", "-q"]
    code, _, err = run(monkeypatch, capsys, *args)  # 30 images: 3 validate
    assert code == 0 and "threshold from 3 normal image(s) is rough" in err
    assert "hold out more (--val-fraction)" in err
    code, _, err = run(monkeypatch, capsys, *args, "--shots", 2, "--val-fraction", 0.5)
    assert code == 0 and "--val-fraction 0.5 does not apply with --shots" in err
    assert "threshold from" not in err  # the 28 images not drawn validate
    code, _, err = run(monkeypatch, capsys, *args, "--val-fraction", 0.5)
    assert code == 0 and err == ""  # 15 validation images
    code, _, err = run(monkeypatch, capsys, *args, "--shot-seed", 3)
    assert code == 0 and "--shot-seed does not apply without --shots" in err
    # --val from DATA's own test split: the threshold would come from test images.
    val = brick_root / "test" / "good"
    code, _, err = run(monkeypatch, capsys, *args, "--val", val, "--val-fraction", 0.5)
    assert code == 0 and "--val-fraction 0.5 does not apply with --val" in err
    assert "inside DATA's test split" in err


def test_evaluate_keeps_an_earlier_evaluation_unless_told_and_then_leaves_nothing_stale(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    results = tmp_path / "e"
    args = ["evaluate", model_dir, brick_root, "--out", results, "--no-report", "-q"]
    assert run(monkeypatch, capsys, *args, "--save-maps")[0] == 0
    before = snapshot(results)
    assert any(k.startswith("maps/") for k in before)
    code, _, err = run(monkeypatch, capsys, *args)
    assert code != 0 and "earlier evaluation" in err and "--overwrite" in err
    assert snapshot(results) == before  # nothing of it touched
    assert run(monkeypatch, capsys, *args, "--overwrite")[0] == 0
    # the first run's maps are not left beside the second run's metrics
    assert not (results / "maps").exists() and (results / "metrics.json").is_file()
    # That run saved no maps: a maps/ folder found now is somebody else's, and is kept.
    (results / "maps").mkdir()
    (results / "maps" / "keep.txt").write_text("my notes")
    code, _, err = run(monkeypatch, capsys, *args, "--overwrite")
    assert code == 2 and "holds maps that defectlens did not write" in err
    assert (results / "maps" / "keep.txt").read_text() == "my notes"


def test_evaluate_interrupted_while_writing_its_report_says_the_metrics_are_complete(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    import defectlens.report.html as html

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(html, "write_report", interrupted)
    out = tmp_path / "e"
    code, _, err = run(monkeypatch, capsys, "evaluate", model_dir, brick_root, "--out", out, "-q")
    assert code == 130 and "metrics.json and scores.csv are complete; no report.html" in err
    assert json.loads((out / "metrics.json").read_text())["image_auroc"] > 0.5


def test_an_evaluation_that_scored_nothing_is_replaced_by_its_corrected_rerun(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "e"
    args = ("evaluate", model_dir, brick_root, "--out", out, "--no-report", "-q")
    code, _, err = run(monkeypatch, capsys, *args, "--max-pixels", 100)  # every image refused
    assert code == 2 and "no test image could be scored" in err
    assert (out / "scores.csv").is_file()  # its error rows say why
    code, _, err = run(monkeypatch, capsys, *args)  # no --overwrite needed: nothing to keep
    assert code == 0, err
    assert (out / "metrics.json").is_file()
    code, _, err = run(monkeypatch, capsys, *args)  # a real evaluation is kept, as before
    assert code == 2 and "holds an earlier evaluation" in err


def test_results_never_go_into_a_model_folder_and_a_failed_run_leaves_no_folder(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    before = snapshot(model_dir)
    image = find_test_samples(brick_root)[0].path
    for args in (
        ["evaluate", model_dir, brick_root, "--out", model_dir],
        ["predict", model_dir, image, "--out", model_dir],
    ):
        code, _, err = run(monkeypatch, capsys, *args, "-q")
        assert code != 0 and "is a model folder" in err, err
    assert snapshot(model_dir) == before
    # a missing model: the results folder the run would have made is not left behind
    new = tmp_path / "new"
    for command, data in (("evaluate", brick_root), ("predict", image)):
        code, _, err = run(monkeypatch, capsys, command, tmp_path / "nomodel", data, "--out", new)
        assert code != 0 and "no such model directory" in err and not new.exists()
    # nor into the dataset evaluated: later runs would read the results with its images
    data_before = snapshot(brick_root)
    for out in (brick_root, brick_root / "test" / "good"):
        code, _, err = run(monkeypatch, capsys, "evaluate", model_dir, brick_root, "--out", out)
        assert code == 2 and "is DATA or inside it" in err
    assert snapshot(brick_root) == data_before


def test_predict_skips_corrupt_images_and_reports_them(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    good = find_test_samples(brick_root)[0].path
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    out_dir = tmp_path / "p"
    code, out, err = run(
        monkeypatch,
        capsys,
        "predict",
        model_dir,
        good,
        broken,
        "--out",
        out_dir,
        "--no-images",
        "--json",
        "-q",
    )
    assert code == 1
    assert "broken.png" in err and "skipped" in err
    lines = {r["path"]: r for r in map(json.loads, out.splitlines())}  # the skipped one's too
    assert sorted(lines) == sorted([str(good), str(broken)])
    assert lines[str(broken)]["predicted"] == "error" and "corrupt" in lines[str(broken)]["error"]
    assert "error" not in lines[str(good)]
    rows = read_csv(out_dir / "results.csv")
    assert [r["predicted"] for r in rows][1] == "error" and "corrupt" in rows[1]["error"]
    assert not (out_dir / "overlays").exists()


def test_an_input_whose_pictures_cannot_be_written_gets_an_error_row_and_the_run_goes_on(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    # Two ways a picture cannot be written: a name that fits the file system only until the
    # output adds ".png" and a temporary suffix (once that aborted the whole run), and a
    # folder standing where another input's mask must go (x.png -> masks/x.png.png).
    samples = [s.path for s in find_test_samples(brick_root)[:4]]
    inputs = tmp_path / "in"
    (inputs / "x.png.png").mkdir(parents=True)
    long_name = "a" * 245 + ".png"  # its picture, masks/<name>.png, still fits 255 bytes
    for source, name in zip(samples, [long_name, "x.png", "x.png.png/y.png", "z.png"], strict=True):
        shutil.copy(source, inputs / name)
    out_dir = tmp_path / "p"
    code, _, err = run(monkeypatch, capsys, "predict", model_dir, inputs, "--out", out_dir, "-q")
    assert code == 1, err  # some skipped, not a failed run
    rows = {Path(r["path"]).name: r for r in read_csv(out_dir / "results.csv")}
    assert sorted(rows) == sorted([long_name, "x.png", "y.png", "z.png"])  # every input a row
    assert rows[long_name]["predicted"] in ("good", "defective")
    assert (out_dir / "masks" / f"{long_name}.png").is_file()
    # x.png's mask is masks/x.png.png, the folder of y.png's: whichever comes second fails.
    failed = [n for n, r in rows.items() if r["predicted"] == "error"]
    assert len(failed) == 1 and failed[0] in ("x.png", "y.png")
    assert "could not be written" in rows[failed[0]]["error"]
    assert rows["z.png"]["predicted"] in ("good", "defective")
    first = "x.png.png" if failed == ["y.png"] else "x.png.png/y.png.png"
    assert (out_dir / "overlays" / first).is_file()
    # The failed input's mask is taken back when its overlay fails, or never written.
    written = {p.relative_to(out_dir / "masks") for p in (out_dir / "masks").rglob("*.png")}
    assert len(written) == 3
    assert not list(out_dir.rglob("*.partial"))


def test_overwrite_keeps_pictures_folders_an_images_free_run_did_not_write(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    good = find_test_samples(brick_root)[0].path
    out_dir = tmp_path / "p"
    args = ("predict", model_dir, good, "--out", out_dir, "-q")
    assert run(monkeypatch, capsys, *args, "--no-images")[0] == 0
    (out_dir / "masks").mkdir()
    (out_dir / "masks" / "labels_for_review.png").write_bytes(b"hand-drawn")
    code, _, err = run(monkeypatch, capsys, *args, "--overwrite")
    assert code == 2 and "masks that defectlens did not write" in err
    assert (out_dir / "masks" / "labels_for_review.png").read_bytes() == b"hand-drawn"
    # The refusal left the earlier run resumable as it was (images-free).
    code, _, err = run(monkeypatch, capsys, *args, "--no-images", "--resume")
    assert code == 0, err
    (out_dir / "masks" / "labels_for_review.png").unlink()
    (out_dir / "masks").rmdir()
    assert run(monkeypatch, capsys, *args, "--overwrite")[0] == 0
    assert len(list((out_dir / "masks").rglob("*.png"))) == 1  # now ours, from this run


def test_globs_select_images(model_dir, brick_root, tmp_path, monkeypatch, capsys):
    pattern = str(brick_root / "test" / "*" / "000.png")
    code, out, _ = run(monkeypatch, capsys, "predict", model_dir, pattern, "--json", "-q")
    assert code == 0 and len(out.splitlines()) == 6  # good + five defect types


RESNET = ["--backbone", "resnet18", "--weights"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "{tmp}/nope", "--out", "{tmp}/m"], "nope: no such file or directory"),
        (["fit", "{tmp}/empty", "--out", "{tmp}/m"], "no images found"),
        (["fit", "{tmp}/empty", "--out", "{tmp}/m", "--image-size", "100"], "multiple of 32"),
        (["fit", "{tmp}/empty", "--out", "{tmp}/m", "--method", "x"], "unknown method"),
        (["evaluate", "{tmp}/nomodel", "{tmp}/empty", "--out", "{tmp}/e"], "no such model"),
        (["predict", "{tmp}/nomodel", "{tmp}/a.png", "--out", "{tmp}/e"], "a.png: no such file"),
        (["predict", "{tmp}/nomodel", "{tmp}/*.png", "--json"], "pattern matches no files"),
        (
            ["fit", "{tmp}/imgs", "--out", "{tmp}/m", *RESNET, "{tmp}/w.pth"],
            "weights file not found",
        ),
        (
            ["fit", "{tmp}/imgs", "--out", "{tmp}/m", "--weights", "/dev/null"],
            "/dev/null: is not a regular file; give the weights file itself",
        ),
        (["fit", "{tmp}/imgs", "--out", "{tmp}/m", "--backbone", "resnet18"], "--weights PATH"),
        (["fit", "{tmp}/imgs", "--out", "{tmp}/m"], "imgs/bad.png: unreadable or corrupt"),
        (
            ["fit", "{tmp}/imgs", "--out", "{tmp}/m", "--coreset-ratio", "0.1"],
            "--coreset-ratio is not a padim option (it is for patchcore, patchsvdd)",
        ),
        (
            ["fit", "{tmp}/imgs", "--out", "{tmp}/m", "--param", "k=1", "--param", "k=2"],
            "--param k is given twice, as 1 and 2",
        ),
        (
            [
                "fit",
                "{tmp}/imgs",
                "--out",
                "{tmp}/m",
                "--n-channels",
                "5",
                "--param",
                "n_channels=6",
            ],
            "--n-channels 5 and --param n_channels=6 disagree",
        ),
        (["fit", "{tmp}/imgs", "--out", "{tmp}/m", "--image-size", "0"], "32<=x<=2048"),
        (["fit", "{tmp}/imgs", "--out", "{tmp}/m", "--val-fraction", "0.99"], "leaves none"),
        (["fit", "{tmp}/imgs", "--out", "{tmp}/m", "--param", "nonsense"], "expected KEY=VALUE"),
        (["fit", "{tmp}/imgs", "--out", "{tmp}/m", "--sigma", "-1"], "'--sigma'"),
        (["fit", "{tmp}/imgs", "--out", "{tmp}/m", "--target-far", "1"], "'--target-far'"),
        (["fit", "{tmp}/imgs", "--out", "{tmp}/m", "--batch-size", "5000"], "1<=x<=4096"),
        (
            ["fit", "{tmp}/imgs", "--out", "{tmp}/m", "--seed", "3", "--param", "seed=5"],
            "--seed 3 and --param seed=5 disagree",
        ),
        (["fit", "{tmp}/nest", "--out", "{tmp}/m"], "sub-folders hold 1 (e.g. batch1/000.png)"),
        (
            ["fit", "{tmp}/imgs", "--out", "{tmp}/m", *RESNET, "{tmp}/imgs/a.png"],
            "a.png: cannot read weights for resnet18: not a PyTorch (.pth) or safetensors",
        ),
        (["predict", "{tmp}/nomodel", "{tmp}/empty", "--json"], "empty: folder holds no files"),
    ],
)
def test_user_mistakes_give_one_error_line(args, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "bad.png"):
        (tmp_path / "imgs" / name).write_bytes(b"not an image")
    (tmp_path / "nest" / "batch1").mkdir(parents=True)  # images only one level down
    (tmp_path / "nest" / "batch1" / "000.png").write_bytes(b"x")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    args = [a.format(tmp=tmp_path) for a in args] + ["--quiet"]
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 2
    assert message in err and err.startswith("defectlens: error:")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_nothing_scored_without_out_points_at_no_results_file(tmp_path, monkeypatch, capsys):
    args = ["predict", tmp_path / "nomodel", tmp_path / "a.png", tmp_path / "*.png", "--json"]
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 2 and "(and 1 more)" in err and "results.csv" not in err  # none written


def test_help_and_backbones(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached ResNet weights
    code, out, _ = run(monkeypatch, capsys, "--help")
    assert code == 0 and "fit" in out and "predict" in out and "Typical use" in out
    code, out, _ = run(monkeypatch, capsys, "backbones")
    assert code == 0 and "efficientnet_lite0" in out and "available" in out
    assert "resnet18" in out and "to supply them: --weights resnet18-f37072fd.pth" in out


def test_demo_runs_end_to_end(tmp_path):
    from defectlens.demo import run_demo

    lines = []
    summary = run_demo(
        tmp_path,
        image_size=64,
        textures=["grass"],
        progress=False,
        echo=lines.append,
        n_train=12,
        n_test_good=4,
        n_test_per_defect=1,
    )
    assert (tmp_path / "grass" / "report.html").is_file()
    assert (tmp_path / "grass" / "model" / "config.json").is_file()
    assert 0 <= summary["grass"]["image_auroc"] <= 1
    assert any("grass" in line for line in lines)
    # A rerun with other textures leaves none of the earlier run's results beside its own.
    (tmp_path / "notes.txt").write_text("mine")
    small = {"n_train": 12, "n_test_good": 4, "n_test_per_defect": 1}
    run_demo(tmp_path, image_size=64, textures=["brick"], progress=False, echo=print, **small)
    assert not (tmp_path / "grass").exists() and not (tmp_path / "data" / "grass").exists()
    assert (tmp_path / "brick" / "report.html").is_file()
    assert list(json.loads((tmp_path / "summary.json").read_text())) == ["brick"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_demo_holds_out_enough_normal_images_for_its_threshold(tmp_path, monkeypatch):
    """With 60 training crops, 6 set the threshold and 40 % of good grass crops were flagged."""
    import defectlens.demo as demo

    asked = {}

    class Stop(Exception):
        pass

    def make_category(root, texture, **kwargs):
        asked.update(kwargs)
        raise Stop

    monkeypatch.setattr(demo, "make_category", make_category)
    with pytest.raises(Stop):
        demo.run_demo(tmp_path / "d", textures=["grass"], progress=False)
    assert asked["n_train"] == 200


def test_method_options_reach_the_model(brick_root, tmp_path, monkeypatch, capsys):
    model = tmp_path / "pc"
    code, _, err = run(
        monkeypatch,
        capsys,
        "fit",
        brick_root,
        "--method",
        "patchcore",
        "--coreset-ratio",
        "0.05",
        "--index",
        "hnsw",
        "--param",
        "embed_dim=64",
        "--sigma",
        0,
        "--image-size",
        64,
        "--out",
        model,
        "-q",
    )
    assert code == 0, err
    config = json.loads((model / "config.json").read_text())
    assert config["detector"]["sigma"] == 0
    params = config["detector"]["method_params"]
    assert params["coreset_ratio"] == 0.05 and params["index"] == "hnsw"
    assert params["embed_dim"] == 64


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "{model}", "--max-upload-mb", "nan"], "'nan' is not a finite number"),
        (["serve", "{model}", "--timeout", "1e400"], "'1e400' is not a finite number"),
        (["serve", "{model}", "--max-wait-ms", "nan"], "'nan' is not a finite number"),
        (["fit", "{data}", "--target-far", "nan", "--out", "{tmp}/m"], "not a finite number"),
        (["threshold", "{model}", "--calibrate", "{data}", "--target-far", "nan"], "finite"),
        (["select", "{data}", "--out", "{tmp}/s", "--budget-minutes", "nan"], "finite"),
        (["select", "{data}", "--out", "{tmp}/s", "--image-sizes", "32"], "at least 64 px"),
        (["select", "{data}", "--out", "{tmp}/s", "--report", "{tmp}/s"], "is the --out model"),
        (["regad", "train", "{data}", "--out", "{tmp}/r", "--image-size", "65"], "multiple of 32"),
        (["fit", "{data}", "--image-size", "100", "--out", "{tmp}/m"], "not a multiple of 32"),
        (["demo", "--out", "{tmp}/d", "--textures", ","], "--textures: give at least one"),
        (["predict", "{model}", "x.png", "--out"], "(see 'defectlens predict --help')"),
        (["regad", "train", "{data}", "--out"], "(see 'defectlens regad train --help')"),
    ],
)
def test_option_values_a_command_cannot_use_are_one_line_errors_before_any_work(
    args, message, model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    """nan and inf pass click's own float ranges; these would have failed deep inside (an
    internal error, a crash after "serving", a silently ignored budget) or after minutes of
    work (a select at 32 px, a 65 px registration no fit can use)."""
    filled = [a.format(model=model_dir, data=brick_root, tmp=tmp_path) for a in args]
    code, _, err = run(monkeypatch, capsys, *filled)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []
