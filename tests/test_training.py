"""One training run's building blocks: the plan as checkpoints store it, hyperparameters, envs and model."""

from __future__ import annotations

import errno
import os
import signal
import threading
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import DQN

from rollback_rl.agents import RollbackDQN
from rollback_rl.callbacks import RollbackCallback
from rollback_rl.evaluation import EVAL_SEED_OFFSET
from rollback_rl.hyperparams import MAX_TIMESTEPS
from rollback_rl.training import (
    TrainingPlan,
    build_envs,
    build_model,
    check_action_space,
    check_env_id,
    create_run_folder,
    evaluation_callback,
    plan_setting,
    resolve_hyperparameters,
    run_is_complete,
    signals_held,
    write_final_files,
)
from rollback_rl.validation import UsageError


def plan(**changes) -> TrainingPlan:
    params, sources = resolve_hyperparameters("CartPole-v1", "dqn", RollbackDQN, overrides=[("learning_starts", "50")])
    values = dict(env_id="CartPole-v1", algo="dqn", algorithm=RollbackDQN, rollback=True, seed=3, steps=600,
                  eval_freq=200, eval_episodes=2, hyperparameters=params, hyperparameter_sources=sources,
                  run_dir=Path("runs/x"))
    return TrainingPlan(**{**values, **changes})


def test_a_plan_comes_back_from_its_checkpoint_json():
    original = plan(max_restores=None, cool_on_solve=None, command=["rollback-rl", "train"])
    restored = TrainingPlan.from_json(original.to_json(), Path("elsewhere"))
    assert restored.to_json() == original.to_json() and restored.max_restores is None
    assert restored.algorithm is RollbackDQN and restored.run_dir == Path("elsewhere")
    assert TrainingPlan.from_json({**original.to_json(), "rollback": False}, Path(".")).algorithm is DQN


@pytest.mark.parametrize("stored", [{"max_restores": 0}, {}])
def test_older_checkpoints_without_a_restore_limit_resume_with_none(stored):
    values = {key: value for key, value in plan().to_json().items() if key != "max_restores"}
    assert TrainingPlan.from_json({**values, **stored}, Path(".")).max_restores is None


def test_checkpoints_without_cool_on_solve_resume_as_they_started_and_a_bad_factor_is_refused():
    values = {key: value for key, value in plan().to_json().items() if key != "cool_on_solve"}
    assert plan().cool_on_solve == 0.1
    assert TrainingPlan.from_json(values, Path(".")).cool_on_solve is None  # made before 0.4.0: no such cooling
    assert TrainingPlan.from_json({**values, "cool_on_solve": 0.5}, Path(".")).cool_on_solve == 0.5
    with pytest.raises(UsageError, match=r"cool_on_solve must be a fraction in \(0, 1\], got 2"):
        TrainingPlan.from_json({**values, "cool_on_solve": 2}, Path("."))


@pytest.mark.parametrize(("changes", "max_restores", "cool_on_solve"), [({}, 2, 0.1),
                                                                        ({"max_restores": None, "cool_on_solve": None},
                                                                         None, None)])
def test_the_plans_rollback_settings_reach_the_rollback_callback(changes, max_restores, cool_on_solve):
    model, eval_env = build_model("CartPole-v1", RollbackDQN, plan().hyperparameters, seed=3)
    callback = evaluation_callback(plan(**changes), model, eval_env)
    assert isinstance(callback, RollbackCallback) and callback.callback is None  # no remedy after a restore
    assert callback.policy.max_restores == max_restores and callback.cool_on_solve == cool_on_solve


def test_hyperparameters_are_the_zoo_defaults_then_the_file_then_set(tmp_path):
    path = tmp_path / "dqn.yml"
    path.write_text("CartPole-v1:\n  learning_rate: 0.001\n  batch_size: 32\n")
    params, sources = resolve_hyperparameters("CartPole-v1", "dqn", DQN, str(path), [("batch_size", "16")])
    assert (params["learning_rate"], params["batch_size"], params["buffer_size"]) == (0.001, 16, 100_000)
    assert sources == ["RL Zoo defaults", str(path), "--set"]


def test_a_hyperparameter_the_algorithm_refuses_is_a_usage_error():
    with pytest.raises(UsageError, match="learning_rat"):
        resolve_hyperparameters("CartPole-v1", "dqn", DQN, overrides=[("learning_rat", "1")])


