"""Make docs/dashboard.png, the README's picture of the dashboard, from generated data only:
fit PaDiM on the synthetic "brick" texture, serve it, score a few test images in Chromium.

    .venv/bin/python docs/screenshot.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from defectlens import Detector  # noqa: E402
from defectlens.data.synthetic import make_category  # noqa: E402
from tests.server import CHROMIUM_FLAGS, chromium, running_server  # noqa: E402


def main() -> None:
    from playwright.sync_api import expect, sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        root = make_category(tmp, "brick", n_train=60, n_test_good=10, n_test_per_defect=2)
        model = Detector(image_size=128).fit(root).save(Path(tmp) / "models" / "brick")
        tests = sorted((root / "test").glob("*/*.png"))
        with running_server([model]) as (url, _), sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1366, "height": 860})
            page.goto(url + "/")
            expect(page.locator("#card")).to_contain_text("padim")
            for path in [*tests[:-1:2], tests[-1]]:
                page.set_input_files("#file", [str(path)])
                expect(page.locator("#result-name")).to_have_text(path.name)
            page.locator("#threshold-slider").focus()
            for _ in range(60):
                page.keyboard.press("ArrowLeft")
            page.screenshot(path=str(ROOT / "docs" / "dashboard.png"))
            browser.close()


if __name__ == "__main__":
    main()
