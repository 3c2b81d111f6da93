"""The inspection service through FastAPI's test client: every endpoint, every refusal with
its status and a JSON message (never a trace), scores equal to `defectlens predict`'s,
result images, metrics with the drift signal, and the batching worker: concurrent requests
share a batch, a full queue refuses at once, closing finishes what was queued."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from defectlens.prediction import Predictor
from defectlens.serve.app import ServeSettings, create_app
from defectlens.serve.batching import Batcher, QueueFull
from tests.conftest import run_cli

KEY = "s3cret-key"


def png_bytes(array: np.ndarray) -> bytes:
    """A PNG of `array`: uint16 (H, W) becomes a 16-bit grey PNG."""
    buffer = io.BytesIO()
    if array.dtype == np.uint16:
        image = Image.new("I;16", array.shape[::-1])
        image.frombytes(array.astype("<u2").tobytes())
    else:
        image = Image.fromarray(array)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def post(client, files, model="brick", params="", headers=None):
    parts = [("images", f) for f in files]
    return client.post(f"/v1/models/{model}/predict{params}", files=parts, headers=headers)


@pytest.fixture(scope="module")
def client(fitted):
    with TestClient(create_app({"brick": fitted})) as c:
        yield c


@pytest.fixture(scope="module")
def good_path(brick_root):
    return brick_root / "test" / "good" / "000.png"


@pytest.fixture(scope="module")
def bad_path(brick_root):
    return brick_root / "test" / "hole" / "000.png"


def assert_refused(response, status: int, code: str, text: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and text in error["message"], error
    assert "Traceback" not in response.text


def test_health_readiness_and_the_model_card(client, fitted):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == ["brick"]
    (card,) = client.get("/v1/models").json()["models"]
    assert card["name"] == "brick" and card["method"] == "padim" and card["kind"] == "model"
    assert card["image_size"] == fitted.image_size
    assert card["thresholds"]["image"] == fitted.thresholds_.image
    assert card["training_images"] == fitted.n_fit_images_ > 0
    assert card["validation_images"] == fitted.thresholds_.n_validation
    assert card["supervision"] == "normal images only"
    assert client.get("/v1/models/brick").json()["name"] == "brick"
    assert "/v1/models/{name}/predict" in client.get("/openapi.json").json()["paths"]
    docs = client.get("/docs")  # Swagger UI from the package, not a CDN: works offline
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower()
    asset = client.get("/docs-assets/swagger-ui-bundle.js")
    assert asset.status_code == 200 and asset.headers["content-type"].startswith("text/javascript")


def test_a_card_shows_only_metrics_made_with_this_models_threshold(fitted, brick_root, tmp_path):
    from defectlens.evaluation import evaluate
    from defectlens.serve.app import card_metrics

    evaluate(fitted, brick_root, tmp_path / "e")
    text = (tmp_path / "e" / "metrics.json").read_text()
    assert card_metrics(text, fitted)["image_auroc"] > 0.5
    other = json.loads(text)
    other["threshold"]["image"] += 1.0  # an evaluation of another model
    with pytest.raises(ValueError, match="another model"):
        card_metrics(json.dumps(other), fitted)
    with pytest.raises(ValueError, match="not a JSON object"):
        card_metrics("[1, 2]", fitted)


def test_scores_equal_the_command_lines(
    client, model_dir, good_path, bad_path, monkeypatch, capsys
):
    files = [(p.name, p.read_bytes(), "image/png") for p in (good_path, bad_path)]
    response = post(client, files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "predict", model_dir, good_path, bad_path, "--json", "--quiet"
    )
    assert code == 0
    expected = [json.loads(line) for line in stdout.splitlines()]
    # the same two images in one batch each way: the same sums in the same order
    assert [r["score"] for r in results] == [e["score"] for e in expected]
    assert [r["decision"] for r in results] == [e["predicted"] for e in expected]
    assert [r["defect_pixels"] for r in results] == [e["defect_pixels"] for e in expected]
    good, bad = results
    assert good["filename"] == good_path.name and good["threshold"] > 0
    assert bad["decision"] == "defective" and bad["boxes"]
    box = bad["boxes"][0]
    assert 0 < box["pixels"] <= box["width"] * box["height"] and box["x"] + box["width"] <= 128


def test_result_images_inline_and_fetched_once(client, bad_path):
    files = [(bad_path.name, bad_path.read_bytes(), "image/png")]
    inline = post(client, files, params="?outputs=overlay,map,mask").json()["results"][0]
    for kind in ("overlay", "map", "mask"):
        data = inline["outputs"][kind]
        assert data.startswith("data:image/png;base64,")
        picture = Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1])))
        assert picture.size == (128, 128)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(inline["outputs"]["mask"][22:]))))
    assert int((mask > 0).sum()) == inline["defect_pixels"]
    linked = post(client, files, params="?outputs=overlay&encoding=url").json()["results"][0]
    url = linked["outputs"]["overlay"]
    first = client.get(url)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert_refused(client.get(url), 404, "not_found", "served once")
    assert_refused(post(client, files, params="?outputs=heatmap"), 422, "invalid_request")


def test_sixteen_bit_and_rgba_images_score_as_the_command_line_reads_them(
    client, fitted, good_path, tmp_path
):
    rgb = np.asarray(Image.open(good_path).convert("RGB"))
    deep = (rgb[:, :, 0].astype(np.uint16) * 257).astype(np.uint16)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])
    for name, data in (("deep.png", png_bytes(deep)), ("alpha.png", png_bytes(rgba))):
        path = tmp_path / name
        path.write_bytes(data)
        response = post(client, [(name, data, "image/png")])
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["score"] == fitted.predict(path)[0].score


@pytest.mark.parametrize(
    ("data", "kind", "status", "code", "text"),
    [
        (b"", "image/png", 422, "not_an_image", "empty (0 bytes)"),
        (b"hello, not an image", "image/png", 422, "not_an_image", "not in an image format"),
        (b"%PDF-1.4", "application/pdf", 415, "unsupported_media_type", "not an image type"),
    ],
)
def test_uploads_that_are_not_images_are_refused(client, data, kind, status, code, text):
    assert_refused(post(client, [("x.png", data, kind)]), status, code, text)


def test_a_truncated_image_is_refused_and_listed_as_an_error(client, good_path):
    data = good_path.read_bytes()
    response = post(client, [("cut.png", data[: len(data) // 2], "image/png")])
    assert_refused(response, 422, "not_an_image", "cut.png")
    last = client.get("/v1/recent").json()["results"][-1]
    assert last["filename"] == "cut.png" and last["decision"] == "error" and last["score"] is None
    assert "cut.png" in last["error"]


def test_requests_the_service_cannot_take(client):
    assert_refused(
        post(client, [("a.png", b"x", "image/png")], model="nope"),
        404,
        "unknown_model",
        "served: brick",
    )
    as_json = client.post("/v1/models/brick/predict", json={"image": "a.png"})
    assert_refused(as_json, 415, "unsupported_media_type", "multipart/form-data")
    empty = client.post("/v1/models/brick/predict", files={"other": ("a.txt", b"1")})
    assert_refused(empty, 422, "invalid_request", "no images")
    assert_refused(client.get("/v1/nothing"), 404, "not_found")
    assert_refused(client.get("/static/../../etc/passwd"), 404, "not_found")


def test_malformed_bodies_and_text_fields_get_the_service_own_words(client, capsys):
    garbage = client.post(
        "/v1/models/brick/predict",
        content=b"xxxxxxxx not multipart",
        headers={"content-type": "multipart/form-data; boundary=abc"},
    )
    assert_refused(garbage, 400, "invalid_request", "not valid multipart/form-data")
    assert "boundary character" not in capsys.readouterr().err  # no stray parser line
    text = client.post("/v1/models/brick/predict", files={"images": (None, "part.png")})
    assert_refused(text, 422, "invalid_request", "text, not a file")
    assert "UploadFile" not in text.text


def test_limits_on_size_pixels_and_count(fitted, good_path):
    settings = ServeSettings(max_upload_bytes=50_000, max_pixels=100_000, max_images=2)
    with TestClient(create_app({"brick": fitted}, settings)) as client:
        big = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
        assert_refused(
            post(client, [("big.png", png_bytes(big), "image/png")]),
            413,
            "too_large",
            "50,000 bytes",
        )
        # a bomb: few bytes, a header claiming 1000 x 1000 pixels, never decoded
        bomb = png_bytes(np.zeros((1000, 1000), np.uint8))
        assert len(bomb) < 50_000
        assert_refused(
            post(client, [("bomb.png", bomb, "image/png")]),
            413,
            "too_large",
            "over the limit of 100,000",
        )
        three = [("g.png", good_path.read_bytes(), "image/png")] * 3
        assert_refused(post(client, three), 413, "too_many_images", "at most 2")


def test_an_api_key_guards_the_api_but_not_the_page(fitted, good_path):
    settings = ServeSettings(api_key=KEY)
    with TestClient(create_app({"brick": fitted}, settings)) as client:
        files = [("g.png", good_path.read_bytes(), "image/png")]
        assert_refused(post(client, files), 401, "unauthorized", "missing API key")
        assert_refused(
            post(client, files, headers={"X-API-Key": "wrong"}),
            401,
            "unauthorized",
            "wrong API key",
        )
        assert_refused(client.get("/metrics"), 401, "unauthorized")
        assert post(client, files, headers={"X-API-Key": KEY}).status_code == 200
        for scheme in ("Bearer", "bearer"):  # auth schemes are case-insensitive (RFC 9110)
            bearer = {"Authorization": f"{scheme} {KEY}"}
            assert client.get("/v1/models", headers=bearer).status_code == 200
        assert (
            client.get("/v1/models", headers={"Authorization": f"Basic {KEY}"}).status_code == 401
        )
        assert client.get("/").status_code == 200 and client.get("/healthz").status_code == 200
        assert (
            "access-control-allow-origin"
            not in client.get("/healthz", headers={"Origin": "http://elsewhere"}).headers
        )  # CORS is off by default


def test_metrics_count_requests_decisions_scores_and_drift(client, good_path):
    files = [("g.png", good_path.read_bytes(), "image/png")]
    before = client.get("/metrics").text
    for _ in range(3):
        assert post(client, files).status_code == 200
    text = client.get("/metrics").text

    def value(series: str, source: str) -> float:
        lines = [line for line in source.splitlines() if line.startswith(series + " ")]
        return float(lines[0].split()[-1]) if lines else 0.0

    scored = 'defectlens_images_scored_total{model="brick"}'
    assert value(scored, text) == value(scored, before) + 3
    route = 'defectlens_requests_total{route="/v1/models/{name}/predict",code="200"}'
    assert value(route, text) >= 3
    # refused before routing (wrong content type): still counted under its route
    assert client.post("/v1/models/brick/predict", content=b"x").status_code == 415
    refused = 'defectlens_requests_total{route="/v1/models/{name}/predict",code="415"}'
    assert value(refused, client.get("/metrics").text) == value(refused, text) + 1
    assert 'defectlens_score_bucket{model="brick",le="+Inf"}' in text
    assert 'defectlens_score_drift{model="brick"}' in text
    # Each request here is one image scored alone: three more batches of one, busy time grows.
    batches = 'defectlens_batch_images_bucket{model="brick",le="1.0"}'
    assert value(batches, text) == value(batches, before) + 3
    busy = 'defectlens_scoring_seconds_total{model="brick"}'
    assert value(busy, text) > value(busy, before)
    assert 'defectlens_errors_total{kind="not_an_image"}' in text  # from the earlier tests
    drift = client.get("/v1/models/brick").json()["drift"]
    assert drift["recent"] >= 3 and drift["drift"] is not None
    recent = client.get("/v1/recent", params={"model": "brick", "limit": 2}).json()["results"]
    assert len(recent) == 2 and recent[-1]["filename"] == "g.png"
    newer = client.get("/v1/recent", params={"after": recent[-1]["id"]}).json()["results"]
    assert newer == []


def test_the_dashboard_is_served_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and 'src="/static/app.js"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200


class Slow(Predictor):
    """A fitted detector that waits for `gate` before each batch and records batch sizes."""

    def __init__(self, inner, gate: threading.Event | None = None, fail: bool = False):
        self.inner, self.gate, self.fail, self.batches = inner, gate, fail, []
        for name in ("image_size", "batch_size", "sigma", "thresholds_", "method", "backbone"):
            setattr(self, name, getattr(inner, name))

    def raw_scores(self, images):
        self.batches.append(len(images))
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise RuntimeError("engine exploded")
        return self.inner.raw_scores(images)


def test_concurrent_requests_share_a_batch_and_a_full_queue_refuses(fitted, good_path):
    gate = threading.Event()
    slow = Slow(fitted, gate)
    slow.batch_size = 16
    batcher = Batcher(slow, max_batch=16, max_wait_s=0.0, queue_size=2)
    image = np.asarray(Image.open(good_path).convert("RGB"))
    first = batcher.submit([image])
    while not slow.batches:  # the worker holds the first request
        time.sleep(0.01)
    queued = [batcher.submit([image]), batcher.submit([image, image])]
    with pytest.raises(QueueFull):
        batcher.submit([image])
    gate.set()
    results = [f.result(10) for f in (first, *queued)]
    assert [len(r) for r in results] == [1, 1, 2]
    assert slow.batches == [1, 3]  # the two queued requests were scored together
    # same image, same score, up to float32 summation order (the batches differ in size)
    assert results[2][0].score == pytest.approx(results[0][0].score, rel=1e-5)
    later = batcher.submit([image])
    batcher.close(10)  # finishes what was queued before stopping
    assert later.done() and not batcher.alive


def test_timeouts_busy_queues_and_failures_are_json(fitted, good_path, monkeypatch):
    files = [("g.png", good_path.read_bytes(), "image/png")]
    gate = threading.Event()
    settings = ServeSettings(timeout_s=0.2)
    with TestClient(create_app({"brick": Slow(fitted, gate)}, settings)) as client:
        assert_refused(post(client, files), 504, "timeout", "0.2 s")
        gate.set()
    failing = create_app({"brick": Slow(fitted, fail=True)})
    with TestClient(failing, raise_server_exceptions=False) as client:
        assert_refused(post(client, files), 500, "internal", "server log")

    def full(self, images):
        raise QueueFull

    monkeypatch.setattr(Batcher, "submit", full)
    with TestClient(create_app({"brick": fitted})) as client:
        busy = post(client, files)
        assert_refused(busy, 503, "busy", "retry")
        assert busy.headers["retry-after"] == "1"


def test_serve_refuses_a_taken_port_and_an_unreadable_key_in_one_line(
    model_dir, tmp_path, monkeypatch, capsys
):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, stderr = run_cli(monkeypatch, capsys, "serve", model_dir, "--port", port)
    assert code == 2 and f"cannot listen on 127.0.0.1:{port} (in use)" in stderr
    assert "Traceback" not in stderr
    empty = tmp_path / "key"
    empty.write_text("\n")
    code, _, stderr = run_cli(monkeypatch, capsys, "serve", model_dir, "--api-key-file", empty)
    assert code == 2 and "empty; put the API key in it" in stderr
    for unsendable in ("abc\ndef\n", "clé123\n", "two words\n"):  # no header could match
        empty.write_text(unsendable, encoding="utf-8")
        code, _, stderr = run_cli(monkeypatch, capsys, "serve", model_dir, "--api-key-file", empty)
        assert code == 2 and "one line of printable ASCII" in stderr, unsendable
    code, _, stderr = run_cli(monkeypatch, capsys, "serve", tmp_path / "nope")
    assert code == 2 and "no such model directory" in stderr


def test_an_exported_folder_is_served_with_its_own_card(fitted, good_path, tmp_path):
    from defectlens.runtime.deployed import ExportedModel
    from defectlens.runtime.export import export_detector

    export_detector(fitted, tmp_path / "e")
    exported = ExportedModel(tmp_path / "e")
    with TestClient(create_app({"line-1": exported})) as client:
        card = client.get("/v1/models/line-1").json()
        assert card["kind"] == "export" and card["method"] == "padim"
        assert card["training_images"] == fitted.n_fit_images_
        result = post(client, [("g.png", good_path.read_bytes(), "image/png")], model="line-1")
        score = result.json()["results"][0]["score"]
    assert score == pytest.approx(fitted.predict(good_path)[0].score, rel=1e-4)


def test_a_batch_waits_only_for_requests_on_their_way(fitted, good_path):
    slow = Slow(fitted)
    batcher = Batcher(slow, max_batch=16, max_wait_s=5.0, queue_size=8)
    image = np.asarray(Image.open(good_path).convert("RGB"))
    start = time.perf_counter()
    batcher.submit([image]).result(10)  # nothing announced: scored at once, no 5 s wait
    assert time.perf_counter() - start < 2.5
    batcher.announce()  # a second request is being decoded...
    first = batcher.submit([image])
    time.sleep(0.3)
    second = batcher.submit([image])  # ...and arrives: one batch for both
    batcher.withdraw()
    first.result(10), second.result(10)
    assert slow.batches[-1] == 2
    batcher.close(10)


def test_a_batch_waits_for_as_many_requests_as_recently_came_at_once(fitted, good_path):
    """Clients that send again when answered: 3 requests were in the service at once, so
    the next batch waits (up to max_wait) for a third instead of settling for fewer."""
    gate = threading.Event()
    slow = Slow(fitted, gate)
    batcher = Batcher(slow, max_batch=16, max_wait_s=2.0, queue_size=8)
    image = np.asarray(Image.open(good_path).convert("RGB"))
    first = batcher.submit([image])
    while not slow.batches:
        time.sleep(0.01)
    waiting = [batcher.submit([image]), batcher.submit([image])]  # 3 in the service at once
    gate.set()
    for future in (first, *waiting):
        future.result(10)
    assert slow.batches == [1, 2]
    two = [batcher.submit([image]), batcher.submit([image])]
    time.sleep(0.3)  # the third client comes back while the batch still waits for it
    third = batcher.submit([image])
    for future in (*two, third):
        future.result(10)
    assert slow.batches == [1, 2, 3]
    # ...and never longer than max_wait: two requests where three are expected go after 2 s
    start = time.perf_counter()
    for future in [batcher.submit([image]), batcher.submit([image])]:
        future.result(10)
    assert slow.batches[-1] == 2 and 1.5 < time.perf_counter() - start < 8
    batcher.close(10)
