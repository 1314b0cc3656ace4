"""Cart-pole physics as a value, the named task variants built from it, and a CartPole that runs any of them.

``CartPolePhysics`` holds every quantity a task variant changes. ``TASK_PRESETS`` names the variants
that the non-stationary environments switch between. ``CartPoleWithPhysics`` is gymnasium's
``CartPoleEnv`` (same spaces, reward 1 per step, same termination) whose physics can be replaced
between episodes; the switching and drifting environments decide *when* to replace them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv


@dataclass(frozen=True)
class CartPolePhysics:
    """The physical constants of one cart-pole task; the defaults are gymnasium's CartPole-v1.

    :param gravity: Downward acceleration, in m/s².
    :param cart_mass: Mass of the cart, in kg.
    :param pole_mass: Mass of the pole, in kg.
    :param pole_half_length: Half the length of the pole, in m (gymnasium's ``CartPoleEnv.length``).
    :param force_magnitude: Force of one push on the cart, in N.
    :param actions_reversed: If ``True``, action 0 pushes right and action 1 pushes left.
    """

    gravity: float = 9.8
    cart_mass: float = 1.0
    pole_mass: float = 0.1
    pole_half_length: float = 0.5
    force_magnitude: float = 10.0
    actions_reversed: bool = False

    def __post_init__(self) -> None:
        for name in CONTINUOUS_PARAMETERS:
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"CartPolePhysics.{name} must be positive, got {value}.")

    def replace(self, **changes: Any) -> CartPolePhysics:
        """Return a copy with the given fields changed (validated like a new instance)."""
        return dataclasses.replace(self, **changes)


CONTINUOUS_PARAMETERS: tuple[str, ...] = (
    "gravity",
    "cart_mass",
    "pole_mass",
    "pole_half_length",
    "force_magnitude",
)
"""Names of the ``CartPolePhysics`` fields that are real numbers (the ones a drift can move)."""

TASK_PRESETS: Mapping[str, CartPolePhysics] = MappingProxyType(
    {
        "default": CartPolePhysics(),
        "long_pole": CartPolePhysics(pole_half_length=1.0),
        "short_pole": CartPolePhysics(pole_half_length=0.25),
        "heavy_pole": CartPolePhysics(pole_mass=0.5),
        "strong_force": CartPolePhysics(force_magnitude=20.0),
        "weak_force": CartPolePhysics(force_magnitude=5.0),
        "reversed": CartPolePhysics(actions_reversed=True),
    }
)
"""The named task variants. Each differs from ``"default"`` in exactly one field."""

TASK_NAMES: tuple[str, ...] = tuple(TASK_PRESETS)
"""Task names in a fixed order; ``info["task_id"]`` is a position in this tuple."""


def physics_of_task(name: str) -> CartPolePhysics:
    """Return the physics of the named task variant.

    :raises ValueError: If ``name`` is not one of ``TASK_NAMES``.
    """
    if name not in TASK_PRESETS:
        raise ValueError(f"Unknown task {name!r}; choose one of: {', '.join(TASK_NAMES)}.")
    return TASK_PRESETS[name]


class CartPoleWithPhysics(CartPoleEnv):
    """Gymnasium's CartPole whose physical constants can be replaced, including reversed actions.

    Observation space, action space, reward (1 per step) and termination are exactly CartPole-v1's.
    Subclasses call ``set_physics`` from ``reset`` so that physics never change mid-episode.

    :param physics: The physics to start with.
    :param render_mode: Passed to ``CartPoleEnv`` (``None``, ``"human"`` or ``"rgb_array"``).
    """

    def __init__(
        self, physics: CartPolePhysics = TASK_PRESETS["default"], render_mode: str | None = None
    ) -> None:
        super().__init__(render_mode=render_mode)
        self.set_physics(physics)

    @property
    def physics(self) -> CartPolePhysics:
        """The physics the current episode runs on."""
        return self._physics

    def set_physics(self, physics: CartPolePhysics) -> None:
        """Write ``physics`` into the attributes ``CartPoleEnv.step`` reads; effective from the next step."""
        self._physics = physics
        self.gravity = physics.gravity
        self.masscart = physics.cart_mass
        self.masspole = physics.pole_mass
        self.total_mass = physics.pole_mass + physics.cart_mass
        self.length = physics.pole_half_length
        self.polemass_length = physics.pole_mass * physics.pole_half_length
        self.force_mag = physics.force_magnitude

    def step(self, action: int | np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Step CartPole, pushing the other way when the current physics reverse the actions."""
        # An invalid action is passed on unchanged so that CartPoleEnv's error names the action given.
        if self._physics.actions_reversed and self.action_space.contains(action):
            action = 1 - action
        return super().step(action)
