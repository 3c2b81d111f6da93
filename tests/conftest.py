"""Shared fixtures: a small synthetic MVTec-layout dataset and a PaDiM detector fitted on it.

Everything is generated from scikit-image textures; no test touches ../shared/data.
"""

from __future__ import annotations

import csv
import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch

from defectlens import Detector
from defectlens.data.synthetic import make_category

IMAGE_SIZE = 64  # small images keep the suite fast; the maths is size-independent

torch.set_num_threads(2)  # the thread setting we ship and benchmark with


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory):
    """One backbone export per test session (it takes seconds), never in the user's ~/.cache;
    subprocesses the tests start inherit it."""
    folder = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("DEFECTLENS_CACHE_DIR")
    os.environ["DEFECTLENS_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("DEFECTLENS_CACHE_DIR", None)
    else:
        os.environ["DEFECTLENS_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def brick_root(tmp_path_factory):
    return make_category(
        tmp_path_factory.mktemp("data"), "brick", n_train=30, n_test_good=10, n_test_per_defect=3
    )


@pytest.fixture(scope="session")
def fitted(brick_root):
    return Detector(image_size=IMAGE_SIZE, batch_size=8).fit(brick_root)


@pytest.fixture(scope="session")
def model_dir(fitted, tmp_path_factory):
    return fitted.save(tmp_path_factory.mktemp("models") / "brick")


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the `defectlens` command in-process; (exit status, stdout, stderr)."""
    from defectlens.cli import main

    monkeypatch.setattr(sys, "argv", ["defectlens", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root (links not followed) with a content digest: compare
    before and after a command to prove it touched nothing."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            state[key] = "link:" + str(path.readlink())
        elif path.is_file():
            state[key] = hashlib.sha1(path.read_bytes()).hexdigest()
        elif path.is_dir():
            state[key] = "dir"
        else:
            state[key] = "special"
    return state
