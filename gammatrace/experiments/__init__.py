"""Studies, sweeps and the executors that run their tasks."""

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
