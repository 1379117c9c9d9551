"""``report()``: runs on disk → figures, ``summary.md`` and a self-contained ``report.html``.

Two layouts from the same pieces: a plain report of any runs, and the report of a study
(claim checks, a table per run, figures per group) when the runs belong to one
(``study=``, or found as ``study.json`` in the folder holding every run).
"""

from __future__ import annotations

import contextvars
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from gammatrace.errors import UserError
from gammatrace.landscape import compute_landscape, plot_landscape
from gammatrace.reporting import study as S
from gammatrace.reporting.collect import RunEntry, collect
from gammatrace.reporting.content import (
    GAMMA_EFF_LOSS_LABEL,
    caveats,
    curvature_blocks,
    ordering,
    principles_table,
    runs_table,
    theorem1_table,
)
from gammatrace.reporting.document import (
    MISSING,
    Block,
    Bullets,
    Figure,
    Heading,
    Table,
    Text,
    fmt,
    fold,
    to_html,
    to_markdown,
)
from gammatrace.reporting.figures import (
    layers_figure,
    matched_figure,
    theorem1_figure,
    trajectory_figure,
)
from gammatrace.reporting.survey import survey_blocks
from gammatrace.store.backend import (
    Location,
    ObjectFiles,
    confined,
    inside,
    output_folder,
    remove_inside,
    write_inside,
)
from gammatrace.store.run import Run, RunStore, StoreError
from gammatrace.store.study import StudyMeta

# The files the last report into a folder wrote (names relative to it): the next report
# removes those it does not write again, and nothing else (the folder may hold the user's own).
MANIFEST = ".gammatrace-report.json"
# The folder a report being drawn (in a temporary folder) is published to: the paths figure
# keeps its landscape's stored grid there, to be reused by the next report.
_PUBLISHED: contextvars.ContextVar[Path | None] = contextvars.ContextVar("published", default=None)
TRAJECTORY_CAPTION = ("Trajectory: normalized distance d_k/D_0 per step, the training loss per epoch (the full "
                      "training loss, or the mean batch loss where no full one was measured: the row's title says "
                      "which), and per epoch "
                      "both γ's (median line, ▼ minimum; log or symlog axis): the γ-optimization principle's γ_k "
                      "(paper 002, Def. 1: gap to ℓ(θ*; B_k)) and the regularity principle's γ^RP_k/‖θ_0 − θ_T‖² "
                      "(papers 000/001, eq. 2: gap to inf ℓ, the quantity those papers plot). Dashed: flagged no "
                      "progress.")
THEOREM1_CAPTION = ("Theorem 1 per epoch (θ* = θ_T; first seed of each cell): d/D_0 at every epoch boundary, and "
                    "the running mean of the loss gap against its O(1/γK) bound with γ = γ_hi = γ_min, the largest γ "
                    "meeting every step (dashed; absent when no γ > 0 meets every step).")
MATCHED_CAPTION = ("γ at matched loss: every step's γ_k against its mini-batch loss ℓ_k (dots), and each cell's "
                   "median γ_k at 10 log-spaced levels of the full training loss over the range every comparable "
                   "run reaches (shaded; line: mean over seeds, band: min–max) — the values the matched-loss test "
                   "takes. Left: continuation θ*; right: θ* = θ_T.")
SEEDED_CAPTION = (" One line per cell: the mean over its seeds (of d_k/D_0, of the loss, of the per-epoch median "
                  "γ_k); band: min–max over the seeds.")
UNSEEDED_CAPTION = " Band: 25–75% of γ_k in the epoch."
PATHS_CAPTION = ("Optimization paths on the loss landscape, as paper 002's Fig. 12 draws them: each path (first "
                 "seed of the cell) on the plane of the top-2 principal components of its own parameters (axis "
                 "labels: the share of the path's displacement each explains), with the loss contours on that "
                 "plane; at every epoch checkpoint the optimizer's actual epoch step and the SGD direction −∇L "
                 "(the full gradient on a fixed training subset), both projected onto the plane. The table gives "
                 "their cosine in the full parameter space.")
