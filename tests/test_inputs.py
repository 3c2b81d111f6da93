"""Expanding command-line inputs: patterns, folders and links, every input accounted for."""

from __future__ import annotations

import os
import time
from pathlib import Path

from defectlens.data.inputs import expand_inputs


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_patterns_match_like_glob_without_following_loops(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _touch(tmp_path / "a" / "x.png")
    _touch(tmp_path / "a" / "b" / "y.png")
    _touch(tmp_path / "a" / "b" / "c" / "z.PNG")
    _touch(tmp_path / "a" / ".hidden" / "h.png")
    _touch(tmp_path / "a" / "b" / "note.txt")
    # Two loops: the standard library's recursive glob multiplies paths through them.
    os.symlink("..", tmp_path / "a" / "b" / "up")
    os.symlink("../..", tmp_path / "a" / "b" / "c" / "upup")
    start = time.monotonic()
    found = expand_inputs(["a/**/*.png", "a/*/y.png", "a/*.PNG"])
    assert time.monotonic() - start < 5
    names = [(str(i.path), i.error) for i in found]
    assert ("a/x.png", None) in names and ("a/b/y.png", None) in names
    assert all(".hidden" not in n for n, _ in names)
    assert ("a/b/c/z.PNG", None) not in names  # fnmatch is case-sensitive on POSIX, like glob
    assert names[-1] == ("a/*.PNG", "pattern matches no files")
    assert len([n for n, _ in names if n.endswith("y.png")]) == 1  # each real file once


def test_folders_list_everything_with_a_reason(tmp_path):
    _touch(tmp_path / "in" / "ok.jpg")
    _touch(tmp_path / "in" / "data.csv")
    os.symlink("missing.png", tmp_path / "in" / "gone.png")
    os.symlink(".", tmp_path / "in" / "self")
    os.mkfifo(tmp_path / "in" / "pipe.png")
    found = {i.path.name: i.error for i in expand_inputs([str(tmp_path / "in")])}
    assert found["ok.jpg"] is None
    assert "not an image type" in found["data.csv"]
    assert "broken symbolic link" in found["gone.png"]
    assert "symbolic link loop" in found["self"]
    assert "not a regular file" in found["pipe.png"]


def test_a_second_link_to_a_folder_is_no_loop_and_no_error(tmp_path):
    """A folder reached twice (a link beside it) is walked once, not reported as a loop:
    its files are already listed under their first path."""
    _touch(tmp_path / "in" / "d" / "x.png")
    os.symlink("d", tmp_path / "in" / "e")  # sorted after d: the second way in
    found = [
        (i.path.relative_to(tmp_path / "in"), i.error)
        for i in expand_inputs([str(tmp_path / "in")])
    ]
    assert found == [(Path("d/x.png"), None)]


def test_named_files_are_tried_whatever_their_suffix_and_duplicates_collapse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _touch(tmp_path / "photo.raw")
    found = expand_inputs(["photo.raw", "./photo.raw", str(tmp_path / "photo.raw"), "nope.png"])
    assert [(str(i.path), i.error) for i in found] == [
        ("photo.raw", None),
        ("nope.png", "no such file or directory"),
    ]


def test_results_folders_are_not_inputs(tmp_path):
    _touch(tmp_path / "in" / "a.png")
    _touch(tmp_path / "in" / "out" / "overlays" / "a.png.png")
    (tmp_path / "in" / "out" / ".defectlens-results.json").write_text("{}")
    from defectlens.outputs import is_results_folder

    found = expand_inputs([str(tmp_path / "in")], skip_folder=is_results_folder)
    assert [i.path.name for i in found] == ["a.png"]
    # Named itself, a results folder is not searched, and the reason says so (it once said
    # "holds no files to score" of a folder full of images).
    (tmp_path / "in" / ".defectlens-results.json").write_text("{}")
    (found,) = expand_inputs([str(tmp_path / "in")], skip_folder=is_results_folder)
    assert found.path == tmp_path / "in" and "holds defectlens results" in found.error
