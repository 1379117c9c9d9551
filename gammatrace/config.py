"""Typed, nested run configuration (pydantic). YAML maps onto it one to one.

Example:
    >>> from gammatrace.config import RunConfig
    >>> cfg = RunConfig.model_validate({"model": {"name": "mlp", "width": 64}, "optim": {"lr": 0.05}})
    >>> cfg.model.switches(), cfg.optim.name, cfg.epochs
    ({'width': 64}, 'sgd', 10)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """A section whose unknown keys are passed to a registry entry as options."""

    model_config = ConfigDict(extra="allow")

    def switches(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataConfig(_Open):
    name: str = "mnist1d"
    n_train: PositiveInt | None = None  # samples kept from the training split
    n_test: PositiveInt | None = None
    classes: list[int] | None = None
    augment: str = "none"  # data.augment registry; seeded from (seed, epoch, index)


class ModelConfig(_Open):
    name: str = "mlp"
    init: str = "default"  # initialization scheme (models.init registry)
    init_from: str | None = None  # a saved initial point (models.init.save_init), loaded where shapes allow


class OptimConfig(_Strict):
    name: str = "sgd"
    lr: PositiveFloat = 0.05  # base learning rate η
    momentum: float = Field(0.9, ge=0, lt=1)  # used by momentum/nesterov/rmsprop
    betas: tuple[float, float] = (0.9, 0.999)  # Adam-family β1, β2
    eps: PositiveFloat = 1e-8  # Adam-family / RMSProp / AdaGrad ε
    weight_decay: float = Field(0.0, ge=0)
    clip_grad_norm: PositiveFloat | None = None  # max global gradient norm, if clipping


class ScheduleConfig(_Strict):
    name: str = "constant"
    step_epochs: PositiveInt = 30  # step: decay every this many epochs
    factor: float = Field(0.1, gt=0)  # step: multiply the lr by this at each decay
    min_lr_ratio: float = Field(0.0, ge=0)  # cosine: final lr / base lr
    warmup_epochs: float = Field(0.0, ge=0)  # linear warm-up, composes with any schedule
    cycle_epochs: PositiveFloat = 4.0  # cyclical: length of one triangle
    max_ratio: float = Field(4.0, gt=0)  # cyclical: peak lr / base lr


class ReferenceConfig(_Strict):
    """Which θ* the analysis uses (DESIGN.md §1)."""

    kind: Literal["last", "continuation", "file"] = "last"
    extra_epochs: int = Field(0, ge=0)  # continuation: epochs trained beyond the horizon
    path: str | None = None  # file: a state dict / checkpoint

    @model_validator(mode="after")
    def _consistent(self) -> ReferenceConfig:
        if self.kind == "continuation" and self.extra_epochs < 1:
            raise ValueError("reference kind 'continuation' needs extra_epochs >= 1")
        if self.kind == "file" and not self.path:
            raise ValueError("reference kind 'file' needs a path")
        return self


class AnalysisConfig(_Strict):
    tail: int = Field(0, ge=0)  # ignore the last m steps in summaries
    ell_inf: float = 0.0  # ℓ_inf of the regularity principle
    eps: float = Field(1e-8, ge=0)  # a loss gap ≤ eps leaves γ_k undefined
    per_tensor: bool = True
    per_sample: bool = True


class RunConfig(_Strict):
    name: str = "run"
    seed: int = 0
    threads: PositiveInt = 1  # torch intra-op threads; part of the trajectory's identity
    device: str = "cpu"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    epochs: PositiveInt = 10  # the cap when target_loss is set
    batch_size: PositiveInt = 128
    drop_last: bool = False
    target_loss: PositiveFloat | None = None  # stop once the full training loss ≤ this
    reference: ReferenceConfig = ReferenceConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    eval_batch_size: PositiveInt = 1024

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not (v == "cpu" or v.startswith("cuda") or v == "mps"):
            raise ValueError(f"device must be cpu, cuda[:i] or mps, got {v!r}")
        return v

    def check_names(self) -> None:
        """Fail early, before anything is written, on names no registry knows."""
        from gammatrace.data import AUGMENTATIONS, DATASETS
        from gammatrace.models import MODELS
        from gammatrace.train.optim import LOSSES, OPTIMIZERS, SCHEDULES

        DATASETS.get(self.data.name)
        AUGMENTATIONS.get(self.data.augment)
        MODELS.get(self.model.name)
        OPTIMIZERS.get(self.optim.name)
        SCHEDULES.get(self.schedule.name)
        LOSSES.get(self.loss)
        from gammatrace.models.init import INITS

        INITS.get(self.model.init)
        acts = [v for k, v in self.model.switches().items() if k == "activation"]
        if acts:
            from gammatrace.models import ACTIVATIONS

            ACTIVATIONS.get(acts[0])

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        return cls.model_validate(load_yaml(path))

    def with_overrides(self, overrides: dict[str, Any]) -> RunConfig:
        """A copy with nested keys replaced, e.g. ``{"model": {"activation": "tanh"}}``."""
        return RunConfig.model_validate(deep_merge(self.model_dump(), overrides))


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def merge_config(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Overrides onto a base config dict, for run lists and studies alike: ``deep_merge``,
    except that a ``data`` or ``model`` section naming another dataset or network than
    ``base`` starts afresh: options are per dataset/network (an MNIST-1D
    ``num_samples`` means nothing to a synthetic image set, an MLP's ``width`` is a
    channel multiplier to a conv net).

    Example:
        >>> merge_config({"data": {"name": "mnist1d", "num_samples": 1000}, "epochs": 5},
        ...              {"data": {"name": "digits"}})
        {'data': {'name': 'digits'}, 'epochs': 5}
    """
    out = deep_merge(base, over)
    for section in ("data", "model"):
        b, o = base.get(section), over.get(section)
        if isinstance(b, dict) and isinstance(o, dict) and "name" in b and "name" in o and b["name"] != o["name"]:
            out[section] = copy.deepcopy(o)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping, got {type(data).__name__}")
    return data