# The paths figure's grid: 15×15 loss evaluations per path on 512 training samples, seconds
# for the quick presets' networks on a CPU (README: optimizer study).
PATHS_GRID, PATHS_SAMPLES = 15, 512
LAYERS_CAPTION = ("Per-tensor share of the total progress Σ_k P_k (red: the tensor pulls against the trajectory "
                  "overall; label: fraction of steps it did).")


def report(runs: list[str | Path | Run], out: str | Path, reference: str | None = None,
           title: str = "gammatrace report", study: str | Path | dict[str, Any] | StudyMeta | None = None) -> Path:
    """Write the report of ``runs`` into ``out`` and return the path of ``report.html``.

    ``out`` receives ``trajectory.png``/``.pdf`` (d_k/D_0, training loss and γ_k per
    epoch, one line per run), ``layers.png``/``.pdf`` (per-tensor progress shares),
    ``summary.md`` and ``report.html`` (the same content, figures embedded). Runs that
    diverged or have no analysis for ``reference`` (default: each run's own, 'last'
    if present) are listed and flagged, not dropped.

    ``study`` (a ``study.json`` path, its dict or a :class:`StudyMeta`; found automatically when every run
    sits in one folder with a ``study.json`` naming it) gives the study layout instead:
    the claim check with θ* = θ_T and the continuation reference side by side, one
    row per run, the null baseline, and ``trajectory_<group>.png`` /
    ``layers_<group>.png`` per group (a line per cell; seeds as mean and min–max band).

    Example (runs without an analysis are listed and flagged; see :func:`gammatrace.train`
    for an analysed run):
        >>> import tempfile, gammatrace
        >>> from gammatrace.reporting.collect import example_entry
        >>> runs = [example_entry("relu").run.path, example_entry("tanh", analysed=False).run.path]
        >>> out = Path(tempfile.mkdtemp()) / "report"
        >>> gammatrace.report(runs, out=out) == out / "report.html"
        True
        >>> [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| tanh")]
        ['| tanh | trained (not analysed) | 3 | — | — | — | — | — |']
    """
    if not runs:
        raise ValueError("report() needs at least one run")
    # Resolved once (a link planted in a run or study folder is refused); one writer at a time.
    folder, note = output_folder(out)
    if note:
        print(f"gammatrace: {note}", file=sys.stderr)
    with RunStore(folder).lock(clean=False), tempfile.TemporaryDirectory(prefix="gammatrace-report-") as tmp:
        # Drawn in a folder of its own, then published file by file (confined, atomic).
        stage = Path(tmp)
        token = _PUBLISHED.set(folder)
        try:
            if study is None:
                study = S.find_study(runs)
            if study is not None:
                blocks = _study_blocks(runs, stage, StudyMeta.load(study), title)
            else:
                blocks = _plain_blocks(collect(runs, reference), stage, title)
        finally:
            _PUBLISHED.reset(token)
        (stage / "summary.md").write_text(to_markdown(blocks), encoding="utf-8")
        (stage / "report.html").write_text(to_html(blocks, title=title, base=stage), encoding="utf-8")
        _publish(stage, folder)
    return folder / "report.html"


def _manifest(out: Path) -> list[str]:
    """The names the last report into ``out`` wrote (none when it has no readable manifest)."""
    try:
        return _listed((out / MANIFEST).read_bytes())
    except OSError:
        return []


def _listed(raw: bytes) -> list[str]:
    """The file names a manifest's bytes list: only plain names below its folder."""
    try:
        names = json.loads(raw.decode("utf-8")).get("files", [])
    except (ValueError, AttributeError):
        return []
    if not isinstance(names, list):
        return []
    return [n for n in names if isinstance(n, str) and confined(n) == n and n != MANIFEST]


def _manifest_text(names: list[str]) -> str:
    return json.dumps({"files": sorted(set(names))}, indent=1) + "\n"


class ReportOverwriteError(UserError):
    """The report would replace a file in its output folder that no earlier report wrote."""


