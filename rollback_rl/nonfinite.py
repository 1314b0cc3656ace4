"""Keep NaN and infinite observations and rewards from the environment out of training.

A NaN observation fed to a Q-network makes every Q-value NaN; a NaN reward stored in the replay buffer
poisons every minibatch that samples it, for as long as it stays in the buffer. :class:`NonFiniteGuard`
stops both at the source, inside the ``Monitor`` wrapper (so episode returns stay finite too): a step
whose observation or reward is not finite **ends the episode** (``truncated=True``), reporting the last
finite observation and a reward of 0 instead. Truncated rather than terminated, because the
environment misbehaving says nothing about the value of the state (a terminal state would teach the
agent that it is worth nothing). A reset that gives a non-finite observation is retried, up to
``MAX_RESET_TRIES`` times in a row; then :class:`NonFiniteResetError` says the env cannot be trained on
(``rollback-rl train`` stops there, with the run so far saved).

:class:`LogNonFiniteCounts` writes the guard's running counts to the SB3 logger as
``rollback/nonfinite_observations`` and ``rollback/nonfinite_rewards`` (summed over envs).
"""

from __future__ import annotations

import math
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from rollback_rl.tensorboard_layout import NONFINITE_OBSERVATIONS_TAG, NONFINITE_REWARDS_TAG

MAX_RESET_TRIES = 10


class NonFiniteResetError(RuntimeError):
    """An env gave a non-finite observation at ``MAX_RESET_TRIES`` resets in a row: it cannot be trained on."""


def is_finite(observation: Any) -> bool:
    """Whether every number in ``observation`` (an array, a number, or a dict/tuple of them) is finite."""
    if isinstance(observation, np.ndarray):
        return observation.dtype.kind not in "fc" or bool(np.isfinite(observation).all())
    if isinstance(observation, dict):
        return all(is_finite(value) for value in observation.values())
    if isinstance(observation, tuple):
        return all(is_finite(value) for value in observation)
    if isinstance(observation, (float, np.floating)):
        return math.isfinite(observation)
    return True


class NonFiniteGuard(gym.Wrapper):
    """End the episode at the first non-finite observation or reward, and count them.

    ``nonfinite_observations`` and ``nonfinite_rewards`` count the steps that had one (a step with
    both counts in each). The step's ``info`` gets ``"nonfinite": "observation"`` or ``"reward"``.

    :param env: the environment to guard
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.nonfinite_observations = 0
        self.nonfinite_rewards = 0
        self._last_observation: Any = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        observation, info = self.env.reset(seed=seed, options=options)
        tries = 1
        while not is_finite(observation):
            self.nonfinite_observations += 1
            if tries == MAX_RESET_TRIES:
                raise NonFiniteResetError(f"{self.env}: reset gave a non-finite observation {MAX_RESET_TRIES} "
                                          "times in a row")
            observation, info = self.env.reset(options=options)
            tries += 1
        self._last_observation = observation
        return observation, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        bad_observation = not is_finite(observation)
        bad_reward = not math.isfinite(float(reward))
        if not (bad_observation or bad_reward):
            self._last_observation = observation
            return observation, reward, terminated, truncated, info
        info = dict(info)
        if bad_observation:
            self.nonfinite_observations += 1
            observation = self._last_observation
            info["nonfinite"] = "observation"
        if bad_reward:
            self.nonfinite_rewards += 1
            reward = 0.0
            info.setdefault("nonfinite", "reward")
        return observation, reward, terminated, not terminated, info


class LogNonFiniteCounts(BaseCallback):
    """Record the counts of every ``NonFiniteGuard`` in the training env at the end of each rollout."""

    def _on_rollout_end(self) -> None:
        env = self.model.get_env()
        if env is None or not env.has_attr("nonfinite_observations"):
            return
        self.logger.record(NONFINITE_OBSERVATIONS_TAG, sum(env.get_attr("nonfinite_observations")))
        self.logger.record(NONFINITE_REWARDS_TAG, sum(env.get_attr("nonfinite_rewards")))

    def _on_step(self) -> bool:
        return True
