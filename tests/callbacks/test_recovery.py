"""The remedies run after a rollback: each changes the dynamics it names, and only that."""

from __future__ import annotations

from types import SimpleNamespace

import gymnasium as gym
import pytest
import torch
from stable_baselines3 import DQN, PPO
from stable_baselines3.common.callbacks import CallbackList, EvalCallback
from stable_baselines3.common.monitor import Monitor

from helpers import CARTPOLE_BALANCER, CARTPOLE_WOBBLER, ScrambleAt, linear_dqn
from rollback_rl.buffers import ReservoirReplayBuffer
from rollback_rl.callbacks import RollbackCallback
from rollback_rl.callbacks.recovery import CoolLearningRate, DropRecentTransitions, ResetOptimizer, SlowTargetUpdates
from rollback_rl.callbacks.schedules import CoolOnSolve

torch.set_num_threads(1)


def _trained_dqn(steps: int = 600, **kwargs) -> DQN:
    settings = dict(learning_starts=100, train_freq=4, gradient_steps=1, batch_size=32, buffer_size=10_000,
                    policy_kwargs=dict(net_arch=[16]), seed=0)
    model = DQN("MlpPolicy", "CartPole-v1", **{**settings, **kwargs})
    model.learn(steps)
    return model


def _run(callback, model, restored_timestep: int | None = None) -> None:
    """Run ``callback`` once as RollbackCallback runs it after a restore from ``restored_timestep``."""
    callback.init_callback(model)
    if restored_timestep is not None:
        callback.parent = SimpleNamespace(rollbacks=[SimpleNamespace(restored_timestep=restored_timestep)])
    callback.on_step()


def test_reset_optimizer_zeroes_adam_moments_and_step_counts_in_place():
    model = _trained_dqn()
    state = model.policy.optimizer.state
    tensors_before = {id(v) for s in state.values() for v in s.values()}
    assert any(s["exp_avg_sq"].abs().sum() > 0 for s in state.values())

    _run(ResetOptimizer(), model)

    for s in state.values():
        assert torch.count_nonzero(s["exp_avg"]) == 0 and torch.count_nonzero(s["exp_avg_sq"]) == 0
        assert float(s["step"]) == 0.0
    assert {id(v) for s in state.values() for v in s.values()} == tensors_before  # snapshots keep their layout
    model.learn(100, reset_num_timesteps=False)  # Adam restarts cleanly: finite weights after more steps
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())


def test_cool_learning_rate_scales_the_schedule_so_sb3_does_not_undo_it_and_compounds():
    model = _trained_dqn(learning_rate=1e-3)
    cool = CoolLearningRate(0.1)
    _run(cool, model)
    model.learn(100, reset_num_timesteps=False)  # SB3 sets the optimizer's rate from lr_schedule each train()
    assert model.policy.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    cool.on_step()
    model.learn(100, reset_num_timesteps=False)
    assert model.policy.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_cool_learning_rate_stops_at_its_minimum():
    model = _trained_dqn(learning_rate=1e-3)
    cool = CoolLearningRate(0.1, min_learning_rate=5e-4)
    _run(cool, model)
    cool.on_step()
    assert model.lr_schedule(0.5) == pytest.approx(5e-4)


def test_cool_learning_rate_from_a_score_cools_only_after_restoring_weights_that_reach_it():
    model = _trained_dqn(learning_rate=1e-3)  # CartPole-v1: reward_threshold 475
    cool = CoolLearningRate(0.1, from_score="reward_threshold")
    cool.init_callback(model)
    for verified, restored, rate in ((300.0, 480.0, 1e-3),  # the fresh check decides: below 475, no cooling
                                     (None, 300.0, 1e-3),  # online mode: the snapshot's score
                                     (490.0, 300.0, 1e-4), (None, 475.0, 1e-5)):
        event = SimpleNamespace(verified_score=verified, restored_score=restored)
        cool.parent = SimpleNamespace(rollbacks=[event], eval_env=None)  # no eval env: the training env's spec
        cool.on_step()
        assert model.lr_schedule(0.5) == pytest.approx(rate)
    assert cool.skipped == 2
    with pytest.raises(ValueError, match="from_score"):
        CoolLearningRate(from_score="solved")


def test_drop_recent_transitions_rewinds_the_buffer_to_the_restored_snapshot():
    model = _trained_dqn(steps=600)
    # Called as inside collect_rollouts at timestep 600: 599 rows written; the snapshot of 400 saw 399.
    assert model.replay_buffer.pos == 600  # learn() returned after storing the 600th transition
    model.num_timesteps = 601
    _run(DropRecentTransitions(), model, restored_timestep=401)
    assert model.replay_buffer.pos == 400
    assert not model.replay_buffer.full


def test_drop_recent_transitions_leaves_a_wrapped_buffer_and_a_reservoir_alone():
    model = _trained_dqn(steps=600, buffer_size=300)
    position = model.replay_buffer.pos
    model.num_timesteps = 601
    _run(DropRecentTransitions(), model, restored_timestep=101)  # 500 rows since: more than the buffer holds
    assert model.replay_buffer.pos == position

    reservoir = _trained_dqn(steps=300, replay_buffer_class=ReservoirReplayBuffer)
    position = reservoir.replay_buffer.pos
    reservoir.num_timesteps = 301
    _run(DropRecentTransitions(), reservoir, restored_timestep=101)
    assert reservoir.replay_buffer.pos == position