def _refuse_foreign(out: Any, new: list[str], old: list[str], exists: Any, owned: bool) -> None:
    """Refuse, before anything is written, a report that would overwrite a file of the user's:
    one in ``out`` with a name the report writes that the folder's manifest (what the last
    report there wrote) does not list. A folder the tool owns — inside a run or study folder,
    where reports were written before manifests existed — is the tool's own."""
    if owned:
        return
    # A link planted where the report writes is write_inside's to refuse, in its own words.
    foreign = [rel for rel in new if rel not in old and exists(rel) and not os.path.islink(f"{out}/{rel}")]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ReportOverwriteError(
            f"{out}/{foreign[0]}{more} exists and no earlier report here wrote it (the folder's {MANIFEST} does not "
            f"list it): the report would overwrite it; move it or choose another --out")


def _owned(folder: Path) -> bool:
    """Whether ``folder`` is (inside) a run or study folder."""
    here = Path(folder).resolve()
    return any((p / "run.json").is_file() or (p / "study.json").is_file() for p in (here, *here.parents))


def _publish(stage: Path, out: Path) -> None:
    """Copy the report drawn in ``stage`` into ``out`` (every file through
    :func:`~gammatrace.store.backend.write_inside`), then remove what the last report there
    wrote and this one did not: a figure skipped this time must not be mistaken for this
    report's. The manifest lists both until they are gone, so an interrupted publish
    forgets nothing. A file of the user's with a name the report writes is refused
    (:func:`_refuse_foreign`)."""
    new = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
    old = _manifest(out)
    _refuse_foreign(out, new, old, lambda rel: os.path.lexists(out / rel), _owned(out))

    def manifest(names: list[str]) -> None:
        text = _manifest_text(names)
        write_inside(out, MANIFEST, lambda p: Path(p).write_text(text, encoding="utf-8"))

    manifest(old + new)
    for rel in new:
        write_inside(out, rel, lambda p, src=stage / rel: shutil.copyfile(src, p))
    for rel in sorted(set(old) - set(new)):
        remove_inside(out, rel)
    manifest(new)


def publish_remote(local: Path, out: Location) -> None:
    """Copy a report drawn in the local folder ``local`` to the folder ``out`` on object
    storage, then remove what the last report there wrote and this one did not, as
    :func:`_publish` does locally: known by the manifest stored there, never by a name
    pattern, so the user's files beside the report stay; a name in it is a key below
    ``out`` (the URL-prefix rule). The caller holds ``out``'s lock.

    Example (a memory:// file system stands in for S3):
        >>> import tempfile
        >>> local = Path(tempfile.mkdtemp())
        >>> _ = (local / "report.html").write_text("new"), (local / "layers.png").write_bytes(b"png")
        >>> out = Location("memory://bucket/rep")
        >>> files = ObjectFiles(out)
        >>> files.write_bytes(MANIFEST, _manifest_text(["report.html", "layers_old.png"]).encode())
        >>> files.write_bytes("layers_old.png", b"old"); files.write_bytes("layers_mine.png", b"the user's")
        >>> publish_remote(local, out)
        >>> files.list(), _listed(files.read_bytes(MANIFEST))
        (['.gammatrace-report.json', 'layers.png', 'layers_mine.png', 'report.html'], ['layers.png', 'report.html'])
        >>> theirs = ObjectFiles(Location("memory://bucket/docs"))
        >>> theirs.write_bytes("layers.png", b"the user's, of the same name")
        >>> publish_remote(local, Location("memory://bucket/docs"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        gammatrace.reporting.build.ReportOverwriteError: memory://bucket/docs/layers.png exists and no earlier report here wrote it ...
        >>> theirs.list(), theirs.read_bytes("layers.png")
        (['layers.png'], b"the user's, of the same name")
    """
    files = ObjectFiles(out)
    new = sorted(p.relative_to(local).as_posix() for p in local.rglob("*")
                 if p.is_file() and p.name not in (MANIFEST, ".lock"))
    try:
        old = _listed(files.read_bytes(MANIFEST))
    except FileNotFoundError:
        old = []
    present = set(files.list())
    parent = ObjectFiles(out.parent)
    owned = any(f.is_file(name) for f in (files, parent) for name in ("run.json", "study.json"))
    _refuse_foreign(out, new, old, lambda rel: rel in present, owned)
    # Both listed until the stale ones are gone: an interrupted publish forgets nothing.
    files.write_bytes(MANIFEST, _manifest_text(old + new).encode())
    for rel in new:
        files.write(rel, lambda p, src=local / rel: shutil.copyfile(src, p))
    for rel in sorted(set(old) - set(new)):
        files.remove(rel)
    files.write_bytes(MANIFEST, _manifest_text(new).encode())


