"""Stable-Baselines3 callbacks: thin glue between SB3 and the core (snapshot ring, rollback policy, detectors)."""

from rollback_rl.callbacks.diagnostics import BufferRecord, ReplayBufferDiagnostics
from rollback_rl.callbacks.rollback import RollbackCallback, SelfRestoringModel
from rollback_rl.core.policy import RollbackEvent
from rollback_rl.sb3_state import sb3_training_state

__all__ = ["BufferRecord", "ReplayBufferDiagnostics", "RollbackCallback", "RollbackEvent", "SelfRestoringModel",
           "sb3_training_state"]
