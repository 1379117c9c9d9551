"""``analysis/<reference>/summary.json``, typed: the per-run summary the analysis writes and
every report reads (DESIGN §1's summaries; NaN is stored as null).

The model is the contract between the analysis and its readers: the analysis validates
what it writes, and :meth:`gammatrace.store.Run.summary_model` refuses a damaged file by
name and field. Keys added later (per-sample convergence ``sample_*``, a hook's numbers)
are kept as extras.

Example:
    >>> s = RunSummary(reference="last", n_steps=10, n_steps_total=10, gamma_min=0.2, gamma_median=0.3,
    ...                gamma_frac_positive=1.0, no_progress=False)
    >>> s.gamma_min, s.certified  # an old summary without gamma_certified: γ_min > 0 and no undefined step
    (0.2, True)
    >>> RunSummary(reference="last", n_steps=10, gamma_min=0.2, gamma_lo=0.3, gamma_certified=False).certified
    False
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
    # where below analysis/ it is stored: the reference for the run config's tail and ℓ_inf,
    # e.g. 'last/tail=28' for others (gammatrace.analysis.analysis_name); None: written before
    analysis: str | None = None
    ell_inf: Num = 0.0
    n_steps_total: int | None = None
    tail: int = 0
    n_steps: int
    d0_sq: Num = None
    # γ-optimization principle: γ_k = P_k / (η_k D_0² (ℓ_k − ℓ*_k)). The certificate is the
    # interval [gamma_lo, gamma_hi] of γ > 0 with P_k ≥ γ η_k D_0² (ℓ_k − ℓ*_k) on every step
    # (gamma_lo 0: no lower bound; gamma_hi = gamma_min, null: no upper bound); certified iff
    # it is non-empty. gamma_*_step: the step binding each end; gamma_certificate: in words.
    gamma_min: Num = None
    gamma_certified: bool | None = None
    gamma_lo: Num = None
    gamma_hi: Num = None
    gamma_lo_step: int | None = None
    gamma_hi_step: int | None = None
    gamma_certificate: str | None = None
    gamma_n_lower: int | None = None
    gamma_n_zero_gap: int | None = None
    gamma_n_conflict: int | None = None
    gamma_n_unmeasured: int | None = None
    gamma_n_steps: int | None = None
    gamma_n_undefined: int | None = None
    gamma_frac_positive: Num = None
    gamma_median: Num = None
    gamma_mean: Num = None
    # regularity principle (γ^RP / D_0²), regularity condition, star-convexity
    gamma_rp_min: Num = None
    gamma_rp_median: Num = None
    gamma_rp_frac_positive: Num = None
    gamma_rp_certified: bool | None = None
    gamma_rp_lo: Num = None
    gamma_rp_hi: Num = None
    gamma_rc_min: Num = None
    gamma_rc_certified: bool | None = None
    gamma_rc_lo: Num = None
    gamma_rc_hi: Num = None
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
        """The principle holds on every step outside the tail with one γ > 0: the certified
        interval [γ_lo, γ_hi] is non-empty (``gamma_certified``). A summary written before the
        interval existed falls back to γ_min > 0 with no undefined γ_k (an undefined step may
        be a constraint no γ meets, so it never lets a certificate hold)."""
        if self.gamma_certified is not None:
            return self.gamma_certified
        return self.gamma_min is not None and self.gamma_min > 0 and not self.gamma_n_undefined
