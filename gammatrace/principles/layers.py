"""Per-tensor and per-module decomposition of the progress P_k = Σ_i P_{k,i}.

P_k (and so γ_k) is a sum over parameter tensors, so each tensor's share of the
total progress shows which layers carry the trajectory toward θ* and which pull
against it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _shares(frame: pd.DataFrame, key: str, by_epoch: bool) -> pd.DataFrame:
    """Share table over ``key``; ``frame`` has one row per (step, key) with ``progress``."""
    keys = ["epoch", key] if by_epoch else [key]
    frame = frame.assign(negative=(frame["progress"] < 0).astype(np.int64))
    # sort=False keeps the parameters in first-appearance (i.e. model) order.
    groups = frame.groupby(keys, sort=False)
    out = pd.DataFrame(
        {
            "progress": groups["progress"].sum(),
            "n_steps": groups.size().astype(np.int64),
            "n_negative": groups["negative"].sum().astype(np.int64),
        }
    )
    if by_epoch:
        totals = frame.groupby("epoch", sort=False)["progress"].sum()
        denom = totals.reindex(out.index.get_level_values("epoch")).to_numpy()
    else:
        denom = frame["progress"].sum()
    # No guard for a zero total: a share of a vanishing progress is inf/NaN, and
    # showing that is more honest than a made-up number.
    with np.errstate(divide="ignore", invalid="ignore"):
        out["share"] = out["progress"].to_numpy() / denom
    out["frac_negative"] = out["n_negative"] / out["n_steps"]
    return out[["progress", "share", "frac_negative", "n_negative", "n_steps"]]


def layer_shares(tensor_df: pd.DataFrame, by_epoch: bool = False) -> pd.DataFrame:
    """Per-tensor total progress, share of the total, and how often it pulls against.

    ``tensor_df`` is the long table keyed by (step, tensor) with columns ``step``,
    ``epoch``, ``tensor`` and ``progress`` (P_{k,i}; Σ_i P_{k,i} = P_k). Output
    indexed by tensor (by (epoch, tensor) when ``by_epoch``):

    - ``progress`` = Σ_k P_{k,i}
    - ``share`` = Σ_k P_{k,i} / Σ_k P_k (over the same epoch when ``by_epoch``);
      shares sum to 1 and may be negative or exceed 1
    - ``frac_negative`` = fraction of steps with P_{k,i} < 0 ("pulls against"),
      with the counts ``n_negative`` and ``n_steps``

    Example:
        >>> import pandas as pd
        >>> from gammatrace.principles import layer_shares
        >>> t = pd.DataFrame({"step": [0, 0, 1, 1], "epoch": 0,
        ...                   "tensor": ["fc.weight", "fc.bias"] * 2,
        ...                   "progress": [0.3, -0.1, 0.5, 0.1]})
        >>> layer_shares(t)[["share", "frac_negative"]]
                   share  frac_negative
        tensor
        fc.weight    1.0            0.0
        fc.bias      0.0            0.5
    """
    frame = tensor_df[["step", "epoch", "tensor", "progress"]].astype({"progress": np.float64})
    return _shares(frame, "tensor", by_epoch)


def module_of(tensor_name: str) -> str:
    """Module prefix of a parameter name: everything before the last ``'.'``.

    A top-level parameter belongs to the root module, named ``""`` as in
    ``torch.nn.Module.named_modules()``.

    Example:
        >>> from gammatrace.principles import module_of
        >>> module_of("blocks.0.conv1.weight"), module_of("scale")
        ('blocks.0.conv1', '')
    """
    return tensor_name.rpartition(".")[0]


def module_shares(tensor_df: pd.DataFrame, by_epoch: bool = False) -> pd.DataFrame:
    """:func:`layer_shares` with tensors grouped by module (see :func:`module_of`).

    A module's per-step progress is the sum over its tensors, so ``frac_negative``
    counts steps where the module *as a whole* pulls against the trajectory.

    Example:
        >>> import pandas as pd
        >>> from gammatrace.principles import module_shares
        >>> t = pd.DataFrame({"step": [0, 0, 0], "epoch": 0,
        ...                   "tensor": ["a.weight", "a.bias", "b.weight"],
        ...                   "progress": [0.2, 0.2, 0.1]})
        >>> module_shares(t)["share"].round(2).tolist()
        [0.8, 0.2]
    """
    frame = tensor_df[["step", "epoch", "tensor", "progress"]].astype({"progress": np.float64})
    frame = frame.assign(module=frame["tensor"].map(module_of))
    per_step = frame.groupby(["step", "epoch", "module"], sort=False, as_index=False)[
        "progress"
    ].sum()
    return _shares(per_step, "module", by_epoch)
