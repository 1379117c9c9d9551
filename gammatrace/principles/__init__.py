"""Pure NumPy/pandas math over the per-step table (DESIGN §1, §6). No torch.

Input everywhere is the step table: one row per step k = 0 … T−1, sorted by step,
with the raw columns ``step, epoch, lr, loss, loss_ref, progress, dist_sq,
update_sq, grad_dot`` (some may be absent; what needs them is NaN).

- series:   :func:`derive` (γ, γ^RP, γ^RC, star, cos_align), :func:`next_dist_sq`
- certificates: :func:`certify`, :func:`per_epoch`, :func:`gamma_eff`, :func:`gamma_eff_curve`
- theorem1: :func:`monotone_distance`, :func:`epoch_distance`, :func:`per_sample_convergence`,
            :func:`rate_bound`, :func:`theorem1_checks` (Theorem 1 as verdicts)
- geometry: :func:`path_geometry`, :func:`null_cos_scale`
- layers:   :func:`layer_shares`, :func:`module_shares`
- summary:  :func:`summarize`
- claims:   :func:`check_claim` (the one verdict rule of every report: an exact one-sided
            test of every strict relation of a claimed weak order, paired by seed, decided by
            intersection–union), :func:`relation_test`, :func:`sign_test`, :func:`tie_report`,
            :func:`order_test` (the trend statistic), :func:`parse_order`,
            :func:`epochs_to_loss`, :func:`null_alignment`
- matched:  :func:`matched_levels`, :func:`gamma_at_levels` (γ compared at matched training loss)
- gradients: :func:`grad_norm_per_epoch`, :func:`gradient_collapse` (paper 002's vanishing gradient)

Example:
    >>> from gammatrace.principles import derive, example_steps, summarize
    >>> derive(example_steps())["gamma"].round(2).tolist()
    [3.2, -1.81, 9.18, 10.0]
    >>> summarize(example_steps())["gamma_min"] < 0
    True
"""

from gammatrace.principles.certificates import certify, gamma_eff, gamma_eff_curve, per_epoch
from gammatrace.principles.claims import (
    ClaimResult,
    OrderTest,
    RelationTest,
    RunPoint,
    TieReport,
    check_claim,
    epochs_to_loss,
    null_alignment,
    order_test,
    parse_order,
    relation_test,
    sign_test,
    tie_report,
)
from gammatrace.principles.geometry import null_cos_scale, path_geometry
from gammatrace.principles.gradients import grad_norm_per_epoch, gradient_collapse
from gammatrace.principles.layers import layer_shares, module_of, module_shares
from gammatrace.principles.matched import gamma_at_levels, matched_gamma, matched_levels, step_loss
from gammatrace.principles.series import (
    DERIVED_COLUMNS,
    RAW_COLUMNS,
    STEP_COLUMNS,
    cos_align,
    derive,
    example_steps,
    next_dist_sq,
)
from gammatrace.principles.summary import summarize
from gammatrace.principles.theorem1 import (
    Check,
    epoch_distance,
    monotone_distance,
    per_sample_convergence,
    rate_bound,
    theorem1_checks,
)

__all__ = [
    "Check",
    "ClaimResult",
    "DERIVED_COLUMNS",
    "OrderTest",
    "RAW_COLUMNS",
    "RelationTest",
    "RunPoint",
    "STEP_COLUMNS",
    "TieReport",
    "certify",
    "check_claim",
    "cos_align",
    "derive",
    "epoch_distance",
    "epochs_to_loss",
    "example_steps",
    "gamma_at_levels",
    "gamma_eff",
    "gamma_eff_curve",
    "grad_norm_per_epoch",
    "gradient_collapse",
    "layer_shares",
    "matched_gamma",
    "matched_levels",
    "module_of",
    "module_shares",
    "monotone_distance",
    "next_dist_sq",
    "null_alignment",
    "null_cos_scale",
    "order_test",
    "parse_order",
    "path_geometry",
    "per_epoch",
    "per_sample_convergence",
    "rate_bound",
    "relation_test",
    "sign_test",
    "step_loss",
    "summarize",
    "theorem1_checks",
    "tie_report",
]
