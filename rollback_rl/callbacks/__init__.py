"""Stable-Baselines3 callbacks: thin glue between SB3 and the snapshot ring and collapse detectors."""

from rollback_rl.callbacks.diagnostics import BufferRecord, ReplayBufferDiagnostics
from rollback_rl.callbacks.rollback import RollbackCallback, RollbackEvent, sb3_training_state

__all__ = ["BufferRecord", "ReplayBufferDiagnostics", "RollbackCallback", "RollbackEvent", "sb3_training_state"]
