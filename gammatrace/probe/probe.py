"""Exact per-step trajectory measurements with O(model size) memory.

The probe measures the update the optimizer actually made, Δ_k = θ_k − θ_{k+1},
whatever the optimizer (DESIGN.md §1), and every inner product the principles need:

* record mode (no reference): loss, ‖Δ_k‖², ‖g_k‖², ‖θ_k − θ_0‖²;
* reference mode (θ* known): additionally ℓ*_k = ℓ(θ*; B_k) from one extra forward,
  P_k = ⟨θ_k − θ*, Δ_k⟩ − ½‖Δ_k‖², d_k² = ‖θ_k − θ*‖², ⟨θ_k − θ*, g_k⟩, and P_k per
  parameter tensor.

Why the arithmetic looks the way it does:

* A float32 value is exact in float64 and so is the difference of two float32 values, so
  Δ_k and θ_k − θ* carry no rounding; inner products accumulate in float64. P_k is formed
  from Δ_k, never as ½(d_k² − d_{k+1}²), which cancels catastrophically when steps are
  small. The arithmetic is a kernel (:mod:`gammatrace.probe.kernels`): a fused Numba loop
  on CPU, which holds only θ_k and the anchor in the parameters' dtype, and float64
  torch buffers elsewhere; both yield the same per-tensor inner products.
* Per-step values stay where the kernel made them (a list of device tensors on GPU) and
  are moved to the host once per :meth:`Probe.flush` (the trainer flushes once per
  epoch), so a CUDA run is not synchronised every step.
* The reference forward runs on a private copy of the model under ``no_grad`` and a
  forked RNG: batch-norm running statistics and dropout streams of the trained model
  are untouched, so probing never changes the trajectory it measures.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from gammatrace.probe.kernels import make_kernel

RECORD_COLUMNS = ["loss", "update_sq", "grad_sq", "dist0_sq"]
REFERENCE_COLUMNS = ["loss", "loss_ref", "progress", "dist_sq", "update_sq", "grad_dot", "grad_sq"]


class ReferenceError_(ValueError):
    """The reference parameters do not fit the model."""


def load_reference(reference: str | Path | Mapping[str, torch.Tensor], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """A reference state dict from a mapping or a file (loaded with ``weights_only=True``).

    Files may hold a plain state dict or a gammatrace checkpoint (``{"model": state_dict, ...}``).
    """
    if isinstance(reference, (str, Path)):
        path = Path(reference)
        if not path.is_file():
            raise ReferenceError_(f"reference file {path} does not exist")
        try:
            obj = torch.load(path, map_location=device or "cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for damaged files
            raise ReferenceError_(f"cannot read reference file {path}: {exc.__class__.__name__}: {exc}") from None
        if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
            obj = obj["model"]
        reference = obj
    if not isinstance(reference, Mapping):
        raise ReferenceError_(f"a reference must be a state dict or a path, got {type(reference).__name__}")
    return dict(reference)


class Probe:
    """Measure the trajectory principles of a training loop, exactly and online.

    Args:
        model: the module being trained. Its trainable parameters (``requires_grad``)
            define θ; buffers (batch-norm statistics) are not parameters.
        optimizer: any ``torch.optim`` optimizer; :meth:`step` calls its ``step()``.
        loss_fn: ``loss_fn(model, batch) -> loss``, the same loss the loop minimises;
            needed in reference mode to evaluate ℓ(θ*; B_k). It may return per-sample
            losses (a vector); their mean is the batch loss.
        reference: θ* as a state dict or a path; ``None`` selects record mode.
        per_tensor: also record P_k per parameter tensor (reference mode).
        lr_group: the parameter group whose learning rate is η_k. Updates are measured,
            not re-derived, so this only sets the normalisation of γ.
        step, epoch: the counters of the first step (a resumed run or a replay segment).
        origin: θ_0 for the record-mode distance ‖θ_k − θ_0‖² (default: the current
            parameters, i.e. the probe is attached before the first step).
        kernel: the arithmetic, ``"fused"`` (CPU float32/float64) or ``"torch"`` (any
            device); ``None`` picks ``fused`` where it applies. Both give the same
            numbers to float64 round-off.

    Example:
        >>> import torch, gammatrace
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> target = {k: v.clone() for k, v in model.state_dict().items()}  # any θ*
        >>> probe = gammatrace.Probe(model, opt, loss_fn, reference=target)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     loss = loss_fn(model, (x, y))
        ...     loss.backward()
        ...     probe.step(loss, (x, y))
        >>> list(probe.steps().columns[:6])
        ['step', 'epoch', 'lr', 'loss', 'loss_ref', 'progress']
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        reference: str | Path | Mapping[str, torch.Tensor] | None = None,
        *,
        per_tensor: bool = True,
        lr_group: int = 0,
        step: int = 0,
        epoch: int = 0,
        origin: Mapping[str, torch.Tensor] | None = None,
        kernel: str | None = None,
    ):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.per_tensor, self.lr_group = per_tensor, lr_group
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.device = self.params[0].device
        self.step_index, self.epoch = step, epoch
        self._ref_model: nn.Module | None = None
        if reference is None:
            self.mode = "record"
            anchor = [p.detach() for p in self.params] if origin is None else self._pick(dict(origin), "origin")  # θ_0
        else:
            self.mode = "reference"
            if loss_fn is None:
                raise ValueError("reference mode needs loss_fn(model, batch) to evaluate the reference loss")
            anchor = self._set_reference(load_reference(reference, self.device))
        self.kernel = make_kernel(kernel, self.params, anchor)
        # Per step: (loss, reference loss or None, the kernel's (n_tensors, 5) products).
        self._pending: list[tuple[torch.Tensor, torch.Tensor | None, np.ndarray | torch.Tensor]] = []
        self._pending_meta: list[tuple[int, int, float]] = []
        self._pending_samples: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self._frames: list[pd.DataFrame] = []
        self._tensor_frames: list[pd.DataFrame] = []
        self._sample_frames: list[pd.DataFrame] = []

    # ------------------------------------------------------------------ buffers
    def _pick(self, state: dict[str, torch.Tensor], what: str) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ReferenceError_(f"{what} lacks {len(missing)} trainable tensor(s), e.g. {missing[:3]}")
        bad = [n for n, p in zip(self.names, self.params) if tuple(state[n].shape) != tuple(p.shape)]
        if bad:
            raise ReferenceError_(f"{what} shapes differ from the model for {bad[:3]}")
        return [state[n].to(self.device) for n in self.names]

    def _set_reference(self, state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        anchor = self._pick(state, "reference")
        ref = copy.deepcopy(self.model)
        own = ref.state_dict()
        # Buffers the reference file does not carry (e.g. θ* given as parameters only)
        # keep the model's current values; in train mode they do not affect the loss.
        ref.load_state_dict({k: state.get(k, v) for k, v in own.items()})
        for p in ref.parameters():
            p.requires_grad_(False)
            p.grad = None
        self._ref_model = ref
        return anchor

    # ---------------------------------------------------------------- the step
    def _reference_loss(self, batch: Any) -> torch.Tensor:
        assert self._ref_model is not None and self.loss_fn is not None
        self._ref_model.train(self.model.training)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            return self.loss_fn(self._ref_model, batch).detach()

    def step(
        self,
        loss: torch.Tensor,
        batch: Any = None,
        *,
        closure: Callable[[], Any] | None = None,
        indices: torch.Tensor | None = None,
        sample_losses: torch.Tensor | None = None,
    ) -> None:
        """Run ``optimizer.step()`` and measure around it.

        Call after ``loss.backward()``. ``batch`` is what ``loss_fn`` takes (reference
        mode). ``indices``/``sample_losses`` (dataset indices of the batch and the
        unreduced losses) additionally record per-sample losses at each visit, for
        the per-sample convergence check of Theorem 1.
        """
        lr = float(self.optimizer.param_groups[self.lr_group]["lr"])
        # θ_k and g_k are read before the step: what the optimizer then does to .grad
        # (in-place weight decay, clipping, sign flips) cannot leak into the measurement.
        self.kernel.before(self.params, [p.grad for p in self.params])
        loss_ref = ref_samples = None
        if self.mode == "reference":
            ref_out = self._reference_loss(batch)
            if ref_out.dim() > 0:
                ref_samples, loss_ref = ref_out, ref_out.mean()
            else:
                loss_ref = ref_out

        self.optimizer.step(closure) if closure is not None else self.optimizer.step()

        self._pending.append((loss.detach().reshape(()), loss_ref, self.kernel.after(self.params)))
        self._pending_meta.append((self.step_index, self.epoch, lr))
        if indices is not None and sample_losses is not None:
            self._pending_samples.append(
                (self.step_index, self.epoch, indices.detach(), sample_losses.detach(), None if ref_samples is None else ref_samples)
            )
        self.step_index += 1

    # ------------------------------------------------------------ host side
    def end_epoch(self) -> pd.DataFrame:
        """Flush, then count following steps in the next epoch. Returns the epoch's raw rows."""
        frame = self.flush()
        self.epoch += 1
        return frame

    def flush(self) -> pd.DataFrame:
        """Move pending per-step values to the host (one synchronisation) and return them raw."""
        if not self._pending:
            return pd.DataFrame(columns=["step", "epoch", "lr", *self.columns])
        losses = torch.stack([loss for loss, _, _ in self._pending]).to(torch.float64).cpu().numpy()
        # (steps, tensors, QUANTITIES); a device kernel's values cross to the host here, once.
        parts = [part for _, _, part in self._pending]
        parts = torch.stack(parts).cpu().numpy() if isinstance(parts[0], torch.Tensor) else np.stack(parts)
        ee, eg, gg, ed, dd = np.moveaxis(parts.sum(axis=1), 1, 0)
        if self.mode == "record":
            values = {"loss": losses, "update_sq": dd, "grad_sq": gg, "dist0_sq": ee}
        else:
            loss_ref = torch.stack([ref.reshape(()) for _, ref, _ in self._pending]).to(torch.float64).cpu().numpy()
            # P_k from Δ_k, never as ½(d_k² − d_{k+1}²), which cancels when steps are small.
            values = {"loss": losses, "loss_ref": loss_ref, "progress": ed - 0.5 * dd,
                      "dist_sq": ee, "update_sq": dd, "grad_dot": eg, "grad_sq": gg}
        meta = np.array(self._pending_meta, dtype=np.float64)
        frame = pd.DataFrame({"step": meta[:, 0].astype(np.int64), "epoch": meta[:, 1].astype(np.int64),
                              "lr": meta[:, 2], **{c: values[c] for c in self.columns}})
        self._frames.append(frame)
        if self.mode == "reference" and self.per_tensor:
            per = parts[:, :, 3] - 0.5 * parts[:, :, 4]
            n_steps, n_t = per.shape
            self._tensor_frames.append(pd.DataFrame({
                "step": np.repeat(frame["step"].to_numpy(), n_t),
                "epoch": np.repeat(frame["epoch"].to_numpy(), n_t),
                "tensor": np.tile(np.array(self.names, dtype=object), n_steps),
                "progress": per.reshape(-1),
            }))
        if self._pending_samples:
            parts = []
            for step, epoch, idx, losses, refs in self._pending_samples:
                part = {"step": step, "epoch": epoch, "index": idx.cpu().numpy(),
                        "loss": losses.to(torch.float64).cpu().numpy()}
                if refs is not None:
                    part["loss_ref"] = refs.to(torch.float64).cpu().numpy()
                parts.append(pd.DataFrame(part))
            self._sample_frames.append(pd.concat(parts, ignore_index=True))
        self._pending, self._pending_meta, self._pending_samples = [], [], []
        return frame

    @property
    def columns(self) -> list[str]:
        """Raw measured columns of this mode (besides step, epoch, lr)."""
        return RECORD_COLUMNS if self.mode == "record" else REFERENCE_COLUMNS

    def raw_steps(self) -> pd.DataFrame:
        """All measured rows so far, without derived columns."""
        self.flush()
        if not self._frames:
            return pd.DataFrame(columns=["step", "epoch", "lr", *self.columns])
        return pd.concat(self._frames, ignore_index=True)

    def steps(self, ell_inf: float = 0.0, d0_sq: float | None = None) -> pd.DataFrame:
        """The per-step table of DESIGN.md §6 (reference mode) or the record-mode table.

        Derived columns (gamma, gamma_rp, gamma_rc, star, cos_align) are computed by
        :func:`gammatrace.principles.derive`; D_0² defaults to the first step's d_k².
        """
        raw = self.raw_steps()
        if self.mode == "record" or raw.empty:
            return raw
        from gammatrace.principles import derive

        return derive(raw, d0_sq=d0_sq, ell_inf=ell_inf)

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
        """Flush and hand over (raw steps, tensor steps, sample steps), clearing host memory.

        The trainer writes each epoch's frames to disk and drops them, so host memory
        stays O(steps per epoch).
        """
        out = (self.raw_steps(), self.tensor_steps(), self.sample_steps())
        self._frames, self._tensor_frames, self._sample_frames = [], [], []
        return out
