"""Exported deployment folders: the same scores, maps and decisions as the model they came
from (the export parity contract every exportable method keeps), scored without torch, and
refused with one line when tampered with or misused."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from defectlens import Detector
from defectlens.data import find_test_samples
from defectlens.errors import DefectLensError, ModelFileError
from defectlens.runtime.deployed import ExportedModel
from defectlens.runtime.export import export_detector

from .conftest import IMAGE_SIZE, read_csv, run_cli, snapshot

EXPORTABLE = {
    "padim": {},
    "spade": {"k_images": 3},
    "patchcore": {"coreset_ratio": 0.2},
    "regad": {"registration": "identity"},  # a trained registration: tests/test_regad.py
    "ensemble": {
        "members": ["padim", "patchcore", "spade"],
        "member_params": {"spade": {"k_images": 3}, "patchcore": {"coreset_ratio": 0.2}},
    },
}


@pytest.fixture(scope="module")
def onnx_export(fitted, tmp_path_factory):
    return export_detector(fitted, tmp_path_factory.mktemp("exports") / "padim").path


def assert_same_predictions(expected, got) -> None:
    assert len(expected) == len(got)
    for a, b in zip(expected, got, strict=True):
        assert a.source == b.source
        assert abs(a.score - b.score) <= 1e-4 * max(abs(a.score), 1e-12)
        scale = float(np.abs(a.anomaly_map).max()) or 1.0
        assert float(np.abs(a.anomaly_map - b.anomaly_map).max()) <= 1e-4 * scale
        assert a.is_anomalous == b.is_anomalous
        assert (a.mask != b.mask).mean() < 1e-3  # only pixels within rounding of the threshold


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@pytest.mark.parametrize("method", sorted(EXPORTABLE))
def test_export_scores_like_the_model(method, fmt, brick_root, tmp_path):
    detector = Detector(
        method=method, image_size=IMAGE_SIZE, batch_size=8, method_params=EXPORTABLE[method]
    ).fit(brick_root)
    report = export_detector(detector, tmp_path / "export", fmt)
    assert report.max_relative_difference < 1e-4
    config = json.loads((report.path / "config.json").read_text())
    assert config["engine"] == ("onnxruntime" if fmt == "onnx" else "openvino")
    assert set(config["files"]) | {"config.json"} == {p.name for p in report.path.iterdir()}
    paths = [s.path for s in find_test_samples(brick_root)]
    exported = ExportedModel(report.path)
    assert exported.thresholds_ == detector.thresholds_
    assert_same_predictions(detector.predict(paths), exported.predict(paths))


def test_onnx_export_also_runs_on_openvino(fitted, onnx_export, brick_root):
    paths = [s.path for s in find_test_samples(brick_root)][:6]
    on_openvino = ExportedModel(onnx_export, engine="openvino").predict(paths)
    assert_same_predictions(fitted.predict(paths), on_openvino)


def test_large_graphs_keep_their_weights_in_a_data_file(fitted, brick_root, tmp_path):
    report = export_detector(fitted, tmp_path / "big", external_data_bytes=1)
    names = set(report.files)
    assert "backbone.onnx.data" in names  # (the PaDiM head has no weights)
    assert report.files["backbone.onnx"] < 200_000 < report.files["backbone.onnx.data"]
    paths = [s.path for s in find_test_samples(brick_root)][:4]
    assert_same_predictions(fitted.predict(paths), ExportedModel(report.path).predict(paths))


def same_results(exported: Path, model: Path) -> list[tuple[dict, dict]]:
    """The rows of two `predict` results.csv: same images, decisions, scores within 1e-4."""
    rows = read_csv(exported / "results.csv"), read_csv(model / "results.csv")
    assert [r["path"] for r in rows[0]] == [r["path"] for r in rows[1]]
    for a, b in zip(*rows, strict=True):
        assert a["predicted"] == b["predicted"]
        assert abs(float(a["score"]) - float(b["score"])) <= 1e-4 * abs(float(b["score"]))
    return list(zip(*rows, strict=True))


@pytest.fixture(scope="module")
def differnet_dir(brick_root, tmp_path_factory):
    params = {"hidden": 16, "blocks": 2, "max_epochs": 2, "n_transforms": 2}
    params.update(n_transforms_test=3, n_transforms_map=1)
    detector = Detector(method="differnet", image_size=128, batch_size=8, method_params=params).fit(
        brick_root
    )
    return detector.save(tmp_path_factory.mktemp("models") / "differnet")


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_differnet_exports_its_scores_and_says_its_maps_need_torch(
    engine, monkeypatch, capsys, differnet_dir, brick_root, tmp_path
):
    out = tmp_path / "dn"
    code, stdout, err = run_cli(monkeypatch, capsys, "export", differnet_dir, "--out", out)
    assert code == 0, err
    assert "scores (no maps: they need torch)" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["finish"] == {"kind": "image_score"}
    assert config["graphs"]["backbone"]["outputs"] == ["features"]
    test = brick_root / "test"
    predict = ["predict", out, test, "--out", tmp_path / "x", "--backend", engine]
    code, _, err = run_cli(monkeypatch, capsys, *predict)
    assert code == 0, err
    assert "without anomaly maps" in err and "need torch" in err
    code, _, err = run_cli(
        monkeypatch, capsys, "predict", differnet_dir, test, "--out", tmp_path / "m", "-q"
    )
    assert code == 0, err
    for a, b in same_results(tmp_path / "x", tmp_path / "m"):
        assert a["defect_pixels"] == "" and b["defect_pixels"] != ""
    assert not (tmp_path / "x" / "masks").exists() and not (tmp_path / "x" / "overlays").exists()
    evaluate = ["evaluate", out, brick_root, "--out", tmp_path / "e"]
    code, _, err = run_cli(monkeypatch, capsys, *evaluate)
    assert code == 0, err
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["pixel_metrics"] == "skipped: this model scores images without anomaly maps"
    assert "pixel_auroc" not in metrics and (tmp_path / "e" / "report.html").is_file()


def test_differnet_refuses_int8_and_says_what_to_do_where_openvino_ir_fails(
    monkeypatch, capsys, differnet_dir, brick_root, tmp_path
):
    # An IR that OpenVINO cannot compile (2026.4's CPU plugin fails on DifferNet's converted
    # graph, whose ONNX form runs, above) is caught by the export's own load check.
    import defectlens.runtime.export as export_module

    def cannot_compile(path, *args, **kwargs):
        raise ModelFileError(f"{path}/backbone.xml: openvino cannot load this graph (...)")

    monkeypatch.setattr(export_module, "ExportedModel", cannot_compile)
    out = tmp_path / "ir"
    args = ["export", differnet_dir, "--out", out, "--format", "openvino"]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert "export with --format onnx instead" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".ir*"))
    monkeypatch.undo()
    args = ["export", differnet_dir, "--out", tmp_path / "q", "--int8", "--calibration"]
    code, _, err = run_cli(monkeypatch, capsys, *args, brick_root)
    assert code == 2
    assert "differnet cannot be exported in int8" in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()


NO_TORCH = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx", "onnxscript", "FrEIA", "sklearn", "skimage"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Blocked())
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch was importable")
from defectlens.cli import main
sys.argv = ["defectlens", *sys.argv[1:]]
main()
"""


