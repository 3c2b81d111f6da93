"""The FastAPI application: routes, limits, errors and the dashboard's files.

Layout (as FastAPI's docs suggest for a small service): `create_app` builds one app from
loaded models and `ServeSettings`; request guards (size, content type, key) run before any
body is parsed; scoring goes through `batching.Batcher`; what is counted is
`metrics.ServiceMetrics`. The app never opens a path taken from a request: uploads are
decoded in memory, result images live in a bounded in-memory store, and the dashboard's files
are read once from the package at start.

Errors are JSON, `{"error": {"code": ..., "message": ...}}`, with the matching 4xx/5xx status
and never a stack trace: 401 missing or wrong key, 404 unknown model or result, 413 upload
or image too large, 415 not multipart or not an image type, 422 not a readable image (empty,
truncated, corrupt) or bad parameters, 503 queue full or shutting down, 504 scoring timed out.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from scipy import ndimage
from starlette.exceptions import HTTPException as StarletteHTTPException

from defectlens import __version__
from defectlens.data.images import read_image_bytes
from defectlens.errors import DataError, PixelLimitError
from defectlens.prediction import Prediction, Predictor
from defectlens.report.overlay import result_pngs
from defectlens.results import one_line
from defectlens.serve.batching import Batcher, QueueFull
from defectlens.serve.metrics import ServiceMetrics

log = logging.getLogger("defectlens.serve")
# The multipart parser logs each malformed body it meets as a warning; with no handler of its
# own, Python prints that bare line on the server's stderr. A malformed body is the client's
# error, answered with a 400 and counted in /metrics: nothing for the server's operator.
logging.getLogger("python_multipart").setLevel(logging.ERROR)

OUTPUTS = ("overlay", "map", "mask")
# Error codes of the statuses the framework raises itself (our own errors carry theirs).
HTTP_ERROR_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_BOXES = 50
# Open even with an API key: the page, the health checks and the API's own documentation.
_OPEN_PATHS = ("/", "/healthz", "/readyz", "/favicon.ico", "/docs", "/openapi.json")


@dataclass(frozen=True)
class ServeSettings:
    """The service's limits; `defectlens serve --help` documents each."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_images: int = 32  # per request
    max_batch: int = 16
    max_wait_ms: float = 20.0
    queue_size: int = 64
    timeout_s: float = 30.0
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    result_store: int = 256  # result images kept for a one-time fetch
    result_ttl_s: float = 300.0


class ServiceError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


@dataclass
class ServedModel:
    name: str
    predictor: Predictor
    batcher: Batcher
    card: dict[str, Any]


@dataclass
class _ResultStore:
    """PNG results to fetch once by an unguessable token; bounded in count and age."""

    capacity: int
    ttl_s: float
    items: OrderedDict = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, png: bytes) -> str:
        token = secrets.token_urlsafe(18)
        with self.lock:
            self.items[token] = (time.monotonic(), png)
            while len(self.items) > self.capacity:
                self.items.popitem(last=False)
        return token

    def take(self, token: str) -> bytes | None:
        with self.lock:
            entry = self.items.pop(token, None)
        if entry is None or time.monotonic() - entry[0] > self.ttl_s:
            return None
        return entry[1]


def card_metrics(text: str, predictor: Predictor) -> dict:
    """An evaluation's metrics.json (its text) for `predictor`'s card, or ValueError saying why
    not: a card must not show another model's metrics. evaluate records the threshold it
    scored with, so a file whose threshold is not this model's came from another model (or
    from this one before it was refitted or recalibrated)."""
    metrics = json.loads(text)
    if not isinstance(metrics, dict):
        raise ValueError("not a JSON object")
    recorded = metrics.get("threshold")
    image = recorded.get("image") if isinstance(recorded, dict) else None
    ours = predictor.thresholds_.image if predictor.thresholds_ is not None else None
    if image is not None and not isinstance(image, int | float):
        raise ValueError(f"its threshold is not a number ({image!r})")
    if image is not None and image != ours:
        raise ValueError(
            f"it was made with threshold {image:.6g}, this model's is {ours:.6g}: an evaluation "
            "of another model, or of this one before it was refitted; evaluate it again"
        )
    return metrics


def model_card(name: str, predictor: Predictor, metrics: dict | None) -> dict[str, Any]:
    """What `GET /v1/models` says about a model."""
    t = predictor.thresholds_
    card: dict[str, Any] = {
        "name": name,
        "kind": predictor.kind,
        "method": predictor.method,
        "backbone": predictor.backbone,
        "image_size": predictor.image_size,
        "thresholds": None if t is None else t.to_dict(),
        "validation_images": None if t is None else t.n_validation,
        "training_images": predictor.n_fit_images_,
        "supervision": predictor.supervision,
        "metrics": metrics,
    }
    return card


