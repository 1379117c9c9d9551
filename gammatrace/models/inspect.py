"""Signal propagation at initialization: is the forward or backward signal dying?

:func:`inspect_init` runs one forward and backward pass on a batch and reports,
per Conv/Linear layer in the order the forward pass calls them:

- ``act_var`` — variance of the layer's output (the forward signal),
- ``grad_norm`` — ‖∂loss/∂W‖ of the layer's (effective) weight (the backward signal),
- ``forward_ratio`` = sqrt(act_var / act_var of the first layer) and
  ``backward_ratio`` = grad_norm / grad_norm of the last layer. Each signal is
  compared with the layer it starts from — the forward one enters at the input, the
  backward one at the loss — and both ratios are magnitudes (the forward one is a
  ratio of RMS values, not of variances), so one pair of thresholds fits both.
- ``flag``: ``"vanishing"`` if a ratio is below ``low`` (default 1e-2),
  ``"exploding"`` if above ``high`` (default 1e2), ``"vanishing,exploding"`` if
  the two signals disagree, else ``""``; ``forward_flag`` / ``backward_flag`` say
  which signal tripped it.

The model's mode is used as is (train-mode batch norm uses batch statistics); its
``.grad`` fields and buffers (running statistics) are left as they were.

Example:
    >>> import torch
    >>> from gammatrace.models import build
    >>> from gammatrace.models.inspect import inspect_init
    >>> _ = torch.manual_seed(0)
    >>> net = build("mlp", input_shape=(1, 40), num_classes=10, width=32, depth=10, activation="sigmoid")
    >>> x, y = torch.randn(64, 1, 40), torch.randint(0, 10, (64,))
    >>> df = inspect_init(net, x, y, torch.nn.CrossEntropyLoss())
    >>> list(df.columns)
    ['depth', 'name', 'type', 'act_var', 'grad_norm', 'forward_ratio', 'backward_ratio', 'forward_flag', 'backward_flag', 'flag']
    >>> df.flag.iloc[0]
    'vanishing'
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from gammatrace.models.init import preserved_buffers, weighted_layers

if TYPE_CHECKING:  # pandas and matplotlib load on first use: `import gammatrace.models` stays light
    import pandas as pd

# Ratios outside [VANISHING_RATIO, EXPLODING_RATIO] — two orders of magnitude — are
# flagged: a factor 100 in scale across the network is far beyond what the variance-
# preserving inits (LeCun, He) leave, yet well short of what 10 sigmoid layers do.
VANISHING_RATIO = 1e-2
EXPLODING_RATIO = 1e2


def _flag(ratio: float, low: float, high: float) -> str:
    if ratio < low:  # NaN compares False both ways: an unused layer is not flagged
        return "vanishing"
    if ratio > high:
        return "exploding"
    return ""


def inspect_init(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    low: float = VANISHING_RATIO,
    high: float = EXPLODING_RATIO,
) -> pd.DataFrame:
    """Per-layer forward and backward signal of ``model`` on the batch (x, y).

    ``loss_fn(output, y)`` returns a scalar (e.g. ``nn.CrossEntropyLoss()``). Layers
    the forward pass never calls are listed last with NaN signals and no flag.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> df = inspect_init(net, torch.randn(16, 8), torch.randn(16, 1), nn.MSELoss())
        >>> df[["name", "type"]].values.tolist()
        [['0', 'Linear'], ['2', 'Linear']]
    """
    # pandas loads on first use: importing the model zoo stays light
    import pandas as pd

    layers = weighted_layers(model)
    names = {id(m): n for n, m in layers}
    order: list[nn.Module] = []
    act_var: dict[int, float] = {}

    def record(module: nn.Module, inputs, output) -> None:
        if id(module) not in act_var:  # a layer called twice reports its first call
            order.append(module)
            act_var[id(module)] = float(output.detach().float().var())

    hooks = [m.register_forward_hook(record) for _, m in layers]
    try:
        # cached(): the effective weight of a weight-normed layer is computed once, so
        # the tensor read after the forward pass is the one in the graph.
        with preserved_buffers(model), parametrize.cached():
            loss = loss_fn(model(x), y)
            weights = [m.weight for m in order]
            wanted = [w for w in weights if w.requires_grad]
            grads = iter(torch.autograd.grad(loss, wanted, allow_unused=True)) if wanted else iter(())
            grad_norm = {}
            for m, w in zip(order, weights, strict=True):
                g = next(grads) if w.requires_grad else None
                grad_norm[id(m)] = float(g.norm()) if g is not None else math.nan
    finally:
        for h in hooks:
            h.remove()

    unused = [m for _, m in layers if id(m) not in act_var]
    rows = []
    for depth, m in enumerate(order + unused):
        rows.append({"depth": depth, "name": names[id(m)], "type": type(m).__name__,
                     "act_var": act_var.get(id(m), math.nan),
                     "grad_norm": grad_norm.get(id(m), math.nan)})
    df = pd.DataFrame(rows, columns=["depth", "name", "type", "act_var", "grad_norm"])
    used = df.iloc[: len(order)]
    first_var = used.act_var.iloc[0] if len(used) else math.nan
    last_grad = used.grad_norm.iloc[-1] if len(used) else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        df["forward_ratio"] = np.sqrt(df.act_var / first_var)
        df["backward_ratio"] = df.grad_norm / last_grad
    df["forward_flag"] = [_flag(r, low, high) for r in df.forward_ratio]
    df["backward_flag"] = [_flag(r, low, high) for r in df.backward_ratio]
    df["flag"] = [",".join(sorted({f, b} - {""})) for f, b in zip(df.forward_flag, df.backward_flag, strict=True)]
    return df


def plot_inspect(df: pd.DataFrame, path: str | os.PathLike, title: str | None = None) -> Path:
    """Save a two-panel figure of the forward and backward signal vs depth (log y).

    Flagged layers are marked in red. Uses matplotlib's Agg canvas directly, so it
    neither needs a display nor changes the global pyplot backend. Written atomically;
    the format follows the suffix of ``path``. Returns the path.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> df = inspect_init(net, torch.randn(16, 8), torch.randn(16, 1), nn.MSELoss())
        >>> plot_inspect(df, Path(tempfile.mkdtemp()) / "inspect.png").stat().st_size > 0
        True
    """
    # matplotlib loads only when a figure is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    panels = (("act_var", "forward_flag", "output variance (forward signal)"),
              ("grad_norm", "backward_flag", "‖∂loss/∂W‖ (backward signal)"))
    for ax, (col, flag_col, label) in zip(fig.subplots(1, 2), panels, strict=True):
        ax.plot(df.depth, df[col], marker="o", color="tab:blue")
        bad = df[df[flag_col] != ""]
        if len(bad):
            ax.scatter(bad.depth, bad[col], color="tab:red", zorder=3, label="flagged")
            ax.legend()
        ax.set_yscale("log")
        ax.set_xlabel("layer (forward order)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=path.suffix or ".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