def _figure_or_note(png: Path | None, name: str, caption: str, notes: list[str]) -> Block:
    if png is None:
        return Text(f"{name} not drawn. " + "; ".join(notes))
    return Figure(png.name, caption, pdf=png.with_suffix(".pdf").name, notes=notes)


def _plain_blocks(entries: list[RunEntry], out: Path, title: str) -> list[Block]:
    refs = sorted({e.summary.get("reference") for e in entries if e.analysed})
    gamma_eff_label = GAMMA_EFF_LOSS_LABEL if refs == ["last"] else "γ_eff"
    ref_text = ", ".join("last (θ* = θ_T, the final iterate)" if r == "last" else str(r) for r in refs)

    notes: list[str] = []
    png = trajectory_figure(entries, out, notes, title=f"{title} — θ*: {', '.join(refs) or 'none'}")
    figure_blocks = [_figure_or_note(png, "trajectory.png", TRAJECTORY_CAPTION + UNSEEDED_CAPTION, notes)]
    layer_notes: list[str] = []
    png = layers_figure(entries, out, layer_notes)
    figure_blocks.append(_figure_or_note(png, "layers.png", LAYERS_CAPTION, layer_notes))

    not_analysed = [f"{e.label}: {e.problem}" for e in entries if not e.analysed]
    blocks: list[Block] = [
        Heading(title),
        Text(f"{len(entries)} run(s); reference point θ*: {ref_text or 'none (no run analysed)'}. "
             "— marks a number that is absent or undefined."),
        Heading("Runs", 2),
        runs_table(entries),
        Heading("Trajectory principles", 2),
    ]
    if any(e.analysed for e in entries):
        blocks.append(principles_table(entries, gamma_eff_label))
    if not_analysed:
        blocks.append(Text("Not analysed (listed above, no trajectory numbers): " + "; ".join(not_analysed) + "."))
    blocks += caveats(entries)
    blocks += ordering(entries)
    blocks += theorem1_table(entries)
    blocks += curvature_blocks(entries)
    return blocks + [Heading("Figures", 2), *figure_blocks]


