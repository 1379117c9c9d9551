"""Cached reference losses: ℓ(θ*; z) once per training sample instead of once per visit.

Replay in reference mode evaluates ℓ*_k = ℓ(θ*; B_k) with one extra forward per step
(DESIGN §2). When the loss of a sample does not depend on the batch it sits in — no batch
norm in train mode, no dropout, no augmentation — ℓ(θ*; z) is the same at every visit,
so one pass over the training set at θ* (N forwards) replaces E·N. Whether that holds is
decided from the config and the model (:func:`why_not_cached`), and checked at run time:
the first step of every replay segment evaluates ℓ*_k by the direct forward as well and
refuses the cache when |ℓ*_direct − ℓ*_cached| > 1e-6·max(1, ℓ*).

The per-sample pass runs in chunks of the run's batch size, in index order, so each chunk
has the size of a training batch (the last one too); the rows of a batch of another
composition may still round differently (a GEMM may block its rows differently), which is
why the check has a tolerance, why the largest deviation and deviation/gap are recorded
(``analysis/<ref>/reference_cache.json``) and why a run is flagged when the implied
relative change of γ_k, max deviation / smallest loss gap, exceeds 1e-3.

Example:
    >>> from gammatrace.config import RunConfig
    >>> from gammatrace.engine.session import build_session
    >>> cfg = RunConfig.model_validate({"batch_size": 32, "data": {"name": "digits", "n_train": 64, "n_test": 32},
    ...                                 "model": {"name": "mlp", "width": 8, "depth": 1}})
    >>> sess = build_session(cfg)
    >>> why_not_cached(cfg, sess.model) is None
    True
    >>> losses = reference_losses(sess, sess.model.state_dict())
    >>> losses.shape, bool(torch.equal(losses[:32], sess.loss_fn(sess.model, (sess.x[:32], sess.y[:32])).detach()))
    (torch.Size([64]), True)
    >>> why_not_cached(cfg.with_overrides({"data": {"augment": "flip_crop"}}), sess.model)
    "data augmentation 'flip_crop' changes a sample at every visit"
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from gammatrace.config import RunConfig
from gammatrace.engine.session import Session
from gammatrace.errors import UserError

# Acceptance of a cached ℓ*_k against the direct forward: relative to max(1, ℓ*).
CACHE_RTOL = 1e-6
# A run is flagged when a cached ℓ* could move some γ_k by more than this (relative).
GAMMA_FLAG = 1e-3
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


class ReferenceCacheError(UserError, RuntimeError):
    """A cached reference loss differs from the direct forward beyond round-off."""


def why_not_cached(cfg: RunConfig, model: nn.Module) -> str | None:
    """Why ℓ(θ*; z) may depend on the batch or the visit for this run (None: it does not).

    Decided from the config (the opt-out, augmentation) and the modules of the model in
    train mode, the mode replay evaluates θ* in.
    """
    if cfg.analysis.reference_cache == "off":
        return "analysis.reference_cache is off"
    if cfg.data.augment != "none":
        return f"data augmentation '{cfg.data.augment}' changes a sample at every visit"
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return f"batch norm '{name}' normalises with the statistics of the batch in train mode"
        if isinstance(module, _DROPOUT) and module.p > 0:
            return f"dropout '{name}' draws a new mask at every visit"
    return None


def reference_model(sess: Session, reference: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the session's model holding θ* (buffers the reference lacks: the model's)."""
    model = copy.deepcopy(sess.model)
    state = model.state_dict()
    model.load_state_dict({k: reference.get(k, v).to(v.device) for k, v in state.items()})
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()  # the mode of the replayed steps, whose forward the probe evaluates θ* in
    return model


