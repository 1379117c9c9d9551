"""Exact per-step trajectory measurements with O(model size) memory.

The probe measures the update the optimizer actually made, Δ_k = θ_k − θ_{k+1},
whatever the optimizer (DESIGN.md §1), and every inner product the principles need:

* record mode (no reference): loss, ‖Δ_k‖², ‖g_k‖², ‖θ_k − θ_0‖²;
* reference mode (θ* known): additionally ℓ*_k = ℓ(θ*; B_k) from one extra forward,
  P_k = ⟨θ_k − θ*, Δ_k⟩ − ½‖Δ_k‖², d_k² = ‖θ_k − θ*‖², ⟨θ_k − θ*, g_k⟩, and P_k per
  parameter tensor.

Why the arithmetic looks the way it does:

* θ_k − θ*, g_k, Δ_k and θ_{k+1} live in one (4, d) float64 block. A float32 value is exact in
  float64 and the difference of two float32 values is exact in float64, so Δ_k and
  θ_k − θ* carry no rounding; inner products accumulate in float64. P_k is formed from Δ_k,
  never as ½(d_k² − d_{k+1}²), which cancels catastrophically when steps are small.
* Per-step scalars stay on the device in a list and are moved to the host once per
  :meth:`Probe.flush` (the trainer flushes once per epoch), so a CUDA run is not
  synchronised every step.
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
    ):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.per_tensor, self.lr_group = per_tensor, lr_group
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.sizes = [p.numel() for p in self.params]
        self.n_params = sum(self.sizes)
        self.device = self.params[0].device
        self.step_index, self.epoch = step, epoch
        # One (4, d) float64 block: row 0 = θ_k − anchor, row 1 = g_k, row 2 = θ_k, then
        # Δ_k, row 3 = θ_{k+1}. Preallocated: a mixed-dtype in-place subtraction would
        # allocate (and page-fault) a d-sized float64 temporary every step.
        self._block = torch.zeros(4, self.n_params, dtype=torch.float64, device=self.device)
        self._e_views, self._g_views, self._d_views, self._next_views = (self._views(row) for row in self._block)
        ends = torch.tensor(self.sizes).cumsum(0).tolist()
        self._bounds = list(zip([0, *ends[:-1]], ends))
        self._ref_model: nn.Module | None = None
        if reference is None:
            self.mode = "record"
            self._anchor = self._flat()  # θ_0
            start = [p.detach() for p in self.params] if origin is None else self._pick(dict(origin), "origin")
            torch._foreach_copy_(self._views(self._anchor), start)
        else:
            self.mode = "reference"
            if loss_fn is None:
                raise ValueError("reference mode needs loss_fn(model, batch) to evaluate the reference loss")
            self._anchor = self._set_reference(load_reference(reference, self.device))
        self._pending: list[torch.Tensor] = []
        self._pending_tensor: list[torch.Tensor] = []
        self._pending_meta: list[tuple[int, int, float]] = []
        self._pending_samples: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self._frames: list[pd.DataFrame] = []
        self._tensor_frames: list[pd.DataFrame] = []
        self._sample_frames: list[pd.DataFrame] = []

    # ------------------------------------------------------------------ buffers
    def _flat(self) -> torch.Tensor:
        return torch.zeros(self.n_params, dtype=torch.float64, device=self.device)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [v.view_as(p) for v, p in zip(flat.split(self.sizes), self.params)]

    def _pick(self, state: dict[str, torch.Tensor], what: str) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ReferenceError_(f"{what} lacks {len(missing)} trainable tensor(s), e.g. {missing[:3]}")
        bad = [n for n, p in zip(self.names, self.params) if tuple(state[n].shape) != tuple(p.shape)]
        if bad:
            raise ReferenceError_(f"{what} shapes differ from the model for {bad[:3]}")
        return [state[n].to(self.device) for n in self.names]

    def _set_reference(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        anchor = self._flat()
        torch._foreach_copy_(self._views(anchor), self._pick(state, "reference"))
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
        group = self.optimizer.param_groups[self.lr_group]
        lr = float(group["lr"])
        params = [p.detach() for p in self.params]
        block, anchor = self._block, self._anchor
        torch._foreach_copy_(self._d_views, params)  # θ_k, exact in float64
        have = [i for i, p in enumerate(self.params) if p.grad is not None]
        if len(have) < len(self.params):  # a tensor the loss did not reach has g = 0
            for i in set(range(len(self.params))) - set(have):
                self._g_views[i].zero_()
        if have:
            torch._foreach_copy_([self._g_views[i] for i in have], [self.params[i].grad.detach() for i in have])
        ref_samples = None
        if self.mode == "reference":
            ref_out = self._reference_loss(batch)
            if ref_out.dim() > 0:
                ref_samples, loss_ref = ref_out, ref_out.mean()
            else:
                loss_ref = ref_out
        torch.sub(block[2], anchor, out=block[0])

        self.optimizer.step(closure) if closure is not None else self.optimizer.step()

        torch._foreach_copy_(self._next_views, params)  # θ_{k+1}, exact in float64
        torch.sub(block[2], block[3], out=block[2])  # Δ_k = θ_k − θ_{k+1}, exact
        loss64 = loss.detach().reshape(()).to(torch.float64)
        e, g, d = block[0], block[1], block[2]
        # Plain float64 dots: for a (3, d) block, BLAS's skinny GEMM measured 2-3x slower
        # than the few dot products a step needs (memory-bound either way).
        if self.mode == "reference" and self.per_tensor:
            ed = torch.stack([e[a:b].dot(d[a:b]) for a, b in self._bounds])
            dd = torch.stack([d[a:b].dot(d[a:b]) for a, b in self._bounds])
            self._pending_tensor.append(ed - 0.5 * dd)
            ed_sum, dd_sum = ed.sum(), dd.sum()
        else:
            ed_sum, dd_sum = (e.dot(d) if self.mode == "reference" else None), d.dot(d)
        if self.mode == "record":
            row = torch.stack([loss64, dd_sum, g.dot(g), e.dot(e)])
        else:
            row = torch.stack([
                loss64, loss_ref.reshape(()).to(torch.float64), ed_sum - 0.5 * dd_sum,
                e.dot(e), dd_sum, e.dot(g), g.dot(g),
            ])
        self._pending.append(row)
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
        values = torch.stack(self._pending).cpu().numpy()
        meta = np.array(self._pending_meta, dtype=np.float64)
        frame = pd.DataFrame(values, columns=self.columns)
        frame.insert(0, "step", meta[:, 0].astype(np.int64))
        frame.insert(1, "epoch", meta[:, 1].astype(np.int64))
        frame.insert(2, "lr", meta[:, 2])
        self._frames.append(frame)
        if self._pending_tensor:
            per = torch.stack(self._pending_tensor).cpu().numpy()
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
        self._pending, self._pending_tensor, self._pending_meta, self._pending_samples = [], [], [], []
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