def _study_blocks(runs: list[str | Path | Run], out: Path, info: StudyMeta, title: str) -> list[Block]:
    last = collect(runs, "last")
    cont = collect([e.run for e in last], "continuation")
    members = S.study_runs(info, last, cont)
    groups = list(dict.fromkeys(r.group for r in members))

    claim_section, checks = S.claim_check_blocks(info, members)
    seeded = info.seeds > 1
    # What a reader wants first: each claim's verdict in one sentence, then the trajectories;
    # the study in a line, then the method and the long tables, each folded.
    blocks: list[Block] = [Heading(title), Bullets([S.verdict_sentence(c) for c in checks]) if checks
                           else Text("This study states no claim: its runs are reported below.")]
    for group in groups:
        cells = S.cells_of_group(members, group)
        stem = S.safe_stem(group)
        notes: list[str] = []
        png = trajectory_figure([e for es in cells.values() for e in es], out, notes,
                                title=f"{info.name}: {group} — θ* = θ_T", cells=cells, stem=f"trajectory_{stem}")
        caption = TRAJECTORY_CAPTION + (SEEDED_CAPTION if seeded else UNSEEDED_CAPTION)
        blocks.append(_figure_or_note(png, f"trajectory_{stem}.png", f"{group}. {caption}", notes))
    blocks.append(Text(
        f"Study {info.name} (preset {info.preset or 'custom'}): {info.question} {len(members)} run(s) in "
        f"{len(groups)} group(s) ({', '.join(groups)}), {info.seeds} seed(s) per cell. "
        "— marks a number that is absent or undefined. In report.html the sections below are folded: a "
        "click opens one."))
    blocks += claim_section
    # The survey's landscape hypotheses and γ against λ_1 (studies that carry them or measured curvature).
    blocks += survey_blocks(info, members, out)
    blocks.append(fold(S.theorem1_blocks(members)))
    blocks.append(fold([Heading("Runs: one row per run", 2), *S.runs_table(members)]))
    principles = [principles_table(last, GAMMA_EFF_LOSS_LABEL)] if any(e.analysed for e in last) else [
        Text("No run has an analysis.")]
    blocks.append(fold([Heading("Trajectory principles (θ* = θ_T)", 2), *principles]))
    blocks.append(fold(caveats(last)))
    blocks.append(fold(S.null_blocks(members)))

    blocks.append(Heading("More figures", 2))
    for group in groups:
        stem = S.safe_stem(group)
        cells = S.cells_of_group(members, group)
        blocks.append(Heading(f"Group {group}", 3))
        # γ at matched loss, with the matched levels of the group's first claim.
        check = next((c for c in checks if c.claim.group in (group, None)), None)
        if check is not None:
            panels = {}
            for ref, label in S.REFERENCES.items():
                by_cell: dict[str, list] = {}
                for r in check.runs:
                    e = r.entry(ref)
                    if e is not None:
                        by_cell.setdefault(r.cell, []).append(e)
                panels[label] = (by_cell, check.matched[ref])
            matched_notes: list[str] = []
            png = matched_figure(panels, out, matched_notes, title=f"{info.name}: {group} — γ against training loss",
                                 stem=f"matched_{stem}")
            blocks.append(_figure_or_note(png, f"matched_{stem}.png", f"{group}. {MATCHED_CAPTION}", matched_notes))
        t1_notes: list[str] = []
        png = theorem1_figure(cells, out, t1_notes, title=f"{info.name}: {group} — Theorem 1 per epoch",
                              stem=f"theorem1_{stem}")
        blocks.append(_figure_or_note(png, f"theorem1_{stem}.png", f"{group}. {THEOREM1_CAPTION}", t1_notes))
        blocks += _paths_blocks(info, members, group, out)
        # One panel per cell (its first seed): the shares are a per-run property.
        layer_notes: list[str] = []
        png = layers_figure([es[0] for es in cells.values()], out, layer_notes, stem=f"layers_{stem}")
        first = " (first seed of each cell)" if seeded else ""
        blocks.append(_figure_or_note(png, f"layers_{stem}.png", f"{group}{first}. {LAYERS_CAPTION}", layer_notes))
    return blocks


def _paths_blocks(info: StudyMeta, members: list[S.StudyRun], group: str, out: Path) -> list[Block]:
    """The group's paths figure (paper 002, Fig. 12) and its cosine table, when the study names
    cells whose paths to draw (``StudyMeta.paths``): one PCA plane per path, first seed."""
    runs = [r for r in members if r.group == group and r.cell in info.paths and info.seed_of.get(r.name, 0) == 0]
    if not runs:
        return []
    stem = f"paths_{S.safe_stem(group)}"
    # The stored grid lives in the report's folder (reused by the next report); the figure is drawn with the rest.
    grid_folder = inside(_PUBLISHED.get() or out, stem)  # a planted link is refused, not drawn around
    try:
        ls = compute_landscape([r.last.run.path for r in runs], grid_folder, plane="per_path", grid=PATHS_GRID,
                               samples=PATHS_SAMPLES, progress=False)
    except (UserError, StoreError, ValueError) as exc:  # e.g. pruned checkpoints: the report goes on
        return [Text(f"{stem}.png not drawn: {exc}")]
    # Only the planes' figure: the report has no use for the interpolation plot.
    png = plot_landscape(ls, out / stem / ls.figure_names()["landscape"])
    rows = []
    for i, r in enumerate(runs):
        cos = ls.cos_full[i]
        rows.append([r.cell, str(len(cos)), fmt(float(np.nanmean(cos))) if len(cos) else MISSING,
                     fmt(float(np.nanmin(cos))) if len(cos) else MISSING,
                     fmt(float(ls.planes[i].explained.sum()))])
    return [Figure(f"{stem}/{png.name}", f"{group}. {PATHS_CAPTION}"),
            Table(["cell (first seed)", "epoch steps", "mean cos(−∇L, actual step)", "min cos(−∇L, actual step)",
                   "path variance on the plane"], rows)]