def create_app(
    models: dict[str, Predictor],
    settings: ServeSettings | None = None,
    metrics: dict[str, dict] | None = None,
) -> FastAPI:
    """The service over `models` (name -> fitted Detector or ExportedModel). `metrics`: an
    evaluation's metrics.json per model name, for the model cards."""
    settings = settings or ServeSettings()
    if not models:
        raise ValueError("serve needs at least one model")
    for name, predictor in models.items():
        if not MODEL_NAME.fullmatch(name):
            raise ValueError(f"model name {name!r}: use letters, digits, '_', '.', '-'")
        if predictor.thresholds_ is None:
            raise ValueError(f"model {name!r} has no thresholds: fit or calibrate it first")
    static = {
        name: (resources.files("defectlens.serve").joinpath("static", name).read_bytes(), kind)
        for name, kind in STATIC_FILES.items()
    }
    served: dict[str, ServedModel] = {}
    counters = ServiceMetrics({n: p.thresholds_ for n, p in models.items()})
    store = _ResultStore(settings.result_store, settings.result_ttl_s)
    state = {"in_flight": 0, "closing": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for name, predictor in models.items():
            batcher = Batcher(
                predictor,
                settings.max_batch,
                settings.max_wait_ms / 1000,
                settings.queue_size,
                on_batch=partial(counters.batch, name),
            )
            card = model_card(name, predictor, (metrics or {}).get(name))
            served[name] = ServedModel(name, predictor, batcher, card)
        yield
        state["closing"] = True  # new scoring refused; queued requests still finish
        for model in served.values():
            await run_in_threadpool(model.batcher.close, settings.timeout_s)

    app = FastAPI(
        title="defectlens inspection service",
        version=__version__,
        summary="Score images against fitted anomaly-detection models.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load Swagger UI from a CDN: ours is served locally
        redoc_url=None,
    )
    docs_assets = _swagger_assets()
    app.state.metrics = counters

    # -- errors -------------------------------------------------------------------------------
    def error_response(status: int, code: str, message: str, headers=None) -> JSONResponse:
        counters.error(code)
        body = {"error": {"code": code, "message": message}}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_ERROR_CODES.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 400 and "multipart" in message.lower():
            message = (
                "the body is not valid multipart/form-data: send each image as a file in the "
                "field 'images' (curl -F images=@part.png)"
            )
        return error_response(exc.status_code, code, message)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request"
        if first.get("type") == "missing" and "images" in where:
            message = "no images: send one or more files in the multipart field 'images'"
        elif where.startswith("images") and "UploadFile" in str(first.get("msg")):
            message = (
                f"{where}: text, not a file: send each image as a file in the multipart field "
                "'images' (curl -F images=@part.png, not -F images=part.png)"
            )
        return error_response(422, "invalid_request", message)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return error_response(500, "internal", "internal error; the server log has the details")

    # -- guards and accounting (plain ASGI: runs before any body is read) ----------------------
    def route_of(scope) -> str:
        """The route template a request refused before routing (413, 415, 401) was for, so
        /metrics counts it under its route, not as "unmatched"."""
        from starlette.routing import Match

        for route in app.router.routes:
            if route.matches(scope)[0] == Match.FULL:
                return getattr(route, "path", "unmatched")
        return "unmatched"

    class Guard:
        def __init__(self, app) -> None:
            self.app = app

        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            start, status = time.perf_counter(), [500]

            async def send_status(message) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            state["in_flight"] += 1
            try:
                refusal = self.refuse(scope)
                if refusal is not None:
                    await refusal(scope, receive, send_status)
                    return
                await self.app(scope, self.limited(receive), send_status)
            except _TooLarge as exc:  # raised outside a route's body parsing
                await error_response(413, "too_large", exc.detail)(scope, receive, send_status)
            finally:
                state["in_flight"] -= 1
                label = getattr(scope.get("route"), "path", None) or route_of(scope)
                counters.request(label, status[0], time.perf_counter() - start)

        def refuse(self, scope) -> Response | None:
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            path = scope["path"]
            if settings.api_key is not None and not (
                path in _OPEN_PATHS or path.startswith(("/static/", "/docs-assets/"))
            ):
                given = headers.get("x-api-key", "")
                scheme, _, token = headers.get("authorization", "").partition(" ")
                if not given and scheme.lower() == "bearer":  # schemes are case-insensitive
                    given = token.strip()
                if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                    what = "wrong API key" if given else "missing API key"
                    return error_response(
                        401,
                        "unauthorized",
                        f"{what}: send it in the X-API-Key header",
                        {"WWW-Authenticate": "Bearer"},
                    )
            if scope["method"] == "POST" and path.endswith("/predict"):
                length = headers.get("content-length", "")
                if length.isdigit() and int(length) > settings.max_upload_bytes:
                    limit = settings.max_upload_bytes
                    return error_response(
                        413, "too_large", f"upload is over the limit of {limit:,} bytes"
                    )
                kind = headers.get("content-type", "")
                if not kind.lower().startswith("multipart/form-data"):
                    return error_response(
                        415,
                        "unsupported_media_type",
                        f"send images as multipart/form-data (field 'images'), not "
                        f"{kind or 'a body without a content type'}",
                    )
            return None

        def limited(self, receive):
            seen = [0]

            async def wrapped():
                message = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > settings.max_upload_bytes:
                        raise _TooLarge(settings.max_upload_bytes)
                return message

            return wrapped

    app.add_middleware(Guard)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Authorization"],
        )

    # -- routes -------------------------------------------------------------------------------
    def get_model(name: str) -> ServedModel:
        if name not in served:
            known = ", ".join(sorted(served))
            raise ServiceError(404, "unknown_model", f"no model {name!r}; served: {known}")
        return served[name]

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz() -> JSONResponse:
        """Every model is loaded and its scoring worker runs (503 otherwise, or while
        shutting down)."""
        ready = (
            bool(served) and not state["closing"] and all(m.batcher.alive for m in served.values())
        )
        body = {"status": "ready" if ready else "not ready", "models": sorted(served)}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        """Counters, latencies, score histograms and the drift signal (Prometheus text)."""
        depths = {n: m.batcher.depth for n, m in served.items()}
        text = counters.render(depths, state["in_flight"])
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", tags=["models"])
    async def list_models() -> dict:
        """Every served model's card: method, backbone, image size, thresholds, image counts,
        what it learned from, evaluation metrics if given, and its drift signal."""
        return {"models": [{**m.card, "drift": counters.drift(n)} for n, m in served.items()]}

    @app.get("/v1/models/{name}", tags=["models"])
    async def one_model(name: str) -> dict:
        """One model's card."""
        model = get_model(name)
        return {**model.card, "drift": counters.drift(name)}

    @app.get("/v1/recent", tags=["results"])
    async def recent(
        model: str | None = None,
        after: Annotated[int, Query(ge=0, description="only results with a larger id")] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    ) -> dict:
        """The most recent results (scored or refused images), newest last."""
        if model is not None:
            get_model(model)
        return {"results": counters.recent_results(model, after, limit)}

    @app.get("/v1/results/{token}", tags=["results"], response_class=Response)
    async def result_image(token: str) -> Response:
        """A result image from a predict call with `encoding=url`; each is served once."""
        png = store.take(token)
        if png is None:
            raise ServiceError(404, "not_found", "no such result (each is served once, for 5 min)")
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.post("/v1/models/{name}/predict", tags=["models"])
    async def predict(
        name: str,
        images: Annotated[list[UploadFile], File(description="one or more image files")],
        outputs: Annotated[
            str, Query(description="comma-separated result images: overlay, map, mask")
        ] = "",
        encoding: Annotated[str, Query(pattern="^(base64|url)$")] = "base64",
    ) -> dict:
        """Score one or more images: per image the score, decision, threshold, defect pixel
        count and bounding boxes of the defect regions; with `outputs`, the overlay, anomaly
        map (coloured, threshold at mid-scale) and mask as PNG (base64 data URLs, or URLs to
        fetch once)."""
        model = get_model(name)
        wanted = [o for o in (s.strip() for s in outputs.split(",")) if o]
        unknown = sorted(set(wanted) - set(OUTPUTS))
        if unknown:
            raise ServiceError(
                422, "invalid_request", f"unknown outputs {unknown}; choose from {list(OUTPUTS)}"
            )
        if state["closing"]:
            raise ServiceError(503, "shutting_down", "the service is shutting down")
        if len(images) > settings.max_images:
            raise ServiceError(
                413, "too_many_images", f"{len(images)} images; at most {settings.max_images}"
            )
        started = time.perf_counter()
        model.batcher.announce()
        try:
            decoded = []
            for i, upload in enumerate(images):
                try:
                    decoded.append(await _decode(upload, i, settings))
                except ServiceError as exc:  # listed on the dashboard as an error
                    counters.failed(name, _clean_name(upload.filename, i), exc.message)
                    raise
            try:
                future = model.batcher.submit([rgb for _, rgb, _ in decoded])
            except QueueFull:
                raise ServiceError(
                    503, "busy", "the scoring queue is full; retry shortly", {"Retry-After": "1"}
                ) from None
        finally:
            model.batcher.withdraw()
        try:
            results = await asyncio.wait_for(asyncio.wrap_future(future), settings.timeout_s)
        except TimeoutError:
            future.cancel()
            raise ServiceError(
                504, "timeout", f"scoring took longer than {settings.timeout_s:g} s"
            ) from None
        thresholds = model.predictor.thresholds_
        body = []
        for (filename, rgb, notes), result in zip(decoded, results, strict=True):
            if isinstance(result, Exception):
                counters.failed(name, filename, str(result))
                raise ServiceError(422, "unscorable", f"{filename}: {result}")
            counters.scored(name, filename, result.score, result.is_anomalous)
            entry = _describe(result, filename, thresholds.image, notes)
            if wanted:
                pngs = await run_in_threadpool(
                    result_pngs,
                    rgb,
                    result.anomaly_map,
                    result.mask,
                    thresholds.pixel,
                    tuple(wanted),
                    1,
                )
                entry["outputs"] = {
                    k: ("data:image/png;base64," + base64.b64encode(v).decode("ascii"))
                    if encoding == "base64"
                    else f"/v1/results/{store.put(v)}"
                    for k, v in pngs.items()
                }
            body.append(entry)
        return {
            "model": name,
            "results": body,
            "seconds": time.perf_counter() - started,
        }

    @app.get("/docs", include_in_schema=False)
    async def api_docs() -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="defectlens API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
        )

    @app.get("/docs-assets/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        if name not in docs_assets:  # a fixed set, read at start
            raise ServiceError(404, "not_found", "no such file")
        content, kind = docs_assets[name]
        return Response(content, media_type=kind, headers={"Cache-Control": "max-age=86400"})

    @app.get("/", include_in_schema=False)
    async def dashboard() -> Response:
        content, kind = static["index.html"]
        return Response(content, media_type=kind, headers=_STATIC_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if name not in static:  # a fixed set, read at start: no request path reaches the disk
            raise ServiceError(404, "not_found", "no such file")
        content, kind = static[name]
        return Response(content, media_type=kind, headers=_STATIC_HEADERS)

    return app


_STATIC_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
}


def _swagger_assets() -> dict[str, tuple[bytes, str]]:
    """Swagger UI 5's files as the `fastapi-offline` package ships them, so /docs works
    offline (only its files are used, not its FastAPI subclass)."""
    kinds = {
        "swagger-ui-bundle.js": "text/javascript",
        "swagger-ui.css": "text/css",
        "favicon.png": "image/png",
    }
    folder = resources.files("fastapi_offline").joinpath("static")
    return {name: (folder.joinpath(name).read_bytes(), kind) for name, kind in kinds.items()}


class _TooLarge(StarletteHTTPException):
    """The request body passed the upload limit while it was being read (an HTTP exception,
    so that FastAPI's body parsing passes it on instead of calling it a parse error)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"upload is over the limit of {limit:,} bytes")


def _clean_name(name: str | None, index: int) -> str:
    """The upload's file name for messages and results (never used as a path)."""
    return one_line(name or "")[-120:] or f"image {index}"


async def _decode(
    upload: UploadFile, index: int, settings: ServeSettings
) -> tuple[str, np.ndarray, list[str]]:
    """An upload's name, decoded pixels and decoding notes; refused with the right status."""
    filename = _clean_name(upload.filename, index)
    kind = (upload.content_type or "").split(";")[0].strip().lower()
    if kind and not (kind.startswith("image/") or kind == "application/octet-stream"):
        raise ServiceError(
            415, "unsupported_media_type", f"{filename}: {kind} is not an image type"
        )
    data = await upload.read()
    try:
        rgb, notes = await run_in_threadpool(read_image_bytes, data, filename, settings.max_pixels)
    except PixelLimitError as exc:
        raise ServiceError(413, "too_large", str(exc)) from None
    except DataError as exc:
        raise ServiceError(422, "not_an_image", str(exc)) from None
    return filename, rgb, notes


def _boxes(mask: np.ndarray | None) -> list[dict[str, int]]:
    """Bounding boxes of the mask's connected regions (8-connected), largest first."""
    if mask is None or not mask.any():
        return []
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    boxes = []
    for i, region in enumerate(ndimage.find_objects(labels)):
        rows, cols = region
        boxes.append(
            {
                "x": int(cols.start),
                "y": int(rows.start),
                "width": int(cols.stop - cols.start),
                "height": int(rows.stop - rows.start),
                "pixels": int(sizes[i]),
            }
        )
    boxes.sort(key=lambda b: -b["pixels"])
    return boxes[:MAX_BOXES]


def _describe(result: Prediction, filename: str, threshold: float, notes: list) -> dict:
    return {
        "filename": filename,
        "score": result.score,
        "decision": "defective" if result.is_anomalous else "good",
        "threshold": threshold,
        "defect_pixels": None if result.mask is None else int(result.mask.sum()),
        "height": result.size[0],
        "width": result.size[1],
        "boxes": _boxes(result.mask),
        "warnings": list(notes),
    }
