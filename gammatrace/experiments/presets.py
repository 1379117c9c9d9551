"""The built-in studies (DESIGN.md §3 experiments/): each a registry entry with a
``quick`` preset (CPU, minutes) and a ``paper`` preset (the papers' settings)."""

from __future__ import annotations

from gammatrace.experiments.study import STUDIES, Claim, Study, make_study


def _check_preset(preset: str) -> None:
    if preset not in ("quick", "paper"):
        raise ValueError(f"unknown preset '{preset}'; choose quick or paper")


@STUDIES.register("activation")
def activation(preset: str = "quick", data_dir: str | None = None) -> Study:
    """Sigmoid, tanh, ReLU, leaky ReLU: does a ReLU-type activation give a larger γ?"""
    _check_preset(preset)
    acts = ["relu", "leaky_relu", "tanh", "sigmoid"]
    if preset == "quick":
        base = {"data": {"name": "mnist1d", "num_samples": 5000}, "model": {"name": "mlp", "width": 256, "depth": 3},
                "optim": {"name": "sgd", "lr": 0.05}, "epochs": 40, "batch_size": 128,
                "reference": {"kind": "continuation", "extra_epochs": 5}}
    else:
        base = {"data": {"name": "cifar10", "data_dir": data_dir}, "model": {"name": "resnet18"},
                "optim": {"name": "sgd", "lr": 0.05}, "epochs": 150, "batch_size": 128, "device": "cuda",
                "reference": {"kind": "continuation", "extra_epochs": 10}}
    cells = {a: {"model": {"activation": a}} for a in acts}
    claims = [Claim("ReLU-type activations give larger γ and faster convergence than sigmoid",
                    ("relu", "leaky_relu", "tanh", "sigmoid"))]
    return make_study("activation", "Does a ReLU-type activation make γ larger and training faster?", base, cells,
                      claims, preset=preset)