def test_the_evaluation_env_is_seeded_apart_from_the_training_env():
    env, eval_env = build_envs("CartPole-v1", 3, {})
    first, _ = gym.make("CartPole-v1").reset(seed=3)
    first_eval, _ = gym.make("CartPole-v1").reset(seed=3 + EVAL_SEED_OFFSET)
    np.testing.assert_array_equal(env.reset()[0], first)
    np.testing.assert_array_equal(eval_env.reset()[0], first_eval)


def test_build_model_takes_its_settings_as_arguments():
    params = plan().hyperparameters
    model, _ = build_model("CartPole-v1", RollbackDQN, params, seed=3)
    assert type(model) is RollbackDQN and model.seed == 3 and model.learning_starts == 50
    with pytest.raises(UsageError, match="cannot make env NoSuchEnv-v0"):
        build_model("NoSuchEnv-v0", DQN, params, seed=0)


@pytest.mark.parametrize(("info", "complete"), [
    ({"interrupted": False, "timesteps_done": 600, "steps": 600}, True),
    ({"interrupted": True, "timesteps_done": 600, "steps": 600}, False),
    ({"interrupted": False, "timesteps_done": 400, "steps": 600}, False),
    ({"interrupted": False, "timesteps_done": "600", "steps": 600}, False),
    (None, False),
])
def test_a_run_is_complete_only_when_run_json_says_all_steps_ran(info, complete):
    assert run_is_complete(info) is complete


# -- a stored plan is data: checked as the command line is ----------------------------------------

@pytest.mark.parametrize(("changes", "words"), [
    ({"steps": "x"}, ["steps", "positive integer"]),
    ({"steps": 10**30}, ["steps", "MAX_TIMESTEPS"]),
    ({"eval_freq": 0}, ["eval_freq", "positive integer"]),
    ({"checkpoint_freq": -5}, ["checkpoint_freq", ">= 0"]),
    ({"eval_episodes": 10**20}, ["eval_episodes", "MAX_EPISODES"]),
    ({"seed": 2**40}, ["seed", "MAX_SEED"]),
    ({"drop": float("nan")}, ["drop", "fraction"]),
    ({"env_id": "os:Anything-v0"}, ["os:Anything-v0", "module"]),
    ({"env_id": "NoSuchEnv-v0"}, ["unknown env id"]),
    ({"algo": "evil"}, ["algo"]),
    ({"rollback": "yes"}, ["rollback", "true or false"]),
    ({"command": "rm -rf /"}, ["command", "list of strings"]),
    ({"steps": 100, "eval_freq": 200}, ["no evaluation would run"]),
    ({"hyperparameters": {"learning_rate": float("inf")}}, ["learning_rate", "finite"]),
    ({"hyperparameters": {"buffer_size": 10**13}}, ["buffer_size", "MAX_BUFFER_SIZE"]),
    ({"hyperparameters": {"n_envs": 10**8}}, ["n_envs", "MAX_N_ENVS"]),
    ({"hyperparameters": "dict(net_arch=[64])"}, ["hyperparameters", "mapping"]),
])
def test_a_plan_read_back_from_a_checkpoint_is_checked_as_the_command_line(changes, words):
    with pytest.raises(UsageError) as refused:
        TrainingPlan.from_json({**plan().to_json(), **changes}, Path("run"))
    for word in words:
        assert word in str(refused.value)


def test_a_plan_missing_a_setting_is_refused_by_name():
    values = plan().to_json()
    del values["eval_freq"]
    with pytest.raises(UsageError, match="no eval_freq"):
        TrainingPlan.from_json(values, Path("run"))
    with pytest.raises(UsageError, match="not a mapping"):
        TrainingPlan.from_json(["steps", 600], Path("run"))


@pytest.mark.parametrize(("name", "text", "value"), [("steps", "5_000", 5_000), ("seed", "0", 0),
                                                     ("drop", "0.25", 0.25), ("max_restores", "0", 0),
                                                     ("checkpoint_freq", "0", 0), ("cool_on_solve", "0.5", 0.5)])
def test_plan_settings_accept_what_the_command_line_types(name, text, value):
    assert plan_setting(name, text) == value


@pytest.mark.parametrize(("name", "text", "limit"), [("steps", str(MAX_TIMESTEPS + 1), "MAX_TIMESTEPS"),
                                                     ("eval_episodes", "9" * 20, "MAX_EPISODES"),
                                                     ("seed", str(2**32), "MAX_SEED"),
                                                     ("patience", "9" * 5_000, "positive integer")])
