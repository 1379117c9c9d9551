"""``analysis/<reference>/summary.json``, typed: the per-run summary the analysis writes and
every report reads (DESIGN §1's summaries; NaN is stored as null).

The model is the contract between the analysis and its readers: the analysis validates
what it writes, and :meth:`gammatrace.store.Run.summary_model` refuses a damaged file by
name and field. Keys added later (per-sample convergence ``sample_*``, a hook's numbers)
are kept as extras.

Example:
    >>> s = RunSummary(reference="last", n_steps=10, n_steps_total=10, gamma_min=0.2, gamma_median=0.3,
    ...                gamma_frac_positive=1.0, no_progress=False)
    >>> s.gamma_min, s.certified
    (0.2, True)
    >>> from pydantic import ValidationError
    >>> try:
    ...     RunSummary.model_validate({"reference": "last", "n_steps": "ten"})
    ... except ValidationError as exc:
    ...     print(exc.errors()[0]["loc"])
    ('n_steps',)
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

Num = float | None  # NaN and ±inf are stored as null


class RunSummary(BaseModel):
    """The summary of one run against one reference (see :func:`gammatrace.principles.summarize`)."""

    model_config = ConfigDict(extra="allow")

    reference: str
    ell_inf: Num = 0.0
    n_steps_total: int | None = None
    tail: int = 0
    n_steps: int
    d0_sq: Num = None
    # γ-optimization principle: γ_k = P_k / (η_k D_0² (ℓ_k − ℓ*_k))
    gamma_min: Num = None
    gamma_certified: bool | None = None
    gamma_n_steps: int | None = None
    gamma_n_undefined: int | None = None
    gamma_frac_positive: Num = None
    gamma_median: Num = None
    gamma_mean: Num = None
    # regularity principle (γ^RP / D_0²), regularity condition, star-convexity
    gamma_rp_min: Num = None
    gamma_rp_median: Num = None
    gamma_rp_frac_positive: Num = None
    gamma_rc_min: Num = None
    star_min: Num = None
    star_frac_nonneg: Num = None
    # loss-determined with θ* = θ_T (DESIGN §1): shown, labelled, never a claim's statistic
    gamma_eff: Num = None
    # Theorem 1
    dist_n_increase: int | None = None
    dist_frac_increase: Num = None
    rate_tightness: Num = None
    rate_holds: bool | None = None
    # path geometry and the null scale of cos_align
    path_ratio: Num = None
    cos_align_mean: Num = None
    cos_null_scale: Num = None
    # training outcome
    loss_rel_drop: Num = None
    no_progress: bool | None = None
    reached_target: bool | None = None
    epochs: int | None = None
    train_loss: Num = None
    test_loss: Num = None
    train_acc: Num = None
    test_acc: Num = None

    @property
    def certified(self) -> bool:
        """γ_min > 0: the principle holds on the whole trajectory with γ = γ_min."""
        return self.gamma_min is not None and self.gamma_min > 0
