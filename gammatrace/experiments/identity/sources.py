"""Where a paper preset's values come from: a phrase quoted from the CS260 teacher–student
report (``../shared/papers/003_169288aa6363f27d.txt``), or "not stated" with the choice made.

Each paper preset of the identity studies carries one :class:`Source` per value (its
``SOURCES`` table); the report prints them, and a test finds every quoted phrase in the
paper file (whitespace-normalised: the stored text breaks lines and numbers them). The type
is the one provenance type of every study (:mod:`gammatrace.experiments.sources`), its
quotes here defaulting to the report's file.

Example:
    >>> s = Source.quote("we set learning rate as 0.1")
    >>> s.stated, str(s)
    (True, '003_169288aa6363f27d.txt: “we set learning rate as 0.1”')
    >>> str(Source.not_stated("batch 100, the quick preset's"))
    "not stated — batch 100, the quick preset's"
    >>> phrase_in("we set learning\\n 239 rate as 0.1", "learning rate"), phrase_in("a  b", "a b")
    (False, True)
    >>> from gammatrace.experiments import sources
    >>> isinstance(s, sources.Source)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

from gammatrace.experiments import sources
from gammatrace.experiments.sources import normalise, phrase_in

__all__ = ["PAPER", "Source", "normalise", "phrase_in"]

# The CS260 report "About SGD Convergence Analysis of NN with Non-linear Activation",
# as stored in the shared papers folder.
PAPER = "003_169288aa6363f27d.txt"


@dataclass(frozen=True)
class Source(sources.Source):
    """A value's provenance (:class:`gammatrace.experiments.sources.Source`), quoted from the
    CS260 report unless ``paper`` names another file."""

    paper: str = PAPER
