"""Callbacks that change the learning schedule, meant to run after a rollback."""

from __future__ import annotations

from typing import Literal

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback

from rollback_rl.core.schedules import ScaledSchedule
from rollback_rl.evaluation import reward_threshold
from rollback_rl.tensorboard_layout import LEARNING_RATE_TAG


def scale_learning_rate(model: BaseAlgorithm, factor: float) -> float:
    """Multiply ``model``'s learning rate by ``factor`` for the rest of training, through ``model.lr_schedule``
    (the optimizer's rate is overwritten from it by SB3 before each training phase); log the new rate under
    ``rollback/learning_rate`` and return it."""
    model.lr_schedule = ScaledSchedule(model.lr_schedule, factor)
    rate = model.lr_schedule(model._current_progress_remaining)
    model.logger.record(LEARNING_RATE_TAG, rate)
    return rate


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
        rate = scale_learning_rate(self.model, factor)
        if self.verbose >= 1:
            print(f"Learning rate scaled by {factor:.3g} to {rate:.3g}")
        return True


class CoolOnSolve(BaseCallback):
    """Multiply the learning rate by ``factor`` once, at the first evaluation of its ``EvalCallback`` whose
    mean reaches ``threshold``; no rollback. Use as ``EvalCallback(eval_env, callback_after_eval=CoolOnSolve())``.

    This is the "hard control" of docs/protocol.md: on 40 held-out CartPole-v1 seeds it cut the training
    episodes that fail after the first solve against plain DQN (docs/results.md), which no rollback
    configuration did. Like ``RollbackCallback(cool_on_solve=...)`` it goes through ``model.lr_schedule``.

    :param threshold: the mean evaluation return that counts as solved; ``"reward_threshold"``: the
        evaluation env's ``spec.reward_threshold`` (never cools where it has none)
    :param factor: learning-rate multiplier, in (0, 1]
    """

    def __init__(self, threshold: float | Literal["reward_threshold"] = "reward_threshold", factor: float = 0.1,
                 verbose: int = 0) -> None:
        super().__init__(verbose=verbose)
        if isinstance(threshold, str) and threshold != "reward_threshold":
            raise ValueError(f'threshold must be a number or "reward_threshold", got {threshold!r}')
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
            raise ValueError(f"factor must be in (0, 1], got {factor!r}")
        self.threshold, self.factor = threshold, factor
        self.cooled_at: int | None = None  # the timestep of the evaluation that first reached the threshold

    def _init_callback(self) -> None:
        if not isinstance(self.parent, EvalCallback):
            raise ValueError("CoolOnSolve reads EvalCallback's evaluations: pass it as "
                             "EvalCallback(..., callback_after_eval=CoolOnSolve())")

    def _on_step(self) -> bool:
        threshold = self.threshold
        if threshold == "reward_threshold":
            threshold = reward_threshold(self.parent.eval_env)
        if self.cooled_at is None and threshold is not None and self.parent.last_mean_reward >= threshold:
            scale_learning_rate(self.model, self.factor)
            self.cooled_at = self.num_timesteps
            if self.verbose >= 1:
                print(f"Solved at timestep {self.num_timesteps}: learning rate x{self.factor:g} from now on")
        return True
