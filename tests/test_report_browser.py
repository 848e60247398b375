"""``report.html`` in a real browser: headless Chromium renders it from disk, and the screenshot is not blank.

Skipped where no Chromium is installed (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_image_folder
from zoo.pipeline.run import run_zoo
from zoo.pipeline.zoo_file import MemberSpec

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 1600, timeout: float = 120) -> Path:
    """Render ``html`` from disk with headless Chromium (no network) and write a PNG of the window."""
    command = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
               "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # nothing may load from the network
               f"--user-data-dir={png.parent / 'chromium-profile'}", f"--window-size={width},{height}",
               f"--screenshot={png}", html.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert png.is_file(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    return png


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium_and_is_not_blank(tmp_path):
    from PIL import Image

    data = make_image_folder(tmp_path / "data", per_class=(8, 4, 0))
    out = tmp_path / "zoo"
    options = dict(pretrained=False, epochs=1, batch_size=8, input_size=32, workers=0, threads=1, warmup_epochs=0.5,
                   auto_augment="none", patience=0)
    result = run_zoo(data, out, [MemberSpec("resnet", "test_resnet"), MemberSpec("efficientnet", "test_efficientnet")],
                     given=options, cv=2, latency_repeats=1, log=lambda m: None)
    png = screenshot(result.report, tmp_path / "report.png")
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (1600, 1280)
    not_white = (pixels.min(axis=2) < 235).mean()
    assert not_white > 0.03, f"only {not_white:.1%} of the screenshot is not white: the page looks blank"
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text and plots, not one colour
