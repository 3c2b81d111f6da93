"""Turning what a user names on the command line into a list of inputs, losing none.

Every input ends up in the list: an image to score, or an entry with the reason it cannot be
(a broken or looping symbolic link, a FIFO, a file type we do not read, a pattern that matches
nothing). Callers list those entries in their results with the reason instead of dropping them.

Folders are walked recursively in name order. Symbolic links to folders are followed, but each
real folder is visited once, so a link loop ends instead of hanging (the standard library's
recursive glob follows loops to the kernel's 40-level limit, which multiplies with every loop).
Hidden files and folders (names starting with '.') are not inputs: they are what tools and
operating systems leave behind (`.DS_Store`, `._x.png`), never images an operator took.
Patterns (`*`, `?`, `[...]`, `**` for any depth) are matched by the same walker.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from defectlens.data.images import (
    IMAGE_SUFFIXES,
    describe_os_error,
    describe_special_file,
    is_url,
    missing_url_package,
)


@dataclass(frozen=True)
class InputItem:
    """One input: `error` is None for an image to score, else why it cannot be scored."""

    path: Path | str  # a str only for a URL (`data.images.is_url`), read through fsspec
    error: str | None = None


def classify(path: Path) -> tuple[str, str | None]:
    """('dir' | 'file' | 'bad', reason) for a path, following symbolic links safely."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError) and not os.path.islink(path):
            return "bad", "no such file or directory"
        return "bad", describe_os_error(path, exc)
    if stat.S_ISDIR(mode):
        return "dir", None
    if stat.S_ISREG(mode):
        return "file", None
    return "bad", describe_special_file(mode)


def _found(path: Path, kind: str, reason: str | None) -> InputItem:
    """An entry found in a folder or by a pattern: files must have an image suffix."""
    if kind != "file":
        return InputItem(path, reason)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return InputItem(path)
    shown = path.suffix or "no suffix"
    return InputItem(
        path, f"not an image type defectlens reads ({shown}; reads {', '.join(IMAGE_SUFFIXES)})"
    )


def walk(
    folder: Path,
    skip_folder: Callable[[Path], bool] = lambda p: False,
    max_depth: int | None = None,
) -> Iterator[tuple[Path, str, str | None]]:
    """(path, kind, reason) for everything under `folder`, each real folder visited once;
    `max_depth` 1 lists the folder's own entries only. A link back to a folder being walked
    (a loop) is listed as such; a second link to a folder walked elsewhere is passed over in
    silence, as its files are already listed under their first path."""
    visited: set[tuple[int, int]] = set()
    walking: list[tuple[int, int]] = []  # the folders from `folder` down to the current one

    def visit(directory: Path, depth: int = 0) -> Iterator[tuple[Path, str, str | None]]:
        info = os.stat(directory)
        key = (info.st_dev, info.st_ino)
        if key in walking:
            yield directory, "bad", "symbolic link loop (it leads back to a folder above it)"
            return
        if key in visited:
            return
        visited.add(key)
        if skip_folder(directory):
            return
        walking.append(key)
        try:
            yield from entries(directory, depth)
        finally:
            walking.pop()

    def entries(directory: Path, depth: int) -> Iterator[tuple[Path, str, str | None]]:
        try:
            names = sorted(entry.name for entry in os.scandir(directory))
        except OSError as exc:
            yield directory, "bad", f"cannot list the folder ({exc.strerror or exc})"
            return
        for name in names:
            if name.startswith("."):
                continue
            path = directory / name
            kind, reason = classify(path)
            if kind == "dir":
                if max_depth is None or depth + 1 < max_depth:
                    yield from visit(path, depth + 1)
            else:
                yield path, kind, reason

    yield from visit(folder)


@lru_cache(maxsize=256)
def _segment_regex(segment: str) -> re.Pattern:
    return re.compile(fnmatch.translate(segment))


def _match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Glob semantics on path segments: `**` spans any number of folders, other wildcards one."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match(rest, parts[i:]) for i in range(len(parts) + 1))
    if not parts or (parts[0].startswith(".") and not head.startswith(".")):
        return False
    return bool(_segment_regex(head).match(parts[0])) and _match(rest, parts[1:])


def expand_pattern(pattern: str, skip_folder: Callable[[Path], bool]) -> list[InputItem]:
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    wanted = tuple(parts[fixed:])
    if classify(base)[0] != "dir":
        return []
    depth = None if "**" in wanted else len(wanted)
    return [
        _found(path, kind, reason)
        for path, kind, reason in walk(base, skip_folder, depth)
        if _match(wanted, path.relative_to(base).parts)
    ]


def expand_url(url: str) -> list[InputItem]:
    """A URL names one file, or with `*`, `?` or `[...]` those its fsspec file system globs
    (`s3://bucket/line1/*.png`). Whether a named file exists is found out where it is read."""
    if not glob.has_magic(url):
        return [InputItem(url)]
    try:
        import fsspec

        fs, _, paths = fsspec.get_fs_token_paths(url)
    except ImportError as exc:
        return [InputItem(url, f"cannot list it: {missing_url_package(url, exc)}")]
    except Exception as exc:  # credentials, network and protocol errors of any backend
        return [InputItem(url, f"cannot list it ({str(exc).splitlines()[0][:200]})")]
    found = [fs.unstrip_protocol(p) for p in sorted(paths)]
    images = [u for u in found if os.path.splitext(u)[1].lower() in IMAGE_SUFFIXES]
    return [InputItem(u) for u in images] or [InputItem(url, "pattern matches no images")]


def expand_inputs(
    names: Sequence[str], skip_folder: Callable[[Path], bool] = lambda p: False
) -> list[InputItem]:
    """Files, folders (searched recursively) and glob patterns, in the order given, each once.

    A file named explicitly is always tried, whatever its suffix (the decoder decides); files
    found in folders or by patterns must have an image suffix, and other files are listed with
    that reason. `skip_folder` excludes folders such as our own results folders. A folder or
    pattern that yields nothing is listed itself, with that reason: an input is never dropped
    without a word.
    """
    items: list[InputItem] = []
    for name in names:
        if is_url(name):
            items.extend(expand_url(name))
            continue
        path = Path(name)
        kind, reason = classify(path)
        if kind == "file":
            items.append(InputItem(path))
        elif kind == "dir" and skip_folder(path):  # named itself: say why it is not searched
            items.append(
                InputItem(
                    path,
                    "folder holds defectlens results, which are never scored; name "
                    "the image folders inside it",
                )
            )
        elif kind == "dir":
            found = [_found(*entry) for entry in walk(path, skip_folder)]
            items.extend(found or [InputItem(path, "folder holds no files to score")])
        elif glob.has_magic(name) and reason == "no such file or directory":
            matches = expand_pattern(name, skip_folder)
            items.extend(matches or [InputItem(path, "pattern matches no files")])
        else:
            items.append(InputItem(path, reason))
    unique: dict[str, InputItem] = {}
    for item in items:
        key = item.path if isinstance(item.path, str) else os.path.abspath(item.path)
        unique.setdefault(key, item)
    return list(unique.values())
