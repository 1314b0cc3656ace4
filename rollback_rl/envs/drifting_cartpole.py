"""A CartPole whose physics drift gradually with the env's age (``rollback_rl/DriftingCartPole-v0``).

By default the pole's half-length stays at 0.5 m for 25 000 env steps, so that a policy can be learnt
first, then grows linearly to 1.0 m over the next 50 000 steps and stays there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Literal, get_args

import numpy as np

from rollback_rl.envs.cartpole_variants import (
    CONTINUOUS_PARAMETERS,
    TASK_PRESETS,
    CartPolePhysics,
    CartPoleWithPhysics,
)

DriftProfile = Literal["linear", "sinusoidal"]


@dataclass(frozen=True)
class ParameterDrift:
    """How one physical parameter moves with the env step count.

    Before ``drift_begins_at`` the value is ``start_value``. ``"linear"`` then moves it in a straight
    line to ``end_value`` over ``drift_steps`` steps and holds it there; ``"sinusoidal"`` moves it
    along a half cosine to ``end_value`` over ``drift_steps`` steps, back to ``start_value`` over the
    next ``drift_steps``, and so on.

    :param parameter: Name of a real-valued ``CartPolePhysics`` field, e.g. ``"pole_half_length"``.
    :param start_value: Value before the drift, in the field's unit (m, kg, N or m/s²).
    :param end_value: Value at the end of the drift, in the same unit.
    :param drift_begins_at: Env steps before the drift starts.
    :param drift_steps: Env steps the drift takes from ``start_value`` to ``end_value``.
    :param profile: ``"linear"`` or ``"sinusoidal"``.
    """

    parameter: str
    start_value: float
    end_value: float
    drift_begins_at: int
    drift_steps: int
    profile: DriftProfile = "linear"

    def __post_init__(self) -> None:
        if self.parameter not in CONTINUOUS_PARAMETERS:
            raise ValueError(
                f"Unknown drift parameter {self.parameter!r}; choose one of: {', '.join(CONTINUOUS_PARAMETERS)}."
            )
        for name in ("start_value", "end_value"):
            value = getattr(self, name)
            if not isinstance(value, Real) or not value > 0:
                raise ValueError(f"{name} must be a positive {self.parameter}, got {value!r}.")
        if not _is_integer(self.drift_begins_at) or self.drift_begins_at < 0:
            raise ValueError(
                f"drift_begins_at must be a non-negative integer number of steps, got {self.drift_begins_at!r}."
            )
        if not _is_integer(self.drift_steps) or self.drift_steps <= 0:
            raise ValueError(f"drift_steps must be a positive integer number of steps, got {self.drift_steps!r}.")
        if self.profile not in get_args(DriftProfile):
            raise ValueError(f"profile must be 'linear' or 'sinusoidal', got {self.profile!r}.")

    def value_at(self, step: int) -> float:
        """The parameter's value once ``step`` env steps have been taken."""
        progress = max(step - self.drift_begins_at, 0) / self.drift_steps
        if self.profile == "linear":
            fraction = min(progress, 1.0)
        else:
            fraction = (1.0 - math.cos(math.pi * progress)) / 2.0
        return float(self.start_value + (self.end_value - self.start_value) * fraction)


class DriftingCartPole(CartPoleWithPhysics):
    """CartPole in which one physical parameter drifts with the env's own step count.

    The value is recomputed at every reset from the env steps taken since construction (a seeded
    reset does not rewind them) and held for the whole episode, so physics never change
    mid-episode; episodes last at most 500 steps, so the drift still looks gradual. All other
    physics are CartPole-v1's. ``info[parameter]`` from ``reset`` and ``step`` holds the value the
    episode runs on.

    :param parameter: Name of the real-valued ``CartPolePhysics`` field that drifts.
    :param start_value: Value before the drift, in the field's unit (m for ``pole_half_length``).
    :param end_value: Value at the end of the drift, in the same unit.
    :param drift_begins_at: Env steps before the drift starts.
    :param drift_steps: Env steps the drift takes from ``start_value`` to ``end_value``.
    :param profile: ``"linear"`` (then hold ``end_value``) or ``"sinusoidal"`` (oscillate between the two).
    :param render_mode: Passed to ``CartPoleEnv``.
    """

    def __init__(
        self,
        parameter: str = "pole_half_length",
        start_value: float = 0.5,
        end_value: float = 1.0,
        drift_begins_at: int = 25_000,
        drift_steps: int = 50_000,
        profile: DriftProfile = "linear",
        render_mode: str | None = None,
    ) -> None:
        self.drift = ParameterDrift(
            parameter=parameter,
            start_value=start_value,
            end_value=end_value,
            drift_begins_at=drift_begins_at,
            drift_steps=drift_steps,
            profile=profile,
        )
        self.num_steps = 0
        """Env steps taken since construction."""
        super().__init__(physics=self._physics_at(0), render_mode=render_mode)

    @property
    def parameter_value(self) -> float:
        """Value of the drifting parameter in the current episode."""
        return float(getattr(self.physics, self.drift.parameter))

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode on the physics the drift has reached after ``num_steps`` steps."""
        self.set_physics(self._physics_at(self.num_steps))
        observation, _ = super().reset(seed=seed, options=options)
        return observation, self._drift_info()

    def step(self, action: int | np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Step the current episode's physics and count the step."""
        observation, reward, terminated, truncated, _ = super().step(action)
        self.num_steps += 1
        return observation, reward, terminated, truncated, self._drift_info()

    def _physics_at(self, step: int) -> CartPolePhysics:
        return TASK_PRESETS["default"].replace(**{self.drift.parameter: self.drift.value_at(step)})

    def _drift_info(self) -> dict[str, Any]:
        return {self.drift.parameter: self.parameter_value}


def _is_integer(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)
