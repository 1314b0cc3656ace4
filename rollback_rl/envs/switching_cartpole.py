"""A CartPole whose physics switch between named task variants on a schedule (``rollback_rl/SwitchingCartPole-v0``).

The default schedule is the A -> B -> A experiment for recency-biased forgetting: standard CartPole
for 25 000 env steps, then reversed actions for 25 000, then standard CartPole again.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Literal, get_args

import numpy as np

from rollback_rl.envs.cartpole_variants import TASK_NAMES, CartPoleWithPhysics, physics_of_task

ScheduleUnit = Literal["steps", "episodes"]

DEFAULT_TASKS: tuple[str, ...] = ("default", "reversed", "default")
DEFAULT_SWITCH_EVERY = 25_000


def _is_integer(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _as_tuple(tasks: Sequence[str]) -> tuple[str, ...]:
    # A lone string is kept as is so that TaskSchedule can reject it with a helpful message.
    return tasks if isinstance(tasks, str) else tuple(tasks)


@dataclass(frozen=True)
class TaskSchedule:
    """Which task runs when: ``tasks[i]`` runs while the count is in ``[switch_at[i-1], switch_at[i])``.

    The last task runs from its boundary on, forever; repeat names in ``tasks`` to cycle.

    :param tasks: Task names (keys of ``TASK_PRESETS``) in the order they run.
    :param switch_at: Counts at which the schedule moves to the next task: strictly increasing
        positive integers, one fewer than ``tasks``.
    :param unit: What the counts count: ``"steps"`` (env steps) or ``"episodes"`` (episodes started).
    """

    tasks: tuple[str, ...]
    switch_at: tuple[int, ...]
    unit: ScheduleUnit = "steps"

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            raise ValueError(f"tasks must be a sequence of task names, not one string; use tasks=({self.tasks!r},).")
        if len(self.tasks) == 0:
            raise ValueError("tasks must name at least one task.")
        for name in self.tasks:
            physics_of_task(name)
        if self.unit not in get_args(ScheduleUnit):
            raise ValueError(f"unit must be 'steps' or 'episodes', got {self.unit!r}.")
        if len(self.switch_at) != len(self.tasks) - 1:
            raise ValueError(
                f"switch_at needs one boundary per switch ({len(self.tasks) - 1} for {len(self.tasks)} tasks), "
                f"got {len(self.switch_at)}."
            )
        previous = 0
        for boundary in self.switch_at:
            if not _is_integer(boundary) or boundary <= previous:
                raise ValueError(
                    f"switch_at must be strictly increasing positive integers (in {self.unit}), got {list(self.switch_at)}."
                )
            previous = boundary

    @classmethod
    def every(cls, tasks: Sequence[str], switch_every: int, unit: ScheduleUnit = "steps") -> TaskSchedule:
        """Run each task for ``switch_every`` units, in order.

        :raises ValueError: If ``switch_every`` is not a positive integer.
        """
        if not _is_integer(switch_every) or switch_every <= 0:
            raise ValueError(f"switch_every must be a positive integer number of {unit}, got {switch_every!r}.")
        return cls(
            tasks=_as_tuple(tasks),
            switch_at=tuple(switch_every * phase for phase in range(1, len(tasks))),
            unit=unit,
        )

    def phase_at(self, count: int) -> int:
        """Index into ``tasks`` of the task that runs when ``count`` units have passed."""
        return bisect.bisect_right(self.switch_at, count)


class SwitchingCartPole(CartPoleWithPhysics):
    """CartPole whose physics switch between named task variants on a schedule; switches apply at reset.

    At every reset the environment looks at its own counters (env steps taken, or episodes started
    before this one, since construction; a seeded reset does not rewind them) and runs the episode
    on the task the schedule gives for that count, so a switch never happens mid-episode: with
    ``switch_every=100, unit="steps"``, the first reset after the 100th step starts the next task.
    With ``unit="steps"``, a task shorter than an episode can be skipped: the reset lands on
    whichever task the count has reached.

    Give either ``switch_every`` or ``switch_at``; with neither, tasks switch every 25 000 steps.
    For per-task evaluation, build an eval env with one task (``tasks=("reversed",)``) or pin one
    with ``set_task``.

    ``info`` from ``reset`` and ``step`` holds ``"task"`` (name), ``"task_id"`` (position of the name
    in ``TASK_NAMES``, the same in every phase that runs that task) and ``"phase"`` (position in
    the schedule's ``tasks``, which tells the first A from the second in A -> B -> A).

    :param tasks: Task names (keys of ``TASK_PRESETS``) in the order they run; the last one runs forever.
    :param switch_every: Length of each task, in ``unit``.
    :param switch_at: Counts, in ``unit``, at which to move to the next task (one fewer than ``tasks``).
    :param unit: ``"steps"`` (env steps) or ``"episodes"`` (episodes started).
    :param render_mode: Passed to ``CartPoleEnv``.
    """

    def __init__(
        self,
        tasks: Sequence[str] = DEFAULT_TASKS,
        switch_every: int | None = None,
        switch_at: Sequence[int] | None = None,
        unit: ScheduleUnit = "steps",
        render_mode: str | None = None,
    ) -> None:
        if switch_every is not None and switch_at is not None:
            raise ValueError("Give switch_every or switch_at, not both.")
        if switch_at is not None:
            schedule = TaskSchedule(tasks=_as_tuple(tasks), switch_at=tuple(switch_at), unit=unit)
        else:
            every = DEFAULT_SWITCH_EVERY if switch_every is None else switch_every
            schedule = TaskSchedule.every(tasks, every, unit)
        self.schedule = schedule
        self.num_steps = 0
        """Env steps taken since construction."""
        self.num_episodes_started = 0
        """Resets since construction."""
        self._pinned_task: str | None = None
        self._task = schedule.tasks[0]
        self._phase = 0
        super().__init__(physics=physics_of_task(self._task), render_mode=render_mode)

    @property
    def task(self) -> str:
        """Name of the task the current episode runs."""
        return self._task

    @property
    def phase(self) -> int:
        """Position in ``schedule.tasks`` that the counters had reached at the last reset."""
        return self._phase

    def set_task(self, name: str | None) -> None:
        """Run task ``name`` from the next reset on, whatever the schedule says; ``None`` follows the schedule again.

        The counters keep counting while a task is pinned.

        :raises ValueError: If ``name`` is not one of ``TASK_NAMES``.
        """
        if name is not None:
            physics_of_task(name)
        self._pinned_task = name

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode on the task that the schedule (or ``set_task``) gives now."""
        count = self.num_steps if self.schedule.unit == "steps" else self.num_episodes_started
        self._phase = self.schedule.phase_at(count)
        self._task = self._pinned_task or self.schedule.tasks[self._phase]
        self.set_physics(physics_of_task(self._task))
        self.num_episodes_started += 1
        observation, _ = super().reset(seed=seed, options=options)
        return observation, self._task_info()

    def step(self, action: int | np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Step the current task's physics and count the step."""
        observation, reward, terminated, truncated, _ = super().step(action)
        self.num_steps += 1
        return observation, reward, terminated, truncated, self._task_info()

    def _task_info(self) -> dict[str, Any]:
        return {"task": self._task, "task_id": TASK_NAMES.index(self._task), "phase": self._phase}
