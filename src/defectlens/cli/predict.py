"""`defectlens predict`: batch scoring that writes as it goes and resumes."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import click

from defectlens.blas import numpy_blas_single_threaded
from defectlens.cli.common import (
    EXIT_SKIPPED,
    apply_max_pixels,
    backend_option,
    dask_option,
    echo,
    max_pixels_option,
    quiet_option,
    warn,
    weights_option,
)
from defectlens.data.images import is_url
from defectlens.errors import DefectLensError
from defectlens.loading import load_model
from defectlens.results import has_scored_rows, is_scored, safe_text


@click.command()
@click.argument("model", type=click.Path())
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--out",
    "out",
    type=click.Path(),
    default=None,
    help="Folder for results.csv, overlays/ and masks/ (required unless --json).",
)
@click.option("--no-images", is_flag=True, help="Write results.csv only.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per input.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted run into the same --out: images already in its "
    "results.csv are not scored again.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start again in an --out that holds the results of an earlier run.",
)
@dask_option(
    "Score on a Dask cluster: the scheduler's tcp://HOST:PORT, or local[:N] for N worker "
    "processes here. Workers read the inputs (paths they see, or fsspec URLs such as "
    "s3://bucket/*.png); results are the same as a local run's."
)
@click.option(
    "--chunk-size",
    type=click.IntRange(1, 100_000),
    default=None,
    help="Images per Dask task [default: 4 batches of the model]. A multiple of the "
    "model's batch size scores in the same batches as a local run (the same bits).",
)
@weights_option
@backend_option
@max_pixels_option
@quiet_option
def predict(
    model,
    inputs,
    out,
    no_images,
    as_json,
    resume,
    overwrite,
    dask_address,
    chunk_size,
    weights,
    backend,
    max_pixels,
    quiet,
) -> None:
    """Score images: INPUTS are files, folders (searched recursively) or glob patterns.

    Every input gets a row in results.csv, written as soon as it is scored: unreadable images,
    broken links and files that are not images are listed with their error and skipped, the
    rest are scored (exit status 1 if any was skipped). Overlays and masks are named after the
    input's path (a.png -> overlays/a.png.png), so a.png and a.jpg do not collide. With --dask,
    the model is checked here, sent to each worker once, and the workers score.
    """
    if out is None and not as_json:
        raise DefectLensError("give --out DIR (or --json to print results)")
    if resume and overwrite:
        raise DefectLensError("--resume and --overwrite exclude each other")
    if resume and out is None:
        raise DefectLensError("--resume needs the --out folder of the run to continue")
    if chunk_size is not None and dask_address is None:
        raise DefectLensError("--chunk-size is for --dask")
    if dask_address is not None and backend is not None:
        raise DefectLensError("--backend does not apply to --dask: workers use their default")
    apply_max_pixels(max_pixels)
    from defectlens.data.inputs import expand_inputs
    from defectlens.outputs import (
        clear_results,
        is_results_folder,
        read_results_marker,
        results_dir,
    )
    from defectlens.results import ResultsTable
    from defectlens.scoring import RESULT_COLUMNS

    with contextlib.ExitStack() as stack:
        client = None
        if dask_address is not None:  # an unreachable cluster: said before anything is written
            from defectlens.distributed import connect

            client = stack.enter_context(connect(dask_address))
        out_dir = None
        if out is not None:
            out_dir = stack.enter_context(
                results_dir(out, ["results.csv", "overlays", "masks"], "predict", inputs)
            )
            earlier = out_dir / "results.csv"
            if earlier.exists() and not (resume or overwrite) and has_scored_rows(earlier):
                raise DefectLensError(
                    f"{out_dir}: holds results.csv of an earlier run; pass --resume to "
                    "continue it or --overwrite to start again"
                )
        # What the earlier run in this folder recorded, before this run records itself.
        earlier_run = read_results_marker(out_dir) if out_dir is not None else {}
        items = expand_inputs(inputs, skip_folder=is_results_folder)
        # Without anything to score, the model is not needed: say so before loading it.
        detector = None
        if not all(i.error for i in items):
            numpy_blas_single_threaded()  # see defectlens.blas: OpenBLAS's idle threads spin
            detector = load_model(model, weights=weights, backend=backend)
        if out_dir is not None and not resume:  # before this run's marker replaces it
            _check_pictures_are_ours(out_dir, earlier_run)
        if out_dir is not None and detector is not None:
            _check_same_run(out_dir, model, detector, resume, not no_images, inputs)
        table = None
        if out_dir is not None:
            if not resume:  # a new run: no picture of an earlier one is left beside its own
                clear_results(out_dir, ["overlays", "masks"])
            table = ResultsTable(
                out_dir / "results.csv",
                RESULT_COLUMNS,
                resume=resume,
                is_done=is_scored,
            )
        score = None
        if client is not None and detector is not None:
            from defectlens.distributed import score_on_cluster

            def score(pending, pictures):
                return score_on_cluster(
                    client,
                    model,
                    pending,
                    pictures,
                    chunk_size=chunk_size or 4 * detector.batch_size,
                    progress=not quiet,
                    weights=weights,
                )

        try:
            outcome = _run_predict(
                detector, items, table, out_dir, no_images, as_json, quiet, score
            )
        finally:
            if table is not None:
                table.close()
        if outcome["skipped"]:
            sys.exit(EXIT_SKIPPED)


def _check_same_run(
    out_dir: Path, model: str, loaded, resume: bool, pictures: bool, inputs: tuple[str, ...]
) -> None:
    """--resume must continue with the model that wrote the earlier rows, never mix two, with
    the same pictures choice (a run resumed without --no-images would write no pictures for
    its done rows, so "done" must mean the same thing), and on the same INPUTS: other inputs
    would be appended to the earlier run's table as if they were one run. The inputs are
    compared as written and as the files they name (order ignored): rows are keyed by the
    path as written, so the same file written another way would be scored again, and the
    same relative path from another folder is another file. A folder that gained images
    since is still the same run, and its new images are scored."""
    from defectlens.outputs import read_results_marker, write_results_marker
    from defectlens.runtime.deployed import ExportedModel

    if isinstance(loaded, ExportedModel):
        identity = loaded.identity  # its files were hashed once, at load
    else:
        from defectlens.io import read_config

        identity = read_config(model)["tensors_sha256"]
    marker = read_results_marker(out_dir)
    if resume and marker.get("model_sha256") not in (None, identity):
        if marker.get("model") == str(model):
            raise DefectLensError(
                f"{out_dir}: its results.csv was written by {model} before it was refitted or "
                "replaced; use --overwrite or another --out to start again"
            )
        raise DefectLensError(
            f"{out_dir}: its results.csv was written by another model ({marker.get('model')}); "
            "resume with that model, or use --overwrite or another --out to start again"
        )
    settings = _scoring_settings(loaded)
    if resume and marker.get("scoring") not in (None, settings):
        raise DefectLensError(
            f"{out_dir}: {model}'s scoring settings changed since the earlier rows were scored "
            f"({_changes(marker['scoring'], settings)}); one results.csv would mix two: use "
            "--overwrite or another --out to start again"
        )
    thresholds = loaded.thresholds_.to_dict() if loaded.thresholds_ is not None else None
    if resume and marker.get("thresholds") not in (None, thresholds):
        raise DefectLensError(
            f"{out_dir}: {model}'s thresholds changed since the earlier rows were decided "
            f"(image threshold then {_threshold_text(marker['thresholds'])}, now "
            f"{_threshold_text(thresholds)}); one results.csv would mix two thresholds: use "
            "--overwrite or another --out to start again"
        )
    if resume and marker.get("pictures") not in (None, pictures):
        was = "with" if pictures else "without"
        raise DefectLensError(
            f"{out_dir}: the earlier run was started {was} --no-images; resume it the same way, "
            "or use --overwrite or another --out to start again"
        )
    given = sorted(
        {(s, s if is_url(s) else os.path.abspath(os.path.expanduser(s))) for s in inputs}
    )
    if resume and marker.get("inputs") not in (None, [list(pair) for pair in given]):
        recorded = marker["inputs"] if isinstance(marker["inputs"], list) else ["?"]
        earlier = [str(pair[0]) if isinstance(pair, list) and pair else "?" for pair in recorded]
        shown = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        raise DefectLensError(
            f"{out_dir}: the earlier run scored other inputs ({shown}); resume it with the "
            "same INPUTS, or use --overwrite or another --out to start again"
        )
    info = {"model": str(model), "model_sha256": identity, "pictures": pictures, "inputs": given}
    info["thresholds"], info["scoring"] = thresholds, settings
    write_results_marker(out_dir, {**marker, **info})


def _check_pictures_are_ours(out_dir: Path, earlier_run: dict) -> None:
    """An earlier run with --no-images wrote no masks/ or overlays/ (see `refuse_unwritten`)."""
    from defectlens.outputs import refuse_unwritten

    if earlier_run.get("pictures") is False:
        refuse_unwritten(
            out_dir, ("masks", "overlays"), "the earlier run was made with --no-images"
        )


def _scoring_settings(loaded) -> dict:
    """What turns the model's tensors into scores besides them and the thresholds: for a
    saved model its image size, map smoothing and method parameters; for an export its
    preprocessing, smoothing and finish. All are in config.json, outside the tensors' hash,
    so an edit there must not go unnoticed by --resume. (As JSON gives them back.)"""
    from defectlens.runtime.deployed import ExportedModel

    if isinstance(loaded, ExportedModel):
        config = loaded.config
        settings = {k: config[k] for k in ("preprocessing", "sigma", "finish")}
    else:
        settings = {
            "image_size": loaded.image_size,
            "sigma": loaded.sigma,
            "method_params": loaded.method_params,
        }
    return json.loads(json.dumps(settings))


def _changes(before: object, after: dict) -> str:
    """'sigma 4.0 -> 0.0, ...': the settings that differ, for one line."""
    if not isinstance(before, dict):
        return "unreadable before"
    keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    text = ", ".join(f"{k} {json.dumps(before.get(k))} -> {json.dumps(after.get(k))}" for k in keys)
    return text if len(text) <= 200 else text[:197] + "..."


def _threshold_text(thresholds: object) -> str:
    image = thresholds.get("image") if isinstance(thresholds, dict) else None
    return f"{image:.6g}" if isinstance(image, float | int) else "unknown"


def _picture_path(source: str, base: Path) -> Path:
    """Where an input's mask and overlay go, relative to the results folder: its path below the
    inputs' common folder, or for a URL its scheme, host and path (never a way out of --out)."""
    if is_url(source):
        scheme, rest = source.split("://", 1)
        parts = [p for p in [scheme, *rest.split("/")] if p not in ("", ".", "..")]
        return Path(*parts)
    return Path(os.path.abspath(source)).relative_to(base)


