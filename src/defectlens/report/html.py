"""A single self-contained `report.html` (images embedded), readable offline."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from defectlens import metrics
from defectlens.data.images import read_image
from defectlens.outputs import write_text_atomic
from defectlens.report.overlay import panel
from defectlens.results import safe_text

N_EXAMPLES = 6


def _png(array_or_fig) -> str:
    buffer = io.BytesIO()
    if isinstance(array_or_fig, np.ndarray):
        Image.fromarray(array_or_fig).save(buffer, format="PNG")
    else:
        array_or_fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
        plt.close(array_or_fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _roc_figure(evaluation) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    fpr, tpr = metrics.roc_curve(evaluation.scores, evaluation.labels)
    ax.plot(fpr, tpr, label=f"image (AUROC {evaluation.metrics['image_auroc']:.3f})")
    if evaluation.pixel_roc is not None:
        fpr, tpr = evaluation.pixel_roc  # from every pixel, thinned to plot points
        ax.plot(fpr, tpr, label=f"pixel (AUROC {evaluation.metrics['pixel_auroc']:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC")
    ax.legend(loc="lower right")
    return fig


def _histogram_figure(evaluation, threshold: float) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    scores, labels = evaluation.scores, evaluation.labels
    bins = np.linspace(scores.min(), max(scores.max(), threshold), 40)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="good", color="tab:green")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="defective", color="tab:red")
    ax.axvline(threshold, color="black", linestyle="--", label="threshold")
    ax.set(xlabel="anomaly score", ylabel="images", title="Score distribution")
    ax.legend()
    return fig


def _examples(views, indices, threshold: float) -> str:
    cells = []
    for s, p, truth in views(indices):
        image = read_image(s.path)
        strip = panel(image, p.anomaly_map, p.mask, threshold, truth)
        if strip.shape[1] > 900:  # keep the page light
            h = int(strip.shape[0] * 900 / strip.shape[1])
            strip = np.asarray(Image.fromarray(strip).resize((900, max(h, 1))))
        elif strip.shape[0] < 200:  # small parts: enlarge, pixels kept sharp
            factor = -(-200 // strip.shape[0])
            strip = strip.repeat(factor, axis=0).repeat(factor, axis=1)
        name = safe_text(s.path.parent.name + "/" + s.path.name)
        caption = f"{html.escape(name)} — score {p.score:.4g}"
        cells.append(
            f'<figure><img src="{_png(strip)}"><figcaption>{caption}</figcaption></figure>'
        )
    return "\n".join(cells) or "<p>none</p>"


def write_report(evaluation, root: Path, path: Path, detector, views) -> None:
    """`views(indices)` gives (sample, prediction, true mask or None) for the images shown."""
    m = evaluation.metrics
    t = detector.thresholds_
    scores, labels, predicted = evaluation.scores, evaluation.labels, evaluation.predicted
    misses = [i for i in np.argsort(scores) if labels[i] == 1 and not predicted[i]]
    alarms = [i for i in np.argsort(-scores) if labels[i] == 0 and predicted[i]]
    rows = [
        ("images (defective)", f"{m['n_images']} ({m['n_defective']})"),
        ("image AUROC", f"{m['image_auroc']:.4f}"),
        ("pixel AUROC", f"{m['pixel_auroc']:.4f}" if "pixel_auroc" in m else "n/a (no masks)"),
        ("AUPRO (FPR ≤ 0.3)", f"{m['aupro']:.4f}" if "aupro" in m else "n/a (no masks)"),
        ("image F1-max", f"{m['image_f1_max']:.4f}"),
        (
            "threshold (from normal validation images)",
            f"{t.image:.4g} (target false-alarm rate {t.target_far:g}, {t.n_validation} images)",
        ),
        ("false-alarm rate at threshold", f"{m['false_alarm_rate']:.3f}"),
        ("miss rate at threshold", f"{m['miss_rate']:.3f}"),
        ("throughput", f"{m['images_per_second']:.1f} images/s"),
        ("images skipped (unreadable image or mask)", str(len(evaluation.skipped))),
    ]
    table = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    per_type = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{v['image_auroc']:.4f}</td></tr>"
        for k, v in m["per_defect_type"].items()
    )
    roc = _png(_roc_figure(evaluation))
    histogram = _png(_histogram_figure(evaluation, t.image))
    title = html.escape(safe_text(root.name))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>defectlens report — {title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1000px; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
figure {{ margin: 0 0 1em 0; }} img {{ max-width: 100%; }}
figcaption {{ font-size: 90%; color: #444; }}
</style></head><body>
<h1>defectlens — {html.escape(detector.method)} on {html.escape(safe_text(str(root)))}</h1>
<p>Backbone {html.escape(detector.backbone)}, image size {detector.image_size}.
Thresholds come from normal validation images only, never from these test labels.</p>
<table>{table}</table>
<h2>Image AUROC per defect type</h2><table>{per_type}</table>
<img src="{roc}"> <img src="{histogram}">
<h2>Worst misses (defective, scored below the threshold)</h2>
<p>Each row: image · heat map (threshold at the middle of the colour scale) ·
predicted mask in red, true mask in green.</p>
{_examples(views, misses[:N_EXAMPLES], t.pixel)}
<h2>Worst false alarms (good, scored above the threshold)</h2>
{_examples(views, alarms[:N_EXAMPLES], t.pixel)}
</body></html>
"""
    write_text_atomic(path, page)


def write_selection_report(
    rows: list[dict], path: Path, data: str, chosen: str, defects: Sequence[str]
) -> None:
    """`defectlens select`'s ranking as a self-contained HTML table (best first)."""
    columns = list(rows[0]) if rows else []
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)

    def cell(value) -> str:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        return f"<td>{html.escape(safe_text(text))}</td>"

    body = "".join("<tr>" + "".join(cell(row[c]) for c in columns) + "</tr>" for row in rows)
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>defectlens select: {html.escape(safe_text(data))}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head><body>
<h1>Configuration chosen on synthetic defects</h1>
<p>Data: {html.escape(safe_text(data))} (normal training images only; test/ is not read).
Each candidate was fitted on 80 % of them and scored on the other 20 %, each also once with
a synthetic defect of each kind ({html.escape(", ".join(defects))}).
Chosen: <strong>{html.escape(safe_text(chosen))}</strong>.</p>
<table><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table></body></html>
"""
    write_text_atomic(path, page)
