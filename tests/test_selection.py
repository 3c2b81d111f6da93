"""`defectlens select`: configurations ranked on synthetic defects made from normal images only,
a broken configuration ranked last, test/ never read, the budget respected, the winner saved."""

from __future__ import annotations

import shlex

import pytest
import torch

from defectlens import Detector
from defectlens.data import loader
from defectlens.data.synthetic import (
    ALL_DEFECTS,
    DEFECTS,
    SELF_TEXTURE_DEFECTS,
    defect_kinds,
    make_category,
)
from defectlens.errors import ParameterError
from defectlens.selection import (
    Candidate,
    Outcome,
    make_task,
    near_ties,
    select,
    split_for_selection,
)

from .conftest import IMAGE_SIZE, read_csv, run_cli


@pytest.fixture(scope="module")
def tile_root(tmp_path_factory):
    return make_category(
        tmp_path_factory.mktemp("select"), "gravel", n_train=40, n_test_good=2, n_test_per_defect=1
    )


def test_a_broken_configuration_ranks_last_and_test_is_never_read(tile_root, monkeypatch):
    read = []
    original = loader.read_image
    monkeypatch.setattr(loader, "read_image", lambda p: read.append(str(p)) or original(p))
    candidates = [
        Candidate("padim", image_size=IMAGE_SIZE, method_params=(("n_channels", 1),)),
        Candidate("padim", image_size=IMAGE_SIZE),
        Candidate("patchcore", image_size=IMAGE_SIZE),
    ]
    ranked = select(tile_root, candidates, batch_size=8)
    assert ranked[-1].candidate == candidates[0], [
        (o.candidate.label, o.image_auroc) for o in ranked
    ]
    assert ranked[0].image_auroc > ranked[-1].image_auroc + 0.1
    assert read and all("/train/good/" in p for p in read)  # never test/ nor ground_truth/


def test_the_task_holds_each_image_clean_and_with_a_defect(tile_root):
    images = sorted((tile_root / "train" / "good").glob("*.png"))
    fit, held_out = split_for_selection(images, seed=0)
    assert not set(fit) & set(held_out) and len(held_out) == 8  # 20 % of 40
    task = make_task(held_out, 96, seed=0, kinds=ALL_DEFECTS)
    assert len(task.images) == 8 * (1 + len(ALL_DEFECTS)) and task.images[0].shape == (96, 96, 3)
    assert list(task.labels) == [0] * 8 + [1] * 8 * len(ALL_DEFECTS)
    assert task.kinds == [""] * 8 + [k for k in ALL_DEFECTS for _ in range(8)]
    assert not any(m.any() for m in task.masks[:8]) and all(m.any() for m in task.masks[8:])
    again = make_task(held_out, 96, seed=0, kinds=ALL_DEFECTS)
    assert all((a == b).all() for a, b in zip(task.images, again.images, strict=True))
    # a kind's defects do not depend on which other kinds are asked for
    scars = make_task(held_out, 96, seed=0, kinds=["scar"])
    assert scars.kinds == [""] * 8 + ["scar"] * 8
    first = task.kinds.index("scar")
    for a, b in zip(scars.images[8:], task.images[first : first + 8], strict=True):
        assert (a == b).all()


def test_candidates_the_task_cannot_tell_apart_are_named():
    aurocs = [0.990, 0.987, 0.980, float("nan")]
    ranked = [Outcome(Candidate("padim", image_size=32 * (i + 1)), a) for i, a in enumerate(aurocs)]
    assert near_ties(ranked) == [ranked[1]]
    assert near_ties(ranked[:1]) == [] and near_ties(ranked[3:]) == []


def test_defect_kinds_accept_groups_and_refuse_unknown_names():
    assert defect_kinds(["self"]) == SELF_TEXTURE_DEFECTS
    assert defect_kinds(["scar", "DRAWN"]) == (*DEFECTS, "scar")
    with pytest.raises(ParameterError, match=r"unknown defect kind 'dent'.*cutpaste"):
        defect_kinds(["dent"])


