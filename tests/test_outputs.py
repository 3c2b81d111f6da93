"""Saving never loses a model or a user's file: atomic replacement, leftovers, results folders,
resumable results, and an interrupt that keeps what was finished."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defectlens import Detector, load
from defectlens.data import find_test_samples
from defectlens.errors import DefectLensError, ModelFileError, OutputError
from defectlens.outputs import (
    check_model_target,
    is_model_folder,
    leftovers,
    prepare_results_dir,
    read_folder_config,
    results_dir,
)
from defectlens.results import ResultsTable, one_line, safe_text

from .conftest import IMAGE_SIZE, read_csv, run_cli, snapshot

DEAD_PID = 2**22 + 12345  # above the default pid_max: never a live process


def test_interrupted_save_keeps_the_old_model_and_leaves_nothing(fitted, tmp_path, monkeypatch):
    path = fitted.save(tmp_path / "m")
    before = snapshot(tmp_path)

    def killed(new, target):
        raise KeyboardInterrupt

    import defectlens.outputs as outputs

    monkeypatch.setattr(outputs, "replace_folder", killed)
    with pytest.raises(KeyboardInterrupt):
        fitted.save(path)
    assert snapshot(tmp_path) == before  # old model intact, temporary folder removed


def test_swap_is_atomic_and_the_fallback_keeps_the_old_model_until_the_new_is_in(
    fitted, tmp_path, monkeypatch
):
    import defectlens.outputs as outputs

    path = fitted.save(tmp_path / "m")
    assert is_model_folder(path)
    fitted.save(path)  # renameat2(RENAME_EXCHANGE) on Linux
    assert is_model_folder(path) and sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)  # e.g. another OS
    renames = []
    real_rename = os.rename

    def watching(src, dst):
        renames.append((Path(src).name, Path(dst).name, path.exists()))
        real_rename(src, dst)

    monkeypatch.setattr(outputs.os, "rename", watching)
    fitted.save(path)
    assert [r[1] for r in renames][-1] == "m"
    assert renames[0][0] == "m" and ".defectlens-old-" in renames[0][1]  # old moved aside first
    assert is_model_folder(path) and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_model_that_cannot_be_replaced_is_refused_before_the_swap(fitted, tmp_path, monkeypatch):
    """A read-only model folder (its files cannot be removed) is refused before anything is
    written; if the previous copy still cannot be removed after the swap, the save has
    succeeded and says where that copy is, instead of reporting a failure."""
    import tempfile

    import defectlens.outputs as outputs

    path = fitted.save(tmp_path / "m")
    before = snapshot(tmp_path)
    real_mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if Path(dir) == path:  # root ignores chmod 555: the probe is made to fail instead
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only)
    with pytest.raises(OutputError, match="m: cannot write there"):
        fitted.save(path)
    assert snapshot(tmp_path) == before
    monkeypatch.undo()
    real_rmtree = shutil.rmtree

    def stuck(target, *args, **kwargs):
        if ".defectlens-tmp-" in str(target) and not kwargs.get("ignore_errors"):
            raise PermissionError(13, "Permission denied", str(target))
        return real_rmtree(target, *args, **kwargs)

    monkeypatch.setattr(outputs.shutil, "rmtree", stuck)
    other = Detector(image_size=IMAGE_SIZE, batch_size=8, target_far=0.2)
    other.fit(fitted_root(fitted))
    with pytest.warns(Warning, match="previous copy could not be removed.*the new one is saved"):
        other.save(path)
    assert load(path).target_far == 0.2


def fitted_root(detector) -> Path:
    """The MVTec root `detector` was fitted on (conftest's brick data)."""
    return Path(detector.fit_images_[0]).parents[2]


def test_leftovers_of_a_killed_save_are_reported_then_cleaned(fitted, tmp_path):
    path = fitted.save(tmp_path / "m")
    # A save killed between "old moved aside" and "new renamed in": the model is missing.
    aside = tmp_path / f".m.defectlens-old-{DEAD_PID}-0000abcd"
    os.rename(path, aside)
    partial = tmp_path / f".m.defectlens-tmp-{DEAD_PID}-1111abcd"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".m.defectlens-tmp-{os.getpid()}-2222abcd"  # a save still running
    live.mkdir()
    with pytest.raises(ModelFileError, match="interrupted save left the previous model in"):
        load(path)
    assert leftovers(path) == sorted([aside, partial])
    with pytest.warns(UserWarning, match="removed 2 leftover folder"):
        fitted.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", live.name])


def test_model_target_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for target in (".", "..", "data", str(tmp_path)):
        with pytest.raises(OutputError):
            check_model_target(target, protect=["data"])
    (tmp_path / "empty").mkdir()
    assert check_model_target("empty") == Path("empty")  # an empty folder may take a model
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(OutputError, match="not a defectlens model's"):
        check_model_target("fake")


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_old_model(
    fitted, tmp_path, monkeypatch
):
    from safetensors import SafetensorError

    import defectlens.io

    path = fitted.save(tmp_path / "m")
    before = snapshot(path)

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(defectlens.io, "save_file", full)
    with pytest.raises(OutputError, match=r"m: saving the model failed .*No space left"):
        fitted.save(path)
    assert snapshot(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_results_folder_marker_rules(tmp_path):
    out = prepare_results_dir(tmp_path / "r", ["results.csv"], "predict")
    (out / "results.csv").write_text("ours\n")
    assert prepare_results_dir(out, ["results.csv"], "predict") == out  # ours: reusable
    user = tmp_path / "user"
    user.mkdir()
    (user / "other.txt").write_text("x")
    assert prepare_results_dir(user, ["results.csv"], "predict") == user  # no collision
    (tmp_path / "user2").mkdir()
    (tmp_path / "user2" / "results.csv").write_text("theirs")
    with pytest.raises(OutputError, match="did not write"):
        prepare_results_dir(tmp_path / "user2", ["results.csv"], "predict")
    assert (tmp_path / "user2" / "results.csv").read_text() == "theirs"
    # Another command's results folder is not mixed into (select's table among predict's rows).
    with pytest.raises(OutputError, match=r"results of `defectlens predict`.*`defectlens select`"):
        prepare_results_dir(out, ["selection.csv"], "select")
    assert sorted(p.name for p in out.iterdir()) == [".defectlens-results.json", "results.csv"]


@pytest.mark.parametrize(
    ("fmt", "said"),
    [
        ("defectlens-export", "is a deployment export"),
        ("defectlens-registration", "is a RegAD registration model"),
    ],
)
def test_a_folder_of_another_kind_is_named_and_never_takes_results(tmp_path, fmt, said):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"format": fmt}))
    with pytest.raises(ModelFileError, match=f"f: {said}.*, not a defectlens model$"):
        read_folder_config(folder, "model", "defectlens-model")
    with pytest.raises(OutputError, match="folder of their own"):
        prepare_results_dir(folder, ["results.csv"], "predict")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]


