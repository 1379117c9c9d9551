"""The deterministic trainer: pass 1 (train + record + checkpoints) and pass 2 (verified replay)."""

from gammatrace.train.replay import ReplayMismatchError, replay
from gammatrace.train.session import DivergedError, build_session
from gammatrace.train.trainer import RunConflictError, train, train_pass

__all__ = ["DivergedError", "ReplayMismatchError", "RunConflictError", "build_session", "replay", "train", "train_pass"]