@torch.no_grad()
def reference_losses(sess: Session, reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """ℓ(θ*; z) of every training sample, in index order, on the session's device.

    Chunks have the run's batch size (the last: the remainder, as the last batch of an
    epoch), so their arithmetic is that of a training batch as far as it can be.
    """
    model = reference_model(sess, reference)
    n, bs = len(sess.x), sess.cfg.batch_size
    parts = [sess.loss_fn(model, (sess.x[s:s + bs], sess.y[s:s + bs])).detach() for s in range(0, n, bs)]
    return torch.cat(parts)


class CachedReference:
    """The probe's ``loss_fn`` during a cached replay segment: the probe calls it once per
    step with θ*'s model and the step's batch (a probe built with ``check=False``), in the
    order of ``batches``; it returns the cached per-sample losses of the batch.

    At the segment's first step it also runs ``direct`` (the forward it replaces), returns
    that, and records the deviation; beyond the tolerance it raises :class:`ReferenceCacheError`.
    """

    def __init__(self, direct: Callable[[nn.Module, Any], torch.Tensor], cache: torch.Tensor,
                 batches: Sequence[torch.Tensor], y: torch.Tensor, first_step: int):
        self.direct, self.cache, self.batches, self.y = direct, cache, list(batches), y
        self.first_step = first_step
        self.calls = 0
        self.checks: list[dict[str, float]] = []

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if self.calls >= len(self.batches):
            raise RuntimeError("the cached reference was asked for more batches than the segment has")
        idx = self.batches[self.calls].to(self.cache.device)
        k = self.first_step + self.calls
        self.calls += 1
        if len(batch[1]) != len(idx) or not torch.equal(batch[1], self.y[idx]):
            raise RuntimeError(f"cached reference out of step with the batches at step {k} (a bug)")
        cached = self.cache[idx]
        if len(self.checks) == 0:
            direct = self.direct(model, batch).detach()
            d_mean, c_mean = float(direct.double().mean()), float(cached.double().mean())
            dev = abs(d_mean - c_mean)
            self.checks.append({"step": k, "loss_ref": d_mean, "dev": dev,
                                "dev_sample": float((direct.double() - cached.double()).abs().max())})
            if not dev <= CACHE_RTOL * max(1.0, abs(d_mean)):
                raise ReferenceCacheError(
                    f"the cached reference loss at step {k} is {c_mean!r}, the direct forward gives {d_mean!r} "
                    f"(|Δ| = {dev:.3g} > {CACHE_RTOL:g}·max(1, ℓ*)): the loss of a sample depends on its batch "
                    "here, or the cache is damaged; set analysis.reference_cache: off (or remove "
                    "analysis/<reference>/reference_losses.pt to recompute it)")
            return direct
        return cached


def segment_checks(lookup: CachedReference, steps: pd.DataFrame) -> dict[str, Any]:
    """What a cached segment records: its checked steps with deviation and deviation/gap,
    and the implied change of γ_k, max deviation / smallest positive gap ℓ_k − ℓ*_k."""
    gap = (steps["loss"] - steps["loss_ref"]).to_numpy(dtype=np.float64)
    at = dict(zip(steps["step"].to_numpy().tolist(), gap.tolist(), strict=True))
    checks = [{**c, "gap": at.get(c["step"], float("nan"))} for c in lookup.checks]
    for c in checks:
        c["dev_over_gap"] = c["dev"] / c["gap"] if c["gap"] > 0 else float("nan")
    positive = gap[gap > 0]
    max_dev = max((c["dev"] for c in checks), default=0.0)
    return {"checks": checks, "max_dev": max_dev, "min_gap": float(positive.min()) if len(positive) else None}


def summarize_checks(segments: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run's record over all cached segments (``reference_cache.json``).

    Example:
        >>> s = summarize_checks([{"checks": [{"step": 0, "dev": 2e-7, "dev_over_gap": 1e-6}], "max_dev": 2e-7,
        ...                        "min_gap": 0.5}, {"checks": [], "max_dev": 0.0, "min_gap": 1e-5}])
        >>> s["max_dev"], round(s["implied_gamma_change"], 6), s["flagged"]
        (2e-07, 0.02, True)
    """
    checks = [c for s in segments for c in s["checks"]]
    max_dev = max((c["dev"] for c in checks), default=0.0)
    # NaN (no positive gap) is stored as null in JSON: neither counts.
    ratios = [c["dev_over_gap"] for c in checks if isinstance(c.get("dev_over_gap"), float)
              and math.isfinite(c["dev_over_gap"])]
    gaps = [s["min_gap"] for s in segments if s.get("min_gap")]
    implied = max_dev / min(gaps) if gaps and max_dev > 0 else 0.0
    return {"steps_checked": len(checks), "max_dev": max_dev,
            "max_dev_over_gap": max(ratios, default=0.0), "implied_gamma_change": implied,
            "flagged": implied > GAMMA_FLAG}