@pytest.mark.parametrize("fmt", [["defectlens-export"], {"a": 1}, None, 3.5, "other"])
def test_a_config_of_no_known_format_is_named_as_such(tmp_path, fmt):
    (tmp_path / "config.json").write_text(json.dumps({"format": fmt}))
    with pytest.raises(ModelFileError, match=r"not a defectlens model config$"):
        read_folder_config(tmp_path, "model", "defectlens-model")


def test_a_results_folder_made_for_a_failed_run_is_removed_an_earlier_one_kept(tmp_path):
    with pytest.raises(KeyError), results_dir(tmp_path / "new", ["a.csv"], "predict"):
        raise KeyError("failed before writing")
    assert not (tmp_path / "new").exists()
    kept = prepare_results_dir(tmp_path / "old", ["a.csv"], "predict")
    with pytest.raises(KeyError), results_dir(kept, ["a.csv"], "predict"):
        raise KeyError("failed before writing")
    assert kept.is_dir()  # it was there before this run
    with pytest.raises(KeyError), results_dir(tmp_path / "w", ["a.csv"], "predict") as out:
        (out / "a.csv").write_text("a row\n")
        raise KeyError("failed after writing")
    assert (tmp_path / "w" / "a.csv").read_text() == "a row\n"  # results are never removed


