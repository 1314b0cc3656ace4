"""Remedies run right after a rollback, so that the restored weights do not collapse again the same way.

Restoring the weights alone puts the agent back where it was, with the dynamics that made it collapse
still in place: the same learning rate, Adam's moment estimates, the replay buffer full of the collapsed
policy's transitions, the same target-network schedule. Each callback here changes one of these; give
one, or several in a ``CallbackList``, as ``RollbackCallback(callback_on_rollback=...)``. Each reads the
rollback that just happened from its ``RollbackCallback`` (``self.parent.rollbacks[-1]``) and how many
times that snapshot has now been restored, so a remedy can grow with repeated collapses.

- :class:`ResetOptimizer`: zero Adam's moment estimates and step counts (Asadi et al. 2023; Dohare et al.
  2023 trace policy collapse in deep RL to Adam's stale second-moment estimates).
- :class:`CoolLearningRate`: multiply the learning rate by ``factor`` for the rest of training, again at
  each rollback (large-model practice: go back to a checkpoint and continue with a lower rate).
- :class:`DropRecentTransitions`: rewind the replay buffer to where it stood when the restored snapshot
  was taken, so the collapsed policy's transitions are not replayed.
- :class:`SlowTargetUpdates`: sync the target network ``factor`` times less often from now on.
"""

from __future__ import annotations

from typing import Any, Literal

from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback

from rollback_rl.buffers import FifoReplayBuffer
from rollback_rl.callbacks.schedules import ScaleLearningRate
from rollback_rl.evaluation import reward_threshold
from rollback_rl.tensorboard_layout import (
    OPTIMIZER_RESET_TAG,
    TARGET_UPDATE_INTERVAL_TAG,
    TRANSITIONS_DROPPED_TAG,
)
from rollback_rl.validation import integer_at_least


def _last_rollback(callback: BaseCallback) -> Any:
    """The RollbackEvent that triggered ``callback`` (its parent is the RollbackCallback)."""
    parent = callback.parent
    rollbacks = getattr(parent, "rollbacks", None)
    if not rollbacks:
        raise RuntimeError(f"{type(callback).__name__} runs as RollbackCallback(callback_on_rollback=...)")
    return rollbacks[-1]


class ResetOptimizer(BaseCallback):
    """Zero the moment estimates and step counts of every optimizer of the model (in place).

    Adam's second-moment estimate decays slowly (beta2 = 0.999: about 1,000 steps); after a collapse it
    still describes the gradients that caused it, so the restored weights take steps sized for another
    regime. A reset makes the next steps start from a clean estimate (with Adam's bias correction).
    """

    def _on_step(self) -> bool:
        reset = 0
        for optimizer in _optimizers(self.model):
            for state in optimizer.state.values():
                for value in state.values():
                    if hasattr(value, "zero_"):
                        value.zero_()
                reset += 1
        self.logger.record(OPTIMIZER_RESET_TAG, reset)
        if self.verbose >= 1:
            print(f"Optimizer state reset ({reset} parameter tensors)")
        return True


def _optimizers(model: Any) -> list[Any]:
    state_dicts, _ = model._get_torch_save_params()
    optimizers = []
    for name in state_dicts:
        obj = model
        for part in name.split("."):
            obj = getattr(obj, part)
        if hasattr(obj, "param_groups"):
            optimizers.append(obj)
    return optimizers


