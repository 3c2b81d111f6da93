"""Finding images in an MVTec-AD-layout root or a plain folder.

MVTec AD layout::

    root/train/good/*.png                       normal images for fitting
    root/test/good/*.png                        normal test images
    root/test/<defect>/*.png                    defective test images
    root/ground_truth/<defect>/<stem>_mask.png  optional masks, same size as the image
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from defectlens.data.images import IMAGE_SUFFIXES
from defectlens.data.inputs import walk
from defectlens.errors import DataError, DataWarning, option
from defectlens.outputs import is_results_folder


@dataclass(frozen=True)
class Sample:
    """One test image: `label` is 0 for good, 1 for defective; `mask` may be None."""

    path: Path
    label: int
    defect: str
    mask: Path | None


def list_images(folder: Path, recursive: bool = False, nested_warning: bool = True) -> list[Path]:
    """Image files in a folder, sorted by name, skipping hidden files.

    Entries that look like images but cannot be (a broken or looping symbolic link, a named
    pipe) are not silently dropped: each gets a `DataWarning`. Other files (notes, CSVs) are
    ignored with one warning that counts them, and so are images in sub-folders when not
    `recursive` (a fit on 4 images where 24 were meant is a silent wrong model).
    """
    images, others = [], []
    for path, kind, reason in walk(Path(folder), max_depth=None if recursive else 1):
        if kind == "file" and path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        elif kind == "file":
            others.append(path)
        else:
            warnings.warn(f"{path}: ignored, {reason}", DataWarning, stacklevel=2)
    if others:
        warnings.warn(
            f"{folder}: ignored {len(others)} file(s) that are not images (e.g. {others[0].name})",
            DataWarning,
            stacklevel=2,
        )
    if nested_warning and not recursive:
        _warn_nested(Path(folder), images_in_subfolders(Path(folder)))
    return sorted(images)


def _warn_nested(folder: Path, nested: list[Path]) -> None:
    if nested:
        warnings.warn(
            f"{folder}: ignored {len(nested)} image(s) in its sub-folders (e.g. "
            f"{nested[0].relative_to(folder)}): only the folder's own images are read; move "
            "them up to use them",
            DataWarning,
            stacklevel=3,
        )


def images_in_subfolders(folder: Path) -> list[Path]:
    """Image files below `folder`'s own entries, in name order (not our results folders'
    overlays and masks, which a predict run may have written inside its input folder)."""
    found = [
        path
        for path, kind, _ in walk(folder, is_results_folder)
        if kind == "file" and path.parent != folder and path.suffix.lower() in IMAGE_SUFFIXES
    ]
    return sorted(found)


def find_normal_images(root: str | Path) -> list[Path]:
    """The normal training images of a dataset: `root/train/good` if present, else `root`."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (give an MVTec-layout root or a folder of images)")
    folder = root / "train" / "good" if (root / "train" / "good").is_dir() else root
    images = list_images(folder, nested_warning=False)
    nested = images_in_subfolders(folder)
    if not images:
        below = ""
        if nested:
            below = (
                f"; its sub-folders hold {len(nested)} (e.g. {nested[0].relative_to(folder)}), "
                "which are not read: give the folder that holds them, or move them up"
            )
        raise DataError(
            f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}){below}; "
            "give an MVTec-layout root (with train/good) or a folder of normal images"
        )
    _warn_nested(folder, nested)
    return images


def find_test_samples(root: str | Path) -> list[Sample]:
    """The labelled test images of an MVTec-layout root, with their masks when present."""
    root = Path(root)
    test = root / "test"
    if not test.is_dir():
        hint = ""
        for above in (root.parent, root.parent.parent):  # given test/ or test/<defect> itself
            if above != root and (above / "test").is_dir() and root.is_relative_to(above):
                hint = f"; the dataset root is probably {above}"
                break
        raise DataError(f"{root}: no test/ folder (expected test/good and test/<defect>){hint}")
    samples = list(_test_images(root))
    if not samples:
        raise DataError(f"{test}: no images found in its sub-folders")
    if not any(s.label == 0 for s in samples):
        raise DataError(f"{test}/good: no normal test images; metrics need both kinds")
    if not any(s.label == 1 for s in samples):
        raise DataError(f"{test}: no defective test images (only test/good)")
    return samples


def find_anomalies(root: str | Path) -> list[Sample]:
    """Labelled anomalous images for a method that learns from a few (Neural Batch Sampling):
    `root/test/<defect>/*` (MVTec layout; test/good is not read), each with its mask at
    `root/ground_truth/<defect>/<stem>_mask.png`. A missing mask is an error naming the
    image: a defect without a mask cannot teach where defects are."""
    root = Path(root)
    if not root.is_dir():
        wants = option("--anomalies", "the anomaly data")
        raise DataError(f"{root}: no such folder ({wants} wants an MVTec-layout root)")
    test = root / "test"
    if not test.is_dir():
        raise DataError(
            f"{root}: no test/ folder; {option('--anomalies', 'the anomaly data')} wants "
            "test/<defect>/ images with masks in "
            "ground_truth/<defect>/<name>_mask.png"
        )
    samples = [s for s in _test_images(root) if s.label == 1]
    for sample in samples:
        if sample.mask is None:
            expected = root / "ground_truth" / sample.defect / f"{sample.path.stem}_mask.png"
            raise DataError(f"{sample.path}: no mask (expected {expected})")
    if not samples:
        raise DataError(f"{test}: no defective images (looked in its sub-folders but good/)")
    return samples


def _test_images(root: Path):
    """Every image under root/test/<defect>/ as a Sample, sorted by defect then name, with its
    mask (root/ground_truth/<defect>/<stem>_mask.png) when the image is defective and the mask
    exists."""
    for folder in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        defect = folder.name
        for path in list_images(folder):
            mask = None
            if defect != "good":
                candidate = root / "ground_truth" / defect / f"{path.stem}_mask.png"
                mask = candidate if candidate.is_file() else None
            yield Sample(path, int(defect != "good"), defect, mask)
