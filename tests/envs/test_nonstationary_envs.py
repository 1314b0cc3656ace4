"""Behaviour of the non-stationary CartPoles in ``rollback_rl.envs``."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from rollback_rl.envs import (
    DRIFTING_CARTPOLE_ID,
    SWITCHING_CARTPOLE_ID,
    TASK_NAMES,
    TASK_PRESETS,
    DriftingCartPole,
    ParameterDrift,
    SwitchingCartPole,
    register_envs,
)

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]

# CartPole-v1's own observation space has infinite velocity bounds; check_env warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:.*Box observation space (minimum|maximum) value:UserWarning")


def take_steps(env: gym.Env, actions: list[int]) -> list[tuple[Any, ...]]:
    """Step ``env`` through ``actions``, resetting (unseeded) after an episode ends; return every transition."""
    transitions = []
    for action in actions:
        observation, reward, terminated, truncated, info = env.step(action)
        transitions.append((observation, reward, terminated, truncated, info))
        if terminated or truncated:
            transitions.append(env.reset())
    return transitions


def balancing_actions(count: int) -> list[int]:
    """Alternating pushes, which keep the pole up for far longer than ``count`` <= 20 steps."""
    return [step % 2 for step in range(count)]


# --- registration ----------------------------------------------------------------------------


@pytest.mark.parametrize("env_id", [SWITCHING_CARTPOLE_ID, DRIFTING_CARTPOLE_ID])
def test_registered_env_passes_gymnasium_env_checker(env_id: str) -> None:
    env = gym.make(env_id)
    # pygame is not installed, so CartPole's render modes cannot be exercised.
    check_env(env.unwrapped, skip_render_check=True)
    env.close()


@pytest.mark.parametrize("env_class", [SwitchingCartPole, DriftingCartPole])
def test_directly_built_env_passes_gymnasium_env_checker(env_class: type[gym.Env]) -> None:
    # check_env assumes a seeded reset restores everything; that holds while the defaults keep the
    # physics still (25 000 steps before the first switch or drift), which is far past its few steps.
    check_env(env_class(), skip_render_check=True)


@pytest.mark.parametrize("env_id", [SWITCHING_CARTPOLE_ID, DRIFTING_CARTPOLE_ID])
def test_env_keeps_cartpole_v1_spaces_reward_and_time_limit(env_id: str) -> None:
    env = gym.make(env_id)
    cartpole = gym.make("CartPole-v1")
    assert env.observation_space == cartpole.observation_space
    assert env.action_space == cartpole.action_space
    assert env.spec is not None and env.spec.max_episode_steps == 500
    env.reset(seed=0)
    _, reward, _, _, _ = env.step(0)
    assert reward == 1.0


def test_register_envs_twice_changes_nothing_and_warns_nothing() -> None:
    specs_before = {env_id: gym.registry[env_id] for env_id in (SWITCHING_CARTPOLE_ID, DRIFTING_CARTPOLE_ID)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_envs()
        register_envs()
    for env_id, spec in specs_before.items():
        assert gym.registry[env_id] is spec


def test_module_prefixed_id_registers_envs_without_an_explicit_import() -> None:
    script = (
        "import gymnasium as gym\n"
        f"env = gym.make('rollback_rl.envs:{SWITCHING_CARTPOLE_ID}')\n"
        "print(env.reset(seed=0)[1]['task'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "default"


# --- task variants ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASK_NAMES)
def test_each_task_writes_its_physics_into_cartpole(task: str) -> None:
    env = SwitchingCartPole(tasks=(task,))
    env.reset(seed=0)
    physics = TASK_PRESETS[task]
    assert (env.gravity, env.masscart, env.masspole, env.length, env.force_mag) == (
        physics.gravity,
        physics.cart_mass,
        physics.pole_mass,
        physics.pole_half_length,
        physics.force_magnitude,
    )
    assert env.total_mass == physics.cart_mass + physics.pole_mass
    assert env.polemass_length == physics.pole_mass * physics.pole_half_length


def test_reversed_task_pushes_the_cart_the_other_way() -> None:
    standard = SwitchingCartPole(tasks=("default",))
    reversed_ = SwitchingCartPole(tasks=("reversed",))
    start, _ = standard.reset(seed=3)
    start_reversed, _ = reversed_.reset(seed=3)
    np.testing.assert_array_equal(start, start_reversed)

    pushed_right, *_ = standard.step(1)
    reversed_push, *_ = reversed_.step(1)
    cart_velocity = 1
    assert pushed_right[cart_velocity] > start[cart_velocity]
    assert reversed_push[cart_velocity] < start[cart_velocity]

    standard.reset(seed=3)
    reversed_.reset(seed=3)
    pushed_left, *_ = standard.step(0)
    reversed_left, *_ = reversed_.step(1)
    np.testing.assert_array_equal(pushed_left, reversed_left)


# --- switching schedule ----------------------------------------------------------------------


def test_step_schedule_switches_at_first_reset_after_boundary_never_mid_episode() -> None:
    env = SwitchingCartPole(tasks=("default", "reversed"), switch_every=10, unit="steps")
    _, info = env.reset(seed=0)
    assert info["task"] == "default"
    take_steps(env, balancing_actions(9))

    _, info = env.reset()
    assert info["task"] == "default", "9 steps are before the boundary at 10"
    transitions = take_steps(env, balancing_actions(4))
    assert env.num_steps == 13
    assert all(info["task"] == "default" for *_, info in transitions), "a switch must wait for a reset"

    _, info = env.reset()
    assert (info["task"], info["phase"]) == ("reversed", 1)
    *_, info = env.step(0)
    assert info["task"] == "reversed"


def test_step_schedule_switches_exactly_when_count_reaches_boundary() -> None:
    env = SwitchingCartPole(tasks=("default", "reversed"), switch_every=10, unit="steps")
    env.reset(seed=0)
    take_steps(env, balancing_actions(10))
    _, info = env.reset()
    assert info["task"] == "reversed"


def test_step_schedule_skips_a_task_shorter_than_the_episode_that_spans_it() -> None:
    env = SwitchingCartPole(tasks=("default", "reversed", "long_pole"), switch_at=(2, 4), unit="steps")
    env.reset(seed=0)
    take_steps(env, balancing_actions(5))
    _, info = env.reset()
    assert (info["task"], info["phase"]) == ("long_pole", 2)


def test_episode_schedule_runs_each_task_for_switch_every_episodes_then_holds_the_last() -> None:
    env = SwitchingCartPole(tasks=("default", "reversed", "default"), switch_every=2, unit="episodes")
    seen = []
    for episode in range(7):
        _, info = env.reset(seed=episode)
        seen.append((info["task"], info["phase"]))
        env.step(0)
    assert seen == [
        ("default", 0),
        ("default", 0),
        ("reversed", 1),
        ("reversed", 1),
        ("default", 2),
        ("default", 2),
        ("default", 2),
    ]


def test_switch_at_sets_uneven_task_lengths() -> None:
    env = SwitchingCartPole(tasks=("default", "long_pole", "default"), switch_at=(3, 4), unit="episodes")
    tasks = [env.reset()[1]["task"] for _ in range(6)]
    assert tasks == ["default", "default", "default", "long_pole", "default", "default"]


def test_info_names_task_and_its_id_on_reset_and_step() -> None:
    env = SwitchingCartPole(tasks=("heavy_pole",))
    _, reset_info = env.reset(seed=0)
    *_, step_info = env.step(1)
    expected = {"task": "heavy_pole", "task_id": TASK_NAMES.index("heavy_pole"), "phase": 0}
    assert reset_info == expected
    assert step_info == expected


def test_counters_count_the_envs_own_steps_and_episodes_through_wrappers() -> None:
    env = gym.make(SWITCHING_CARTPOLE_ID, switch_every=1, unit="episodes")
    env.reset(seed=0)
    take_steps(env, balancing_actions(5))
    env.reset(seed=0)  # a seeded reset reseeds the start state but must not rewind the schedule
    take_steps(env, balancing_actions(2))
    unwrapped = env.unwrapped
    assert isinstance(unwrapped, SwitchingCartPole)
    assert (unwrapped.num_steps, unwrapped.num_episodes_started) == (7, 2)
    assert unwrapped.task == "reversed"


def test_same_seed_and_actions_give_identical_transitions_across_a_switch() -> None:
    actions = list(np.random.default_rng(7).integers(0, 2, size=200))
    runs = []
    for _ in range(2):
        env = gym.make(SWITCHING_CARTPOLE_ID, tasks=("default", "reversed"), switch_every=20, unit="steps")
        runs.append([env.reset(seed=11), *take_steps(env, actions)])
    first, second = runs
    assert len(first) == len(second)
    for transition, replay in zip(first, second):
        for value, replayed in zip(transition, replay):
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value, replayed)
            else:
                assert value == replayed
    tasks_seen = {transition[-1]["task"] for transition in first}
    assert tasks_seen == {"default", "reversed"}, "the trajectory must cross a switch"


def test_set_task_pins_a_task_from_the_next_reset_until_unpinned() -> None:
    env = SwitchingCartPole()
    env.reset(seed=0)
    env.set_task("reversed")
    *_, info = env.step(0)
    assert info["task"] == "default", "pinning must not change the running episode"
    assert env.reset()[1]["task"] == "reversed"
    env.set_task(None)
    assert env.reset()[1]["task"] == "default"


# --- drifting physics ------------------------------------------------------------------------


def test_linear_drift_moves_from_start_to_end_then_holds() -> None:
    drift = ParameterDrift("pole_half_length", 0.5, 1.0, drift_begins_at=100, drift_steps=200)
    assert drift.value_at(0) == 0.5
    assert drift.value_at(100) == 0.5
    assert drift.value_at(200) == pytest.approx(0.75)
    assert drift.value_at(300) == 1.0
    assert drift.value_at(10_000) == 1.0


def test_sinusoidal_drift_reaches_end_after_drift_steps_and_returns_to_start() -> None:
    drift = ParameterDrift("force_magnitude", 10.0, 20.0, drift_begins_at=0, drift_steps=100, profile="sinusoidal")
    assert drift.value_at(0) == 10.0
    assert drift.value_at(50) == pytest.approx(15.0)
    assert drift.value_at(100) == pytest.approx(20.0)
    assert drift.value_at(200) == pytest.approx(10.0)


def test_drifting_env_holds_value_within_episode_and_updates_it_at_reset() -> None:
    env = DriftingCartPole(start_value=0.5, end_value=1.0, drift_begins_at=0, drift_steps=100)
    _, info = env.reset(seed=0)
    assert info == {"pole_half_length": 0.5}
    transitions = take_steps(env, balancing_actions(10))
    assert all(info["pole_half_length"] == 0.5 for *_, info in transitions)

    _, info = env.reset()
    assert info["pole_half_length"] == pytest.approx(0.55)
    assert env.length == pytest.approx(0.55)
    assert env.parameter_value == info["pole_half_length"]


def test_drifting_env_can_drift_another_parameter() -> None:
    env = gym.make(DRIFTING_CARTPOLE_ID, parameter="force_magnitude", start_value=10.0, end_value=5.0,
                   drift_begins_at=0, drift_steps=4)
    env.reset(seed=0)
    take_steps(env, balancing_actions(4))
    _, info = env.reset()
    assert info == {"force_magnitude": 5.0}
    assert env.unwrapped.force_mag == 5.0
    assert env.unwrapped.length == TASK_PRESETS["default"].pole_half_length


def test_drifting_env_is_deterministic_under_a_seed() -> None:
    actions = list(np.random.default_rng(3).integers(0, 2, size=60))
    runs = []
    for _ in range(2):
        env = DriftingCartPole(drift_begins_at=0, drift_steps=30, end_value=2.0)
        runs.append([env.reset(seed=5), *take_steps(env, actions)])
    for transition, replay in zip(*runs, strict=True):
        for value, replayed in zip(transition, replay):
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value, replayed)
            else:
                assert value == replayed
    assert len({transition[-1]["pole_half_length"] for transition in runs[0]}) > 1, "the drift must have moved"


# --- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ("default", "upside_down")}, "Unknown task 'upside_down'"),
        ({"tasks": "reversed"}, "not one string"),
        ({"tasks": ()}, "at least one task"),
        ({"switch_every": 0}, "switch_every must be a positive integer"),
        ({"switch_every": -5}, "switch_every must be a positive integer"),
        ({"switch_every": 2.5}, "switch_every must be a positive integer"),
        ({"unit": "hours"}, "unit must be 'steps' or 'episodes'"),
        ({"tasks": ("default", "reversed"), "switch_at": (5, 10)}, "one boundary per switch"),
        ({"tasks": ("default", "reversed", "default"), "switch_at": (10, 10)}, "strictly increasing"),
        ({"switch_every": 10, "switch_at": (5, 10)}, "not both"),
    ],
)
def test_switching_env_rejects_bad_arguments_with_a_one_line_message(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        SwitchingCartPole(**kwargs)
    assert "\n" not in str(error.value)


def test_bad_arguments_given_to_gym_make_raise_value_error() -> None:
    with pytest.raises(ValueError, match="unit must be"):
        gym.make(SWITCHING_CARTPOLE_ID, unit="hours")


def test_set_task_rejects_an_unknown_task() -> None:
    with pytest.raises(ValueError, match="Unknown task 'upside_down'"):
        SwitchingCartPole().set_task("upside_down")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"parameter": "pole_colour"}, "Unknown drift parameter 'pole_colour'"),
        ({"parameter": "actions_reversed"}, "Unknown drift parameter"),
        ({"drift_steps": 0}, "drift_steps must be a positive integer"),
        ({"drift_begins_at": -1}, "drift_begins_at must be a non-negative integer"),
        ({"profile": "cubic"}, "profile must be 'linear' or 'sinusoidal'"),
        ({"end_value": 0.0}, "end_value must be a positive pole_half_length"),
    ],
)
def test_drifting_env_rejects_bad_arguments_with_a_one_line_message(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        DriftingCartPole(**kwargs)
    assert "\n" not in str(error.value)
