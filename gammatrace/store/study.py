"""``study.json``: what a study folder holds, typed once for its writer and its readers.

A study folder is one run folder per cell × seed beside ``study.json``, which names the
study, maps every run to its cell, seed and group, and lists the claims the report
checks. :mod:`gammatrace.experiments.study` writes it, :mod:`gammatrace.reporting`
reads it; both go through :class:`StudyMeta`, so neither spells a key.

Example:
    >>> import tempfile
    >>> meta = StudyMeta(study="s", runs={"a-s0": "a"}, groups={"a-s0": "g"},
    ...                  claims=[Claim("a first", ("a", "b"), "g")])
    >>> folder = tempfile.mkdtemp()
    >>> meta.write(folder)
    >>> back = StudyMeta.load(StudyMeta.path(folder))
    >>> back == meta, back.cell("a-s0"), back.group("a-s0"), back.cell("other"), back.claims[0].order
    (True, 'a', 'g', 'other', (('a',), ('b',)))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gammatrace.principles.claims import ClaimError, Order, order_text, parse_order
from gammatrace.store.backend import location
from gammatrace.store.run import RunStore, StoreError, damaged

# A claim about differences: an item "a − b" of an order is, per seed, the γ of cell a minus
# the γ of cell b of the same seed ("skip connections are more effective in deeper resnets":
# "r34-all − r34-first > r18-all − r18-first"). Spelt with the minus sign U+2212, or " - "
# with spaces (cell names have none), which is read as it.
MINUS = " − "


def difference(name: str) -> tuple[str, str] | None:
    """The two cells of a difference item ``"a − b"``, None for a plain cell.

    Example:
        >>> difference("resnet34-all − resnet34-first"), difference("resnet34-all")
        (('resnet34-all', 'resnet34-first'), None)
    """
    if MINUS not in name:
        return None
    parts = [part.strip() for part in name.split(MINUS)]
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise ClaimError(f"a difference item names two different cells, 'a − b': got {name!r}")
    return parts[0], parts[1]


def _minus(order: Any) -> Any:
    """``" - "`` (spaced ASCII hyphen) spelt as the minus sign in every item of ``order``."""
    if isinstance(order, str):
        return order.replace(" - ", MINUS)
    if isinstance(order, (list, tuple)):
        return type(order)(_minus(x) for x in order)
    return order


class Claim(BaseModel):
    """A paper's claim about a set of cells: ``order`` is a weak order of them by γ,
    largest first, as levels (cells of one level are tied: "a ≈ b" asserts no order
    between them; written ``"a ≈ b > c"`` or as a list, see
    :func:`~gammatrace.principles.claims.parse_order`); ``group`` is the network /
    dataset it is checked in (None: the study's only group); ``source`` where a paper
    states it (file and quoted phrase; None for a hypothesis no paper states).

    Example:
        >>> Claim("ReLU first", ["relu", "tanh"]).order
        (('relu',), ('tanh',))
        >>> c = Claim("ReLU types first", "relu ≈ leaky_relu > tanh")
        >>> c.cells, c.order_text
        (('relu', 'leaky_relu', 'tanh'), 'relu ≈ leaky_relu > tanh')
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str
    order: tuple[tuple[str, ...], ...]
    group: str | None = None
    source: str | None = None
    # A claim the paper states over a window ("in the first 20 epochs"): its statistics
    # use the steps of epochs 0 … first_epochs − 1 only. None: the whole run.
    first_epochs: int | None = Field(None, ge=1)
    # An equivalence margin δ for the order's ties ("comparable γ"): each tie a ≈ b gets its
    # own verdict, |γ_a − γ_b| < δ by two one-sided exact tests. None: ties are not tested.
    equivalent_within: float | None = Field(None, gt=0)
    # The order of convergence speed the paper states (fastest first), checked by the same
    # rule on −epochs beside the γ verdict. None: the paper states none for this claim.
    speed: tuple[tuple[str, ...], ...] | None = None

    # Positional construction, Claim(text, order, group), reads like the claim it states.
    def __init__(self, text: str, order: str | Sequence[Any], group: str | None = None,
                 source: str | None = None, first_epochs: int | None = None,
                 equivalent_within: float | None = None, speed: str | Sequence[Any] | None = None) -> None:
        super().__init__(text=text, order=order, group=group, source=source, first_epochs=first_epochs,
                         equivalent_within=equivalent_within, speed=speed)

    @field_validator("order", mode="before")
    @classmethod
    def _levels(cls, value: Any) -> Order:
        # A study.json of an earlier version stores a strict order as a list of names.
        order = parse_order(_minus(value))
        for level in order:
            for name in level:
                difference(name)  # a malformed difference item is refused here
        return order

    @field_validator("speed", mode="before")
    @classmethod
    def _speed_levels(cls, value: Any) -> Order | None:
        return None if value is None else parse_order(value)

    @property
    def differences(self) -> dict[str, tuple[str, str]]:
        """The order's items that are differences of two cells, ``"a − b"`` -> (a, b).

        Example:
            >>> Claim("deeper", "r34-all − r34-first > r18-all − r18-first").differences["r34-all − r34-first"]
            ('r34-all', 'r34-first')
        """
        return {name: pair for level in self.order for name in level if (pair := difference(name)) is not None}

    @property
    def cells(self) -> tuple[str, ...]:
        """The runs' cells the claim needs, in claimed order (tied cells side by side; a
        difference ``"a − b"`` needs a and b).

        Example:
            >>> Claim("deeper", "r34-all − r34-first > r18-all − r18-first").cells
            ('r34-all', 'r34-first', 'r18-all', 'r18-first')
        """
        return tuple(c for level in self.order for name in level for c in (difference(name) or (name,)))

    @property
    def order_text(self) -> str:
        return order_text(self.order)

    @property
    def window_text(self) -> str:
        """What the claim's statistics cover, in words.

        Example:
            >>> Claim("t", "a > b", first_epochs=20).window_text, Claim("t", "a > b").window_text
            ('the first 20 epochs', 'the whole run')
        """
        return f"the first {self.first_epochs} epochs" if self.first_epochs else "the whole run"


class StudyMeta(BaseModel):
    """``study.json``: the study's name, question and preset, its runs' cells, seeds and
    groups (by run name), and its claims.

    Example:
        >>> meta = StudyMeta.load({"study": "s", "runs": {"a-s0": "a"}, "claims": [{"text": "t", "order": ["a"]}]})
        >>> meta.cell("a-s0"), meta.group("a-s0"), meta.claims[0].order
        ('a', 'all', (('a',),))
    """

    # Fields written by later versions are kept, not lost, when an older one reads the file.
    model_config = ConfigDict(extra="allow")

    FILE: ClassVar[str] = "study.json"

    study: str = "study"  # the study's name
    question: str = ""
    preset: str = ""
    seeds: int = Field(1, ge=1)
    shared_init: bool = False
    runs: dict[str, str] = {}  # run name -> cell
    seed_of: dict[str, int] = {}  # run name -> seed index
    groups: dict[str, str] = {}  # run name -> group
    claims: list[Claim] = []
    # Cells whose optimization paths (first seed) the report draws, each on its own PCA
    # plane with the SGD direction projected (paper 002, Fig. 12).
    paths: list[str] = []

    @property
    def name(self) -> str:
        """The study's name (``study`` in the file)."""
        return self.study

    def cell(self, run: str) -> str:
        """The cell of ``run`` (a run the study does not name is a cell of its own)."""
        return self.runs.get(run, run)

    def group(self, run: str) -> str:
        """The group of ``run`` ('all' when the study has none for it)."""
        return self.groups.get(run, "all")

    @classmethod
    def path(cls, folder: str | Path) -> Path:
        """Where a study folder keeps its ``study.json``."""
        return location(folder) / cls.FILE  # a URL for a study on object storage

    @classmethod
    def load(cls, source: str | Path | dict[str, Any] | StudyMeta) -> StudyMeta:
        """A ``study.json`` file, its parsed dict, or a StudyMeta (returned as is).

        A damaged file raises :class:`StoreError` naming the field.
        """
        if isinstance(source, StudyMeta):
            return source
        where = "study meta"
        if not isinstance(source, dict):
            path = location(source)
            where = str(path)
            source = RunStore(path.parent).read_json(path.name)
            if not isinstance(source, dict):
                raise StoreError(f"{where} is damaged: expected a JSON object, got {type(source).__name__}")
        try:
            return cls.model_validate(source)
        except ValidationError as exc:
            raise damaged(where, exc) from None

    def write(self, folder: str | Path) -> None:
        """Write ``folder/study.json`` atomically."""
        RunStore(folder).write_json(self.FILE, self.model_dump(mode="json"))