def test_plan_settings_over_their_limit_are_refused_naming_it(name, text, limit):
    with pytest.raises(ValueError, match=limit) as refused:
        plan_setting(name, text)
    assert len(str(refused.value)) < 200


def test_env_ids_that_name_a_module_are_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "planted_module.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for call in (lambda: check_env_id("planted_module:Nothing-v0"),
                 lambda: build_envs("planted_module:Nothing-v0", 0, {}),
                 lambda: TrainingPlan.from_json({**plan().to_json(), "env_id": "planted_module:Nothing-v0"}, tmp_path)):
        with pytest.raises(UsageError, match="module"):
            call()
    assert not marker.exists()


def test_an_algorithm_is_refused_an_action_space_it_cannot_act_in():
    expected = "RollbackDQN cannot run Pendulum-v1: its action space is Box, and RollbackDQN needs Discrete actions"
    with pytest.raises(UsageError, match=expected):
        check_action_space(RollbackDQN, gym.make("Pendulum-v1").action_space, "Pendulum-v1")
    check_action_space(RollbackDQN, gym.make("CartPole-v1").action_space, "CartPole-v1")


class WideObservations(gym.Env):
    """An env of 200,000-float observations: a replay buffer of 100,000 of them would take 160 GB."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (200_000,), dtype=np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(200_000, dtype=np.float32), {}

    def step(self, action):
        return np.zeros(200_000, dtype=np.float32), 0.0, True, False, {}


gym.register("tests/WideObservations-v0", entry_point=WideObservations)


def test_build_model_refuses_a_buffer_over_its_limit_on_the_env_spaces_before_allocating_it():
    params = {**plan().hyperparameters, "buffer_size": 100_000}
    with pytest.raises(UsageError, match="replay buffer would take 160,002,400,000 bytes.*MAX_BUFFER_BYTES"):
        build_model("tests/WideObservations-v0", RollbackDQN, params, seed=0)


# -- the run folder: created atomically, under a name no other run has -----------------------------

def test_two_runs_creating_the_same_folder_at_once_get_two_folders(tmp_path):
    wanted = tmp_path / "runs" / "CartPole-v1_dqn_s0_20250101-120000"
    made, start = [], threading.Barrier(8)

    def create():
        start.wait()
        made.append(create_run_folder(wanted, number_if_taken=True))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(path.name for path in made) == sorted([wanted.name] + [f"{wanted.name}-{n}" for n in range(2, 9)])


def test_a_named_run_folder_that_exists_is_refused_and_a_failed_one_leaves_no_parents(tmp_path):
    create_run_folder(tmp_path / "runs" / "mine")
    with pytest.raises(UsageError, match="already exists"):
        create_run_folder(tmp_path / "runs" / "mine")
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="cannot create the run folder"):
        create_run_folder(tmp_path / "file" / "runs" / "mine")
    with pytest.raises(UsageError, match="cannot create the run folder"):
        create_run_folder(tmp_path / "new" / "parents" / ("x" * 300))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "runs"]


# -- the final files: written together, or not at all -------------------------------------------

def test_final_files_that_cannot_all_be_written_leave_the_old_ones_untouched(tmp_path, monkeypatch):
    model, _ = build_model("CartPole-v1", RollbackDQN, plan().hyperparameters, seed=0)
    assert write_final_files(model, {"timesteps_done": 0}, tmp_path) is None
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert sorted(before) == ["model.safetensors", "model.zip", "run.json"]

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    model.num_timesteps = 123
    for name in ("save_model", "save_sb3_zip", "atomic_write_bytes"):  # the first, second or last write fails
        with monkeypatch.context() as patch:
            patch.setattr(f"rollback_rl.training.{name}", disk_full)
            error = write_final_files(model, {"timesteps_done": 123}, tmp_path)
        assert error is not None and "No space left on device" in error
        assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before, name


def test_signals_that_arrive_while_held_are_listed_and_do_not_interrupt():
    handler = signal.getsignal(signal.SIGINT)
    with signals_held() as arrived:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1_000):  # Python runs handlers between bytecodes
            pass
    assert arrived == [signal.SIGINT, signal.SIGTERM]
    assert signal.getsignal(signal.SIGINT) is handler
