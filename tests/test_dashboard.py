"""The service as deployed: a real `defectlens serve` process on loopback, driven by a real
browser (Playwright on the system Chromium; `make test` installs it) and by a bounded load
test. The dashboard must show an uploaded image's overlay and decision, list the results and
let the threshold slider change how many recent images would be flagged; under load, no 5xx,
every score right, and memory not growing."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.server import CHROMIUM_FLAGS, chromium, rss_mb, run_load, running_server

ARTIFACTS = Path(os.environ.get("DEFECTLENS_TEST_ARTIFACTS", "test-artifacts"))


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server([model_dir]) as (url, process):
        yield url, process


def test_the_dashboard_scores_an_upload_and_the_slider_moves_the_counts(server, fitted, brick_root):
    from playwright.sync_api import expect, sync_playwright

    url, _ = server
    bad = brick_root / "test" / "hole" / "000.png"
    goods = sorted((brick_root / "test" / "good").iterdir())
    good = next(p for p in goods if not fitted.predict(p)[0].is_anomalous)
    assert fitted.predict(bad)[0].is_anomalous
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url + "/")
            expect(page.locator("#model")).to_have_value("brick")
            expect(page.locator("#card")).to_contain_text("padim")
            page.set_input_files("#file", [str(good)])
            expect(page.locator("#result-decision")).to_have_text("good")
            page.set_input_files("#file", [str(bad)])
            expect(page.locator("#result-decision")).to_have_text("defective")
            expect(page.locator("#result-name")).to_have_text("000.png")
            assert page.locator("#overlay").get_attribute("src").startswith("data:image/png")
            expect(page.locator("#recent-list tr")).to_have_count(2)
            expect(page.locator("#recent-count")).to_have_text("2")
            expect(page.locator("#flagged-count")).to_have_text("1")
            # keyboard only: the highest threshold passes both, the lowest flags both
            slider = page.locator("#threshold-slider")
            slider.focus()
            page.keyboard.press("End")
            expect(page.locator("#flagged-count")).to_have_text("0")
            expect(page.locator("#flip-count")).to_have_text("1")
            page.keyboard.press("Home")
            expect(page.locator("#flagged-count")).to_have_text("2")
            expect(page.locator("#flip-count")).to_have_text("1")
            tried = float(page.locator("#slider-value").text_content())
            command = page.locator("#apply-command")  # how to make the tried one the model's
            expect(command).to_have_text(re.compile(r"defectlens threshold MODEL_DIR --value \S+"))
            applied = float(command.text_content().split("--value")[1])
            assert abs(applied - tried) <= 1e-3 * max(abs(tried), 1.0)
            page.get_by_label("flagged", exact=True).check()
            expect(page.locator("#recent-list tr")).to_have_count(1)
            page.get_by_role("button", name="Back to the model's threshold").click()
            expect(page.locator("#flagged-count")).to_have_text("1")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()


def test_load_no_errors_right_scores_and_flat_memory(server, fitted, brick_root):
    url, process = server
    paths = sorted((brick_root / "test" / "good").iterdir())[:4]
    images = [(p.name, p.read_bytes()) for p in paths]
    expected = {p.name: fitted.predict(p)[0].score for p in paths}
    run_load(url, "brick", images, expected, clients=4, requests=100)  # warm-up
    before = rss_mb(process.pid)
    result = run_load(url, "brick", images, expected, clients=4, requests=400)
    after = rss_mb(process.pid)
    assert result["statuses"] == {200: 400}, result
    assert result["n_wrong"] == 0, result["wrong"]
    assert after - before < 30, (before, after)  # MB over 400 requests


def test_sigterm_finishes_the_requests_in_flight(model_dir, fitted, brick_root):
    """Graceful shutdown: requests the service has received when SIGTERM arrives are answered
    in full (right scores), new connections are refused, and the process exits cleanly."""
    import io
    import re
    import signal
    import threading
    import time

    import httpx
    import numpy as np
    from PIL import Image

    # Large uploads (512 px, decoded and mapped at full size) keep each request busy a while.
    paths = sorted((brick_root / "test").rglob("*.png"))[:24]
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((512, 512))) for p in paths]
    files = []
    for i, array in enumerate(arrays):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        files.append(("images", (f"{i}.png", buffer.getvalue(), "image/png")))
    expected = [p.score for p in fitted.predict(arrays)]
    n_requests = 4
    answers: list[httpx.Response | Exception] = []

    with running_server([model_dir]) as (url, process):

        def post() -> None:
            try:
                answers.append(
                    httpx.post(f"{url}/v1/models/brick/predict", files=files, timeout=120)
                )
            except Exception as exc:  # recorded: the assertion below names it
                answers.append(exc)

        threads = [threading.Thread(target=post) for _ in range(n_requests)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while True:  # until the service holds all of them (the poll itself is one more)
            text = httpx.get(f"{url}/metrics", timeout=10).text
            held = int(re.search(r"^defectlens_in_flight_requests (\d+)", text, re.M).group(1))
            if held >= n_requests + 1:
                break
            assert time.monotonic() < deadline, "the requests never arrived together"
            time.sleep(0.005)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(120)
        assert process.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=5)
    assert len(answers) == n_requests
    for answer in answers:
        assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer
        scores = [r["score"] for r in answer.json()["results"]]
        assert scores == pytest.approx(expected, rel=1e-5)
