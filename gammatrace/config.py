"""Typed, nested run configuration (pydantic). YAML maps onto it one to one.

Example:
    >>> from gammatrace.config import RunConfig
    >>> cfg = RunConfig.model_validate({"model": {"name": "mlp", "width": 64}, "optim": {"lr": 0.05}})
    >>> cfg.model.switches(), cfg.optim.name, cfg.epochs
    ({'width': 64}, 'sgd', 10)
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    TypeAdapter,
    field_validator,
    model_validator,
)

from gammatrace.curvature import CurvatureConfig
from gammatrace.data import AUGMENTATIONS, DATASETS, TRANSFORM_OPTIONS
from gammatrace.errors import UserError
from gammatrace.models import ACTIVATIONS, MODELS
from gammatrace.models.init import INITS
from gammatrace.registry import UnknownNameError
from gammatrace.techniques import LOSSES, OPTIMIZERS, SCHEDULES

# Ceilings on what a config may ask for, checked before anything is allocated (a count
# beyond them is a typo or hostile input, not an experiment): an epoch count of 10**12
# would otherwise build a set of every epoch, a width of 10**9 ask torch for 10**18 bytes.
MAX_EPOCHS = 1_000_000  # epochs, and epochs + reference.extra_epochs
MAX_SEEDS = 10_000  # seeds per study cell
MAX_SAMPLES = 100_000_000  # n_train, n_test, batch sizes, a dataset's num_samples/num_train/num_test
MAX_THREADS = 1024
# Optimizer and clipping values: torch converts them to the parameters' dtype (float32's
# largest is 3.4e38; an lr of 1e308 raises inside the first step), with room for the
# optimizer's own arithmetic (Adam divides the lr by 1 - β1^t).
MAX_OPTIM_VALUE = 1e30
MAX_NAME = 100  # characters of a run, cell, group or config name (a folder name; most file systems allow 255 bytes)
MAX_CONFIG_NODES = 100_000  # values in a config file once its YAML aliases are expanded


class _Strict(BaseModel):
    # inf/NaN are refused by name: an lr of 1e400 (YAML reads it as text) must not train
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Open(BaseModel):
    """A section whose unknown keys are passed to a registry entry as options."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    def switches(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataConfig(_Open):
    name: str = "mnist1d"
    n_train: Annotated[int, Field(ge=1, le=MAX_SAMPLES)] | None = None  # samples kept from the training split
    n_test: Annotated[int, Field(ge=1, le=MAX_SAMPLES)] | None = None
    classes: list[int] | None = None
    augment: str = "none"  # data.augment registry; seeded from (seed, epoch, index)

    @model_validator(mode="after")
    def _sample_counts(self) -> DataConfig:
        # A dataset's own sample counts (mnist1d's num_samples, teacher's num_train) are
        # switches: bounded here, before a generator allocates them.
        for key, value in self.switches().items():
            if _is_sample_count(key) and isinstance(value, int) and not isinstance(value, bool) and value > MAX_SAMPLES:
                raise ValueError(f"data.{key} = {value} is beyond the ceiling of {MAX_SAMPLES:,} samples")
        return self


class ModelConfig(_Open):
    name: str = "mlp"
    init: str = "default"  # initialization scheme (models.init registry)
    init_from: str | None = None  # a saved initial point (models.init.save_init), loaded where shapes allow


