"""The deterministic trainer: pass 1 (train + record + checkpoints) and pass 2 (verified replay).

Example:
    >>> import tempfile
    >>> from gammatrace.engine import replay, train_pass
    >>> cfg = {"name": "demo", "seed": 3, "epochs": 2, "batch_size": 32, "data": {"name": "digits", "n_train": 96, "n_test": 64}, "model": {"name": "mlp", "width": 8, "depth": 2}, "optim": {"name": "sgd", "lr": 0.2}}
    >>> run = train_pass(cfg, tempfile.mkdtemp() + "/demo", progress=False)
    >>> run.status, run.meta.horizon_epochs, len(run.record_steps())
    (<Status.TRAINED: 'trained'>, 2, 6)
    >>> replay(run.path, "last", progress=False)   # pass 2: every step verified bit for bit
    'last'
"""

from gammatrace.engine.hooks import OnePointConvexity
from gammatrace.engine.replay import ReplayMismatchError, replay
from gammatrace.engine.session import DivergedError, StepHook, StepHookFactory, build_session
from gammatrace.engine.trainer import RunConflictError, train_pass

__all__ = ["DivergedError", "OnePointConvexity", "ReplayMismatchError", "RunConflictError", "StepHook",
           "StepHookFactory", "build_session", "replay", "train_pass"]