def _run_predict(detector, items, table, out_dir, no_images, as_json, quiet, score=None) -> dict:
    """Score the inputs not yet done and write their rows and pictures as they come. `score`
    (pending sources, pictures wanted) -> ScoredFile stream: the Dask runner; by default the
    images are scored here."""
    from defectlens.scoring import iter_scored_files, write_row

    done = table.done if table is not None else {}
    errors: dict[str, str] = {}

    def record_error(name: str, message: str) -> None:
        errors[name] = message
        if detector is not None:  # else the one error line below says it all
            warn(f"skipped {message}")
        if table is not None:
            table.write([name, "", "error", "", message])
        if as_json:  # a pipeline reading stdout learns of every input, as results.csv does
            row = {"path": name, "score": None, "predicted": "error", "defect_pixels": None}
            echo(json.dumps({**row, "error": message}))

    pending = []
    for item in items:
        name = safe_text(str(item.path))
        if item.error is not None:
            record_error(name, f"{name}: {item.error}")
        elif name not in done:
            pending.append(item.path)
    # Pictures are named relative to the inputs' common folder: the same names on --resume.
    local = [p for p in (i.path for i in items if i.error is None) if not is_url(p)]
    base = Path(os.path.commonpath([os.path.abspath(p.parent) for p in local or [Path("x")]]))
    if detector is None:
        _nothing_scored(errors, out_dir)
    if done:
        warn(f"resuming: {len(done)} image(s) already scored, {len(pending)} to go")
    if not detector.has_maps:
        warn(
            f"this {detector.method} export scores images without anomaly maps (its maps are "
            "gradients through the backbone, which need torch): no masks or overlays, "
            "defect_pixels left empty; score the saved model for maps"
        )
        no_images = True
    pictures = out_dir is not None and not no_images
    if score is None:
        results = iter_scored_files(detector, pending, pictures, progress=not quiet)
    else:
        results = score(pending, pictures)
    scored = flagged = 0
    start = time.perf_counter()
    try:
        for result in results:
            if result.summary is None:
                record_error(result.name, result.error)
                continue
            for note in result.notes:
                warn(note)
            # Pictures first, then the row: a row on disk means its pictures are complete.
            problem = _save_pictures(result, out_dir, _picture_path(result.source, base))
            if problem is not None:  # this input's error row; the rest of the run goes on
                record_error(result.name, f"{result.name}: {problem}")
                continue
            if table is not None:
                write_row(table.write, result)
            if as_json:
                echo(json.dumps(result.summary))
            scored += 1
            flagged += result.summary["predicted"] == "defective"
    except KeyboardInterrupt:
        where = f"; rows so far are in {out_dir / 'results.csv'}" if out_dir else ""
        resume = " (rerun the same command with --resume to finish)" if out_dir else ""
        echo(f"interrupted after {scored} of {len(pending)} image(s){where}{resume}", err=True)
        raise
    if not scored and not done and errors:  # every input failed, found late: as if found early
        _nothing_scored(errors, out_dir)
    seconds = time.perf_counter() - start
    echo(
        f"scored {scored} image(s) in {seconds:.1f} s ({scored / max(seconds, 1e-9):.1f} img/s): "
        f"{flagged} defective, {scored - flagged} good"
        + (f", {len(errors)} skipped" if errors else "")
        + (f", {len(done)} done earlier" if done else ""),
        err=as_json,
    )
    return {"scored": scored, "skipped": len(errors)}


