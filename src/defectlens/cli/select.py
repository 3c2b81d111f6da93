"""`defectlens select`."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click

from defectlens.cli.backbones import installed_backbones
from defectlens.cli.common import (
    FiniteFloat,
    batch_size_option,
    device_option,
    echo,
    mark_saved,
    out_option,
    quiet_option,
)
from defectlens.errors import DefectLensError


@click.command()
@click.argument("data", type=click.Path())
@out_option(
    "Where to save the chosen model: a new folder, or an existing defectlens model to replace."
)
@click.option(
    "--methods",
    default="padim,patchcore",
    show_default=True,
    help="Comma-separated methods to try.",
)
@click.option(
    "--backbones",
    "backbone_names",
    default="efficientnet_lite0",
    show_default=True,
    help="Comma-separated backbones to try (see `defectlens backbones`), or `installed`: "
    "every backbone whose weights are on this machine.",
)
@click.option(
    "--image-sizes",
    default="256",
    show_default=True,
    help="Comma-separated image sizes to try (multiples of 32).",
)
@click.option(
    "--budget-minutes",
    type=FiniteFloat(0, min_open=True),
    default=None,
    help="Stop trying new candidates after this long (the ones tried are ranked).",
)
@click.option(
    "--report",
    type=click.Path(),
    default=None,
    help="Folder for selection.csv and selection.html [default: OUT.selection].",
)
@click.option(
    "--defects",
    default="drawn",
    show_default=True,
    help="Synthetic defect kinds of the task, comma-separated: scratch, spot, hole, patch, "
    "smudge (drawn), cutpaste, scar, blob, stain (the image's own texture), or the groups "
    "`drawn`, `self`, `all`.",
)
@batch_size_option("Images read and run through the backbone at once (memory, not results).")
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the held-out split, the synthetic defects and the fits.",
)
@device_option("Where a method that trains a network trains (auto, cpu, cuda, cuda:N).")
@quiet_option
def select(
    data, out, methods, backbone_names, image_sizes, budget_minutes, report, defects, batch_size,
    seed, device, quiet,
) -> None:  # fmt: skip
    """Choose a configuration for DATA from its normal images only, and save it to --out.

    Every combination of --methods, --backbones and --image-sizes is fitted on 80 % of
    DATA's normal images (train/good of an MVTec root; test/ is never read) and scored on
    the other 20 %, each of them also once with each kind of synthetic defect (--defects).
    Candidates are ranked by image AUROC on that task, then AUPRO; the table is printed and
    written to --report. The winner is then fitted on all of DATA as `defectlens fit` would
    and saved.
    """
    import numpy as np
    from tqdm.auto import tqdm

    from defectlens.backbones import get_spec
    from defectlens.data.dataset import find_normal_images
    from defectlens.data.synthetic import MIN_PASTE_SIZE, defect_kinds
    from defectlens.methods import get_method
    from defectlens.outputs import check_model_target, results_dir
    from defectlens.report.html import write_selection_report
    from defectlens.selection import TIE_AUROC, Candidate, near_ties, split_for_selection
    from defectlens.selection import select as run_selection

    def names(text: str, what: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise DefectLensError(f"--{what}: give at least one")
        return list(dict.fromkeys(items))

    sizes = []
    for item in names(image_sizes, "image-sizes"):
        if not item.isdigit():
            raise DefectLensError(f"--image-sizes: {item!r} is not a whole number")
        if int(item) < MIN_PASTE_SIZE:
            raise DefectLensError(
                f"--image-sizes {item}: select pastes synthetic defects into the images, which "
                f"needs at least {MIN_PASTE_SIZE} px"
            )
        sizes.append(int(item))
    kinds = defect_kinds(names(defects, "defects"))
    backbone_list = names(backbone_names, "backbones")
    if "installed" in (b.lower() for b in backbone_list):
        if len(backbone_list) > 1:
            raise DefectLensError(
                "--backbones: `installed` already means every backbone here; give it alone"
            )
        backbone_list = installed_backbones()
    candidates = []
    for method in names(methods, "methods"):
        for backbone in backbone_list:
            for size in sizes:
                takes_seed = "seed" in get_method(method).param_names()  # unknown: said here
                params = (("seed", seed),) if takes_seed else ()
                candidate = Candidate(method, backbone, size, params)
                candidate.detector(batch_size, seed)  # an unknown name or size: said now
                candidates.append(candidate)
    for backbone in backbone_list:  # select finds weights only where `backbones` lists them
        status = get_spec(backbone).weights_status(hint=False)
        if not status.startswith("available"):
            reason = status.removeprefix("missing: ")
            raise DefectLensError(
                f"--backbones {backbone}: {reason} (select has no --weights: it uses the "
                "weights `defectlens backbones` finds)"
            )
    check_model_target(out, [data])
    split_for_selection(find_normal_images(data), seed)  # too few images: said before writing
    report_name = report or f"{out}.selection"
    if Path(report_name).absolute() == Path(out).absolute():
        raise DefectLensError(
            f"--report {report}: is the --out model folder; the report goes in a folder of its own"
        )
    # interrupted before the table is written: no folder holding only our marker is left
    with results_dir(
        report_name, ["selection.csv", "selection.html"], "select", [data], flag="--report"
    ) as report_dir:
        bar = tqdm(total=len(candidates), desc="select", disable=quiet, unit="config")
        try:
            ranked = run_selection(
                data,
                candidates,
                budget_s=None if budget_minutes is None else 60 * budget_minutes,
                batch_size=batch_size,
                seed=seed,
                device=device,
                on_outcome=lambda outcome: bar.update(1),
                defects=kinds,
            )
        finally:
            bar.close()
        rows = [{"rank": i + 1, **o.row()} for i, o in enumerate(ranked)]
        _write_csv(report_dir / "selection.csv", rows)
    winner = ranked[0]
    if not np.isfinite(winner.image_auroc):
        raise DefectLensError(f"no candidate could be fitted: {winner.error}")
    write_selection_report(
        rows, report_dir / "selection.html", str(data), winner.candidate.label, kinds
    )
    echo(f"{'rank':>4}  {'synthetic AUROC':>15}  {'AUPRO':>6}  {'fit s':>6}  candidate")
    for row in rows:
        auroc, pro = row["synthetic_image_auroc"], row["synthetic_aupro"]
        echo(
            f"{row['rank']:>4}  {auroc:>15.4f}  {pro:>6.3f}  {row['fit_s']:>6.1f}  "
            f"{row['candidate']}" + (f"  ({row['error']})" if row["error"] else "")
        )
    ties = near_ties(ranked)
    if ties:
        echo(
            f"note: {len(ties)} other candidate(s) within {TIE_AUROC} synthetic AUROC of the "
            f"winner ({', '.join(o.candidate.label for o in ties)}): the task cannot tell them "
            "apart. If you have a few real defects, compare them with `defectlens evaluate`."
        )
    echo(f"chosen: {winner.candidate.label}; fitting it on all of {data}")
    detector = winner.candidate.detector(batch_size, seed)
    try:
        detector.fit(data, progress=not quiet, device=device)
    except KeyboardInterrupt:  # the ranking is kept: say how to get the model without it
        echo(
            f"interrupted while fitting the winner: nothing was saved to {out}; the ranking is "
            f"in {report_dir / 'selection.csv'}. To fit the winner without selecting again: "
            f"{_fit_command(winner.candidate, data, out, seed, batch_size)}",
            err=True,
        )
        raise
    path = detector.save(out, protect=(data,))
    mark_saved(path)
    echo(f"saved {path}; ranking in {report_dir / 'selection.csv'} and selection.html")


def _fit_command(candidate, data: str, out: str, seed: int, batch_size: int) -> str:
    """The `defectlens fit` command line that fits `candidate` as select's final fit does."""
    words = ["defectlens", "fit", str(data), "--method", candidate.method]
    words += ["--backbone", candidate.backbone, "--image-size", str(candidate.image_size)]
    words += ["--seed", str(seed), "--batch-size", str(batch_size), "--out", str(out)]
    for key, value in candidate.method_params:  # JSON, as --param reads it (tuples as lists)
        words += ["--param", f"{key}={json.dumps(value)}"]
    return shlex.join(words)


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv
    import io

    from defectlens.outputs import write_text_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