class _OptimBase(_Strict):
    """Arguments every optimizer takes. Each variant below adds exactly the arguments its
    ``torch.optim`` class uses (``gammatrace.techniques`` registers the same signatures), so
    an argument an optimizer would ignore is a validation error, not a silent no-op."""

    lr: float = Field(0.05, gt=0, le=MAX_OPTIM_VALUE)  # base learning rate η
    weight_decay: float = Field(0.0, ge=0, le=MAX_OPTIM_VALUE)
    # max global gradient norm, if clipping (not an optimizer argument)
    clip_grad_norm: float | None = Field(None, gt=0, le=MAX_OPTIM_VALUE)

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the optimizer factory (everything but name and clipping)."""
        return self.model_dump(exclude={"name", "clip_grad_norm"})


class SGDConfig(_OptimBase):
    name: Literal["sgd"] = "sgd"


class MomentumConfig(_OptimBase):
    name: Literal["momentum", "nesterov"] = "momentum"
    momentum: float = Field(0.9, ge=0, lt=1)


class AdamConfig(_OptimBase):
    name: Literal["adam", "amsgrad", "adamw"] = "adam"
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)  # β1, β2
    eps: float = Field(1e-8, gt=0, le=MAX_OPTIM_VALUE)


class AdagradConfig(_OptimBase):
    name: Literal["adagrad"] = "adagrad"
    eps: float = Field(1e-8, gt=0, le=MAX_OPTIM_VALUE)


class RMSpropConfig(_OptimBase):
    name: Literal["rmsprop"] = "rmsprop"
    alpha: float = Field(0.99, gt=0, lt=1)  # smoothing constant of the squared-gradient average
    momentum: float = Field(0.0, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0, le=MAX_OPTIM_VALUE)


OptimConfig = Annotated[SGDConfig | MomentumConfig | AdamConfig | AdagradConfig | RMSpropConfig,
                        Field(discriminator="name")]
OPTIM_VARIANTS: tuple[type[_OptimBase], ...] = (SGDConfig, MomentumConfig, AdamConfig, AdagradConfig, RMSpropConfig)
_OPTIM_ADAPTER: TypeAdapter[Any] = TypeAdapter(OptimConfig)


def optim_config(**fields: Any) -> _OptimBase:
    """The optimizer config for ``fields`` (``name`` defaults to sgd).

    Example:
        >>> optim_config(name="adam", lr=1e-3).optimizer_kwargs()
        {'lr': 0.001, 'weight_decay': 0.0, 'betas': (0.9, 0.999), 'eps': 1e-08}
    """
    return _OPTIM_ADAPTER.validate_python({"name": "sgd", **fields})


# The format before optimizer variants: every run.json held all of these, whatever the optimizer.
_LEGACY_OPTIM_KEYS = {"name", "lr", "momentum", "betas", "eps", "weight_decay", "clip_grad_norm"}


def upgrade_legacy_optim(optim: dict[str, Any]) -> dict[str, Any]:
    """A run.json ``optim`` section of the flat format (one config for all optimizers) as
    the variant that reproduces the optimizer that run actually used: fields its optimizer
    ignored are dropped, and rmsprop keeps what the flat format gave it (alpha = betas[1],
    no momentum). Sections in the current format are returned unchanged.

    Example:
        >>> upgrade_legacy_optim({"name": "rmsprop", "lr": 0.01, "momentum": 0.9, "betas": [0.9, 0.999],
        ...                       "eps": 1e-08, "weight_decay": 0.0, "clip_grad_norm": None})["alpha"]
        0.999
    """
    if set(optim) != _LEGACY_OPTIM_KEYS:
        return optim
    name = optim["name"]
    variant = _optim_variant(name)
    if variant is None:
        return optim  # an unknown name: let validation report it
    out = {k: v for k, v in optim.items() if k in variant.model_fields}
    if name == "rmsprop":
        out.update(alpha=optim["betas"][1], momentum=0.0)
    return out


class ScheduleConfig(_Strict):
    name: str = "constant"
    step_epochs: PositiveInt = 30  # step: decay every this many epochs
    factor: float = Field(0.1, gt=0)  # step: multiply the lr by this at each decay
    min_lr_ratio: float = Field(0.0, ge=0)  # cosine: final lr / base lr
    warmup_epochs: float = Field(0.0, ge=0)  # linear warm-up, composes with any schedule
    cycle_epochs: PositiveFloat = 4.0  # cyclical: length of one triangle
    max_ratio: float = Field(4.0, gt=0)  # cyclical: peak lr / base lr

    def options(self) -> dict[str, Any]:
        """The fields the named schedule's factory takes (its keyword-only parameters), so
        each schedule gets its own options and nothing else.

        Example:
            >>> ScheduleConfig(name="step", factor=0.5).options()
            {'step_epochs': 30, 'factor': 0.5}
        """
        params = inspect.signature(SCHEDULES.get(self.name)).parameters
        return {k: getattr(self, k) for k, p in params.items() if p.kind is p.KEYWORD_ONLY}


class ReferenceConfig(_Strict):
    """Which θ* the analysis uses (DESIGN.md §1)."""

    kind: Literal["last", "continuation", "file"] = "last"
    extra_epochs: int = Field(0, ge=0, le=MAX_EPOCHS)  # continuation: epochs trained beyond the horizon
    path: str | None = None  # file: a state dict / checkpoint

    @model_validator(mode="after")
    def _consistent(self) -> ReferenceConfig:
        if self.kind == "continuation" and self.extra_epochs < 1:
            raise ValueError("reference kind 'continuation' needs extra_epochs >= 1")
        if self.kind == "file" and not self.path:
            raise ValueError("reference kind 'file' needs a path")
        return self


class AnalysisConfig(_Strict):
    tail: int = Field(0, ge=0, description="ignore the last m steps in summaries")
    ell_inf: float = Field(0.0, description="ℓ_inf of the regularity principle (the loss's infimum)")
    eps: float = Field(1e-8, ge=0, description="a loss gap ≤ eps leaves γ_k undefined")
    per_tensor: bool = True
    per_sample: bool = True
    # ℓ(θ*; z) looked up from one pass over the training set at θ* instead of a forward per
    # step, where the loss of a sample does not depend on its batch (no batch norm in train
    # mode, no dropout, no augmentation; checked, and verified at each replay segment's
    # first step): "auto" uses it where it applies, "off" never.
    reference_cache: Literal["auto", "off"] = Field(
        "auto", description="cached reference losses where the loss is batch-independent (auto) or never (off)")


class RunConfig(_Strict):
    name: str = "run"
    seed: int = 0
    threads: int = Field(1, ge=1, le=MAX_THREADS)  # torch intra-op threads; part of the trajectory's identity
    device: str = "cpu"
    # Floating dtype of the parameters and data. float64 for problems whose loss gaps fall
    # below float32 round-off (a realizable teacher–student converges to loss 0).
    dtype: Literal["float32", "float64"] = "float32"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    optim: OptimConfig = Field(default_factory=SGDConfig)
    schedule: ScheduleConfig = ScheduleConfig()
    epochs: int = Field(10, ge=1, le=MAX_EPOCHS)  # the cap when target_loss is set
    batch_size: int = Field(128, ge=1, le=MAX_SAMPLES)
    drop_last: bool = False
    target_loss: PositiveFloat | None = None  # stop once the full training loss ≤ this
    reference: ReferenceConfig = ReferenceConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    eval_batch_size: int = Field(1024, ge=1, le=MAX_SAMPLES)
    # Epochs between checkpoints: replay segments are this many epochs long. Larger saves
    # disk (see `gammatrace run --dry-run`) at the price of replay parallelism; "auto" takes
    # the densest spacing whose estimate fits the disk budget (resolved before training).
    checkpoint_every: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] | Literal["auto"] = 1
    # Curvature along the trajectory (gammatrace.curvature.CurvatureConfig: every N steps, top-k
    # eigenvalues, trace, stability ratio, Santurkar's step measurements), measured during the
    # analysis replay as the step-hook table analysis/<ref>/curvature/; None: not measured.
    curvature: CurvatureConfig | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not (v == "cpu" or v.startswith("cuda") or v == "mps"):
            raise ValueError(f"device must be cpu, cuda[:i] or mps, got {v!r}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _numbers_in_range(cls, data: Any) -> Any:
        # Switches too (free-form): an integer beyond 64 bits or a non-finite number would
        # otherwise fail deep inside torch ("Overflow when unpacking long"), naming nothing.
        bad = _out_of_range(data)
        if bad:
            raise UserError(f"invalid config: {bad[0]}: {bad[1]!r:.60} is not a finite number in the "
                            "64-bit range")
        return data

    @model_validator(mode="after")
    def _horizon(self) -> RunConfig:
        if self.epochs + self.reference.extra_epochs > MAX_EPOCHS:
            raise ValueError(f"epochs + reference.extra_epochs = {self.epochs + self.reference.extra_epochs} is "
                             f"beyond the ceiling of {MAX_EPOCHS:,} epochs")
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_optimizer(cls, data: Any) -> Any:
        # The optimizer variant is chosen by its name; a section without one is plain SGD.
        if isinstance(data, dict) and isinstance(data.get("optim"), dict):
            if "name" not in data["optim"]:
                data = {**data, "optim": {"name": "sgd", **data["optim"]}}
            OPTIMIZERS.get(data["optim"]["name"])  # "unknown optimizer 'x'; choose one of: ..."
        return data

    def check_names(self) -> None:
        """Fail early, before anything is written, on names no registry knows."""
        DATASETS.get(self.data.name)
        AUGMENTATIONS.get(self.data.augment)
        MODELS.get(self.model.name)
        OPTIMIZERS.get(self.optim.name)
        SCHEDULES.get(self.schedule.name)
        LOSSES.get(self.loss)
        INITS.get(self.model.init)
        activation = self.model.switches().get("activation")
        if activation is not None:
            ACTIVATIONS.get(activation)
        check_switches("model", self.model.name, MODELS.get(self.model.name), self.model.switches(),
                        builder_args={"input_shape", "num_classes"})
        check_switches("data", self.data.name, DATASETS.get(self.data.name), self.data.switches(),
                        builder_args=set(), shared=set(TRANSFORM_OPTIONS))

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> RunConfig:
        """A config as a run.json stores it, of this format or an older one (flat optimizer
        fields: see :func:`upgrade_legacy_optim`)."""
        if isinstance(data, dict) and isinstance(data.get("optim"), dict):
            data = {**data, "optim": upgrade_legacy_optim(data["optim"])}
        return cls.model_validate(data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        return cls.model_validate(load_yaml(path))

    def with_overrides(self, overrides: dict[str, Any]) -> RunConfig:
        """A copy with nested keys replaced, e.g. ``{"model": {"activation": "tanh"}}``."""
        return RunConfig.model_validate(deep_merge(self.model_dump(), overrides))


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+,@-]*")


def _is_sample_count(key: str) -> bool:
    return key in {"num_samples", "num_train", "num_test", "n_train", "n_test"} or key.endswith("_samples")


def check_name(name: str, what: str = "run") -> str:
    """A run, cell or group name that is safe as one folder name: no path separators,
    no ``..``, not absolute, not hidden, no control character (a trailing newline
    included: the whole name must match), at most :data:`MAX_NAME` characters.

    Example:
        >>> check_name("relu-s0")
        'relu-s0'
        >>> check_name("../x")
        Traceback (most recent call last):
        ...
        gammatrace.errors.UserError: run name '../x' is not a plain folder name (letters, digits and _ . = + , @ -, not starting with '.'; no '/', no '..')
    """
    if isinstance(name, str) and len(name) > MAX_NAME:
        raise UserError(f"{what} name {name[:40]!r}... is {len(name)} characters long; at most {MAX_NAME}")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise UserError(f"{what} name {name!r:.80} is not a plain folder name (letters, digits and _ . = + , @ -, "
                        "not starting with '.'; no '/', no '..')")
    return name


def check_switches(section: str, name: str, factory: Any, switches: dict[str, Any], *,
                    builder_args: set[str], shared: set[str] = frozenset()) -> None:
    """Unknown switches of a registry entry are refused before anything runs, naming the
    switches it has (a misspelt ``widht`` would otherwise surface as a TypeError deep in
    the model's constructor, or not at all); so is a switch whose value is not of the
    plain type (int, float, str, bool) its parameter declares."""
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return  # the entry forwards options it does not name; it checks them itself
    known = {k for k in params if k not in builder_args} | set(shared)
    unknown = sorted(set(switches) - known)
    if unknown:
        raise UnknownNameError(f"{section} '{name}' has no switch {', '.join(map(repr, unknown))}; "
                               f"its switches: {', '.join(sorted(known)) or 'none'}")
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check against
        hints = {}
    for key, value in switches.items():
        accepted = _plain_types(hints.get(key))
        if accepted and not (isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted)):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in accepted if t is not int or
                               float not in accepted)
            raise UserError(f"invalid config: {section}.{key} ({section} '{name}') must be {want}, "
                            f"got {type(value).__name__} {value!r:.60}")


def _plain_types(annotation: Any) -> tuple[type, ...] | None:
    """The Python types a plain annotation (int, float, str, bool, optionally | None)
    accepts, an int being a float; None for any other annotation (not checked here)."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    if not args or not all(a in (int, float, str, bool, type(None)) for a in args):
        return None
    return tuple(args) + ((int,) if float in args else ())


def _out_of_range(data: Any, where: str = "") -> tuple[str, Any] | None:
    """(field, value) of the first int beyond 64 bits or non-finite float in ``data``."""
    if isinstance(data, dict):
        for k, v in data.items():
            found = _out_of_range(v, f"{where}.{k}" if where else str(k))
            if found:
                return found
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            found = _out_of_range(v, f"{where}[{i}]")
            if found:
                return found
    elif (isinstance(data, int) and not isinstance(data, bool) and not -2**63 <= data < 2**63) or \
            (isinstance(data, float) and not math.isfinite(data)):
        return where or "(top level)", data
    return None


def error_location(loc: tuple[int | str, ...]) -> str:
    """A validation error's location as the user wrote it: ``optim.lr``, not the
    ``optim.sgd.lr`` of pydantic's tagged union.

    Example:
        >>> error_location(("optim", "momentum", "lr"))
        'optim.lr'
    """
    parts = list(loc)
    if len(parts) > 1 and parts[0] == "optim" and parts[1] in OPTIMIZERS:
        del parts[1]
    return ".".join(map(str, parts))


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
    channel multiplier to a conv net). An ``optim`` section naming another optimizer keeps
    the base's arguments that the new optimizer also takes (a study's common ``lr``) and
    drops the others (SGD's ``momentum`` means nothing to Adam).

    Example:
        >>> merge_config({"data": {"name": "mnist1d", "num_samples": 1000}, "epochs": 5},
        ...              {"data": {"name": "digits"}})
        {'data': {'name': 'digits'}, 'epochs': 5}
        >>> merge_config({"optim": {"name": "momentum", "lr": 0.01, "momentum": 0.9}},
        ...              {"optim": {"name": "adam", "eps": 0.01}})
        {'optim': {'name': 'adam', 'lr': 0.01, 'eps': 0.01}}
    """
    out = deep_merge(base, over)
    for section in ("data", "model", "optim"):
        b, o = base.get(section), over.get(section)
        if isinstance(b, dict) and isinstance(o, dict) and "name" in o and b.get("name", o["name"]) != o["name"]:
            if section == "optim":
                fields = _optim_variant(o["name"]).model_fields if _optim_variant(o["name"]) else {}
                out[section] = {k: v for k, v in out[section].items() if k in fields or k in o}
            else:
                out[section] = copy.deepcopy(o)
    return out


def _optim_variant(name: str) -> type[_OptimBase] | None:
    return next((v for v in OPTIM_VARIANTS if name in v.model_fields["name"].annotation.__args__), None)


def expanded_size(data: Any, bound: int) -> int | None:
    """How many values ``data`` holds once YAML aliases are expanded (a shared list counts
    once per reference), or None beyond ``bound`` or for a structure that contains itself.
    ``yaml.safe_load`` keeps an alias as a shared reference, so a file of a few hundred
    bytes can stand for 10**9 values; any walk of it (validation, merging, dumping) takes
    forever. Counted once per distinct node (memoised by identity), so the count itself is
    fast whatever the expansion.

    Example:
        >>> leaf = [0] * 10
        >>> bomb = [leaf] * 10
        >>> for _ in range(7):
        ...     bomb = [bomb] * 10
        >>> expanded_size({"a": [1, 2]}, 100)  # the mapping, its key, the list, its two values
        5
        >>> expanded_size(bomb, 10**6) is None  # 10**9 values in 9 shared lists
        True
        >>> loop = []; loop.append(loop); expanded_size(loop, 100) is None
        True
    """
    sizes: dict[int, int | None] = {}

    def count(node: Any) -> int | None:
        if not isinstance(node, (dict, list, tuple)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]  # None while in progress: the node contains itself
        sizes[key] = None
        total = 1
        for child in (node.items() if isinstance(node, dict) else node):
            sub = count(child[1]) if isinstance(node, dict) else count(child)
            if sub is None:
                return None
            total += sub + (isinstance(node, dict))  # a mapping's key is a value too
            if total > bound:
                return None
        sizes[key] = total
        return total

    return count(data)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a dict; a missing file, a YAML syntax error or a non-mapping is
    one :class:`~gammatrace.errors.UserError` naming the file (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a config") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: YAML syntax error{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot be read as a config ({exc.__class__.__name__}: {exc})") from None
    try:
        size = expanded_size(data, MAX_CONFIG_NODES)
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a config") from None
    if size is None:
        raise UserError(f"{path}: its YAML aliases expand to more than {MAX_CONFIG_NODES:,} values (or refer to "
                        "themselves); a config is far smaller: write the values out")
    if data is None:  # an empty (truncated, unsaved) file must not train the defaults
        raise UserError(f"{path} holds no settings (it is empty or all comments); write `{{}}` "
                        "to mean every default")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping, got {type(data).__name__}")
    return data
