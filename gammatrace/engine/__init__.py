"""The deterministic trainer: pass 1 (train + record + checkpoints) and pass 2 (verified replay)."""

from gammatrace.engine.replay import ReplayMismatchError, replay
from gammatrace.engine.session import DivergedError, build_session
from gammatrace.engine.trainer import RunConflictError, train_pass

__all__ = ["DivergedError", "ReplayMismatchError", "RunConflictError", "build_session", "replay", "train_pass"]