def test_drop_recent_transitions_does_nothing_for_on_policy_algorithms():
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, seed=0)
    _run(DropRecentTransitions(), model, restored_timestep=1)  # no replay buffer: no error, no change


def test_slow_target_updates_multiplies_the_interval_up_to_its_cap():
    model = _trained_dqn(target_update_interval=100)
    slow = SlowTargetUpdates(10, max_interval=5_000)
    _run(slow, model)
    assert model.target_update_interval == 1_000
    slow.on_step()
    assert model.target_update_interval == 5_000


def test_remedies_in_a_callback_list_run_after_a_real_rollback_and_see_it():
    model = linear_dqn(CARTPOLE_BALANCER, learning_rate=1e-5, seed=1)
    drop, cool = DropRecentTransitions(), CoolLearningRate(0.1)
    rollback = RollbackCallback("CartPole-v1", eval_freq=500, n_eval_episodes=3, cool_on_solve=None,
                                callback_on_rollback=CallbackList([ResetOptimizer(), cool, drop]))
    model.learn(2000, callback=CallbackList([ScrambleAt(1200), rollback]))

    assert [e.timestep for e in rollback.rollbacks] == [1500]
    assert drop.parent is rollback and cool.parent is rollback
    assert model.lr_schedule(1.0) == pytest.approx(1e-6)
    # Rewound at 1500 to the snapshot of 1000, then 500 more transitions: 1,499 + 1 - 500 + 500 rows.
    assert model.replay_buffer.pos == 1500


def test_rollback_callback_runs_no_remedy_by_default_and_refuses_the_old_default_by_name():
    assert RollbackCallback().callback is None and RollbackCallback().policy.max_restores == 2
    with pytest.raises(ValueError, match=r"0.3.0's \"default\" was CallbackList\(\[ResetOptimizer\(\)"):
        RollbackCallback(callback_on_rollback="default")


@pytest.mark.parametrize("cool_on_solve, rate, cooled_at", [(0.1, 1e-6, 500), (None, 1e-5, None)])
def test_cool_on_solve_cuts_the_learning_rate_once_at_the_first_score_at_the_reward_threshold(cool_on_solve, rate,
                                                                                            cooled_at):
    model = linear_dqn(CARTPOLE_BALANCER, learning_rate=1e-5, seed=1)  # scores 500 >= 475 at every evaluation
    rollback = RollbackCallback("CartPole-v1", eval_freq=500, n_eval_episodes=3, cool_on_solve=cool_on_solve)
    model.learn(1500, callback=rollback)

    assert [score.mean for score in rollback.scores] == [500.0, 500.0, 500.0] and not rollback.rollbacks
    assert rollback.cooled_at == cooled_at
    assert model.lr_schedule(1.0) == pytest.approx(rate)  # once, not at each of the three solved scores
    model.learn(100, reset_num_timesteps=False)  # SB3 sets the optimizer's rate from lr_schedule each train()
    assert model.policy.optimizer.param_groups[0]["lr"] == pytest.approx(rate)


def test_cool_on_solve_waits_for_the_threshold_and_its_state_survives_a_checkpoint():
    model = linear_dqn(CARTPOLE_WOBBLER, learning_rate=1e-5, seed=1)  # 138 to 278: never solved
    rollback = RollbackCallback("CartPole-v1", eval_freq=500, n_eval_episodes=3)
    model.learn(1000, callback=rollback)
    assert rollback.cooled_at is None and model.lr_schedule(1.0) == pytest.approx(1e-5)

    state = rollback.state_dict()
    resumed = RollbackCallback("CartPole-v1")
    resumed.load_state_dict({**state, "cooled_at": 4_000})
    assert resumed.cooled_at == 4_000  # a cooled run does not cool again after a resume
    del state["cooled_at"]  # a checkpoint of 0.3.0, which had no such cooling
    resumed.load_state_dict(state)
    assert resumed.cooled_at is None
    for bad in (0, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="cool_on_solve"):
            RollbackCallback(cool_on_solve=bad)


@pytest.mark.parametrize("threshold, rate, cooled_at", [("reward_threshold", 1e-6, 500), (501.0, 1e-5, None)])
def test_cool_on_solve_under_eval_callback_cuts_the_rate_once_at_the_first_solved_evaluation(threshold, rate,
                                                                                           cooled_at):
    model = linear_dqn(CARTPOLE_BALANCER, learning_rate=1e-5, seed=1)  # 500 at every evaluation
    cool = CoolOnSolve(threshold)
    evaluation = EvalCallback(Monitor(gym.make("CartPole-v1")), eval_freq=500, n_eval_episodes=3, warn=False,
                              callback_after_eval=cool)
    model.learn(1500, callback=evaluation)
    assert evaluation.last_mean_reward == 500.0 and cool.cooled_at == cooled_at
    assert model.lr_schedule(1.0) == pytest.approx(rate)  # once, not at each of the three solved evaluations


def test_cool_on_solve_refuses_to_run_outside_eval_callback_and_bad_settings():
    model = linear_dqn(CARTPOLE_BALANCER, learning_rate=1e-5, seed=1)
    with pytest.raises(ValueError, match="callback_after_eval=CoolOnSolve"):
        model.learn(10, callback=CoolOnSolve())
    for bad in ({"factor": 0}, {"factor": 1.5}, {"threshold": "solved"}):
        with pytest.raises(ValueError):
            CoolOnSolve(**bad)