def run_without_torch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter where importing torch (and the other packages of the
    full install) fails, as on a machine with only `pip install defectlens`."""
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )


def test_an_export_scores_without_torch_exactly_as_the_model(
    monkeypatch, capsys, model_dir, onnx_export, brick_root, tmp_path
):
    test = brick_root / "test"
    done = run_without_torch("predict", onnx_export, test, "--out", "bare", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    code, _, err = run_cli(
        monkeypatch, capsys, "predict", model_dir, test, "--out", tmp_path / "full", "-q"
    )
    assert code == 0, err
    same_results(tmp_path / "bare", tmp_path / "full")
    for folder in ("overlays", "masks"):
        assert sorted(os.listdir(tmp_path / "bare" / folder)) == sorted(
            os.listdir(tmp_path / "full" / folder)
        )
    done = run_without_torch("evaluate", onnx_export, brick_root, "--out", "ev", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "image AUROC" in done.stdout
    # A saved (unexported) model needs torch: one line saying which install brings it.
    done = run_without_torch("predict", model_dir, test, "--out", "x", "-q", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("defectlens: error: this needs torch")
    assert "Traceback" not in done.stderr


def test_the_backend_variable_is_checked_for_an_export_and_said_not_to_apply(
    monkeypatch, capsys, onnx_export, brick_root, tmp_path
):
    args = ("predict", onnx_export, brick_root / "test" / "good", "--no-images", "-q")
    monkeypatch.setenv("DEFECTLENS_BACKEND", "onnxrutnime")
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "a")
    assert code == 2 and "unknown backend 'onnxrutnime' in $DEFECTLENS_BACKEND" in err
    monkeypatch.setenv("DEFECTLENS_BACKEND", "torch")  # set for the models on this PC
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "b")
    assert code == 0 and "applies to saved models, not to an export" in err
    # Without torch installed, the check needs none.
    done = run_without_torch(*map(str, args), "--out", "c", cwd=tmp_path)
    assert done.returncode == 0 and "not to an export" in done.stderr, done.stderr


def test_predict_resume_refuses_rows_of_another_export(
    monkeypatch, capsys, onnx_export, model_dir, brick_root, tmp_path
):
    test = brick_root / "test" / "good"
    out = tmp_path / "out"
    assert run_cli(monkeypatch, capsys, "predict", onnx_export, test, "--out", out, "-q")[0] == 0
    code, _, err = run_cli(
        monkeypatch, capsys, "predict", model_dir, test, "--out", out, "--resume", "-q"
    )
    assert code == 2 and "written by another model" in err


@pytest.mark.parametrize("kind", ["model", "export"])
def test_predict_resume_refuses_rows_scored_before_config_json_was_edited(
    monkeypatch, capsys, onnx_export, model_dir, brick_root, tmp_path, kind
):
    """The smoothing and the like live in config.json, outside the hashes that name a model;
    an edit between two parts of a run would have mixed two scorings in one results.csv."""
    folder = tmp_path / kind
    shutil.copytree(onnx_export if kind == "export" else model_dir, folder)
    good = sorted((brick_root / "test" / "good").iterdir())
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(good[0], inputs / good[0].name)
    args = ("predict", folder, inputs, "--out", tmp_path / "out", "--no-images", "-q")
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    config = json.loads((folder / "config.json").read_text())
    (config if kind == "export" else config["detector"])["sigma"] = 0.0
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(good[1], inputs / good[1].name)  # a new image for the resumed run
    code, _, err = run_cli(monkeypatch, capsys, *args, "--resume")
    assert code == 2 and "scoring settings changed" in err and "sigma 4.0 -> 0.0" in err
    assert len(read_csv(tmp_path / "out" / "results.csv")) == 1  # nothing mixed in


def tamper(folder: Path, name: str, change) -> None:
    path = folder / name
    data = bytearray(path.read_bytes())
    change(data)
    path.write_bytes(bytes(data))


def copy_export(source: Path, target: Path) -> Path:
    target.mkdir()
    for item in source.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


def flip_byte(data: bytearray) -> None:
    data[len(data) // 2] ^= 0xFF


def test_tampered_truncated_or_incomplete_exports_are_refused(onnx_export, tmp_path):
    broken = copy_export(onnx_export, tmp_path / "flipped")
    tamper(broken, "head.onnx", flip_byte)
    with pytest.raises(ModelFileError, match=r"head\.onnx: checksum mismatch"):
        ExportedModel(broken)

    # Truncated, with config.json's checksum updated to match: the engine cannot read it.
    from defectlens.outputs import file_sha256

    truncated = copy_export(onnx_export, tmp_path / "truncated")
    tamper(truncated, "backbone.onnx", lambda d: d.__delitem__(slice(len(d) // 3, None)))
    config = json.loads((truncated / "config.json").read_text())
    config["files"]["backbone.onnx"] = file_sha256(truncated / "backbone.onnx")
    (truncated / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"backbone\.onnx: onnxruntime cannot load this graph"):
        ExportedModel(truncated)

    missing = copy_export(onnx_export, tmp_path / "missing")
    (missing / "head.onnx").unlink()
    with pytest.raises(ModelFileError, match=r"head\.onnx: missing"):
        ExportedModel(missing)


BACKBONE_OUT_HEAD_IN = [("backbone", "outputs"), ("head", "inputs")]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(format_version=99), "export format version 99"),
        (lambda c: c.update(surprise=1), "unknown key 'surprise'"),
        (lambda c: c["files"].update({"../escape": "0" * 64}), "is not allowed"),
        (lambda c: c.update(sigma=1e9), "sigma"),
        (lambda c: c["thresholds"].update(image="high"), "thresholds.image"),
        (lambda c: c["finish"].update(kind="telepathy"), "finish.kind"),
        (lambda c: c["preprocessing"].update(image_size=65536), "image_size"),
        (lambda c: c["preprocessing"].update(image_size=63), "multiple of 32, not 63"),
        # The graphs were exported for IMAGE_SIZE: another size failed inside the engine.
        (lambda c: c["preprocessing"].update(image_size=96), "96 does not match the head graph"),
        (lambda c: c["graphs"]["head"].update(file="nope.onnx"), "graphs.head.file"),
        (lambda c: c["graphs"]["head"].update(file=["head.onnx"]), "graphs.head.file"),
        (lambda c: c.update(arrays=[1]), "'arrays' is not one of the listed files"),
        (
            lambda c: [c["graphs"][g].update({k: ["stride2"]}) for g, k in BACKBONE_OUT_HEAD_IN],
            "no output 'stride2'",
        ),
        (lambda c: c["graphs"]["backbone"].update(outputs=["stride2"]), "read the backbone's"),
        (lambda c: c["graphs"]["head"].update(outputs=["embedding"]), "do not fit its finish"),
        (lambda c: c["graphs"]["head"].update(outputs=["map1", "map0"]), "do not fit its finish"),
        (lambda c: c["finish"].update(kind="image_score"), "unknown key finish.'block'"),
    ],
)
def test_edited_configs_are_refused_by_name(onnx_export, tmp_path, edit, message):
    folder = copy_export(onnx_export, tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=re.escape(message)):
        ExportedModel(folder)


def test_an_edited_image_size_is_refused_on_openvino_too(onnx_export, tmp_path):
    folder = copy_export(onnx_export, tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    config["preprocessing"]["image_size"] = 2 * IMAGE_SIZE
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="does not match the head graph"):
        ExportedModel(folder, engine="openvino")


def test_export_targets_are_checked_and_nothing_is_half_written(
    monkeypatch, capsys, model_dir, onnx_export, fitted, tmp_path
):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("keep me")
    before = snapshot(tmp_path)
    for target, fragment in [
        (folder, "is not a defectlens export (holds todo.txt)"),
        (model_dir, "which this command reads"),  # the model itself
        (tmp_path / "notes" / "todo.txt", "exists and is not a folder"),
    ]:
        code, _, err = run_cli(monkeypatch, capsys, "export", model_dir, "--out", target)
        assert code == 2 and fragment in err, err
        assert len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before
    # An export whose config.json was damaged is not replaced, and the message says why.
    damaged = tmp_path / "damaged"
    shutil.copytree(onnx_export, damaged)
    (damaged / "config.json").write_text("{")
    code, _, err = run_cli(monkeypatch, capsys, "export", model_dir, "--out", damaged)
    assert code == 2 and "its config.json is not a defectlens export's or cannot be read" in err
    shutil.rmtree(damaged)
    # An earlier export is replaced, atomically, with no sibling left behind.
    target = tmp_path / "again"
    export_detector(fitted, target)
    code, out, err = run_cli(monkeypatch, capsys, "export", model_dir, "--out", target)
    assert code == 0, err
    assert "checked against the model" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "notes"]
    # A model that is not fitted has nothing to export.
    with pytest.raises(DefectLensError, match="not fitted"):
        export_detector(Detector(image_size=IMAGE_SIZE), tmp_path / "unfitted")
    assert not (tmp_path / "unfitted").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--weights", "w.pth"], "--weights does not apply to an exported model"),
        (["--backend", "torch"], "runs on onnxruntime or openvino, not torch"),
    ],
)
def test_export_only_options_are_refused(
    monkeypatch, capsys, onnx_export, brick_root, args, fragment, tmp_path
):
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "predict",
        onnx_export,
        brick_root / "test",
        "--out",
        tmp_path / "o",
        *args,
    )
    assert code == 2 and fragment in err


def test_calibration_goes_with_int8(monkeypatch, capsys, model_dir, brick_root, tmp_path):
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "export",
        model_dir,
        "--out",
        tmp_path / "x",
        "--calibration",
        brick_root,
    )
    assert code == 2 and "--calibration is for --int8" in err
    code, _, err = run_cli(
        monkeypatch, capsys, "export", model_dir, "--out", tmp_path / "x", "--int8"
    )
    assert code == 2 and "--int8 needs --calibration" in err
    few = tmp_path / "few"
    few.mkdir()
    for sample in find_test_samples(brick_root)[:2]:
        shutil.copy(sample.path, few / f"{sample.defect}-{sample.path.name}")
    code, _, err = run_cli(
        monkeypatch, capsys, "export", model_dir, "--out", tmp_path / "x", "--int8",
        "--calibration", few,
    )  # fmt: skip
    assert code == 2 and "2 normal image(s)" in err and "give at least 10" in err
    assert not (tmp_path / "x").exists()


def test_int8_export_refits_sets_its_own_thresholds_and_reports_the_change(
    monkeypatch, capsys, model_dir, fitted, brick_root, tmp_path
):
    out = tmp_path / "int8"
    code, printed, err = run_cli(
        monkeypatch, capsys, "export", model_dir, "--out", out, "--int8",
        "--calibration", brick_root, "-q",
    )  # fmt: skip
    assert code == 0, err
    assert "score drift vs the fp32 model" in printed and "image AUROC" in printed
    assert "are they normal images" not in err  # the model's own product
    config = json.loads((out / "config.json").read_text())
    assert config["precision"] == "int8"
    info = config["int8"]
    assert info["threshold_fp32"] == fitted.thresholds_.image
    assert info["threshold_int8"] == config["thresholds"]["image"]
    assert info["threshold_int8"] != info["threshold_fp32"]  # refitted, not copied
    assert 0 <= info["score_drift_median"] <= info["score_drift_max"] < 0.5
    assert 0.5 < info["test_auroc_int8"] <= 1.0
    # The backbone graph holds quantised operators.
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "backbone.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    exported = ExportedModel(out)
    for p in exported.predict([s.path for s in find_test_samples(brick_root)][:5]):
        assert p.is_anomalous == (p.score > info["threshold_int8"])


def test_int8_calibration_on_another_product_is_warned(monkeypatch, capsys, model_dir, tmp_path):
    """The int8 export is refitted on its calibration images: another product's images would
    become its normal. A brick model given grass images says so."""
    from defectlens.data.synthetic import make_category

    grass = make_category(tmp_path, "grass", n_train=12, n_test_good=1, n_test_per_defect=0)
    args = ["export", model_dir, "--out", tmp_path / "q", "--int8", "--calibration", grass, "-q"]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and re.search(r"1[0-2] of 12 calibration images .* are they normal", err), err


def test_int8_checks_its_destination_before_quantising(monkeypatch, capsys, model_dir, brick_root):
    args = ["export", model_dir, "--int8", "--calibration", brick_root, "-q", "--out"]
    code, _, err = run_cli(monkeypatch, capsys, *args, brick_root)
    assert code == 2 and "which this command reads" in err
    assert "int8: refitted" not in err
