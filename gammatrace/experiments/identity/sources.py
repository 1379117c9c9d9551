"""Where a paper preset's values come from: a phrase quoted from the CS260 teacher–student
report (``../shared/papers/003_169288aa6363f27d.txt``), or "not stated" with the choice made.

Each paper preset of the identity studies carries one :class:`Source` per value (its
``SOURCES`` table); the report prints them, and a test finds every quoted phrase in the
paper file (whitespace-normalised: the stored text breaks lines and numbers them).

Example:
    >>> s = Source.quote("we set learning rate as 0.1")
    >>> s.stated, str(s)
    (True, '003_169288aa6363f27d.txt: “we set learning rate as 0.1”')
    >>> str(Source.not_stated("batch 100, the quick preset's"))
    "not stated — batch 100, the quick preset's"
    >>> phrase_in("we set learning\\n 239 rate as 0.1", "learning rate"), phrase_in("a  b", "a b")
    (False, True)
"""

from __future__ import annotations

from dataclasses import dataclass

# The CS260 report "About SGD Convergence Analysis of NN with Non-linear Activation",
# as stored in the shared papers folder.
PAPER = "003_169288aa6363f27d.txt"


@dataclass(frozen=True)
class Source:
    """A value's provenance: ``phrase`` quoted from ``paper``, or ``None`` and the ``choice``
    made where the paper is silent (or contradicts itself)."""

    phrase: str | None = None
    choice: str = ""
    paper: str = PAPER

    @classmethod
    def quote(cls, phrase: str, note: str = "") -> Source:
        """A value the paper states, in its own words (``note``: how it was read)."""
        return cls(phrase=phrase, choice=note)

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


def normalise(text: str) -> str:
    """Runs of whitespace as one space (the stored papers break and indent lines)."""
    return " ".join(text.split())


def phrase_in(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text``, whitespace-normalised."""
    return normalise(phrase) in normalise(text)
