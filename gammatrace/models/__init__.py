"""The model zoo: every network is a registry entry built by one call.

Builders take the per-sample ``input_shape`` (channels first), ``num_classes`` (or
output channels for regression) and technique switches (activation, norm, skip,
init, width, ...).

Example:
    >>> from gammatrace.models import build, count_params
    >>> net = build("mlp", input_shape=(1, 40), num_classes=10, width=32, depth=2)
    >>> count_params(net)
    2698
"""

from __future__ import annotations

from gammatrace.models.activations import ACTIVATIONS, make_activation
from gammatrace.models.init import INITS, apply_init, load_init, save_init
from gammatrace.models.inspect import inspect_init, plot_inspect
from gammatrace.models.norms import NORMS, apply_weight_norm, make_norm, uses_weight_norm
from gammatrace.models.registry import MODELS, build, count_params

# Importing the modules registers their networks.
from gammatrace.models import mlp  # noqa: E402,F401  isort: skip
from gammatrace.models import chain, teacher  # noqa: E402,F401  isort: skip
from gammatrace.models import alexnet, cnn1d, resnet, unet, vgg  # noqa: E402,F401  isort: skip

__all__ = ["ACTIVATIONS", "MODELS", "build", "count_params", "make_activation", "INITS", "NORMS", "apply_init", "apply_weight_norm", "inspect_init", "load_init", "make_norm", "plot_inspect", "save_init", "uses_weight_norm"]