def test_results_table_resume_drops_errors_and_torn_rows(tmp_path):
    path = tmp_path / "results.csv"
    columns = ["path", "score", "predicted", "error"]
    path.write_text(
        "path,score,predicted,error\n"
        "a.png,1.5,good,\n"
        "b.png,,error,b.png: corrupt\n"
        '"c,d.png",2.5,defective,\n'
        "e.png,0.12"  # torn by a kill: no newline
    )
    table = ResultsTable(path, columns, resume=True, is_done=lambda r: r["predicted"] != "error")
    assert sorted(table.done) == ["a.png", "c,d.png"]
    table.write(["e.png", "0.125", "good", ""])
    table.close()
    assert [r["path"] for r in read_csv(path)] == ["a.png", "c,d.png", "e.png"]
    path.write_text("name,value\nx,1\n")
    with pytest.raises(OutputError, match="cannot resume"):
        ResultsTable(path, columns, resume=True)


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=30) | st.binary(max_size=30))
@settings(max_examples=200, deadline=None)
def test_any_file_name_becomes_valid_utf8_on_one_line(name):
    text = os.fsdecode(name) if isinstance(name, bytes) else name
    line = one_line(text)
    line.encode("utf-8")  # never raises
    assert "\n" not in line and "\r" not in line
    safe_text(text).encode("utf-8")


def test_predict_resume_after_a_kill_scores_each_image_once(model_dir, brick_root, tmp_path):
    """SIGTERM a real `defectlens predict` mid-run: exit 130, finished rows on disk; then
    --resume finishes without rescoring, and every input appears exactly once."""
    images = tmp_path / "many"
    images.mkdir()
    samples = find_test_samples(brick_root)
    for i in range(600):
        shutil.copy(samples[i % len(samples)].path, images / f"{i:03d}.png")
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "defectlens", "predict", str(model_dir), str(images),
        "--out", str(out), "--no-images", "-q",
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    results = out / "results.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if results.exists() and len(results.read_text().splitlines()) > 5:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    first = read_csv(results)
    assert 0 < len(first) < 600 and all(r["error"] == "" for r in first)
    finished = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    rows = read_csv(results)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in images.iterdir())
    assert rows[: len(first)] == first  # earlier rows kept as they were, not rescored
    assert f"{len(first)} done earlier" in finished.stdout


