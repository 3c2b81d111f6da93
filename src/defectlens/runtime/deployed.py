"""An exported deployment folder, scored without torch: onnxruntime or OpenVINO, numpy, pillow
(and faiss for the nearest-neighbour methods).

    from defectlens.runtime.deployed import ExportedModel
    model = ExportedModel("exports/bottle")            # checks every file's SHA-256 first
    result = model.predict("part.png")[0]              # the same Prediction a Detector gives

Loading trusts nothing in the folder: config.json's keys and values are checked like a saved
model's, every file it lists must match its SHA-256 (a tampered or truncated graph is refused
with one line naming the file), and a graph the engine cannot read is one line too. Scoring goes
through `prediction.iter_predictions`, the loop a `Detector` uses, so images are decoded,
resized, post-processed and decided by the same code; only the graphs differ.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from defectlens import __version__
from defectlens.errors import DefectLensError, ModelFileError, option
from defectlens.outputs import EXPORT_FORMAT, MODEL_CONFIG, file_sha256, read_folder_config
from defectlens.params import MAX_SIGMA, check_choice, check_float, check_image_size, check_int
from defectlens.prediction import NORMAL_ONLY, Predictor
from defectlens.runtime.finish import Finish, make_finish
from defectlens.runtime.sessions import ENGINES, Session, open_session
from defectlens.thresholds import Thresholds

EXPORT_VERSION = 2  # 2: heads output feature maps, laid out after the graph
ARRAYS = "arrays.safetensors"
INPUT = "images"
_TOP_KEYS = {
    "format",
    "format_version",
    "defectlens_version",
    "engine",
    "precision",
    "method",
    "source",
    "preprocessing",
    "sigma",
    "batch_size",
    "thresholds",
    "graphs",
    "finish",
    "arrays",
    "files",
    "int8",
}
_GRAPH_KEYS = {"file", "inputs", "outputs"}
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,120}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_export(path: str | Path) -> bool:
    """Whether `path` is a folder whose config.json says it is a deployment export."""
    try:
        config = json.loads((Path(path) / MODEL_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and config.get("format") == EXPORT_FORMAT


def read_export_config(path: str | Path) -> dict[str, Any]:
    """config.json of an export folder, structure and every file's checksum checked."""
    path = Path(path)
    config_path, config = read_folder_config(path, "export", EXPORT_FORMAT)

    def reject(problem: str) -> ModelFileError:
        return ModelFileError(f"{config_path}: {problem}")

    version = config.get("format_version")
    if isinstance(version, bool) or version != EXPORT_VERSION:
        raise reject(
            f"export format version {version!r}, this defectlens ({__version__}) reads version "
            f"{EXPORT_VERSION}; export the model again"
        )
    unknown, missing = sorted(set(config) - _TOP_KEYS), sorted(_TOP_KEYS - set(config))
    if unknown or missing:
        raise reject(f"{'unknown' if unknown else 'missing'} key {(unknown or missing)[0]!r}")
    files = config["files"]
    if not isinstance(files, dict) or not files:
        raise reject("'files' must be an object of file names and SHA-256 digests")
    for name, digest in files.items():
        if not _SAFE_NAME.fullmatch(name) or name == MODEL_CONFIG:
            raise reject(f"file name {name[:60]!r} is not allowed")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise reject(f"files.{name} must be a SHA-256 hex digest")
        file = path / name
        if not file.is_file() or file.is_symlink():
            raise ModelFileError(f"{file}: missing (the export is incomplete)")
        if file_sha256(file) != digest:
            raise ModelFileError(f"{file}: checksum mismatch, the file is corrupt or altered")
    graphs = config["graphs"]
    if not isinstance(graphs, dict) or set(graphs) != {"backbone", "head"}:
        raise reject("'graphs' must name a backbone and a head graph")
    for role, graph in graphs.items():
        if not isinstance(graph, dict) or set(graph) != _GRAPH_KEYS:
            raise reject(f"graphs.{role} must have the keys {sorted(_GRAPH_KEYS)}")
        if not isinstance(graph["file"], str) or graph["file"] not in files:
            raise reject(f"graphs.{role}.file is not one of the listed files")
        for key in ("inputs", "outputs"):
            names = graph[key]
            if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
                raise reject(f"graphs.{role}.{key} must be a list of names")
    arrays = config["arrays"]
    if arrays is not None and (not isinstance(arrays, str) or arrays not in files):
        raise reject("'arrays' is not one of the listed files")
    return config


