"""Scoring image files for batch jobs: each input's result row and pictures, made the same way
on this machine (`defectlens predict`) and on Dask workers (`defectlens.distributed`).

A batch job's output is a row per input (score and decision, or the reason it could not be
scored) and, on request, the mask and overlay as PNG bytes. Producing them in one place is what
makes a distributed run's results.csv and pictures identical to a local run's: the workers run
this same function on their share of the inputs, and the client only writes what comes back.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from defectlens.data.images import read_image
from defectlens.data.loader import ImageInput
from defectlens.errors import DataError
from defectlens.prediction import Predictor
from defectlens.report.overlay import result_pngs
from defectlens.results import safe_text


@dataclass
class ScoredFile:
    """One input's outcome: `summary` (as `Prediction.summary`) when it was scored, else
    `error`; `pngs` holds its "mask" and "overlay" pictures when they were asked for."""

    name: str  # printable (`results.safe_text`), as results.csv lists it
    source: str  # the path or URL as given, for naming its pictures
    summary: dict[str, Any] | None = None
    error: str | None = None
    pngs: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. why there is no overlay


def iter_scored_files(
    model: Predictor,
    sources: Sequence[ImageInput],
    pictures: bool,
    progress: bool = False,
) -> Iterator[ScoredFile]:
    """Score `sources` (paths or URLs) in input order, streaming: a `ScoredFile` for each,
    unreadable ones included (with their error). With `pictures`, each scored image's mask and
    overlay are drawn (the image is read again for the overlay: holding every decoded image
    until its map is ready would cost more memory than the second read costs time)."""
    failed: deque[ScoredFile] = deque()

    def on_error(name: str, error: DataError) -> None:
        failed.append(ScoredFile(safe_text(name), name, error=str(error)))

    for prediction in model.iter_predict(list(sources), progress=progress, on_error=on_error):
        while failed:  # the unreadable inputs that came before this one, in input order
            yield failed.popleft()
        source = prediction.source
        scored = ScoredFile(safe_text(source), source, summary=prediction.summary())
        scored.summary["path"] = scored.name
        if pictures and prediction.anomaly_map is not None:
            threshold = model.thresholds_.pixel
            amap, mask = prediction.anomaly_map, prediction.mask
            scored.pngs.update(result_pngs(None, amap, mask, threshold, ("mask",)))
            try:
                image = read_image(prediction.source)
                if image.shape[:2] != prediction.anomaly_map.shape:
                    raise DataError(f"{scored.name}: its size changed")
            except DataError as exc:  # changed on disk since it was scored
                scored.notes.append(f"no overlay for {scored.name}: {exc}")
            else:
                scored.pngs.update(result_pngs(image, amap, mask, threshold, ("overlay",)))
        yield scored
    yield from failed


def score_files(
    model: Predictor, sources: Sequence[ImageInput], pictures: bool
) -> tuple[list[ScoredFile], list[str]]:
    """`iter_scored_files` for one chunk of a distributed run, with the warnings reading the
    images raised (16-bit data, multi-frame files) returned as text, since a worker's warnings
    would otherwise never reach the user."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = list(iter_scored_files(model, sources, pictures))
    return results, [str(w.message) for w in caught]


def write_row(write: Callable[[list[Any]], None], scored: ScoredFile) -> None:
    """The results.csv row of an input (columns `RESULT_COLUMNS`)."""
    if scored.summary is None:
        write([scored.name, "", "error", "", scored.error])
        return
    pixels = scored.summary["defect_pixels"]
    write(
        [
            scored.name,
            f"{scored.summary['score']:.6g}",
            scored.summary["predicted"],
            "" if pixels is None else pixels,
            "",
        ]
    )


RESULT_COLUMNS = ("path", "score", "predicted", "defect_pixels", "error")
