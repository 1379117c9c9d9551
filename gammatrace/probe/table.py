"""Table assembly: the probe's per-step values, from device buffers to host tables.

A measured step arrives as what the kernel and the loss made it: device tensors on GPU,
kept as they are until :meth:`StepTable.flush` moves a whole epoch to the host at once
(a CUDA run is not synchronised every step). Flushed rows accumulate as frames until
:meth:`StepTable.take` hands them over. The arithmetic that turns the kernel's inner
products into columns lives here, in one place: P_k is formed from Δ_k, never as
½(d_k² − d_{k+1}²), which cancels catastrophically when steps are small.

Example:
    >>> import numpy as np, torch
    >>> from gammatrace.probe.table import StepTable
    >>> table = StepTable("record", ["w"])
    >>> parts = np.array([[4.0, 0.0, 1.0, 0.0, 0.25, 0.0, 0.01]])  # ee, eg, gg, ed, dd, eg/gg used
    >>> table.append(0, 0, 0.1, torch.tensor(2.0), None, parts)
    >>> table.skip(1, 0, 2, None)                        # two micro-batches, never stepped
    >>> table.steps().columns.tolist()
    ['step', 'epoch', 'lr', 'loss', 'update_sq', 'grad_sq', 'dist0_sq', 'grad_sq_used']
    >>> table.steps().values.tolist()
    [[0.0, 0.0, 0.1, 2.0, 0.25, 1.0, 4.0, 0.01]]
    >>> table.skipped()[["next_step", "micro_batches"]].values.tolist()
    [[1, 2]]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from gammatrace.principles import derive

# The measured columns (besides step, epoch, lr). g_k is the raw mini-batch gradient of ℓ_k
# (DESIGN §1): accumulated over the step's micro-batches, divided by the GradScaler's scale,
# before clipping (read at the end of the step's last backward, see gammatrace.probe.probe):
#   loss        ℓ_k, the sample-weighted mean of the micro-batch losses given to probe.batch
#   loss_ref    ℓ(θ*; B_k), the reference forward under the training forward's RNG/autocast
#   progress    P_k = ⟨θ_k − θ*, Δ_k⟩ − ½‖Δ_k‖²
#   dist_sq     d_k² = ‖θ_k − θ*‖²          dist0_sq  ‖θ_k − θ_0‖² (record mode)
#   update_sq   ‖Δ_k‖², Δ_k = θ_k − θ_{k+1}
#   grad_dot    ⟨θ_k − θ*, g_k⟩ (raw g_k; star = grad_dot − (ℓ_k − ℓ*_k))
#   grad_sq     ‖g_k‖² (raw g_k; the gradient-collapse rule reads it)
# and the gradient the optimizer received (after clipping or anything else the loop did to
# .grad between the backward and the step; equal to the raw one where nothing did):
#   grad_dot_used  ⟨θ_k − θ*, ĝ_k⟩        grad_sq_used  ‖ĝ_k‖²
# and the raw gradient with the optimizer's coupled weight decay folded in, g_k + λθ_k
# (:mod:`gammatrace.probe.decay`; equal to the raw ones where nothing decays, NaN where the decay
# is decoupled or the optimizer unknown):
#   grad_dot_wd  ⟨θ_k − θ*, g_k + λθ_k⟩      grad_sq_wd  ‖g_k + λθ_k‖²
# REFERENCE_COLUMNS is what every stored reference-mode step shard holds (runs written before
# the *_used or *_wd columns existed lack those).
RECORD_COLUMNS = ["loss", "update_sq", "grad_sq", "dist0_sq", "grad_sq_used"]
REFERENCE_COLUMNS = ["loss", "loss_ref", "progress", "dist_sq", "update_sq", "grad_dot", "grad_sq"]
USED_COLUMNS = ["grad_dot_used", "grad_sq_used"]
FOLDED_COLUMNS = ["grad_dot_wd", "grad_sq_wd"]
# The probe's per-step, per-tensor products, in this order: the kernel's five
# (:data:`gammatrace.probe.kernels.QUANTITIES`) with eg, gg of the raw gradient, then eg, gg of
# the gradient the optimizer received, then the folded decay's λ⟨θ, e⟩, 2λ⟨g, θ⟩, λ²‖θ‖².
STEP_QUANTITIES = ("ee", "eg", "gg", "ed", "dd", "eg_used", "gg_used", "wd_dot", "wd_cross", "wd_sq")
SKIPPED_COLUMNS = ["next_step", "epoch", "micro_batches", "loss"]


class StepTable:
    """The per-step, per-tensor, per-sample and skipped-step tables of one probe.

    Args:
        mode: ``"record"`` or ``"reference"`` (which columns, :attr:`columns`).
        names: the parameter tensors' names, in the kernel's order.
        per_tensor: keep P_k per tensor (reference mode): :meth:`tensor_steps`.
        start_step: the first step's index; D_0² (:attr:`d0_sq`) is measured only from 0.
    """

    def __init__(
        self, mode: str, names: Sequence[str], *, per_tensor: bool = True, start_step: int = 0
    ):
        self.mode, self.names, self.per_tensor = mode, list(names), per_tensor
        self._start_step = start_step
        # D_0² = ‖θ_0 − θ*‖², measured at the first step when the probe counts from step 0.
        self.d0_sq: float | None = None
        self._warned_d0 = False
        # Per step: (loss, reference loss or None, the kernel's (n_tensors, 5) products).
        self._pending: list[
            tuple[torch.Tensor, torch.Tensor | None, np.ndarray | torch.Tensor]
        ] = []
        self._pending_meta: list[tuple[int, int, float]] = []
        self._pending_samples: list[
            tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None]
        ] = []
        self._frames: list[pd.DataFrame] = []
        self._tensor_frames: list[pd.DataFrame] = []
        self._sample_frames: list[pd.DataFrame] = []
        # (next step, epoch, micro-batches, their loss or None) per step never made.
        self.skips: list[tuple[int, int, int, torch.Tensor | None]] = []

    @property
    def columns(self) -> list[str]:
        """Raw measured columns of this mode (besides step, epoch, lr)."""
        return RECORD_COLUMNS if self.mode == "record" else REFERENCE_COLUMNS + USED_COLUMNS + FOLDED_COLUMNS

    # ----------------------------------------------------------------- input
    def append(
        self,
        step: int,
        epoch: int,
        lr: float,
        loss: torch.Tensor,
        loss_ref: torch.Tensor | None,
        parts: np.ndarray | torch.Tensor,
        samples: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = (),
    ) -> None:
        """One measured step: its losses, the ``(n_tensors, 10)`` products (:data:`STEP_QUANTITIES`;
        ``(n_tensors, 5)``: the used gradient is the raw one; fewer than 10: the folded decay
        not measured) and the
        per-sample (indices, losses, reference losses or None) of its micro-batches."""
        self._pending.append((loss, loss_ref, parts))
        self._pending_meta.append((step, epoch, lr))
        for indices, sample_losses, refs in samples:
            self._pending_samples.append((step, epoch, indices, sample_losses, refs))

    def skip(
        self, next_step: int, epoch: int, micro_batches: int, loss: torch.Tensor | None
    ) -> None:
        """One step the optimizer never made (see :meth:`skipped`)."""
        self.skips.append((next_step, epoch, micro_batches, loss))

    # ---------------------------------------------------------------- output
    def flush(self) -> pd.DataFrame:
        """Move pending per-step values to the host (one synchronisation) and return them raw."""
        if not self._pending:
            return pd.DataFrame(columns=["step", "epoch", "lr", *self.columns])
        # Losses are float32 (one micro-batch) or float64 (a weighted mean, a Python float).
        losses = (
            torch.stack([loss.to(torch.float64) for loss, _, _ in self._pending]).cpu().numpy()
        )
        # (steps, tensors, QUANTITIES); a device kernel's values cross to the host here, once.
        parts = [part for _, _, part in self._pending]
        parts = (
            torch.stack(parts).cpu().numpy()
            if isinstance(parts[0], torch.Tensor)
            else np.stack(parts)
        )
        frame = self._step_frame(losses, parts)
        if self.d0_sq is None and self.mode == "reference" and self._start_step == 0 and len(frame):
            self.d0_sq = float(frame["dist_sq"].iloc[0])
        self._frames.append(frame)
        if self.mode == "reference" and self.per_tensor:
            self._tensor_frames.append(self._tensor_frame(frame, parts))
        if self._pending_samples:
            self._sample_frames.append(self._sample_frame())
        self._pending, self._pending_meta, self._pending_samples = [], [], []
        return frame

    def _step_frame(self, losses: np.ndarray, parts: np.ndarray) -> pd.DataFrame:
        sums = np.moveaxis(parts.sum(axis=1), 1, 0)
        ee, eg, gg, ed, dd = sums[:5]
        eg_used, gg_used = sums[5:7] if len(sums) >= 7 else (eg, gg)
        # The folded decay's products (absent: not measured, NaN).
        wd_dot, wd_cross, wd_sq = sums[7:10] if len(sums) >= 10 else (np.full_like(eg, np.nan),) * 3
        if self.mode == "record":
            values = {
                "loss": losses,
                "update_sq": dd,
                "grad_sq": gg,
                "dist0_sq": ee,
                "grad_sq_used": gg_used,
            }
        else:
            loss_ref = (
                torch.stack([ref.reshape(()).to(torch.float64) for _, ref, _ in self._pending])
                .cpu()
                .numpy()
            )
            # P_k from Δ_k, never as ½(d_k² − d_{k+1}²), which cancels when steps are small.
            values = {
                "loss": losses,
                "loss_ref": loss_ref,
                "progress": ed - 0.5 * dd,
                "dist_sq": ee,
                "update_sq": dd,
                "grad_dot": eg,
                "grad_sq": gg,
                "grad_dot_used": eg_used,
                "grad_sq_used": gg_used,
                "grad_dot_wd": eg + wd_dot,
                "grad_sq_wd": gg + wd_cross + wd_sq,
            }
        meta = np.array(self._pending_meta, dtype=np.float64)
        return pd.DataFrame(
            {
                "step": meta[:, 0].astype(np.int64),
                "epoch": meta[:, 1].astype(np.int64),
                "lr": meta[:, 2],
                **{c: values[c] for c in self.columns},
            }
        )

    def _tensor_frame(self, frame: pd.DataFrame, parts: np.ndarray) -> pd.DataFrame:
        per = parts[:, :, 3] - 0.5 * parts[:, :, 4]
        n_steps, n_t = per.shape
        return pd.DataFrame(
            {
                "step": np.repeat(frame["step"].to_numpy(), n_t),
                "epoch": np.repeat(frame["epoch"].to_numpy(), n_t),
                "tensor": np.tile(np.array(self.names, dtype=object), n_steps),
                "progress": per.reshape(-1),
            }
        )

    def _sample_frame(self) -> pd.DataFrame:
        sample_parts = []
        for step, epoch, idx, sample_losses, refs in self._pending_samples:
            part = {
                "step": step,
                "epoch": epoch,
                "index": idx.cpu().numpy(),
                "loss": sample_losses.to(torch.float64).cpu().numpy(),
            }
            if refs is not None:
                part["loss_ref"] = refs.to(torch.float64).cpu().numpy()
            sample_parts.append(pd.DataFrame(part))
        return pd.concat(sample_parts, ignore_index=True)

    def raw_steps(self) -> pd.DataFrame:
        """All measured rows so far, without derived columns."""
        self.flush()
        if not self._frames:
            return pd.DataFrame(columns=["step", "epoch", "lr", *self.columns])
        return pd.concat(self._frames, ignore_index=True)

    def derived(
        self, frame: pd.DataFrame, *, ell_inf: float = 0.0, d0_sq: float | None = None
    ) -> pd.DataFrame:
        """``frame`` with the derived columns of :func:`gammatrace.principles.derive`
        (reference mode; a record-mode or empty frame is returned as it is)."""
        if self.mode == "record" or frame.empty:
            return frame
        return derive(frame, d0_sq=self._d0(d0_sq), ell_inf=ell_inf)

    def steps(self, ell_inf: float = 0.0, d0_sq: float | None = None) -> pd.DataFrame:
        """All measured rows with the derived columns (see :meth:`derived`)."""
        return self.derived(self.raw_steps(), ell_inf=ell_inf, d0_sq=d0_sq)

    def _d0(self, d0_sq: float | None) -> float | None:
        """D_0² for the derived columns: given, measured at step 0, or (with a warning) the
        squared distance at the first step this table holds."""
        if d0_sq is not None or self.d0_sq is not None:
            return d0_sq if d0_sq is not None else self.d0_sq
        frames = [f for f in self._frames if len(f)]
        if not frames:
            return None
        if not self._warned_d0:
            self._warned_d0 = True
            warnings.warn(
                f"the probe started counting at step {self._start_step}, so it never saw θ_0: "
                "γ and γ^RP are normalised by the squared distance at its first step instead "
                "of D_0²; pass d0_sq=‖θ_0 − θ*‖²",
                RuntimeWarning,
                stacklevel=4,  # the caller of Probe.steps / Probe.end_epoch (via derived)
            )
        return float(frames[0]["dist_sq"].iloc[0])

    def skipped(self) -> pd.DataFrame:
        """Steps never made: next_step, epoch, micro_batches, loss (NaN when unknown)."""
        rows = [
            (step, epoch, n, math.nan if loss is None else float(loss))
            for step, epoch, n, loss in self.skips
        ]
        frame = pd.DataFrame(rows, columns=SKIPPED_COLUMNS)
        return frame.astype(
            {
                "next_step": np.int64,
                "epoch": np.int64,
                "micro_batches": np.int64,
                "loss": np.float64,
            }
        )

    def tensor_steps(self) -> pd.DataFrame:
        """Per-tensor progress P_k,i as a long table (step, epoch, tensor, progress)."""
        self.flush()
        if not self._tensor_frames:
            return pd.DataFrame(columns=["step", "epoch", "tensor", "progress"])
        return pd.concat(self._tensor_frames, ignore_index=True)

    def sample_steps(self) -> pd.DataFrame:
        """Per-sample losses at each visit (step, epoch, index, loss[, loss_ref])."""
        self.flush()
        if not self._sample_frames:
            return pd.DataFrame(columns=["step", "epoch", "index", "loss"])
        return pd.concat(self._sample_frames, ignore_index=True)

    def take(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """Flush and hand over (raw steps, tensor steps, sample steps), clearing host memory."""
        out = (self.raw_steps(), self.tensor_steps(), self.sample_steps())
        self._frames, self._tensor_frames, self._sample_frames = [], [], []
        return out

    def nbytes(self) -> int:
        """Bytes of the per-step values held: pending (loss, loss_ref, per-tensor products)
        and flushed frames (what ``benchmarks/probe_overhead.py`` reports)."""
        total = 0
        for item in self._pending:
            for v in item:
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
                elif v is not None:
                    total += v.nbytes
        for frames in (self._frames, self._tensor_frames, self._sample_frames):
            total += sum(int(f.memory_usage(deep=True).sum()) for f in frames)
        return total
