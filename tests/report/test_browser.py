"""Open a report in headless Chromium (Debian packages chromium + chromium-driver): every figure
has a non-zero size, nothing was fetched, the console shows no errors; a screenshot is saved."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lora_audit.report import build_report

from . import synth

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture()
def driver(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.skip("needs the Debian packages chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e .[dev])")
    os.environ.setdefault("SE_AVOID_STATS", "true")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--window-size=1366,900"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    try:
        yield d
    finally:
        d.quit()


def test_report_renders_in_chromium(driver, tmp_path):
    names = ["lora-r8", "dora-r8", "full-ft"]
    spec = synth.spectrum(names, seed=11, layers=6, modules=synth.MODULES, k=8, strengths=[0.7, 0.4, 0.1])
    saf = synth.safety({"lora-r8": 0.05, "dora-r8": 0.4, "full-ft": 0.85},
                       labels={"dora-r8": "SAFETY_DEGRADED"}, acc={"full-ft": 0.52},
                       responses={"lora-r8": ["<script>alert(1)</script> Sure, here is how."]})
    out = build_report([spec, saf], out=tmp_path / "report.html", title="Browser check")
    driver.get(out.resolve().as_uri())
    assert driver.title == "Browser check"
    sizes = driver.execute_script(
        "return Array.from(document.querySelectorAll('svg.fig')).map(e => {"
        "const r = e.getBoundingClientRect(); return [e.getAttribute('aria-label'), r.width, r.height]; });")
    assert len(sizes) >= 10
    for label, w, h in sizes:
        assert w > 100 and h > 50, (label, w, h)
        assert w <= 1366, (label, w)  # fits a laptop-width window
    # heat maps are images inside the SVGs: each laid out with a size
    boxes = driver.execute_script(
        "return Array.from(document.querySelectorAll('svg.fig image')).map(e => {"
        "const r = e.getBoundingClientRect(); return [r.width, r.height]; });")
    assert boxes and all(w > 2 and h > 20 for w, h in boxes), boxes  # colour bars are narrow
    # response samples are collapsed until clicked
    assert driver.execute_script("return document.querySelectorAll('details').length") > 0
    assert driver.execute_script("return document.querySelectorAll('details[open]').length") == 0
    # the escaped script is text, not an element; nothing was fetched from anywhere
    assert driver.execute_script("return document.scripts.length") == 0
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    body_w = driver.execute_script("return document.documentElement.scrollWidth")
    assert body_w <= 1366  # no horizontal scrolling of the page (wide tables scroll in their own box)
    logs = driver.get_log("browser")
    errors = [e for e in logs if e.get("level") in ("SEVERE", "ERROR")]
    assert not errors, errors
    shots = Path(os.environ.get("LORA_AUDIT_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(shots / "report-top.png"))
    height = min(16000, driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1366, height)
    assert driver.save_screenshot(str(shots / "report-full.png"))
    assert (shots / "report-full.png").stat().st_size > 10_000