def _nothing_scored(errors: dict[str, str], out_dir: Path | None) -> None:
    """No input could be scored (all missing, unreadable or not images): a user error, exit
    status 2, whether the model was needed to find out or not (each input's row stays in
    results.csv, and the corrected rerun may use the same --out)."""
    first = next(iter(errors.values()), "no inputs")
    listed = f"; see {out_dir / 'results.csv'}" if out_dir is not None else ""
    more = f" (and {len(errors) - 1} more{listed})" if len(errors) > 1 else ""
    raise DefectLensError(f"nothing could be scored: {first}{more}")


def _save_pictures(result, out_dir: Path | None, relative: Path) -> str | None:
    """Write the input's mask and overlay (those it has); on failure, remove what was written
    for it and say why. A picture that cannot be written (a name too long for the file
    system, a folder where the picture should go) is that input's problem, not the run's:
    it gets an error row, as an unreadable input does, and is retried by --resume."""
    from defectlens.outputs import write_bytes_atomic

    written: list[Path] = []
    for kind, folder in (("mask", "masks"), ("overlay", "overlays")):
        if kind not in result.pngs:
            continue
        path = out_dir / folder / f"{relative}.png"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, result.pngs[kind])
        except OSError as exc:
            for done in written:
                done.unlink(missing_ok=True)
            reason = exc.strerror or type(exc).__name__
            return f"scored, but its {kind} could not be written to {path} ({reason})"
        written.append(path)
    return None
