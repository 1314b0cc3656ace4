"""Non-stationary CartPole environments, registered with gymnasium when this package is imported.

After ``import rollback_rl.envs`` (or with the module named in the id,
``gym.make("rollback_rl.envs:rollback_rl/SwitchingCartPole-v0")``):

- ``rollback_rl/SwitchingCartPole-v0``: physics switch between named task variants on a schedule
  (``SwitchingCartPole``); by default standard -> reversed actions -> standard, 25 000 steps each.
- ``rollback_rl/DriftingCartPole-v0``: one physical parameter drifts with the env's age
  (``DriftingCartPole``); by default the pole lengthens.

Both keep CartPole-v1's spaces and reward, and are cut at 500 steps by ``gym.make``'s ``TimeLimit``.

Gymnasium 1.x no longer loads the ``gymnasium.envs`` entry points that ``pyproject.toml`` declares
(gymnasium 0.x did), so importing this package is what registers the environments; ``register_envs``
stays as that entry point's target.
"""

from __future__ import annotations

import gymnasium as gym

from rollback_rl.envs.cartpole_variants import TASK_NAMES, TASK_PRESETS, CartPolePhysics, CartPoleWithPhysics
from rollback_rl.envs.drifting_cartpole import DriftingCartPole, ParameterDrift
from rollback_rl.envs.switching_cartpole import SwitchingCartPole, TaskSchedule

SWITCHING_CARTPOLE_ID = "rollback_rl/SwitchingCartPole-v0"
DRIFTING_CARTPOLE_ID = "rollback_rl/DriftingCartPole-v0"

_ENTRY_POINTS: dict[str, str] = {
    SWITCHING_CARTPOLE_ID: "rollback_rl.envs.switching_cartpole:SwitchingCartPole",
    DRIFTING_CARTPOLE_ID: "rollback_rl.envs.drifting_cartpole:DriftingCartPole",
}


def register_envs() -> None:
    """Register this package's environments with gymnasium; calling it again changes nothing."""
    for env_id, entry_point in _ENTRY_POINTS.items():
        if env_id in gym.registry:
            continue
        # Same episode cap and reward threshold as CartPole-v1, so returns compare directly.
        gym.register(id=env_id, entry_point=entry_point, max_episode_steps=500, reward_threshold=475.0)


register_envs()

__all__ = [
    "DRIFTING_CARTPOLE_ID",
    "SWITCHING_CARTPOLE_ID",
    "TASK_NAMES",
    "TASK_PRESETS",
    "CartPolePhysics",
    "CartPoleWithPhysics",
    "DriftingCartPole",
    "ParameterDrift",
    "SwitchingCartPole",
    "TaskSchedule",
    "register_envs",
]
