"""Evaluation: the evaluation env, the seeds of evaluation episodes, greedy episodes, and loading a saved
model to score it.

Seeds, so that no evaluation episode replays a training episode:

- training env: the run's ``seed`` (``make_vec_env(seed=seed)``);
- evaluations during training: an env seeded ``seed + EVAL_SEED_OFFSET`` (10,000);
- the final policy's score: greedy episodes reset with seeds from ``FINAL_SEED_OFFSET`` (1,000,000)
  on, far above both. ``rollback-rl evaluate --seed S`` uses ``1,000,000 + S + i`` for episode i;
  the experiments give run ``seed`` the block :func:`final_episode_seed` ``(seed) + i``
  (``1,000,000 + 1,000 * seed + i``), which ``rollback-rl evaluate --seed 1000*seed`` replays.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from rollback_rl.persistence.safe_io import SafeLoadError
from rollback_rl.persistence.safe_model import load_model, load_sb3_zip_safely
from rollback_rl.validation import UsageError

EVAL_SEED_OFFSET = 10_000  # evaluation episodes never share seeds with the training env's
FINAL_SEED_OFFSET = 1_000_000  # far above every seed used in training (seed, seed + EVAL_SEED_OFFSET)
FINAL_SEED_STRIDE = 1_000  # run seed k's final episodes use FINAL_SEED_OFFSET + 1000 * k + i


def make_eval_env(env: gym.Env | VecEnv | str) -> VecEnv:
    """A one-env VecEnv for evaluation from an env id, a gym.Env or a VecEnv (returned as is)."""
    if isinstance(env, VecEnv):
        return env
    if isinstance(env, str):
        try:
            gym.spec(env)
        except gym.error.Error as error:
            raise ValueError(f"unknown env id {env!r}: {error}") from None
        return DummyVecEnv([lambda: Monitor(gym.make(env))])
    if isinstance(env, gym.Env):
        return DummyVecEnv([lambda: Monitor(env)])
    raise TypeError(f"eval_env must be a gym.Env, a VecEnv or an env id string, got {type(env).__name__}")


def final_episode_seed(seed: int) -> int:
    """The reset seed of the first final-scoring episode of the run with seed ``seed`` (experiments)."""
    return FINAL_SEED_OFFSET + FINAL_SEED_STRIDE * seed


def greedy_returns(model: BaseAlgorithm, env: gym.Env, n_episodes: int, first_seed: int) -> list[float]:
    """Returns of ``n_episodes`` greedy episodes, episode i reset with seed ``first_seed + i``."""
    returns = []
    for episode in range(n_episodes):
        observation, _ = env.reset(seed=first_seed + episode)
        total, done = 0.0, False
        while not done:
            action, _ = model.predict(observation, deterministic=True)
            observation, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns


# -- a saved model to score -------------------------------------------------------------------------

def is_zip(path: Path) -> bool:
    """Whether ``path`` is a zip file (an SB3 ``.zip``), by its first bytes.

    :raises UsageError: if it cannot be read
    """
    try:
        with open(path, "rb") as file:
            return file.read(4) == b"PK\x03\x04"
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None


def load_model_for_evaluation(path: Path, env_id: str, algorithm: type[BaseAlgorithm] | None,
                              env_kwargs: dict[str, Any]) -> BaseAlgorithm:
    """Load a model to act with, without running any code the file holds.

    A ``.safetensors`` model (``safe_model.save_model``) is loaded as is; an SB3 ``.zip`` is read with
    ``load_sb3_zip_safely``, which needs ``algorithm`` and the env (its training settings that only
    the pickles hold are not needed to act, and are left at their defaults silently).

    :raises UsageError: if the file is refused (pickled code), corrupted, or not a model (or a ``.zip``
        comes without ``algorithm``)
    """
    try:
        if not is_zip(path):
            return load_model(path, device="cpu")
        if algorithm is None:
            raise ValueError("an SB3 .zip is read with the algorithm class that saved it: none given")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return load_sb3_zip_safely(path, algorithm, gym.make(env_id, **env_kwargs), device="cpu")
    except (SafeLoadError, OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise UsageError(f"cannot load {path}: {error}") from None


def reward_threshold(env: VecEnv | None) -> float | None:
    """The task's ``reward_threshold`` from its gymnasium spec (CartPole-v1: 475), if it has one."""
    try:
        spec = env.get_attr("spec", indices=[0])[0] if env is not None else None
    except (AttributeError, IndexError):
        return None
    threshold = getattr(spec, "reward_threshold", None)
    return float(threshold) if threshold is not None else None
