"""Test helpers: hand-made CartPole policies, injected faults, and exact state comparison."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback

from rollback_rl.callbacks import sb3_training_state
from rollback_rl.core.detectors import CollapseDetector, Score

# A tiny RL Zoo-format hyperparameter file: CartPole-v1 trains in seconds with it.
TINY_YAML = """\
CartPole-v1:
  learning_starts: 100
  batch_size: 32
  buffer_size: 1000
  train_freq: 4
  gradient_steps: 1
  target_update_interval: 50
  policy_kwargs: "dict(net_arch=[16])"
"""

# Push right when this dot product with (x, x_dot, theta, theta_dot) is positive.
CARTPOLE_BALANCER = (0.0, 0.0, 1.0, 0.2)  # 500 on every seed tried
CARTPOLE_WOBBLER = (0.0, 0.0, 0.0, 1.0)  # 138 to 278: a mediocre, noisy policy
CARTPOLE_WEAK = (0.0, 0.0, 1.0, 0.01)  # 49 to 191 (mean 90 over 40 seeds): a fall that is not to the floor


def set_linear_cartpole_policy(model: DQN, weights: tuple[float, ...]) -> None:
    """Make a DQN with ``net_arch=[]`` prefer action 1 exactly when ``weights . obs > 0``."""
    with torch.no_grad():
        for q_net in (model.policy.q_net, model.policy.q_net_target):
            layer = q_net.q_net[0]
            layer.weight.zero_()
            layer.bias.zero_()
            layer.weight[1] = torch.tensor(weights)


def linear_dqn(weights: tuple[float, ...], learning_rate: float, seed: int = 0, **kwargs: Any) -> DQN:
    """A DQN on CartPole-v1 whose greedy policy starts as the linear rule ``weights``."""
    settings = dict(learning_starts=0, train_freq=4, gradient_steps=1, target_update_interval=100,
                    exploration_initial_eps=0.0, exploration_final_eps=0.0, batch_size=32,
                    buffer_size=10_000, policy_kwargs=dict(net_arch=[]))
    settings.update(kwargs)
    model = DQN("MlpPolicy", "CartPole-v1", learning_rate=learning_rate, seed=seed, **settings)
    set_linear_cartpole_policy(model, weights)
    return model


def copy_training_state(model: BaseAlgorithm) -> dict[str, Any]:
    """An independent deep copy of everything a rollback must restore."""
    copied = {}
    for name, obj in sb3_training_state(model).items():
        copied[name] = obj.detach().clone() if isinstance(obj, torch.Tensor) else copy.deepcopy(obj.state_dict())
    return copied


def _tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_states_equal(expected: Any, actual: Any, path: str = "state") -> None:
    """Bitwise equality of nested states: the one exact comparison of the tests.

    Tensors and numpy arrays must have the same dtype and shape and the same bytes (so NaN equals NaN
    and -0.0 differs from 0.0); dicts the same keys, lists and tuples the same length, compared item by
    item; anything else compares with ``==``. The message names the first difference by its path.
    """
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: expected a tensor"
        assert expected.dtype == actual.dtype and expected.shape == actual.shape, f"{path}: dtype/shape differ"
        assert torch.equal(_tensor_bytes(expected), _tensor_bytes(actual)), f"{path}: values differ"
    elif isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), f"{path}: expected an array"
        assert expected.dtype == actual.dtype and expected.shape == actual.shape, f"{path}: dtype/shape differ"
        assert expected.tobytes() == actual.tobytes(), f"{path}: values differ"
    elif isinstance(expected, dict):
        assert set(expected) == set(actual), f"{path}: keys differ: {set(expected) ^ set(actual)}"
        for key in expected:
            assert_states_equal(expected[key], actual[key], f"{path}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), f"{path}: lengths differ"
        for index, (e, a) in enumerate(zip(expected, actual)):
            assert_states_equal(e, a, f"{path}[{index}]")
    else:
        assert expected == actual, f"{path}: {expected!r} != {actual!r}"


def states_equal(expected: Any, actual: Any) -> bool:
    try:
        assert_states_equal(expected, actual)
    except AssertionError:
        return False
    return True


class ScrambleAt(BaseCallback):
    """Injected fault: at ``timestep``, turn the policy's weights into garbage that fails the task."""

    def __init__(self, timestep: int, scramble=None) -> None:
        super().__init__()
        self.timestep = timestep
        self.scramble = scramble or self._negate_and_shake
        self.done_at: int | None = None

    @staticmethod
    def _negate_and_shake(model: BaseAlgorithm) -> None:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in model.policy.parameters():
                parameter.mul_(-1).add_(0.01 * torch.randn(parameter.shape, generator=generator))

    def _on_step(self) -> bool:
        if self.done_at is None and self.num_timesteps >= self.timestep:
            self.scramble(self.model)
            self.done_at = self.num_timesteps
        return True


class RecordState(BaseCallback):
    """Records a deep copy of the training state each time it runs (as a child or in a CallbackList).

    :param at_timesteps: only record at these timesteps (``None``: every call)
    """

    def __init__(self, at_timesteps: set[int] | None = None) -> None:
        super().__init__()
        self.at_timesteps = at_timesteps
        self.records: dict[int, dict[str, Any]] = {}

    def _on_step(self) -> bool:
        if self.at_timesteps is None or self.num_timesteps in self.at_timesteps:
            self.records[self.num_timesteps] = copy_training_state(self.model)
        return True


class CollapseAt(CollapseDetector):
    """Injected detection: judges the first score at or after ``timestep`` (and only it) a collapse."""

    def __init__(self, timestep: int) -> None:
        super().__init__(patience=1)
        self.timestep = timestep
        self.fired_at: int | None = None

    def is_bad(self, reference: Score, current: Score, floor: float) -> bool:
        if self.fired_at is None and current.timestep >= self.timestep:
            self.fired_at = current.timestep
        return current.timestep == self.fired_at
