"""gammatrace.reporting on real small runs: files, numbers read back, flags, embedded figures.

The runs are trained once per module (digits, 256 samples, width 16): one that trains
(Adam), one that barely moves (SGD on a sigmoid net), one that diverges (MSE, lr 1e4).
Variants (a run without its per-tensor table, runs with edited summaries for the
ordering) are copies of these folders, so only three runs are ever trained.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from gammatrace.analysis import train
from gammatrace.reporting import report
from gammatrace.reporting.collect import collect
from gammatrace.reporting.content import caveats, fmt, ordering
from gammatrace.reporting.document import md_unescape, to_markdown
from gammatrace.reporting.figures import NEGATIVE, layers_figure
from gammatrace.store import load_run

IMG = '<img src="data:image/png;base64,'
# summary.md prints 4 significant digits: a value read back is within half a unit of
# the 4th digit, i.e. a relative error ≤ 5e-4.
REL_TOL = 5e-4

# Header of the trajectory table → summary key (what the cell must equal).
PRINCIPLE_KEYS = {
    "certified on every step": "gamma_certified",
    "γ_lo (0: no lower bound)": "gamma_lo",
    "γ_hi = min γ_k": "gamma_min",
    "fraction γ_k > 0": "gamma_frac_positive",
    "undefined γ_k": "gamma_n_undefined",
    "median γ_k": "gamma_median",
    "median γ^RP_k / D_0²": "gamma_rp_median",
    "γ_eff (loss-determined)": "gamma_eff",
    "d_k increases": "dist_n_increase",
    "fraction d_k increases": "dist_frac_increase",
    "rate tightness (actual / bound)": "rate_tightness",
    "path ratio (length / displacement)": "path_ratio",
    "mean cos_align": "cos_align_mean",
    "cos null scale 1/√n": "cos_null_scale",
}


def _config(name, **over):
    cfg = {"name": name, "epochs": 3, "batch_size": 64, "data": {"name": "digits", "n_train": 256},
           "model": {"name": "mlp", "width": 16, "depth": 2, "activation": "relu"},
           "optim": {"name": "adam", "lr": 0.01}}
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    paths = {
        "adam": train(_config("adam"), out=root / "adam", progress=False).path,
        "sigmoid": train(_config("sigmoid", model={"name": "mlp", "width": 16, "depth": 2, "activation": "sigmoid"},
                                 optim={"name": "sgd", "lr": 0.05}),
                         out=root / "sigmoid", progress=False).path,
        "div": train(_config("div", loss="mse", optim={"name": "sgd", "lr": 1e4}), out=root / "div",
                     progress=False).path,
    }
    # The fixture must hold what the tests rely on, or they would pass vacuously.
    assert load_run(paths["adam"]).summary()["no_progress"] is False
    assert load_run(paths["sigmoid"]).summary()["no_progress"] is True
    assert load_run(paths["div"]).status == "diverged"
    return root, paths


@pytest.fixture(scope="module")
def full(runs, tmp_path_factory):
    _, paths = runs
    out = tmp_path_factory.mktemp("report")
    html = report([paths["adam"], paths["sigmoid"], paths["div"]], out)
    return out, html, paths


# ---------------------------------------------------------------------------- parsing
def _cells(line: str) -> list[str]:
    parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [md_unescape(p.strip()) for p in parts]


def md_table(md: str, heading: str) -> list[dict[str, str]]:
    """The first table after ``heading`` as a list of {header: cell} dicts."""
    lines = md[md.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        block.append(line)
    header = _cells(block[0])
    return [dict(zip(header, _cells(row), strict=True)) for row in block[2:]]


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def html_tables(text: str) -> list[list[list[str]]]:
    parser = _Tables()
    parser.feed(text)
    return parser.tables


def assert_cell(cell: str, value, what: str) -> None:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        assert cell == "—", what
    elif isinstance(value, bool):
        assert cell == ("yes" if value else "no"), what
    else:
        assert math.isclose(float(cell), value, rel_tol=REL_TOL), f"{what}: {cell} vs {value}"


# ------------------------------------------------------------------------------ tests
def test_files_and_images(full):
    out, html, _ = full
    assert html == out / "report.html"
    for name in ("trajectory.png", "trajectory.pdf", "layers.png", "layers.pdf", "summary.md", "report.html"):
        assert (out / name).stat().st_size > 1000, name
    for name in ("trajectory.png", "layers.png"):
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 300, (name, im.size)
    assert (out / "trajectory.pdf").read_bytes().startswith(b"%PDF")


def test_numbers_equal_run_summaries(full):
    out, html, paths = full
    md = (out / "summary.md").read_text()
    print(f"numbers in summary.md are printed with 4 significant digits; compared at rel_tol={REL_TOL}")
    rows = {r["run"]: r for r in md_table(md, "## Trajectory principles")}
    assert set(rows) == {"adam", "sigmoid"}  # the diverged run has no trajectory numbers
    for name in ("adam", "sigmoid"):
        s = load_run(paths[name]).summary()
        for header, key in PRINCIPLE_KEYS.items():
            assert_cell(rows[name][header], s[key], f"{name} {header}")
        assert_cell(rows[name]["mean cos_align / null scale"], s["cos_align_mean"] / s["cos_null_scale"], name)
    runs_rows = {r["run"]: r for r in md_table(md, "## Runs")}
    for name in ("adam", "sigmoid"):
        s = load_run(paths[name]).summary()
        assert_cell(runs_rows[name]["final train loss"], s["train_loss"], name)
        assert_cell(runs_rows[name]["test acc"], s["test_acc"], name)
        assert runs_rows[name]["epochs"] == str(s["epochs"])
        assert runs_rows[name]["loss drop (first → last epoch)"] == f"{s['loss_rel_drop']:.1%}"

    # The HTML tables are the same data structure rendered again: identical cells.
    tables = html_tables(html.read_text())
    md_rows = md_table(md, "## Trajectory principles")
    principles = next(t for t in tables if "median γ_k" in t[0])
    assert [dict(zip(principles[0], r, strict=True)) for r in principles[1:]] == md_rows


def test_diverged_run_is_listed_with_its_step(full):
    out, html, paths = full
    step = load_run(paths["div"]).meta.diverged_at_step
    assert isinstance(step, int)
    rows = {r["run"]: r for r in md_table((out / "summary.md").read_text(), "## Runs")}
    assert rows["div"]["status"] == f"diverged at step {step}"
    assert f"diverged at step {step}" in html.read_text()


def test_no_progress_flag_and_caveats(full):
    out, html, paths = full
    md = md_unescape((out / "summary.md").read_text())
    rows = {r["run"]: r for r in md_table((out / "summary.md").read_text(), "## Runs")}
    for name in ("adam", "sigmoid"):
        s = load_run(paths[name]).summary()
        assert rows[name]["no progress"] == ("yes" if s["no_progress"] else "no")
    s = load_run(paths["sigmoid"]).summary()
    section = md[md.index("## What these numbers can and cannot say"):md.index("## Ordering")]
    assert f"sigmoid: the mean batch loss fell by only {s['loss_rel_drop']:.1%}" in section
    assert "adam: the mean batch loss" not in section
    # γ_eff is shown as the loss-determined identity, with the run's own value.
    a = load_run(paths["adam"]).summary()
    assert f"= {fmt(a['gamma_eff'])}; the table's γ_eff = {fmt(a['gamma_eff'])}." in section
    assert f"mean cos_align {fmt(a['cos_align_mean'])}" in section and "null scale" in section
    ordering = md[md.index("## Ordering"):]
    # One run may be compared (sigmoid made no progress, div diverged): the shared rule says so.
    assert "inconclusive (fewer than 2 comparable runs (1))" in ordering
    left_out = ordering.split("Not in the ordering")[1]
    assert "sigmoid (no progress (mean batch loss fell by only" in left_out  # kept out, named, with the reason
    assert f"div (diverged at step {load_run(paths['div']).meta.diverged_at_step})" in left_out


def test_html_embeds_every_figure(full):
    out, html, _ = full
    text = html.read_text()
    assert text.count(IMG) == 2
    for chunk in text.split(IMG)[1:]:
        png = base64.b64decode(chunk.split('"', 1)[0])
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.width >= 400
    assert 'src="trajectory.png"' not in text and "http" not in text  # self-contained
    md = (out / "summary.md").read_text()
    assert "](trajectory.png)" in md and "](layers.png)" in md


def test_single_run_without_layers_table(runs, tmp_path):
    root, paths = runs
    bare = tmp_path / "bare"
    shutil.copytree(paths["adam"], bare)
    ref = bare / "analysis" / "last"
    (ref / "layers.parquet").unlink()
    (ref / "modules.parquet").unlink()
    shutil.rmtree(ref / "tensors")
    report([paths["adam"]], tmp_path / "out", title="earlier")  # an earlier report drew layers.png
    assert (tmp_path / "out" / "layers.png").exists()
    html = report([bare], tmp_path / "out", title="one run")
    assert (tmp_path / "out" / "trajectory.png").exists()
    assert not (tmp_path / "out" / "layers.png").exists()
    assert html.read_text().count(IMG) == 1
    md = (tmp_path / "out" / "summary.md").read_text()
    assert md.startswith("# one run")
    assert "layers.png not drawn." in md and "no per-tensor table" in md


def test_ordering_with_three_comparable_runs(runs, tmp_path):
    root, paths = runs
    # Three copies of the trained run with edited summaries: γ median and final loss
    # chosen so the orderings agree; then one loss far off makes them not comparable.
    def variant(name, median, loss):
        dst = tmp_path / name
        shutil.copytree(paths["adam"], dst, dirs_exist_ok=True)
        meta = json.loads((dst / "run.json").read_text())
        meta["config"]["name"] = name
        (dst / "run.json").write_text(json.dumps(meta))
        summ = dst / "analysis" / "last" / "summary.json"
        s = json.loads(summ.read_text())
        s.update(gamma_median=median, train_loss=loss)
        summ.write_text(json.dumps(s))
        return dst

    # The ordering section alone (report() itself is covered above): no figures to draw.
    def ordering_md(dirs):
        return to_markdown(ordering(collect(dirs)) + caveats(collect(dirs)))

    md = ordering_md([variant("a", 3.0, 0.5), variant("b", 2.0, 0.6), variant("c", 1.0, 0.7)])
    # One seed per run: the trend's p-value (1 of 3! arrangements), labelled a trend, never a verdict.
    assert ("the runs ordered by convergence as the claim — a > b > c: single seed (one run per cell: trend "
            "p = 0.17, reversed 1 shown, never a verdict)") in md_unescape(md)
    rows = md_table(md, "## Ordering")
    assert [r["by median γ_k (largest first)"].split()[0] for r in rows] == ["a", "b", "c"]
    assert [r["by convergence (lowest final train loss first)"] for r in rows] == ["a (0.5)", "b (0.6)", "c (0.7)"]

    md = md_unescape(ordering_md([variant("a", 1.0, 0.5), variant("b", 2.0, 0.6), variant("c", 3.0, 0.7)]))
    assert "a > b > c: single seed (one run per cell: trend p = 1, reversed 0.17 shown, never a verdict)" in md

    md = md_unescape(ordering_md([variant("a", 3.0, 0.2), variant("b", 2.0, 0.6), variant("c", 1.0, 0.7)]))
    assert "differ by 3.5× (more than 2×): a ends at 0.2, c at 0.7" in md
    assert "inconclusive (final train losses differ by 3.5×" in md

    # The single-run report once called any ρ > 0 "consistent" (0.2522 vs 0.2541, one seed):
    # it now applies the study's rule, and one seed per run is never a verdict.
    md = md_unescape(ordering_md([variant("a", 3.0, 0.5), variant("b", 2.0, 0.6), variant("c", 4.0, 0.7),
                                  variant("d", 1.0, 0.8)]))
    assert "a > b > c > d: single seed (one run per cell: trend p = 0.38, reversed 0.83 shown, never a verdict)" in md


def test_layers_negative_share_in_distinct_colour(runs, tmp_path):
    _, paths = runs
    (entry,) = collect([paths["adam"]])
    entry.layers = entry.layers.assign(share=-entry.layers["share"])  # every tensor pulls against
    png = layers_figure([entry], tmp_path, notes := [])
    assert png is not None and not notes
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    red = tuple(int(NEGATIVE[i:i + 2], 16) for i in (1, 3, 5))
    assert (np.abs(pixels.astype(int) - red).sum(axis=1) < 12).sum() > 500


def test_theorem1_table_numbers_are_the_runs(full):
    out, _, paths = full
    md = (out / "summary.md").read_text()
    rows = {r["run"]: r for r in md_table(md, "## Theorem 1")}
    assert set(rows) == {"adam", "sigmoid"}  # analysed runs only
    run = load_run(paths["adam"])
    s = run.summary()
    steps = run.steps()
    premise = rows["adam"]["the principle with one γ > 0 on every step (the premise)"]
    g = steps["gamma"].to_numpy(float)
    # The premise on every step: the certified interval is non-empty (DESIGN §1), not a 95% share.
    assert premise.startswith("holds: on every step: yes — " if s["gamma_certified"] else "fails: on every step: no — ")
    assert premise.startswith(f"{'holds' if s['gamma_certified'] else 'fails'}: on every step: "
                              f"{s['gamma_certificate']}")
    assert f"γ_k > 0 on {100 * s['gamma_frac_positive']:.1f}% of {np.isfinite(g).sum()} defined steps" in premise
    item1 = rows["adam"]["‖θ_{k+1} − θ*‖ ≤ ‖θ_k − θ*‖ for every k"]
    assert item1.startswith(("holds: " if s["dist_n_increase"] == 0 else "fails: ")
                            + f"d_k rises at {s['dist_n_increase']} of {s['n_steps']} steps")
    samples = rows["adam"]["per-sample losses converge"]
    assert f"for {100 * s['sample_frac_improved']:.1f}% of {s['sample_n_revisited']} revisited samples" in samples
    rate = rows["adam"]["O(1/γK) rate bound with γ = γ_min"]
    assert rate.startswith("not applicable") == (not s["gamma_certified"])


def test_no_progress_of_a_loop_without_epochs_is_decided_by_its_steps():
    """Issue 21 item 4: a loop without epochs is one epoch; its batch loss fell from 3.99 to
    2.13, so it is neither "no progress" nor left out of orderings, and what the report says of
    a flagged one-epoch run is what the flag was decided on (its steps)."""
    import pandas as pd

    from gammatrace.principles import summarize
    from gammatrace.reporting.claims import exclusion, loss_drop_words
    from gammatrace.reporting.collect import example_entry

    n = 40
    steps = pd.DataFrame({"step": range(n), "epoch": 0, "lr": 0.1, "loss": np.linspace(3.99, 2.13, n),
                          "loss_ref": 2.0, "progress": 0.01, "dist_sq": np.linspace(1.0, 0.1, n),
                          "update_sq": 0.01, "grad_dot": 0.2})
    keys = ("no_progress", "loss_rel_drop", "loss_rel_drop_steps", "loss_first_steps", "loss_last_steps",
            "loss_first_epoch", "loss_last_epoch")
    entry = example_entry("gpt", 0.3, [3.0, 2.1])
    entry.summary.update({k: v for k, v in summarize(steps).items() if k in keys})
    assert entry.summary["no_progress"] is False and exclusion(entry) is None

    steps["loss"] = 2.3 + 0.001 * np.sin(np.arange(n))
    flat = example_entry("flat", 0.3, [3.0, 2.1])
    flat.summary.update({k: v for k, v in summarize(steps).items() if k in keys})
    s = flat.summary
    assert s["no_progress"] is True and exclusion(flat).startswith("no progress (mean batch loss ")
    words = loss_drop_words(s)
    assert "epoch" not in words and f"(first tenth of the steps {fmt(s['loss_first_steps'])} → last tenth" in words
