"""The brute force every probe test holds the §6 columns to, shared (one copy).

``brute_force_table`` computes each column of DESIGN §6 from stored float64 iterates θ_k, the
raw and the used gradient and the micro-batch losses, one obvious formula each;
``assert_matches_brute_force`` compares a probe's table with it at ≤ 1e-9 relative (inner
products that can pass through zero get an absolute floor of 1e-13 of the product of the
norms involved: float64 round-off of a sum over the parameters). ``Recorder`` is a stand-in
for ``gammatrace.attach``/``Probe`` that reads everything a step needs and changes nothing.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

DERIVED = ["gamma", "gamma_rp", "gamma_rc", "star", "cos_align", "rsi", "eb", "rsi_wd", "eb_wd", "rsi_eb"]
FOLDED = ["grad_dot_wd", "grad_sq_wd"]


def flat64(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Σ n_i v_i / Σ n_i (one micro-batch: the value itself)."""
    if len(values) == 1:
        return float(values[0])
    return float(sum(v * n for v, n in zip(values, weights, strict=True)) / sum(weights))


def brute_force_table(thetas: Sequence[torch.Tensor], theta_star: torch.Tensor, raw: Sequence[torch.Tensor],
                      used: Sequence[torch.Tensor], lrs: Sequence[float], losses: Sequence[float],
                      losses_ref: Sequence[float], *, names: Sequence[str] = (), sizes: Sequence[int] = (),
                      epochs: Sequence[int] | None = None, decay: float | None = None
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The §6 table (and per-tensor progress when ``names``/``sizes`` are given) from θ_0..θ_T
    (``len(thetas) == steps + 1``), θ*, the raw and used gradients, η_k, ℓ_k and ℓ*_k.
    ``decay``: the optimizer's coupled weight decay λ (g_k + λθ_k in ``grad_dot_wd``,
    ``grad_sq_wd``); None where there is none to fold (decoupled decay, a manual update): NaN."""
    rows, tensor_rows = [], []
    for k in range(len(thetas) - 1):
        e, delta = thetas[k] - theta_star, thetas[k] - thetas[k + 1]
        g, u = raw[k], used[k]
        rows.append({
            "step": k, "epoch": 0 if epochs is None else epochs[k], "lr": lrs[k], "loss": losses[k],
            "loss_ref": losses_ref[k], "progress": float(e @ delta - 0.5 * delta @ delta),
            "dist_sq": float(e @ e), "update_sq": float(delta @ delta), "grad_dot": float(e @ g),
            "grad_sq": float(g @ g), "grad_dot_used": float(e @ u), "grad_sq_used": float(u @ u),
            "delta_dot_e": float(delta @ e),
            "grad_dot_wd": np.nan if decay is None else float(e @ (g + decay * thetas[k])),
            "grad_sq_wd": np.nan if decay is None else float((g + decay * thetas[k]) @ (g + decay * thetas[k])),
        })
        for name, e_i, d_i in zip(names, e.split(list(sizes)), delta.split(list(sizes)), strict=True):
            tensor_rows.append({"step": k, "tensor": name, "progress": float(e_i @ d_i - 0.5 * d_i @ d_i)})
    df = pd.DataFrame(rows)
    # The derived columns of DESIGN §1, each from its definition (ℓ_inf = 0, D_0² = d_0²).
    d0, gap, lr, P = df["dist_sq"].iloc[0], df["loss"] - df["loss_ref"], df["lr"], df["progress"]
    with np.errstate(divide="ignore", invalid="ignore"):
        df["gamma"] = np.where(gap > 1e-8, P / (lr * d0 * gap), np.nan)
        df["gamma_rp"] = np.where(df["loss"] > 1e-8, P / (lr * df["loss"]) / d0, np.nan)
        df["gamma_rc"] = np.where(df["dist_sq"] > 0, P / (lr * df["dist_sq"]), np.nan)
        df["star"] = df["grad_dot"] - gap
        df["cos_align"] = df.pop("delta_dot_e") / np.sqrt(df["dist_sq"] * df["update_sq"])
        df["rsi"] = df["grad_dot"] / df["dist_sq"]
        df["eb"] = np.sqrt(df["grad_sq"]) / np.sqrt(df["dist_sq"])
        df["rsi_wd"] = df["grad_dot_wd"] / df["dist_sq"]
        df["eb_wd"] = np.sqrt(df["grad_sq_wd"]) / np.sqrt(df["dist_sq"])
        df["rsi_eb"] = df["rsi"] / df["eb"]
    return df, pd.DataFrame(tensor_rows)


def close(name, ours, expected, floor=None):
    """≤ 1e-9 relative; ``floor``: an absolute float64 round-off floor per row."""
    ours, expected = np.asarray(ours, dtype=float), np.asarray(expected, dtype=float)
    atol = 0.0 if floor is None else np.asarray(floor, dtype=float)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(expected), err_msg=name)
    ok = ~np.isnan(expected)
    err = np.abs(ours[ok] - expected[ok])
    bound = 1e-9 * np.abs(expected[ok]) + (atol[ok] if floor is not None else 0.0)
    assert (err <= bound).all(), (name, np.flatnonzero(ok)[err > bound], ours[ok][err > bound],
                                  expected[ok][err > bound])


def assert_matches_brute_force(steps: pd.DataFrame, expected: pd.DataFrame, tensors: pd.DataFrame | None = None,
                               expected_tensors: pd.DataFrame | None = None) -> None:
    """Every column of ``steps`` (raw and derived) against the brute force, ≤ 1e-9 relative."""
    assert len(steps) == len(expected)
    for c in ("step", "epoch", "lr"):
        np.testing.assert_array_equal(steps[c], expected[c], err_msg=c)
    norm = lambda col: np.sqrt(expected[col].to_numpy())  # noqa: E731
    d, dd, g, gu = norm("dist_sq"), norm("update_sq"), norm("grad_sq"), norm("grad_sq_used")
    for col in ("loss", "loss_ref", "dist_sq", "update_sq", "grad_sq", "grad_sq_used", "gamma_rc", "eb"):
        close(col, steps[col], expected[col])
    # Inner products: relative, with a floor of float64 round-off of the product of the norms.
    close("progress", steps["progress"], expected["progress"], 1e-13 * (d * dd + dd * dd))
    close("grad_dot", steps["grad_dot"], expected["grad_dot"], 1e-13 * d * g)
    close("grad_dot_used", steps["grad_dot_used"], expected["grad_dot_used"], 1e-13 * d * gu)
    close("cos_align", steps["cos_align"], expected["cos_align"], 1e-13 * (1 + dd / d))
    close("rsi", steps["rsi"], expected["rsi"], 1e-13 * g / d)
    close("rsi_eb", steps["rsi_eb"], expected["rsi_eb"], np.full(len(expected), 1e-13))  # a cosine
    gw = np.sqrt(expected["grad_sq_wd"].to_numpy())
    close("grad_sq_wd", steps["grad_sq_wd"], expected["grad_sq_wd"])
    close("eb_wd", steps["eb_wd"], expected["eb_wd"])
    close("grad_dot_wd", steps["grad_dot_wd"], expected["grad_dot_wd"], 1e-13 * d * gw)
    close("rsi_wd", steps["rsi_wd"], expected["rsi_wd"], 1e-13 * gw / d)
    gap = (expected["loss"] - expected["loss_ref"]).abs().to_numpy()
    close("star", steps["star"], expected["star"], 1e-13 * d * g + 1e-9 * gap)
    lr_d0 = expected["lr"].to_numpy() * expected["dist_sq"].iloc[0]
    close("gamma_rp", steps["gamma_rp"], expected["gamma_rp"],
          1e-13 * (d * dd + dd * dd) / (lr_d0 * expected["loss"].to_numpy()))
    close("gamma", steps["gamma"], expected["gamma"], 1e-13 * (d * dd + dd * dd) / (lr_d0 * np.maximum(gap, 1e-300)))
    if tensors is not None:
        assert len(tensors) == len(expected_tensors)
        np.testing.assert_array_equal(tensors["tensor"].to_numpy(), expected_tensors["tensor"].to_numpy())
        scale = np.repeat(d * dd + dd * dd, len(tensors) // len(expected))
        close("tensor progress", tensors["progress"], expected_tensors["progress"], 1e-13 * scale)


# --------------------------------------------------------------------------- a read-only recorder
class Recorder:
    """What ``gammatrace.attach`` returns, as a brute force: it reads θ_k, the raw gradient (each
    tensor's .grad as the step's last backward left it), the gradient the step used, η_k, every
    micro-batch with its loss, size and the RNG state of its training forward, and changes
    nothing. ``probe.batch``, ``with probe.update(lr)`` and ``probe.end_epoch`` as the probe.
    ``finish()`` adds θ_T and ℓ(θ*; B) of every micro-batch with θ* = θ_T."""

    def __init__(self, model: nn.Module, optimizer, loss_fn=None, **_):
        self.model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.loss_fn = loss_fn
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.sizes = [p.numel() for p in self.params]
        self.steps: list[dict] = []
        self.epoch, self._micro, self._raw, self._rng = 0, [], {}, None
        for p in self.params:
            p.register_post_accumulate_grad_hook(lambda q: self._raw.__setitem__(id(q), q.grad.detach().clone()))
        self._hook = torch.nn.modules.module.register_module_forward_pre_hook(self._forward)
        if optimizer is not None:
            optimizer.register_step_pre_hook(lambda opt, a, k: self._step(opt.param_groups[0]["lr"]))

    def _forward(self, module, args):
        if module is self.model and torch.is_grad_enabled() and self._rng is None:
            self._rng = torch.get_rng_state()

    def batch(self, batch, loss, **_):
        clone = tuple(t.detach().clone() if isinstance(t, torch.Tensor) else t for t in batch)
        n = batch[0].shape[0] if isinstance(batch[0], torch.Tensor) and batch[0].dim() else 1
        self._micro.append((clone, float(loss.detach().double()), n, self._rng, self.model.training))
        self._rng = None

    def _step(self, lr):
        self.steps.append({
            "theta": flat64(self.params),
            "raw": flat64([self._raw.get(id(p), torch.zeros_like(p)) for p in self.params]),
            "used": flat64([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]),
            "lr": float(lr), "micro": self._micro, "epoch": self.epoch})
        self._micro, self._raw = [], {}

    @contextlib.contextmanager
    def update(self, lr):
        self._step(lr)
        yield

    def end_epoch(self):
        self.epoch += 1

    def finish(self) -> dict:
        """Everything the brute force needs, θ* = θ_T, ℓ(θ*; B) under each forward's RNG state."""
        self._hook.remove()
        ref = copy.deepcopy(self.model)
        out = {"thetas": [s["theta"] for s in self.steps] + [flat64(self.params)], "names": self.names,
               "sizes": self.sizes, "raw": [s["raw"] for s in self.steps], "used": [s["used"] for s in self.steps],
               "lrs": [s["lr"] for s in self.steps], "epochs": [s["epoch"] for s in self.steps],
               "losses": [], "losses_ref": [], "ns": []}
        for s in self.steps:
            refs = []
            for batch, _, _, rng, training in s["micro"]:
                ref.train(training)
                with torch.random.fork_rng(devices=[]), torch.no_grad():
                    torch.set_rng_state(rng)  # the training forward's dropout masks
                    refs.append(float(self.loss_fn(ref, batch).double()))
            out["losses"].append([m[1] for m in s["micro"]])
            out["losses_ref"].append(refs)
            out["ns"].append([m[2] for m in s["micro"]])
        return out


class ParameterHook:
    """An engine step hook (``replay(..., hooks=(ParameterHook,))``) recording θ_k itself at
    every step — every trainable tensor, flattened in order, as columns ``p0, p1, …`` of the
    table ``analysis/<ref>/params/`` — for brute forces that recompute a quantity at θ_k."""

    name = "params"

    def __init__(self, session, reference):
        self.params = [p for p in session.model.parameters() if p.requires_grad]

    def __call__(self, batch):
        flat = torch.cat([p.detach().reshape(-1) for p in self.params]).tolist()
        return {f"p{i}": v for i, v in enumerate(flat)}
