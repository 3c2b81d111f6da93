"""int8 export: the backbone quantised statically, the method refitted on int8 features.

Static QDQ quantisation (onnxruntime.quantization: int8 weights per channel, int8 activations,
ranges calibrated on normal images) makes the backbone several times faster on a CPU but moves
its features: a Gaussian or memory bank fitted on fp32 features does not fit int8 ones. So the
int8 export is a new model, fitted again: the method is refitted on the quantised backbone's
features of the calibration images (with the model's own parameters, seed and validation split)
and its thresholds are set again from the normal validation images. Its scores therefore differ
from the fp32 model's, and the export says by how much: the score drift on the validation images,
and, when the calibration data has a labelled test set (MVTec layout), the image AUROC of both.
Dynamic int8 quantisation is not offered: on these CPUs it was slower than fp32.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from defectlens.data.dataset import find_normal_images, find_test_samples
from defectlens.data.loader import iter_batches
from defectlens.errors import DataError, DefectLensError, DefectLensWarning, ParameterError
from defectlens.metrics import auroc
from defectlens.outputs import check_model_target
from defectlens.runtime.export import ExportReport, export_detector
from defectlens.runtime.onnx_graph import INPUT, backbone_model, output_name

MAX_CALIBRATION_IMAGES = 64  # activation ranges settle well before this (min/max calibration)
MIN_CALIBRATION_IMAGES = 10  # the refit and its held-out validation share need some
UNLIKE_SAMPLE = 32  # calibration images the fp32 model scores before quantising


def _warn_if_unlike_the_model(detector, images: list, calibration) -> None:
    """Label-free: the int8 export is refitted on the calibration images, so images of another
    product would silently become its idea of normal. Most of them scoring above every normal
    validation image the fp32 model saw says so. (Its highest validation score, not its
    threshold: a threshold set by hand may be anywhere.) A sample, before minutes of work."""
    sample = images[:: max(1, len(images) // UNLIKE_SAMPLE)][:UNLIKE_SAMPLE]
    scores = np.array([p.score for p in detector.predict(sample)])
    reference = detector.thresholds_.validation_max
    above = int((scores > reference).sum())
    if above > len(sample) / 2:
        warnings.warn(
            f"{above} of {len(sample)} calibration images from {calibration} score above every "
            f"normal validation image of the model ({reference:.6g}): are they normal images of "
            "the product it was fitted on? The int8 export is refitted on them and would take "
            "them as normal",
            DefectLensWarning,
            stacklevel=3,
        )


def quantise_backbone(detector, images: list):
    """The detector's backbone graph (its taps) statically quantised to int8 QDQ, calibrated on
    `images`: an onnx.ModelProto."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    extractor = detector.ensure_extractor()
    names = [output_name(s) for s in extractor.strides]
    chosen = images[:: max(1, len(images) // MAX_CALIBRATION_IMAGES)][:MAX_CALIBRATION_IMAGES]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter_batches(chosen, detector.image_size, 8)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch.images}

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser's advice to pre-process is noise to users
    try:
        with tempfile.TemporaryDirectory(prefix="defectlens-int8-") as folder:
            fp32, int8 = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
            onnx.save_model(backbone_model(extractor, names), str(fp32))
            quantize_static(
                str(fp32),
                str(int8),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
            return onnx.load(str(int8))
    finally:
        root.setLevel(level)


def _test_auroc(model, root: Path) -> float | None:
    try:
        samples = find_test_samples(root)
    except DataError:
        return None
    labels = np.array([s.label for s in samples])
    if labels.min() == labels.max():
        return None
    scores = np.array([p.score for p in model.predict([s.path for s in samples])])
    return auroc(scores, labels)


def export_int8(
    detector,
    out: str | Path,
    calibration: str | Path,
    format: str = "onnx",
    protect=(),
    progress: bool = False,
) -> ExportReport:
    """Quantise, refit, set new thresholds, export, and measure the change; see the module."""
    from defectlens.detector import Detector
    from defectlens.runtime.backends import OnnxRuntimeBackend

    start = time.perf_counter()
    if detector.model_ is not None and not detector.model_.training_free:
        raise ParameterError(
            f"{detector.method} cannot be exported in int8 (refitting it means training again); "
            "export it in fp32"
        )
    check_model_target(out, [*protect, calibration], kind="export")  # before the slow part
    images = find_normal_images(calibration)
    if len(images) < MIN_CALIBRATION_IMAGES:  # before minutes of quantising
        raise DataError(
            f"{calibration}: {len(images)} normal image(s); an int8 export refits the method on "
            f"them and sets its threshold from a held-out share: give at least "
            f"{MIN_CALIBRATION_IMAGES} (usually the training images)"
        )
    _warn_if_unlike_the_model(detector, images, calibration)
    graph = quantise_backbone(detector, images)
    refitted = Detector(**detector.params())
    refitted.ensure_extractor().use_backend(
        OnnxRuntimeBackend(refitted.extractor_, graph=graph.SerializeToString())
    )
    try:
        refitted.fit(images, progress=progress)
    except DefectLensError as exc:
        raise DefectLensError(f"refitting on int8 features failed: {exc}") from None
    if detector.thresholds_.manual:  # it was on the fp32 scores' scale: not carried over
        warnings.warn(
            f"the model's image threshold was set by hand ({detector.thresholds_.image:.6g}); "
            "the int8 export's thresholds are set again from normal images "
            f"({refitted.thresholds_.image:.6g}), since int8 scores differ",
            DefectLensWarning,
            stacklevel=2,
        )
    _, validation = refitted.split_validation(images)
    fp32_scores = np.array([p.score for p in detector.predict(validation)])
    int8_scores = np.array([p.score for p in refitted.predict(validation)])
    drift = np.abs(int8_scores - fp32_scores) / np.maximum(np.abs(fp32_scores), 1e-12)
    info: dict[str, Any] = {
        "calibration_images": min(len(images), MAX_CALIBRATION_IMAGES),
        "refit_images": len(images) - len(validation),
        "validation_images": len(validation),
        "score_drift_median": float(np.median(drift)),
        "score_drift_max": float(drift.max()),
        "threshold_fp32": detector.thresholds_.image,
        "threshold_int8": refitted.thresholds_.image,
    }
    fp32_auroc, int8_auroc = _test_auroc(detector, Path(calibration)), None
    if fp32_auroc is not None:
        int8_auroc = _test_auroc(refitted, Path(calibration))
        info.update(test_auroc_fp32=fp32_auroc, test_auroc_int8=int8_auroc)
    report = export_detector(
        refitted, out, format, protect=protect, backbone_graph=lambda _: graph, extra_config=info
    )
    summary = [
        f"int8: refitted on {info['refit_images']} normal images, new threshold "
        f"{info['threshold_int8']:.4g} (fp32 model: {info['threshold_fp32']:.4g})",
        f"score drift vs the fp32 model on {len(validation)} validation images: median "
        f"{info['score_drift_median']:.1%}, largest {info['score_drift_max']:.1%}",
    ]
    if fp32_auroc is not None:
        summary.append(
            f"image AUROC on {calibration}'s test set: fp32 {fp32_auroc:.4f}, int8 "
            f"{int8_auroc:.4f} ({int8_auroc - fp32_auroc:+.4f})"
        )
    report.extra = {**info, "summary": summary}
    report.seconds = time.perf_counter() - start
    return report