def test_select_command_saves_the_winner_and_respects_the_budget(
    tile_root, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "chosen"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "select", tile_root, "--out", out, "--methods", "padim,patchcore",
        "--image-sizes", f"{IMAGE_SIZE}", "--batch-size", 8, "--budget-minutes", "0.0001", "-q",
    )  # fmt: skip
    assert code == 0, err
    rows = read_csv(tmp_path / "chosen.selection" / "selection.csv")
    assert [r["rank"] for r in rows] == ["1", "2"]
    assert rows[1]["error"] == "not tried: the time budget was spent"
    assert rows[0]["method"] == "padim" and float(rows[0]["synthetic_image_auroc"]) > 0.5
    by_kind = dict(item.split("=") for item in rows[0]["auroc_by_kind"].split())
    assert list(by_kind) == list(DEFECTS) and all(0 <= float(v) <= 1 for v in by_kind.values())
    assert "chosen: padim" in stdout
    model = Detector.load(out)
    assert model.method == "padim" and model.image_size == IMAGE_SIZE
    assert (tmp_path / "chosen.selection" / "selection.html").read_text().count("<tr>") == 3


def test_select_interrupted_in_its_final_fit_prints_the_fit_that_makes_the_winner(
    tile_root, tmp_path, monkeypatch, capsys
):
    args = ["select", tile_root, "--methods", "padim", "--image-sizes", IMAGE_SIZE, "-q"]
    args += ["--batch-size", 8, "--seed", 3]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "whole")
    assert code == 0, err
    original = Detector.fit

    def fit(self, data, val_images=None, **kwargs):
        if val_images is None:  # the final fit on all of DATA (candidates get the task)
            raise KeyboardInterrupt
        return original(self, data, val_images=val_images, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Detector, "fit", fit)
        code, _, err = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "cut")
    assert code == 130 and "interrupted while fitting the winner" in err
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.selection/selection.csv").is_file()
    command = shlex.split(err.split("without selecting again: ")[1].splitlines()[0])
    assert command[:2] == ["defectlens", "fit"]
    code, _, err = run_cli(monkeypatch, capsys, *command[1:])
    assert code == 0, err
    whole, refit = Detector.load(tmp_path / "whole"), Detector.load(tmp_path / "cut")
    assert refit.thresholds_ == whole.thresholds_
    for name, tensor in whole.model_.state_dict().items():
        assert torch.equal(refit.model_.state_dict()[name], tensor), name


def test_select_refuses_unknown_names_before_any_work(
    tile_root, model_dir, tmp_path, monkeypatch, capsys
):
    code, _, err = run_cli(
        monkeypatch, capsys, "select", tile_root, "--out", tmp_path / "m", "--methods", "padim,nope"
    )
    assert code == 2 and "nope" in err and not (tmp_path / "m.selection").exists()
    code, _, err = run_cli(
        monkeypatch, capsys, "select", tile_root, "--out", tmp_path / "m", "--image-sizes", "100"
    )
    assert code == 2 and "multiple of 32" in err
    code, _, err = run_cli(
        monkeypatch, capsys, "select", tile_root, "--out", tmp_path / "m", "--defects", "dent"
    )
    assert code == 2 and "unknown defect kind 'dent'" in err
    # a backbone without weights here: the fix, not a --weights that select does not have
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-hub"))
    code, _, err = run_cli(
        monkeypatch, capsys, "select", tile_root, "--out", tmp_path / "m", "--backbones",
        "resnet18",
    )  # fmt: skip
    assert code == 2 and "no weights for resnet18" in err and "select has no --weights" in err
    assert "pass --weights" not in err
    assert not (tmp_path / "m.selection").exists()
    # a model folder as the report's: the message names the option that chose it
    code, _, err = run_cli(
        monkeypatch, capsys, "select", tile_root, "--out", tmp_path / "m", "--report", model_dir
    )
    assert code == 2 and "is a model folder" in err and "choose another --report" in err


def test_select_installed_backbones_tries_every_backbone_with_weights_here(
    tile_root, tmp_path, monkeypatch, capsys
):
    from defectlens.backbones import available_backbones

    here = [s.name for s in available_backbones() if s.weights_status().startswith("available")]
    code, _, err = run_cli(
        monkeypatch, capsys, "select", tile_root, "--out", tmp_path / "m", "--methods", "padim",
        "--backbones", "installed", "--image-sizes", f"{IMAGE_SIZE}", "--batch-size", 8,
        "--budget-minutes", "0.0001", "-q",
    )  # fmt: skip
    assert code == 0, err
    rows = read_csv(tmp_path / "m.selection" / "selection.csv")
    assert sorted(r["backbone"] for r in rows) == sorted(here)
    assert "efficientnet_lite0" in here


def test_select_installed_mixed_with_names_is_refused(tile_root, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(
        monkeypatch, capsys, "select", tile_root, "--out", tmp_path / "m",
        "--backbones", "installed,efficientnet_lite0",
    )  # fmt: skip
    assert code == 2 and "give it alone" in err
    assert not (tmp_path / "m").exists()
