"""Studies: grids of runs that share a base config, their built-in presets, and the claims
their report checks (the executors that run their tasks are :mod:`gammatrace.executors`).

Example:
    >>> from gammatrace.experiments import STUDIES
    >>> STUDIES.names()
    ['activation', 'batchnorm', 'init', 'optimizer', 'skip', 'width']
    >>> study = STUDIES.get("activation")("quick", None)
    >>> study.name, study.preset
    ('activation', 'quick')
"""

from gammatrace.experiments import presets  # noqa: F401  (registers the built-in studies)
from gammatrace.experiments.study import (
    STUDIES,
    Claim,
    Study,
    make_study,
    run_study,
    study_from_yaml,
)

__all__ = ["STUDIES", "Claim", "Study", "make_study", "run_study", "study_from_yaml"]
