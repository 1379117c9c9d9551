"""Where a paper preset's values come from: a phrase quoted from the CS260 teacher–student
report (``../shared/papers/003_169288aa6363f27d.txt``), or "not stated" with the choice made.

Each paper preset of the identity studies carries one
:class:`~gammatrace.experiments.sources.Source` per value (its ``SOURCES`` table) — the one
provenance type of every study; :func:`quote` is its quote from the report's file. The
report prints them, and a test finds every quoted phrase in the paper file
(whitespace-normalised: the stored text breaks lines and numbers them).

Example:
    >>> s = quote("we set learning rate as 0.1")
    >>> s.stated, str(s)
    (True, '003_169288aa6363f27d.txt: “we set learning rate as 0.1”')
    >>> str(Source.not_stated("batch 100, the quick preset's"))
    "not stated — batch 100, the quick preset's"
    >>> phrase_in("we set learning\\n 239 rate as 0.1", "learning rate"), phrase_in("a  b", "a b")
    (False, True)
"""

from __future__ import annotations

from gammatrace.experiments.sources import Source, normalise, phrase_in

__all__ = ["PAPER", "Source", "normalise", "phrase_in", "quote"]

# The CS260 report "About SGD Convergence Analysis of NN with Non-linear Activation",
# as stored in the shared papers folder.
PAPER = "003_169288aa6363f27d.txt"


def quote(phrase: str, note: str = "") -> Source:
    """A value the CS260 report states, in its own words (``note``: how it was read)."""
    return Source.quote(phrase, note, paper=PAPER)
