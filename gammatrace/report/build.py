"""``report()``: runs on disk → figures, ``summary.md`` and a self-contained ``report.html``."""

from __future__ import annotations

from pathlib import Path

from gammatrace.report.collect import collect
from gammatrace.report.content import (
    GAMMA_EFF_LOSS_LABEL,
    caveats,
    ordering,
    principles_table,
    runs_table,
)
from gammatrace.report.document import Block, Figure, Heading, Text, to_html, to_markdown
from gammatrace.report.figures import layers_figure, trajectory_figure
from gammatrace.store.run import Run

FIGURE_FILES = ("trajectory.png", "trajectory.pdf", "layers.png", "layers.pdf")


def report(runs: list[str | Path | Run], out: str | Path, reference: str | None = None,
           title: str = "gammatrace report") -> Path:
    """Write the report of ``runs`` into ``out`` and return the path of ``report.html``.

    ``out`` receives ``trajectory.png``/``.pdf`` (d_k/D_0, training loss and γ_k per
    epoch, one line per run), ``layers.png``/``.pdf`` (per-tensor progress shares),
    ``summary.md`` and ``report.html`` (the same content, figures embedded). Runs that
    diverged or have no analysis for ``reference`` (default: each run's own, 'last'
    if present) are listed and flagged, not dropped.

    Example:
        >>> import gammatrace
        >>> gammatrace.report(["runs/relu", "runs/sigmoid"], out="report")   # doctest: +SKIP
        PosixPath('report/report.html')
    """
    if not runs:
        raise ValueError("report() needs at least one run")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # A figure skipped this time must not leave last time's file behind to be mistaken for it.
    for name in FIGURE_FILES:
        (out / name).unlink(missing_ok=True)
    entries = collect(runs, reference)

    refs = sorted({e.summary.get("reference") for e in entries if e.analysed})
    gamma_eff_label = GAMMA_EFF_LOSS_LABEL if refs == ["last"] else "γ_eff"
    ref_text = ", ".join("last (θ* = θ_T, the final iterate)" if r == "last" else str(r) for r in refs)

    figure_blocks: list[Block] = []
    notes: list[str] = []
    png = trajectory_figure(entries, out, notes, title=f"{title} — θ*: {', '.join(refs) or 'none'}")
    if png is not None:
        figure_blocks.append(Figure(png.name, "Trajectory: normalized distance d_k/D_0 per step, full training loss "
                                    "per epoch, γ_k per epoch (median line, 25–75% band, ▼ minimum; log or symlog "
                                    "axis). Dashed: flagged no progress.", pdf="trajectory.pdf", notes=notes))
    else:
        figure_blocks.append(Text("trajectory.png not drawn. " + "; ".join(notes)))
    layer_notes: list[str] = []
    png = layers_figure(entries, out, layer_notes)
    if png is not None:
        figure_blocks.append(Figure(png.name, "Per-tensor share of the total progress Σ_k P_k (red: the tensor "
                                    "pulls against the trajectory overall; label: fraction of steps it did).",
                                    pdf="layers.pdf", notes=layer_notes))
    else:
        figure_blocks.append(Text("layers.png not drawn. " + "; ".join(layer_notes)))

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
    blocks += [Heading("Figures", 2), *figure_blocks]

    (out / "summary.md").write_text(to_markdown(blocks), encoding="utf-8")
    html_path = out / "report.html"
    html_path.write_text(to_html(blocks, title=title, base=out), encoding="utf-8")
    return html_path
