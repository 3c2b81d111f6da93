"""A fitted `Detector` -> a self-contained deployment folder that scores without torch.

    defectlens export models/bottle --format onnx --out exports/bottle

The folder holds two graphs and what the method needs beside them:
- `backbone.onnx`: images (B, 3, S, S) in [0, 1] -> the feature maps the method reads (the
  backbone's cached graph, cut to those taps; normalisation included), or the method's own
  first graph from `export_features()` (DifferNet: transformed copies, three scales, pooled;
  RegAD: the backbone with its spatial transformers, each stage returned to the image frame),
- `head.onnx`: feature maps -> the tensors the finish reads (PaDiM: the pyramid's maps, aligned;
  PatchCore: patch features; SPADE: pooled features and the pyramid's maps; DifferNet: image
  scores), exported with torch's dynamo exporter from the method's `export_head()`,
- `arrays.safetensors`: arrays the finish needs outside the graphs (PatchCore's bank, from
  which the faiss index is rebuilt at load; SPADE's training features),
- `config.json`: preprocessing, sigma, thresholds, the finish, format version, and the SHA-256
  of every file, which `runtime.deployed` checks before loading anything.
With `--format openvino` the two graphs are OpenVINO IR (`.xml` + `.bin`, weights kept fp32).
A graph larger than `external_data_bytes` (default 1.5 GiB, under protobuf's 2 GiB limit) keeps
its weights in a `.data` file beside it, which the engines load.

Nothing is half-written: the folder is assembled in a temporary sibling, loaded back with the
torch-free runtime, checked against the model on a few images (maps and scores within 1e-4
relative, or the export is refused), and only then swapped into place.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defectlens import __version__
from defectlens.errors import DefectLensError, ModelFileError, ParameterError, option
from defectlens.outputs import (
    EXPORT_FORMAT,
    MODEL_CONFIG,
    assembling,
    check_model_target,
    file_sha256,
)
from defectlens.runtime.deployed import ARRAYS, EXPORT_VERSION, INPUT, ExportedModel
from defectlens.runtime.onnx_graph import backbone_model, dynamo_export, output_name

FORMATS = ("onnx", "openvino")
EXTERNAL_DATA_BYTES = 3 << 29  # 1.5 GiB
PARITY_TOLERANCE = 1e-4  # relative to the largest value of the map or score compared


@dataclass
class ExportReport:
    """What an export wrote and how closely it matches the model it came from."""

    path: Path
    files: dict[str, int]  # name -> bytes
    seconds: float
    max_relative_difference: float  # maps and scores, fp32 export vs the model, check images
    has_maps: bool = True  # False: the export gives scores only (DifferNet)
    extra: dict[str, Any] = field(default_factory=dict)


def _relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(float(np.abs(a).max()), 1e-12)
    return float(np.abs(a - b).max()) / scale


def _save_onnx(model, path: Path, external_data_bytes: int) -> None:
    """Write an onnx.ModelProto, weights in `<name>.data` beside it if the graph is large."""
    import onnx

    if model.ByteSize() > external_data_bytes:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{path.name}.data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def _export_graph(
    module: torch.nn.Module,
    args: list[torch.Tensor],
    inputs: list[str],
    outputs: list[str],
    path: Path,
    external_data_bytes: int,
) -> None:
    """A head (or a method's own first graph) as an ONNX graph with a free batch size (the
    other sizes are the model's). The module's forward takes its inputs as *args."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    tensors = [*module.parameters(), *module.buffers()]
    size = sum(t.numel() * t.element_size() for t in tensors)
    program = dynamo_export(
        module.eval(),
        tuple(args),
        input_names=inputs,
        output_names=outputs,
        dynamic_shapes=(tuple({0: batch} for _ in args),),  # one *args / images arg
    )
    program.save(str(path), external_data=size > external_data_bytes)


def _to_openvino(folder: Path, graphs: dict[str, dict]) -> None:
    """Convert each ONNX graph in `folder` to OpenVINO IR, weights kept in fp32."""
    from defectlens.runtime.sessions import openvino_core

    openvino_core()  # a one-line error if OpenVINO is missing
    import openvino

    for graph in graphs.values():
        source = folder / graph["file"]
        target = source.with_suffix(".xml")
        model = openvino.convert_model(str(source))
        openvino.save_model(model, str(target), compress_to_fp16=False)
        for leftover in folder.glob(f"{source.name}*"):  # the graph and its .data file
            leftover.unlink()
        graph["file"] = target.name


def check_images(image_size: int, count: int = 4, seed: int = 0) -> np.ndarray:
    """Seeded smooth random images (B, 3, S, S) in [0, 1] for the export's parity check:
    low-frequency noise, so that features are not all in the saturated range."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((count, 3, 8, 8)).astype(np.float32)
    reps = image_size // 8
    return np.ascontiguousarray(np.repeat(np.repeat(coarse, reps, axis=2), reps, axis=3))


def export_detector(
    detector,
    out: str | Path,
    format: str = "onnx",
    protect: Sequence[str | Path] = (),
    external_data_bytes: int = EXTERNAL_DATA_BYTES,
    backbone_graph: Callable[[list[str]], Any] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> ExportReport:
    """Write `detector` as a deployment folder at `out`; see the module docstring.

    `backbone_graph` (outputs -> onnx.ModelProto) replaces the fp32 backbone graph (the int8
    export passes its quantised one); `extra_config` is recorded under `int8`.
    """
    start = time.perf_counter()
    if format not in FORMATS:
        raise ParameterError(f"unknown export format {format!r}; choose one of: onnx, openvino")
    model = detector.model_
    if not model.is_fitted or detector.thresholds_ is None:
        raise DefectLensError("nothing to export: the detector is not fitted")
    head = model.export_head()  # ParameterError for a method that cannot export
    spec, arrays = model.export_finish()
    target = check_model_target(out, protect, kind="export")
    extractor = detector.ensure_extractor()
    features_module = model.export_features(extractor)
    if features_module is not None and backbone_graph is not None:
        raise ParameterError(f"{detector.method} cannot be exported in int8")
    # The first graph's outputs: the backbone's taps, or the method's own features (one
    # tensor, or a tuple of them: RegAD's registered stages).
    taps = [output_name(s) for s in extractor.strides]
    names = taps
    if features_module is not None:
        with torch.no_grad():
            probe = features_module(torch.from_numpy(check_images(detector.image_size, 1)))
        count = len(probe) if isinstance(probe, tuple | list) else 0
        names = [f"features{i}" for i in range(count)] if count else ["features"]
    from defectlens.runtime.finish import Finish

    with assembling(target, "exporting") as tmp:
        example = torch.from_numpy(check_images(detector.image_size, 2))
        if features_module is None:
            backbone = (backbone_graph or (lambda o: backbone_model(extractor, o)))(names)
            _save_onnx(backbone, tmp / "backbone.onnx", external_data_bytes)
            features = [f.contiguous() for f in extractor.fast(example)]
        else:
            _export_graph(
                features_module,
                [example],
                [INPUT],
                names,
                tmp / "backbone.onnx",
                external_data_bytes,
            )
            with torch.no_grad():
                features = features_module(example)
            features = list(features) if isinstance(features, tuple | list) else [features]
        with torch.no_grad():
            out = head(*features)
        spec, outputs = Finish.REGISTRY[spec["kind"]].name_head_outputs(spec, out)
        _export_graph(head, features, names, outputs, tmp / "head.onnx", external_data_bytes)
        graphs = {
            "backbone": {"file": "backbone.onnx", "inputs": [INPUT], "outputs": names},
            "head": {"file": "head.onnx", "inputs": names, "outputs": outputs},
        }
        if arrays:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / ARRAYS))
        if format == "openvino":
            _to_openvino(tmp, graphs)
        files = sorted(p.name for p in tmp.iterdir())
        config = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_VERSION,
            "defectlens_version": __version__,
            "engine": "onnxruntime" if format == "onnx" else "openvino",
            "precision": "int8" if extra_config else "fp32",
            "method": detector.method,
            "source": {
                "detector": detector.params(),
                "supervision": detector.supervision,
                "fit_images": detector.n_fit_images_,
            },
            "preprocessing": {
                "image_size": detector.image_size,
                "resize": "bilinear-antialias",
                "range": [0.0, 1.0],
            },
            "sigma": detector.sigma,
            "batch_size": detector.batch_size,
            "thresholds": detector.thresholds_.to_dict(),
            "graphs": graphs,
            "finish": spec,
            "arrays": ARRAYS if arrays else None,
            "files": {name: file_sha256(tmp / name) for name in files},
            "int8": extra_config,
        }
        (tmp / MODEL_CONFIG).write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")
        try:
            exported = ExportedModel(tmp)
        except ModelFileError as exc:
            if format != "openvino":
                raise
            raise DefectLensError(
                "OpenVINO could not compile the converted graph (nothing was written); export "
                f"with {option('--format', value='onnx')} instead: an ONNX export runs on "
                f"OpenVINO too ({option('--backend', value='openvino')})"
            ) from exc
        difference = parity_check(detector, exported)
        has_maps = exported.has_maps
        if extra_config is None and difference > PARITY_TOLERANCE:
            raise DefectLensError(
                f"the exported graphs disagree with the model (relative difference "
                f"{difference:.2e} > {PARITY_TOLERANCE:g}); nothing was written"
            )
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    return ExportReport(target, sizes, time.perf_counter() - start, difference, has_maps)


def parity_check(detector, exported: ExportedModel) -> float:
    """Largest relative difference of raw maps and scores between the model and its export on
    seeded check images."""
    images = check_images(detector.image_size)
    raw, scores = detector.raw_scores(images)
    raw_x, scores_x = exported.raw_scores(images)
    difference = 0.0 if raw_x is None else _relative_difference(raw, raw_x)
    if scores is not None:
        difference = max(difference, _relative_difference(scores, scores_x))
    return difference
