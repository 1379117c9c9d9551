"""Where a preset's values come from: a phrase quoted from a paper in ``../shared/papers/``,
or "not stated" with the choice made where the paper is silent.

One provenance type for every study: the identity studies keep a :class:`Source` per value
(quoted through :func:`gammatrace.experiments.identity.sources.quote`, from the CS260 report),
the built-in studies' paper presets a table of :class:`Setting` rows — a run-config field
(dotted path), the cells it applies to, its value and its :class:`Source`
(:mod:`gammatrace.experiments.presets`). Reports print them; tests find every quoted phrase
in its paper file (whitespace-normalised: the stored text breaks lines and numbers them)
and compare every value with the built configs.

Example:
    >>> s = Source.quote("a mini-batch size 128", paper="001_954b36295a226970.txt")
    >>> s.stated, str(s)
    (True, '001_954b36295a226970.txt: “a mini-batch size 128”')
    >>> str(Source.not_stated("cuda: the papers train on GPUs of unstated kind"))
    'not stated — cuda: the papers train on GPUs of unstated kind'
    >>> phrase_in("a mini-batch\\n size 128", "mini-batch size"), phrase_in("a  b", "a b")
    (True, True)
    >>> row = Setting("batch_size", 128, s, cells=("unet-*", "vgg11-*"))
    >>> row.applies("unet-relu"), row.applies("vgg16-relu")
    (True, False)
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any


@dataclass(frozen=True)
class Source:
    """A value's provenance: ``phrase`` quoted from ``paper`` (a file name in the shared
    papers folder), or ``None`` and the ``choice`` made where the paper is silent (or
    contradicts itself). A quote's ``choice`` is the note on how it was read."""

    phrase: str | None = None
    choice: str = ""
    paper: str = ""

    def __post_init__(self) -> None:
        if self.phrase is not None and not self.paper:
            raise ValueError(f"a quoted source names its paper file: {self.phrase!r}")
        if self.phrase is None and not self.choice:
            raise ValueError("a value no paper states says what was chosen and why")

    @classmethod
    def quote(cls, phrase: str, note: str = "", *, paper: str | None = None) -> Source:
        """A value the paper states, in its own words (``note``: how it was read;
        ``paper``: the file, default the class's)."""
        return cls(phrase=phrase, choice=note) if paper is None else cls(phrase=phrase, choice=note, paper=paper)

    @classmethod
    def not_stated(cls, choice: str) -> Source:
        """A value the paper does not state, with what was chosen and why."""
        return cls(phrase=None, choice=choice)

    @property
    def stated(self) -> bool:
        return self.phrase is not None

    def __str__(self) -> str:
        if self.phrase is None:
            return f"not stated — {self.choice}"
        return f"{self.paper}: “{self.phrase}”" + (f" ({self.choice})" if self.choice else "")


@dataclass(frozen=True)
class Setting:
    """One row of a preset's provenance table: run-config ``field`` (a dotted path such as
    ``optim.lr``; ``study.<x>`` for a field of the study itself) has ``value`` in the cells
    whose names match the glob ``cells`` (or one of several globs), because of ``source``."""

    field: str
    value: Any
    source: Source
    cells: str | tuple[str, ...] = "*"

    def applies(self, cell: str) -> bool:
        globs = (self.cells,) if isinstance(self.cells, str) else self.cells
        return any(fnmatchcase(cell, g) for g in globs)


def normalise(text: str) -> str:
    """Runs of whitespace as one space (the stored papers break and indent lines)."""
    return " ".join(text.split())


def phrase_in(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text``, whitespace-normalised."""
    return normalise(phrase) in normalise(text)
