"""report.html in a real headless browser (Debian's chromium): every figure decodes and
renders at its PNG's size, and the page paints. Skipped, with the reason, without chromium
(install it with ``apt-get install -y chromium``)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from gammatrace.experiments.study import grid_study, run_study
from tests.conftest import tiny_config

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Records each image's decode state in the DOM once the page has loaded; --dump-dom
# then prints the DOM after the virtual time budget (load included) has run out.
CHECK = """<script>
window.addEventListener('load', function () {
  var out = document.createElement('pre');
  out.id = 'imgcheck';
  out.textContent = JSON.stringify(Array.prototype.map.call(document.images, function (i) {
    return [i.complete, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width];
  }));
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def browser():
    exe = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if exe is None:
        pytest.skip("no chromium on PATH (apt-get install -y chromium)")
    return exe


def _chromium(exe: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def study_report(tmp_path_factory):
    # Two groups of one run each, no claim: eight figures (trajectory, RSI/EB beside γ, Theorem 1,
    # layers per group).
    out = tmp_path_factory.mktemp("browser") / "s"
    spec = {"name": "b", "base": tiny_config(), "variants": {"relu": {"model": {"activation": "relu"}}},
            "groups": {"narrow": {}, "wide": {"base": {"model": {"width": 16}}}}}
    return run_study(grid_study(spec), out, progress=False)


def test_every_figure_renders(browser, study_report, tmp_path):
    html = study_report.read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", (study_report.parent / "summary.md").read_text())
    assert len(figures) == 8 and html.count("<img ") == 8
    page = tmp_path / "check.html"
    page.write_text(html.replace("</body>", CHECK + "\n</body>"), encoding="utf-8")
    result = _chromium(browser, tmp_path, "--dump-dom", page.as_uri())
    found = re.search(r'<pre id="imgcheck">(.*?)</pre>', result.stdout, re.S)
    assert found, f"no image record in the dumped DOM (rc {result.returncode}): {result.stderr[-500:]}"
    images = json.loads(found.group(1))
    assert len(images) == len(figures)
    for (complete, width, height, shown), name in zip(images, figures, strict=True):
        with Image.open(study_report.parent / name) as png:
            # Decoded at the PNG's own size, and laid out on the page with a width.
            assert complete and (width, height) == png.size and shown > 100, (name, width, height, shown)


def test_page_paints(browser, study_report, tmp_path):
    shot = tmp_path / "shot.png"
    result = _chromium(browser, tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", study_report.as_uri())
    assert shot.exists(), result.stderr[-500:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    # Text, tables and plotted lines: many distinct colours, mostly a light page.
    assert len(np.unique(pixels, axis=0)) > 200
    assert (pixels.mean(axis=1) > 200).mean() > 0.5


# Records, once loaded: the page's first elements after the title, and for every <details>
# whether it starts closed, its height and whether its tables are visible, closed and opened.
FOLDS = """<script>
window.addEventListener('load', function () {
  var out = document.createElement('pre');
  out.id = 'foldcheck';
  var order = [];
  var h1 = document.querySelector('h1');
  for (var e = h1.nextElementSibling; e && order.length < 3; e = e.nextElementSibling) order.push(e.tagName);
  var folds = Array.prototype.map.call(document.querySelectorAll('body > details'), function (d) {
    var shown = function () { var n = 0; d.querySelectorAll('table').forEach(function (t) {
      n += t.checkVisibility() ? 1 : 0; }); return n; };
    var wasOpen = d.open, closed = [d.getBoundingClientRect().height, shown()];
    d.open = true;
    return [d.querySelector('summary').textContent, wasOpen, closed, [d.getBoundingClientRect().height, shown()],
            d.querySelectorAll('table').length];
  });
  out.textContent = JSON.stringify({order: order, folds: folds});
  document.body.appendChild(out);
});
</script>"""


def test_sections_fold_and_open(browser, study_report, tmp_path):
    page = tmp_path / "folds.html"
    page.write_text(study_report.read_text().replace("</body>", FOLDS + "\n</body>"), encoding="utf-8")
    result = _chromium(browser, tmp_path, "--dump-dom", page.as_uri())
    found = re.search(r'<pre id="foldcheck">(.*?)</pre>', result.stdout, re.S)
    assert found, f"no fold record in the dumped DOM (rc {result.returncode}): {result.stderr[-500:]}"
    record = json.loads(found.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    # The title, then the verdict line (no claim here: one sentence saying so), then the first figure.
    assert record["order"][:2] == ["P", "FIGURE"]
    folds = {name: rest for name, *rest in record["folds"]}
    assert {"Theorem 1", "Runs: one row per run", "Null baseline for alignment"} <= set(folds)
    for name, (was_open, (closed, closed_shown), (opened, opened_shown), tables) in folds.items():
        assert not was_open and closed_shown == 0 and closed < 60, (name, closed)  # folded: one summary line
        assert opened_shown == tables and opened > closed, name  # opened: every table shows
    assert sum(t for *_, t in folds.values()) >= 4