class ExportedModel(Predictor):
    """A deployment folder ready to score: the same `predict`/`iter_predict` as a `Detector`.

    `engine` runs the graphs: the folder's own by default; an ONNX export may also run on
    OpenVINO (which reads ONNX), an OpenVINO export only on OpenVINO.
    """

    kind = "export"

    def __init__(
        self, path: str | Path, engine: str | None = None, threads: int | None = None
    ) -> None:
        self.path = Path(path)
        config = read_export_config(self.path)
        config_path = self.path / MODEL_CONFIG
        try:
            self.engine_format = check_choice("engine", config["engine"], ENGINES)
            self.precision = check_choice("precision", config["precision"], ("fp32", "int8"))
            pre = config["preprocessing"]
            if not isinstance(pre, dict) or set(pre) != {"image_size", "resize", "range"}:
                raise DefectLensError("preprocessing must give image_size, resize and range")
            if pre["resize"] != "bilinear-antialias" or pre["range"] != [0.0, 1.0]:
                raise DefectLensError("preprocessing this version does not know")
            self.image_size = check_image_size(pre["image_size"])
            self.sigma = check_float("sigma", config["sigma"], 0.0, MAX_SIGMA)
            self.batch_size = check_int("batch_size", config["batch_size"], 1, 4096)
            self.thresholds_: Thresholds | None = Thresholds.from_dict(config["thresholds"])
            source = config["source"]
            if not (isinstance(source, dict) and isinstance(source.get("detector"), dict)):
                raise DefectLensError("source must describe the exported detector")
            if not isinstance(config["method"], str):
                raise DefectLensError("method must be a name")
            self.method = config["method"]
            # For reports and model cards only: the graphs are what scores.
            self.backbone = str(source["detector"].get("backbone", "unknown"))
            self.supervision = str(source.get("supervision", NORMAL_ONLY))
            # The exported model's parameters, as a Detector's (e.g. which anomalies it
            # learned from), for reading only.
            params = source["detector"].get("method_params")
            self.method_params: dict[str, Any] = params if isinstance(params, dict) else {}
            fit_images = source.get("fit_images")
            self.n_fit_images_ = fit_images if isinstance(fit_images, int) else None
        except DefectLensError as exc:
            raise ModelFileError(f"{config_path}: {exc}") from None
        self.config = config
        # Names this export's content (its files' checksums), for results markers.
        files = json.dumps(config["files"], sort_keys=True)
        self.identity = hashlib.sha256(files.encode()).hexdigest()
        self.engine = self.engine_format if engine is None else engine
        if self.engine not in ENGINES:
            raise DefectLensError(
                f"an exported model runs on {' or '.join(ENGINES)}, not {self.engine}"
            )
        if self.engine_format == "openvino" and self.engine != "openvino":
            raise DefectLensError(
                f"{self.path}: an OpenVINO export runs on openvino only; export with "
                f"{option('--format', value='onnx')} to run it on onnxruntime"
            )
        self.finish: Finish = self._load_finish(config_path)
        graphs = config["graphs"]
        if graphs["backbone"]["inputs"] != [INPUT]:
            raise ModelFileError(f"{config_path}: the backbone graph must take '{INPUT}'")
        if graphs["head"]["inputs"] != graphs["backbone"]["outputs"]:
            raise ModelFileError(f"{config_path}: the head must read the backbone's outputs")
        if not self.finish.accepts(graphs["head"]["outputs"]):
            raise ModelFileError(f"{config_path}: the head's outputs do not fit its finish")
        self.backbone_session: Session = self._open(graphs["backbone"], threads)
        self.head_session: Session = self._open(graphs["head"], threads)
        self._check_head_fits_image_size(config_path)

    def _check_head_fits_image_size(self, config_path: Path) -> None:
        """The head graph is exported for one image size: its stride-s inputs are fixed at
        image_size / s. A config.json whose image size was edited would otherwise fail at
        the first image, inside the engine."""
        for name, shape in self.head_session.input_shapes().items():
            stride = name.removeprefix("stride")
            if not (stride.isdigit() and len(shape) == 4):
                continue
            want = self.image_size // int(stride)
            if any(d is not None and d != want for d in shape[2:]):
                sides = "x".join("?" if d is None else str(d) for d in shape[2:])
                raise ModelFileError(
                    f"{config_path}: preprocessing.image_size {self.image_size} does not match "
                    f"the head graph (its {name} input is {sides}, which "
                    f"{int(stride) * shape[2] if shape[2] else '?'} px images give)"
                )

    def _open(self, graph: dict[str, Any], threads: int | None) -> Session:
        return open_session(self.engine, self.path / graph["file"], graph["outputs"], threads)

    def _load_finish(self, config_path: Path) -> Finish:
        arrays: dict[str, np.ndarray] = {}
        if self.config["arrays"] is not None:
            from safetensors import SafetensorError
            from safetensors.numpy import load_file

            file = self.path / self.config["arrays"]
            try:
                arrays = load_file(str(file))
            except (SafetensorError, OSError, ValueError) as exc:
                raise ModelFileError(f"{file}: corrupt array file ({str(exc)[:120]})") from None
            for name, array in arrays.items():
                if array.dtype.kind == "f" and not np.isfinite(array).all():
                    raise ModelFileError(f"{file}: array {name!r} holds NaN or infinite values")
        try:
            return make_finish(self.config["finish"], arrays)
        except DefectLensError as exc:
            raise ModelFileError(f"{config_path}: {exc}") from None

    # -- scoring ---------------------------------------------------------------------------
    def raw_scores(self, images: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Raw maps (B, h, w) (None for a scores-only export) and the method's own scores for
        preprocessed images (B, 3, S, S) float32 in [0, 1]: first graph, head graph, finish."""
        features = self.backbone_session.run({INPUT: np.ascontiguousarray(images, np.float32)})
        outputs = self.head_session.run(dict(zip(self.head_inputs, features, strict=True)))
        maps, scores = self.finish(outputs)
        maps = None if maps is None else np.asarray(maps, np.float32)
        return maps, None if scores is None else np.asarray(scores)

    @property
    def has_maps(self) -> bool:
        """False for an export that scores images without anomaly maps (DifferNet)."""
        return self.finish.gives_maps

    @property
    def head_inputs(self) -> list[str]:
        return self.config["graphs"]["head"]["inputs"]
