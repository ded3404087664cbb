"""The report in a real browser: headless Chromium renders it, every image loads, every heading shows."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from report_run import SECTION_TITLES, Outline, build_run

from pipeline.report import run_report

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
# Written into the DOM once the page has loaded, so --dump-dom shows each image's decoded size.
PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) {
    img.dataset.naturalWidth = img.naturalWidth;
    img.dataset.naturalHeight = img.naturalHeight;
  }
  document.body.dataset.probed = "yes";
});
</script>
"""


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium with a fresh profile, no network services and no first-run UI."""
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(
        command, capture_output=True, encoding="utf-8", errors="replace", timeout=120, check=True
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found (apt-get install -y chromium)")
    config = build_run(tmp_path_factory.mktemp("browser"))
    return run_report(config)


def test_screenshot_is_not_blank(report, tmp_path):
    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,4000", report.as_uri())
    pixels = imread(shot)[..., :3].mean(axis=2)
    assert pixels.shape == (4000, 1280)
    tiles = [t for band in np.array_split(pixels, 8, axis=0) for t in np.array_split(band, 4, axis=1)]
    means = np.array([t.mean() for t in tiles])
    stds = np.array([t.std() for t in tiles])
    assert pixels.std() > 0.05
    assert means.std() > 0.02, "every region of the page looks the same"
    assert (stds > 0.02).sum() >= len(tiles) // 2, "most regions are flat"


def test_every_image_loads_and_every_heading_renders(report, tmp_path):
    probe = report.with_name("browser_probe.html")
    shutil.copyfile(report, probe)
    probe.write_text(
        probe.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8"
    )
    try:
        dom = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()).stdout
    finally:
        probe.unlink()
    page = Outline(dom)
    assert 'data-probed="yes"' in dom, "the load event never fired"
    assert [h.split(".", 1)[1] for h in page.headings] == list(SECTION_TITLES)
    expected = Outline(report.read_text(encoding="utf-8")).images
    assert len(page.images) == len(expected) >= 9
    for img in page.images:
        assert int(img["data-natural-width"]) > 0 and int(img["data-natural-height"]) > 0, img["src"]
