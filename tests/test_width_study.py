"""The width study (issue 24, item 5): the survey's "more parameters than necessary" can "smooth
the landscape" as a hypothesis over median λ_1, γ and curvature per cell, γ against λ_1 in the report.

The default run trains a tiny version (2 widths × 2 seeds, a few epochs); the whole quick study is
``-m slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gammatrace.experiments.presets import QUICK_CURVATURE, QUICK_WIDTHS, SURVEY, preset_spec
from gammatrace.experiments.study import STUDIES, GroupSpec, run_study
from gammatrace.principles.claims import restrict_order
from gammatrace.principles.survey import Hypothesis
from gammatrace.store.study import StudyMeta


def test_the_presets_vary_width_only_and_measure_curvature():
    quick = STUDIES.get("width")("quick", None)
    assert list(quick.cells) == [f"w{w}" for w in QUICK_WIDTHS] and QUICK_WIDTHS[0] == 16 and QUICK_WIDTHS[-1] == 512
    assert quick.seeds == 6  # 3 relations: 2^-6 < 0.05 / 3
    base = quick.cells["w16"].model_dump(exclude={"name", "model"})
    for cell, cfg in quick.cells.items():
        assert cfg.model.width == int(cell[1:]) and not cfg.model.switches().get("batchnorm")
        assert cfg.model_dump(exclude={"name", "model"}) == base  # only the width differs
        assert cfg.curvature is not None and cfg.curvature.every == QUICK_CURVATURE["every"]
    [h] = quick.hypotheses
    assert (h.order_text, h.statistic, h.source) == ("w16 > w128 > w512", "lambda_1", SURVEY)
    assert "the survey's summary of" in h.attribution and "can smooth the landscape" in h.attribution
    assert quick.claims[0].source is None and "hypothesis" in quick.claims[0].text
    paper = STUDIES.get("width")("paper", "/cifar")
    assert [c.model.width for c in paper.cells.values()] == [0.25, 0.5, 1, 2]
    assert {c.model.name for c in paper.cells.values()} == {"resnet18"}
    assert paper.hypotheses[0].order_text == "w0_25 > w0_5 > w1 > w2"


def tiny_width_study():
    """Two widths, two seeds, a few epochs: the whole pipeline in seconds."""
    spec = preset_spec("width", "quick")
    # θ* = θ_T only (one replay per run); batch norm so that 3 epochs leave the plateau the plain
    # MLP sits on first (a run flagged "no progress" is excluded: no verdict to look at).
    base = {**spec.base, "epochs": 3, "target_loss": None, "reference": {"kind": "last", "extra_epochs": 0},
            "model": {**spec.base["model"], "batchnorm": True},
            "curvature": {**QUICK_CURVATURE, "every": 5, "subset": 64}, "data": {"name": "digits", "n_train": 384},
            "analysis": {"per_sample": False, "per_tensor": False}}
    variants = {k: v for k, v in spec.variants.items() if k in ("w128", "w512")}
    def restricted(items):
        return [c.model_copy(update={"order": restrict_order(c.order, variants)}) for c in items]

    return spec.model_copy(update={"base": base, "variants": variants, "groups": {"mlp": GroupSpec()}, "seeds": 2,
                                   "claims": restricted(spec.claims),
                                   "hypotheses": restricted(spec.hypotheses)}).build("quick")


def test_tiny_width_study_reports_the_hypothesis_and_gamma_against_lambda(tmp_path):
    study = tiny_width_study()
    assert [h.order_text for h in study.hypotheses] == ["w128 > w512"]
    report = run_study(study, tmp_path / "width", workers=2, progress=False)
    meta = StudyMeta.load(StudyMeta.path(tmp_path / "width"))
    assert [Hypothesis.from_json(h) for h in meta.hypotheses] == study.hypotheses
    md = (Path(report).parent / "summary.md").read_text()
    assert "Landscape hypotheses and curvature" in md
    sentence = next(line for line in md.splitlines() if line.startswith("- Wider networks have a smoother path"))
    # Two seeds: measured, but no verdict can be reached; never "not measured".
    assert "— inconclusive (" in sentence and "not measured" not in sentence, sentence
    assert "the survey's summary of" in sentence
    assert "Spearman ρ = " in md and "over n = 4 runs of 2 cell(s)" in md
    assert (Path(report).parent / "gamma_lambda_mlp.png").is_file()


@pytest.mark.slow
def test_quick_width_study_runs_and_reports(tmp_path):
    """The whole quick preset (6 seeds × 3 widths; timed with `gammatrace study width --quick`
    in the README)."""
    report = run_study(STUDIES.get("width")("quick", None), tmp_path / "width", workers=2, progress=False)
    md = (Path(report).parent / "summary.md").read_text()
    sentence = next(line for line in md.splitlines() if line.startswith("- Wider networks have a smoother path"))
    assert "not measured" not in sentence
    assert (Path(report).parent / "gamma_lambda_mlp.png").is_file()
