"""`defectlens serve`."""

from __future__ import annotations

from pathlib import Path

import click

from defectlens.blas import numpy_blas_single_threaded
from defectlens.cli.common import (
    FiniteFloat,
    backend_option,
    echo,
    warn,
)
from defectlens.errors import DefectLensError
from defectlens.loading import load_model


def _check_port_free(host: str, port: int) -> None:
    """A taken port or an unknown address is a one-line error before any model is served."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise DefectLensError(f"--host {host}: cannot resolve it ({exc})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            reason = "in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise DefectLensError(
                f"cannot listen on {host}:{port} ({reason}); choose another --port or --host"
            ) from None


@click.command()
@click.argument("models", nargs=-1, required=True, metavar="MODEL_DIR...")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. The default answers this machine only; use 0.0.0.0 (with "
    "--api-key-file) for cameras on the network.",
)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="File holding an API key that every /v1 and /metrics request must send (X-API-Key "
    "header or 'Authorization: Bearer KEY'). Default: no key.",
)
@click.option(
    "--max-upload-mb",
    type=FiniteFloat(min=0.001),
    default=20.0,
    show_default=True,
    help="Largest request body; larger ones get 413 before they are read.",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=50_000_000,
    show_default=True,
    help="Largest image (width x height from its header); larger ones get 413 before any "
    "pixel is decoded (decompression bombs). Lower than the other commands' 67108864: a "
    "service reads images from the network.",
)
@click.option(
    "--max-images",
    type=click.IntRange(1, 1024),
    default=32,
    show_default=True,
    help="Most images in one request.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1, 1024),
    default=16,
    show_default=True,
    help="Most images scored together; concurrent requests are batched up to this.",
)
@click.option(
    "--max-wait-ms",
    type=FiniteFloat(0, 1000),
    default=20.0,
    show_default=True,
    help="Most a batch waits for company: for requests still being read, and for as many "
    "requests as were recently in the service at once (a lone client never waits). 0 "
    "scores whatever is queued at once.",
)
@click.option(
    "--queue-size",
    type=click.IntRange(1, 100_000),
    default=64,
    show_default=True,
    help="Requests waiting per model; when full, new ones get 503 at once.",
)
@click.option(
    "--timeout",
    type=FiniteFloat(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds a request may wait for its scores before it gets 504 (and the grace "
    "period for in-flight requests at shutdown).",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    metavar="ORIGIN",
    help="Allow browser pages from ORIGIN (e.g. https://line-pc:3000) to call the API. "
    "Default: none (CORS off).",
)
@backend_option
def serve(
    models,
    host,
    port,
    api_key_file,
    max_upload_mb,
    max_pixels,
    max_images,
    max_batch,
    max_wait_ms,
    queue_size,
    timeout,
    cors_origins,
    backend,
) -> None:
    """Serve models over HTTP: a REST API under /v1 (OpenAPI page at /docs), Prometheus
    metrics at /metrics, and the dashboard at /.

    Each MODEL_DIR is a saved model or an exported folder; its folder name is its name in
    the API (POST /v1/models/NAME/predict). A metrics.json placed in a model folder (from
    `defectlens evaluate`) is shown on its model card if it was made with that model's
    threshold. Ctrl-C or SIGTERM stops accepting
    requests and finishes the ones in flight.
    """
    import uvicorn

    from defectlens.allocator import limit_arenas
    from defectlens.serve.app import MODEL_NAME, ServeSettings, card_metrics, create_app

    limit_arenas()  # before loading starts the engines' threads: memory levels off under load
    numpy_blas_single_threaded()  # single images: 25 instead of 35 ms (defectlens.blas)

    api_key = None
    if api_key_file is not None:
        try:
            api_key = Path(api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise DefectLensError(f"{api_key_file}: cannot read the API key ({exc})") from None
        if not api_key:
            raise DefectLensError(f"{api_key_file}: empty; put the API key in it")
        # A header carries one line of visible ASCII: any other key could never be sent, and
        # every request would be refused with 401.
        if not all("!" <= c <= "~" for c in api_key):
            raise DefectLensError(
                f"{api_key_file}: the API key must be one line of printable ASCII without "
                "spaces (a client sends it in a header)"
            )
    loaded, metrics = {}, {}
    for folder in models:
        name = Path(folder).resolve().name
        if not MODEL_NAME.fullmatch(name):
            raise DefectLensError(
                f"{folder}: its folder name {name!r} is its API name and must use letters, "
                "digits, '_', '.' or '-' (rename the folder)"
            )
        if name in loaded:
            raise DefectLensError(f"two models are named {name!r}: rename one folder")
        predictor = load_model(folder, backend=backend)
        if predictor.thresholds_ is None:
            raise DefectLensError(f"{folder}: the model has no thresholds")
        loaded[name] = predictor
        metrics_file = Path(folder) / "metrics.json"
        if metrics_file.is_file():
            try:
                text = metrics_file.read_text(encoding="utf-8")
                metrics[name] = card_metrics(text, predictor)
            except (OSError, ValueError, RecursionError) as exc:
                warn(f"{metrics_file}: not shown on the model card ({exc})")
    settings = ServeSettings(
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_pixels=max_pixels,
        max_images=max_images,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        queue_size=queue_size,
        timeout_s=timeout,
        api_key=api_key,
        cors_origins=tuple(cors_origins),
    )
    _check_port_free(host, port)  # a host that cannot be resolved is refused here first
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        warn(f"serving on {host} without --api-key-file: anyone who reaches it can use it")
    app = create_app(loaded, settings, metrics)
    shown = f"[{host}]" if ":" in host else host
    echo(f"serving {', '.join(loaded)} on http://{shown}:{port}/ (API docs: /docs)")
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=max(1, int(timeout)),
    )