class CoolLearningRate(ScaleLearningRate):
    """Multiply the learning rate by ``factor`` for the rest of training, once more at every rollback:
    ``ScaleLearningRate`` with the remedy's default of 0.1 and a factor that can only cool.

    Replaces ``model.lr_schedule`` (not the optimizer's rate, which SB3's ``_update_learning_rate``
    overwrites before each training phase), so it holds whatever schedule was in place.

    :param factor: multiplier per rollback, in (0, 1]
    :param min_learning_rate: never cool below this learning rate
    :param from_score: cool only after a rollback whose restored weights scored at least this (their fresh
        check, or their snapshot's score in online mode); ``"reward_threshold"``: the evaluation env's
        ``spec.reward_threshold`` (cool always where it has none). ``None``: cool after every rollback.
        Cooling before the task is learned can freeze an agent at a mediocre level; this keeps the
        cooling for weights worth consolidating.
    """

    def __init__(self, factor: float = 0.1, min_learning_rate: float = 0.0,
                 from_score: float | Literal["reward_threshold"] | None = None, verbose: int = 0) -> None:
        if not 0 < factor <= 1:
            raise ValueError(f"factor must be in (0, 1], got {factor!r}")
        if isinstance(from_score, str) and from_score != "reward_threshold":
            raise ValueError(f'from_score must be a number, "reward_threshold" or None, got {from_score!r}')
        super().__init__(factor, min_learning_rate, verbose=verbose)
        self.from_score = from_score
        self.skipped = 0  # rollbacks after which the rate was not cooled (restored weights below from_score)

    def _threshold(self) -> float | None:
        if self.from_score != "reward_threshold":
            return self.from_score
        env = getattr(self.parent, "eval_env", None)
        return reward_threshold(env if env is not None else self.model.get_env())

    def _on_step(self) -> bool:
        threshold = self._threshold()
        if threshold is not None:
            event = _last_rollback(self)
            restored = event.verified_score if event.verified_score is not None else event.restored_score
            if restored < threshold:
                self.skipped += 1
                return True
        return super()._on_step()


class DropRecentTransitions(BaseCallback):
    """Rewind the replay buffer to where it stood when the restored snapshot was taken.

    SB3's buffer is a ring with a write position: moving the position back makes the transitions
    collected since the snapshot unreachable for sampling (they are overwritten by the next ones). This is
    exact while the buffer has not wrapped around since the snapshot; once it has, the older transitions
    those slots held are gone and nothing is dropped (counted in ``rollback/transitions_dropped`` as 0).
    Off-policy algorithms only; with a rollout buffer (PPO, A2C) it does nothing: that buffer is
    emptied at every update anyway. Only first-in-first-out buffers (SB3's ``ReplayBuffer`` and
    ``rollback_rl.buffers.FifoReplayBuffer``): in a reservoir buffer the newest transitions are not the rows
    just before the write position, so nothing is dropped there.
    """

    def _on_step(self) -> bool:
        buffer = getattr(self.model, "replay_buffer", None)
        if type(buffer) not in (ReplayBuffer, FifoReplayBuffer):
            return True
        event = _last_rollback(self)
        n_envs = self.model.n_envs
        # In collect_rollouts the callback runs before the step's own transition is stored: at timestep t
        # the buffer holds t / n_envs - 1 rows written since the start of training.
        written_now = self.model.num_timesteps // n_envs - 1
        written_then = event.restored_timestep // n_envs - 1
        since = written_now - written_then
        dropped = 0
        if 0 < since < buffer.buffer_size and buffer.pos >= since:
            # (wrapping between the snapshot and now would need buffer.pos < since: not exact, skip it)
            buffer.pos -= since
            dropped = since * n_envs
        self.logger.record(TRANSITIONS_DROPPED_TAG, dropped)
        if self.verbose >= 1:
            print(f"Replay buffer rewound by {dropped} transitions")
        return True


class SlowTargetUpdates(BaseCallback):
    """Sync the target network ``factor`` times less often from now on (DQN-style algorithms), again at
    every rollback, up to ``max_interval`` timesteps: the bootstrapped targets then move more slowly
    away from the restored weights' values.

    :param factor: multiplier of ``target_update_interval`` per rollback, >= 1
    :param max_interval: never sync less often than every this many timesteps
    """

    def __init__(self, factor: int = 10, max_interval: int = 10_000, verbose: int = 0) -> None:
        super().__init__(verbose=verbose)
        self.factor = integer_at_least(1, factor, "factor")
        self.max_interval = integer_at_least(1, max_interval, "max_interval")

    def _on_step(self) -> bool:
        interval = getattr(self.model, "target_update_interval", None)
        if interval is None:
            return True
        self.model.target_update_interval = min(interval * self.factor, self.max_interval)
        self.logger.record(TARGET_UPDATE_INTERVAL_TAG, self.model.target_update_interval)
        return True