def test_predict_refuses_to_overwrite_an_earlier_run_without_being_told(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "o"
    image = brick_root / "test" / "good" / "000.png"
    args = ["predict", model_dir, image, "--out", out, "--no-images", "-q"]
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and "--resume" in err and "--overwrite" in err
    assert run_cli(monkeypatch, capsys, *args, "--overwrite")[0] == 0
    assert len(read_csv(out / "results.csv")) == 1


def test_a_run_that_scored_nothing_does_not_block_the_corrected_rerun(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "o"
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(
        monkeypatch, capsys, "predict", model_dir, tmp_path / "empty", "--out", out
    )
    assert code == 2 and "empty: folder holds no files to score" in err
    assert [r["predicted"] for r in read_csv(out / "results.csv")] == ["error"]  # kept to read
    good = brick_root / "test" / "good"
    code, _, err = run_cli(monkeypatch, capsys, "predict", model_dir, good, "--out", out, "-q")
    assert code == 0, err
    assert {r["predicted"] for r in read_csv(out / "results.csv")} <= {"good", "defective"}
    # --overwrite starts again: no picture of the earlier run is left beside the new ones
    one = brick_root / "test" / "hole" / "000.png"
    args = ["predict", model_dir, one, "--out", out, "--overwrite", "-q"]
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    assert sorted(p.name for p in (out / "overlays").rglob("*.png")) == ["000.png.png"]


def test_resume_refuses_rows_of_another_model_and_a_concurrent_run(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "o"
    image = brick_root / "test" / "good" / "000.png"
    args = [image, "--out", out, "--no-images", "-q"]
    assert run_cli(monkeypatch, capsys, "predict", model_dir, *args)[0] == 0
    other = Detector(image_size=IMAGE_SIZE, batch_size=8, seed=1).fit(brick_root)
    other = other.save(tmp_path / "other-model")
    code, _, err = run_cli(monkeypatch, capsys, "predict", other, *args, "--resume")
    assert code == 2 and "written by another model" in err
    from defectlens.scoring import RESULT_COLUMNS

    table = ResultsTable(out / "results.csv", RESULT_COLUMNS, resume=True)  # a run in progress
    try:
        code, _, err = run_cli(monkeypatch, capsys, "predict", model_dir, *args, "--resume")
        assert code == 2 and "another defectlens run is writing" in err
    finally:
        table.close()
    assert run_cli(monkeypatch, capsys, "predict", model_dir, *args, "--resume")[0] == 0
    # resumed without --no-images, "0 to go" would write no pictures: refused instead
    code, _, err = run_cli(monkeypatch, capsys, "predict", model_dir, *args[:-2], "--resume")
    assert code == 2 and "started with --no-images; resume it the same way" in err
    assert not (out / "overlays").exists()
    # other inputs would be appended to this run's table as if one run had scored them
    other_image = brick_root / "test" / "good" / "001.png"
    code, _, err = run_cli(
        monkeypatch, capsys, "predict", model_dir, other_image, *args[1:], "--resume"
    )
    assert code == 2 and "the earlier run scored other inputs" in err and "000.png" in err
    assert len(read_csv(out / "results.csv")) == 1
    # the same file written another way would get a second row (rows are keyed as written)
    monkeypatch.chdir(image.parent)
    code, _, err = run_cli(
        monkeypatch, capsys, "predict", model_dir, image.name, *args[1:], "--resume"
    )
    assert code == 2 and "the earlier run scored other inputs" in err
    assert len(read_csv(out / "results.csv")) == 1


# -- config loading: any edit is either harmless or a one-line ModelFileError -----------------
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))


@pytest.fixture(scope="module")
def pristine_config(model_dir):
    return json.loads((model_dir / "config.json").read_text())


@given(data=st.data())
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_mutated_configs_load_or_fail_with_model_file_error(
    data, model_dir, pristine_config, tmp_path_factory
):
    config = json.loads(json.dumps(pristine_config))
    paths = [p for p in _paths(config) if p]
    target = data.draw(st.sampled_from(paths))
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    parent = config
    for key in target[:-1]:
        parent = parent[key]
    if action == "replace":
        parent[target[-1]] = data.draw(_JSON)
    elif action == "delete":
        del parent[target[-1]]
    else:
        parent[data.draw(st.text(max_size=6))] = data.draw(_JSON)
    model = tmp_path_factory.mktemp("mutated") / "m"
    shutil.copytree(model_dir, model)
    (model / "config.json").write_text(json.dumps(config))
    try:
        detector = load(model)
    except DefectLensError as exc:
        assert "\n" not in str(exc)
        return
    # It loaded: then it must be a valid model that scores like the original would.
    assert detector.thresholds_ is not None


def test_a_models_metrics_json_stays_with_it_and_nothing_is_written_inside_it(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    """serve shows a metrics.json kept in a model folder: the folder stays replaceable (a
    threshold change or a refit keeps the file), and no results, export or model folder is
    put inside a saved one (which would make it unreplaceable)."""
    model = tmp_path / "m"
    shutil.copytree(model_dir, model)
    (model / "metrics.json").write_text('{"image_auroc": 1.0}')
    code, _, err = run_cli(monkeypatch, capsys, "threshold", model, "--value", 1000)
    assert code == 0, err
    assert (model / "metrics.json").read_text() == '{"image_auroc": 1.0}'
    assert load(model).thresholds_.image == 1000
    for command in (
        ["evaluate", model, brick_root, "--out", model / "ev"],
        ["predict", model, brick_root / "test" / "good", "--out", model / "pred"],
        ["export", model, "--out", model / "exp"],
        ["fit", brick_root, "--image-size", IMAGE_SIZE, "--out", model / "inner"],
    ):
        code, _, err = run_cli(monkeypatch, capsys, *command, "-q")
        assert code == 2 and "is inside a model folder" in err, (command, err)
    assert sorted(p.name for p in model.iterdir()) == [
        "config.json",
        "metrics.json",
        "model.safetensors",
    ]


def test_resume_refuses_rows_decided_at_another_threshold(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    model, out = tmp_path / "m", tmp_path / "o"
    shutil.copytree(model_dir, model)
    args = [brick_root / "test" / "good" / "000.png", "--out", out, "--no-images", "-q"]
    assert run_cli(monkeypatch, capsys, "predict", model, *args)[0] == 0
    assert run_cli(monkeypatch, capsys, "threshold", model, "--value", 1e6)[0] == 0
    code, _, err = run_cli(monkeypatch, capsys, "predict", model, *args, "--resume")
    assert code == 2 and "thresholds changed since the earlier rows were decided" in err
    assert "now 1e+06" in err
    # refitted in place: said as such, not as "another model"
    Detector(image_size=IMAGE_SIZE, batch_size=8, seed=3).fit(brick_root).save(model)
    code, _, err = run_cli(monkeypatch, capsys, "predict", model, *args, "--resume")
    assert code == 2 and "before it was refitted or replaced" in err
