"""Callbacks that change the learning schedule, meant to run after a rollback."""

from __future__ import annotations

from stable_baselines3.common.callbacks import BaseCallback
from rollback_rl.core.schedules import ScaledSchedule
from rollback_rl.tensorboard_layout import LEARNING_RATE_TAG


class ScaleLearningRate(BaseCallback):
    """Multiply the model's learning rate by ``factor`` each time it runs, for the rest of training.

    Use as ``RollbackCallback(callback_on_rollback=ScaleLearningRate(0.5))``: after each rollback, training
    goes on from the restored weights with the learning rate multiplied by ``factor`` (like Keras'
    ``ReduceLROnPlateau``, triggered by collapses instead of plateaus). ``rollback-rl compare --arms
    rollback,rollback_lr_half`` measures what it changes.

    :param factor: multiplier per call, in (0, 1] to slow learning
    :param min_learning_rate: never go below this learning rate
    """

    def __init__(self, factor: float = 0.5, min_learning_rate: float = 0.0, verbose: int = 0) -> None:
        super().__init__(verbose=verbose)
        if not 0 < factor:
            raise ValueError(f"factor must be positive, got {factor!r}")
        self.factor = factor
        self.min_learning_rate = min_learning_rate

    def _on_step(self) -> bool:
        schedule = self.model.lr_schedule
        current = schedule(self.model._current_progress_remaining)
        factor = max(self.factor, self.min_learning_rate / current) if current > 0 else self.factor
        self.model.lr_schedule = ScaledSchedule(schedule, factor)
        self.logger.record(LEARNING_RATE_TAG, current * factor)
        if self.verbose >= 1:
            print(f"Learning rate scaled by {factor:.3g} to {current * factor:.3g}")
        return True
